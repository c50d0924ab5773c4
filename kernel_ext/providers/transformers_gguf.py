"""The local provider: a GGUF file dequantised into a Hugging Face Transformers model.

Loading is done by :mod:`kernel_ext.gguf.loader`; this module turns prompts into text with
``model.generate``: streaming through :class:`IncrementalDecoder`, stop strings, cooperative
stopping (timeouts) between tokens, greedy or seeded sampling.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PromptError, ProviderError, ProviderOutOfMemoryError
from ..prompt import render_chat_template
from .base import GenerationParams, GenerationResult, Health, StopCheck, TokenCallback
from .streaming import IncrementalDecoder

__all__ = ["TransformersGGUFProvider", "LocalModel"]


@dataclass
class LocalModel:
    """What the loader produced, plus what generation needs to know."""

    model: Any
    tokenizer: Any
    path: Path
    sha256: str
    device: str
    dtype: str
    chat_template: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


class TransformersGGUFProvider:
    """A loaded model behind the :class:`~kernel_ext.providers.base.Provider` protocol."""

    def __init__(self, name: str, local: LocalModel, *, template_caps: dict[str, Any] | None = None) -> None:
        self.name = name
        self.local: LocalModel | None = local
        self.template_caps = template_caps or {}

    @property
    def identity(self) -> str:
        """What makes answers of this provider interchangeable: the file's content hash."""
        return self.local.sha256 if self.local is not None else self.name

    def load(self) -> None:
        if self.local is None:
            raise ProviderError(f"model {self.name!r} was unloaded; load it again with %model load")

    def health(self) -> Health:
        return Health(self.local is not None, "loaded" if self.local is not None else "unloaded")

    def close(self) -> None:
        if self.local is None:
            return
        device = self.local.device
        self.local = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # --- prompts -------------------------------------------------------------------------------
    def build_prompt(self, prompt: str, params: GenerationParams) -> tuple[str, bool]:
        """The text fed to the tokenizer, and whether the chat template was used."""
        local = self._ready()
        template = local.chat_template
        use_chat = params.chat if params.chat is not None else bool(template)
        if use_chat and not template:
            raise PromptError(
                f"model {self.name!r} has no chat template (a base model completes plain text); "
                "drop --chat or use --no-chat"
            )
        if not use_chat:
            text = f"{params.system}\n\n{prompt}" if params.system else prompt
            return text, False
        messages = ([{"role": "system", "content": params.system}] if params.system else [])
        messages.append({"role": "user", "content": prompt})
        tok = local.tokenizer
        rendered = render_chat_template(
            template or "", messages, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "",
            **self.template_caps,
        )
        return rendered, True

    def _ready(self) -> LocalModel:
        if self.local is None:
            raise ProviderError(f"model {self.name!r} was unloaded; load it again with %model load")
        return self.local

    # --- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        on_token: TokenCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> GenerationResult:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        local = self._ready()
        text, used_chat = self.build_prompt(prompt, params)
        tok = local.tokenizer
        # A chat template writes its own BOS; plain text gets the tokenizer's default.
        enc = tok(text, return_tensors="pt", add_special_tokens=not used_chat)
        input_ids = enc["input_ids"].to(local.device)
        n_prompt = int(input_ids.shape[1])
        decoder = IncrementalDecoder(tok, params.stop, on_token)
        state = {"first": None, "n": 0, "timed_out": False}
        t0 = time.perf_counter()

        class _Stream(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                ids = value.reshape(-1).tolist()
                if state["first"] is None:
                    state["first"] = time.perf_counter() - t0
                state["n"] += len(ids)
                decoder.add(ids)

            def end(self) -> None:
                return None

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = decoder.stopped
                if not stop and should_stop is not None and should_stop():
                    state["timed_out"] = True
                    stop = True
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "streamer": _Stream(),
            "stopping_criteria": StoppingCriteriaList([_Stop()]),
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            "attention_mask": enc.get("attention_mask", torch.ones_like(input_ids)).to(local.device),
        }
        if params.greedy:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            gen_kwargs.update(do_sample=True, temperature=params.temperature,
                              top_p=params.top_p, top_k=params.top_k or None)
        devices = [torch.device(local.device).index or 0] if local.device.startswith("cuda") else []
        try:
            with torch.inference_mode(), torch.random.fork_rng(devices=devices):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                out = local.model.generate(input_ids, **gen_kwargs)
        except torch.OutOfMemoryError as e:
            raise ProviderOutOfMemoryError(
                f"{self.name}: out of memory while generating ({e}); try fewer --max-new-tokens, "
                "a smaller dtype or another device"
            ) from e
        total = time.perf_counter() - t0
        final = decoder.finish()
        generated = out[0, n_prompt:]
        eos_ids = _eos_ids(local)
        if state["timed_out"]:
            reason = "timeout"
        elif decoder.stopped or (len(generated) and int(generated[-1]) in eos_ids):
            reason = "stop"
        elif len(generated) >= params.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        return GenerationResult(
            text=final, prompt=prompt, model=self.name, provider=self.name,
            prompt_tokens=n_prompt, completion_tokens=int(state["n"]), finish_reason=reason,
            time_to_first_token_s=state["first"], total_s=total,
        )


def _eos_ids(local: LocalModel) -> set[int]:
    ids: set[int] = set()
    gc_eos = getattr(getattr(local.model, "generation_config", None), "eos_token_id", None)
    for value in (gc_eos, local.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
