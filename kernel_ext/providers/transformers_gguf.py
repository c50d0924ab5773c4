"""The local provider: a GGUF file dequantised into a Hugging Face Transformers model.

Loading is done by :mod:`kernel_ext.gguf.loader`; this module turns prompts into text with
:func:`kernel_ext.providers.decode.decode` (a lean loop in place of ``model.generate``):
streaming through :class:`IncrementalDecoder`, stop strings, cooperative stopping (timeouts)
between prompt chunks and between tokens, greedy or seeded sampling.

Cancellation contract: a deadline (``should_stop``) returns a result with ``finish_reason``
``"timeout"``; the stop button (a ``KeyboardInterrupt`` during prompt processing or decoding)
is caught and *returned* as a result with the partial text and ``finish_reason``
``"interrupted"``, never raised, so the caller can keep what was generated.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..budget import RequestGuard
from ..errors import PromptError, ProviderError, ProviderOutOfMemoryError
from ..prompt import render_chat_template
from .base import GenerationParams, GenerationResult, Health, StopCheck, TokenCallback
from .streaming import IncrementalDecoder

if TYPE_CHECKING:
    from .decode import Prepared

__all__ = ["LocalModel", "TransformersGGUFProvider"]


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
    # the conversion cache's root: decoding copies (int4 repacks, the head's screen) are kept
    # in the file's entry there (None: built in memory when needed)
    cache_dir: Path | None = None


class TransformersGGUFProvider:
    """A loaded model behind the :class:`~kernel_ext.providers.base.Provider` protocol."""

    def __init__(self, name: str, local: LocalModel, *, template_caps: dict[str, Any] | None = None,
                 decode_mode: str | Callable[[], str] = "exact", guard: RequestGuard | None = None,
                 on_use: Callable[[TransformersGGUFProvider], None] | None = None) -> None:
        self.name = name
        # a mode of kernel_ext.providers.decode.DECODE_MODES, or a callable read at each call
        # (the registry passes the live `KernelExt.decode_mode` setting)
        self.decode_mode = decode_mode
        self.local: LocalModel | None = local
        self.sha256 = local.sha256
        self.template_caps = template_caps or {}
        # budgets checked before tokenizing/prefilling (kernel_ext.budget)
        self.guard = guard or RequestGuard()
        # called at each use: the registry's residency touches its LRU and reloads an evicted
        # model (setting self.local and adding a note for the next result)
        self.on_use = on_use
        self.notes: list[str] = []

    def cache_identity(self) -> str:
        """The model file's content hash: answers stay valid for the same file, even unloaded."""
        return f"sha256:{self.sha256}"

    def load(self) -> None:
        self._ready()  # an evicted model is loaded again here (see on_use)

    def health(self) -> Health:
        if self.local is None and self.on_use is not None:
            return Health(True, "evicted; reloads on next use")
        return Health(self.local is not None, "loaded" if self.local is not None else "unloaded")

    def take_notes(self) -> list[str]:
        """Notes for the next result (an eviction reload), then forgotten."""
        notes, self.notes = self.notes, []
        return notes

    def close(self) -> None:
        self.on_use = None  # unloaded for good: nothing reloads it
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
        if self.on_use is not None:
            self.on_use(self)
        if self.local is None:
            raise ProviderError(f"model {self.name!r} was unloaded; load it again with %model load")
        return self.local

    def _mode(self) -> str:
        return self.decode_mode() if callable(self.decode_mode) else self.decode_mode

    def prepare_decode(self, mode: str | None = None) -> Prepared:
        """Build (or read from the conversion cache) the copies ``mode`` decodes with (default:
        the current ``decode_mode``), so the first generation does not wait for them."""
        return self._prepare(self._ready(), mode or self._mode())

    def _prepare(self, local: LocalModel, mode: str) -> Prepared:
        from ..gguf.cache import CacheError, entry_dir
        from .decode import Source, prepare

        entry = None
        if local.cache_dir is not None:
            try:
                entry = entry_dir(local.cache_dir, local.sha256)
            except CacheError:
                entry = None
        return prepare(local.model, mode, source=Source(local.path, entry))

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

        from .decode import DecodeResult, Sampling, decode

        local = self._ready()
        mode = self._mode()
        sampling = Sampling(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        tok = local.tokenizer
        decoder = IncrementalDecoder(tok, params.stop, on_token)
        out: DecodeResult | None = None
        request_notes: list[str] = []
        input_ids = None
        try:
            text, used_chat = self.build_prompt(prompt, params)
            # Budgets before work (kernel_ext.budget): the context and memory checks run before
            # the prompt is tokenized whole or prefilled. A chat template writes its own BOS.
            request = self.guard.prepare(local.model, tok, text,
                                         max_new_tokens=params.max_new_tokens,
                                         add_special_tokens=not used_chat, device=local.device,
                                         name=self.name)
            request_notes = list(request.notes)
            input_ids = request.input_ids.to(local.device)
            self._prepare(local, mode)
            # torch.manual_seed reseeds every CUDA device: fork them all, so the seed stays local
            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                out = decode(local.model, input_ids, max_new_tokens=params.max_new_tokens,
                             sampling=sampling, eos_ids=_eos_ids(local),
                             on_token=lambda t: decoder.add((t,)) or decoder.stopped,
                             should_stop=should_stop, mode=mode,
                             prefill_chunk=params.prefill_chunk)
        except KeyboardInterrupt:
            pass  # before decoding started (tokenising, preparing): nothing generated yet
        except torch.OutOfMemoryError as e:
            err = ProviderOutOfMemoryError(
                f"{self.name}: out of memory while generating ({e}); try fewer --max-new-tokens, "
                "a smaller dtype or another device"
            )
            if input_ids is not None:
                err.prompt_tokens = int(input_ids.shape[1])  # the retry's prefill chunk is half
            raise err from e
        final = decoder.finish()
        if out is None or out.finish_reason == "interrupted":
            reason = "interrupted"
        elif out.finish_reason == "cancelled":
            reason = "timeout"
        elif out.finish_reason == "length" and not decoder.stopped:
            reason = "length"
        else:
            reason = "stop"
        notes = [*self.take_notes(), *request_notes, *(out.notes if out is not None else [])]
        if out is not None and out.mode == "quantized":
            notes.append("quantized weights")  # numerics differ from the model's own: say so
        return GenerationResult(
            text=final, prompt=prompt, model=self.name, provider=self.name,
            prompt_tokens=out.prompt_tokens if out is not None else 0,
            completion_tokens=len(out.tokens) if out is not None else 0, finish_reason=reason,
            time_to_first_token_s=out.first_token_s if out is not None else None,
            total_s=out.total_s if out is not None else 0.0, notes=notes,
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
