"""Batched local generation with continuous batching (what ``%%infer --over`` runs locally).

Decoding one sequence at a time reads every weight once per token; a batch of B rows reads
them once for B tokens, which is where serving engines get their throughput. This engine
drives the Transformers model's own forward with a left-padded batch, a 2-D attention mask
and a ``DynamicCache``:

* **Left padding, one mask.** Every row's tokens end at the right edge of the cache; padded
  positions are masked out and each row's positions (RoPE) count its own tokens only, so a
  row computes what it would compute alone (up to the summation order of batched products:
  fp32 near-ties can pick another token, see ``tests/test_over.py``).
* **Continuous batching.** A row that finishes (EOS, stop string, ``max_new_tokens``,
  timeout) leaves the batch at once; the next waiting request is prefilled on its own and
  merged into the running cache (both sides padded on the left to the longer one), so a batch
  never waits for its longest member. Columns that no row uses any more are trimmed.
* **The LM head of the decode mode.** Given the model's :class:`~kernel_ext.providers.decode.
  Prepared` copies (what ``%%infer`` alone decodes with), the engine runs the model's body and
  picks greedy tokens through the same certified int4/int8 screen of the head
  (:mod:`kernel_ext.providers.head`: the token the float32 head picks, without reading it
  whole), and in ``decode_mode='quantized'`` computes with the same int4 linears. A batch of 16
  through the float32 head is compute-bound on a CPU (measured: ~3.5x the time of one row),
  the screen is not; uncertified rows and sampled rows get the full logits.
* **Sampling** mirrors the one-at-a-time loop (:mod:`kernel_ext.providers.decode`):
  temperature, top-k, top-p, ``softmax`` and ``torch.multinomial``, each row on its own
  generator seeded with the request's seed, so a seeded item gives the same tokens whatever
  else is in the batch (and the same as ``%%infer --seed`` alone, up to fp32 rounding).

Limits: only caches made of full-attention and sliding-window layers (Llama, Mistral, Qwen,
Phi, Gemma families); a request whose prompt plus ``max_new_tokens`` would not fit in the
model's sliding window is not batchable (:meth:`BatchEngine.fits`): the scheduler runs it
alone. :func:`default_batch_size` sizes batches from a KV-cache memory budget.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProviderError
from .decode import Prepared, Sampling, int4_forwards, sampling_probs
from .streaming import IncrementalDecoder

__all__ = ["BatchEngine", "BatchOutput", "BatchRequest", "default_batch_size", "kv_bytes_per_token"]

MAX_DEFAULT_BATCH = 16
"""The default batch size never goes above this (CPU decoding gains little beyond)."""


@dataclass
class BatchRequest:
    """One prompt to complete. ``tag`` is the caller's (returned with the output)."""

    tag: Any
    input_ids: Sequence[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout: float | None = None  # seconds from admission; None or 0: none


@dataclass
class BatchOutput:
    """What one request produced; ``finish_reason`` as in ``GenerationResult``."""

    request: BatchRequest
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "timeout"
    prompt_tokens: int
    first_token_s: float | None
    total_s: float


def kv_bytes_per_token(config: Any, dtype_bytes: int = 4) -> int:
    """Bytes of K and V cache one token takes in every layer: ``2 * layers * kv_heads *
    head_dim * dtype_bytes`` (from the model's config)."""
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_key_value_heads", None)
                or getattr(config, "num_attention_heads", 1) or 1)
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        hidden = int(getattr(config, "hidden_size", 0) or 0)
        head_dim = hidden // max(1, int(getattr(config, "num_attention_heads", 1) or 1))
    return 2 * layers * heads * int(head_dim) * dtype_bytes


def default_batch_size(config: Any, tokens_per_row: int, budget_bytes: int, *,
                       dtype_bytes: int = 4, cap: int = MAX_DEFAULT_BATCH) -> int:
    """Rows whose KV cache fits in ``budget_bytes``: each row holds at most ``tokens_per_row``
    tokens (prompt + new tokens); the logits of a decode step (``vocab * 4`` bytes per row)
    count too. At least 1, at most ``cap``.

    A simple estimate from the config (no activations, no allocator slack): the budget the
    caller passes should leave room for those (the scheduler gives it a quarter of the free
    memory the memory guard reports).
    """
    per_row = kv_bytes_per_token(config, dtype_bytes) * max(1, tokens_per_row)
    per_row += int(getattr(config, "vocab_size", 0) or 0) * 4
    if per_row <= 0:
        return 1
    return max(1, min(cap, int(budget_bytes // per_row)))


@dataclass
class _Row:
    request: BatchRequest
    decoder: IncrementalDecoder
    generator: Any
    start: float
    deadline: float | None
    tokens: list[int] = field(default_factory=list)
    first: float | None = None
    last: int = 0
    reason: str | None = None


class BatchEngine:
    """Continuous batching over one loaded Transformers causal LM; see the module docstring."""

    def __init__(self, model: Any, tokenizer: Any, *, eos_ids: Collection[int] = (),
                 prepared: Prepared | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model
        # the decode mode's copies: its head (screen) and int4 linears; None: the model's own
        self.prepared = prepared if prepared is not None and prepared.head is not None else None
        self.head = self.prepared.head if self.prepared is not None else None
        self.mode = self.prepared.mode if self.prepared is not None else "full"
        self.body = model if self.head is None else model.base_model
        self.screened = 0  # greedy tokens certified through the head's screen
        self.tokenizer = tokenizer
        self.eos = frozenset(int(e) for e in eos_ids)
        self.clock = clock
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (min(self.eos) if self.eos else 0)
        self.device = next(iter(model.parameters())).device
        self.window = _sliding_window(model.config)
        self.cache_arg = _cache_kwarg(model)
        # state of the running batch
        self._cache: Any = None
        self._mask: Any = None  # (B, T) long: 1 where a row has a token
        self._pos: Any = None  # (B,) long: the position of each row's next token
        self.steps = 0  # decode steps run (for tests and benchmarks)
        self.admissions: list[tuple[int, int]] = []  # (step, rows admitted) per prefill

    # --- what can be batched ---------------------------------------------------------------------
    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Why this model cannot be batched here, or None when it can."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=model.config)
        except Exception as e:  # noqa: BLE001 - an unusual config: say why, run one at a time
            return f"no dynamic cache for this model ({type(e).__name__}: {e})"
        kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
        odd = kinds - {"DynamicLayer", "DynamicSlidingWindowLayer"}
        if odd:
            return f"cache layers of kind {', '.join(sorted(odd))} are not batched"
        if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
            return "the model is offloaded by accelerate (its hooks own the forward)"
        return None

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a request stays inside the sliding window (always, without one)."""
        return self.window is None or prompt_tokens + max_new_tokens <= self.window - 1

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, requests: Iterable[BatchRequest], *, batch_size: int,
            on_done: Callable[[BatchOutput], None],
            on_step: Callable[[int], None] | None = None) -> None:
        """Complete every request, ``batch_size`` rows at most at a time; ``on_done`` gets each
        output as soon as its row finishes (in finishing order); ``on_step(tokens)`` after
        every forward with the number of new tokens it made."""
        import torch

        if batch_size < 1:
            raise ProviderError(f"batch size must be >= 1, got {batch_size}")
        queue = deque(requests)
        for r in queue:
            if r.max_new_tokens < 1:
                raise ProviderError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
            if not r.input_ids:
                raise ProviderError("a request has no prompt tokens")
        rows: list[_Row] = []
        self._cache = self._mask = self._pos = None
        linears = self.prepared.linears if self.prepared is not None else {}
        try:
            with torch.inference_mode(), int4_forwards(linears):
                while queue or rows:
                    if queue and len(rows) < batch_size:
                        new = [queue.popleft() for _ in range(min(batch_size - len(rows), len(queue)))]
                        rows = self._admit(rows, new)
                        if on_step is not None:
                            on_step(len(new))
                    else:
                        self._step(rows)
                        if on_step is not None:
                            on_step(len(rows))
                    rows = self._retire(rows, on_done)
        finally:
            self._cache = self._mask = self._pos = None

    def _admit(self, rows: list[_Row], new: list[BatchRequest]) -> list[_Row]:
        """Prefill ``new`` as a left-padded batch of its own and merge it into the running one."""
        import torch
        from transformers import DynamicCache

        now = self.clock()
        length = max(len(r.input_ids) for r in new)
        ids = torch.full((len(new), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), length), dtype=torch.long)
        for i, r in enumerate(new):
            n = len(r.input_ids)
            ids[i, length - n:] = torch.tensor(list(r.input_ids), dtype=torch.long)
            mask[i, length - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        last = self._forward(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device), use_cache=True, **{self.cache_arg: cache},
            cache_position=torch.arange(length, device=self.device),
        )
        added = []
        for r in new:
            generator = None
            if not r.sampling.greedy:
                generator = torch.Generator(device=self.device)
                if r.seed is not None:
                    generator.manual_seed(int(r.seed))
                else:
                    generator.seed()
            deadline = now + r.timeout if r.timeout else None
            added.append(_Row(r, IncrementalDecoder(self.tokenizer, r.stop), generator, now, deadline))
        self.admissions.append((self.steps, len(new)))
        self._merge(cache, mask.to(self.device), positions[:, -1].to(self.device) + 1)
        self._choose([*rows, *added], last, only=added)
        return [*rows, *added]

    def _step(self, rows: list[_Row]) -> None:
        import torch

        T = int(self._mask.shape[1])
        ids = torch.tensor([[row.last] for row in rows], dtype=torch.long, device=self.device)
        ones = torch.ones((len(rows), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        last = self._forward(
            input_ids=ids, attention_mask=self._mask, position_ids=self._pos[:, None],
            use_cache=True, **{self.cache_arg: self._cache},
            cache_position=torch.tensor([T], device=self.device),
        )
        self._pos = self._pos + 1
        self.steps += 1
        self._choose(rows, last, only=rows)

    def _forward(self, **kwargs: Any) -> Any:
        """The last position of every row: float32 logits from the model's own head, or the
        hidden states the decode mode's head turns into tokens (:meth:`_tokens`)."""
        if self.head is None:
            return self.model(**kwargs, logits_to_keep=1).logits[:, -1, :].float()
        return self.body(**kwargs).last_hidden_state[:, -1, :]

    def _tokens(self, last: Any, rows: list[_Row]) -> list[int]:
        """The next token of each row from :meth:`_forward`'s output (one row each)."""
        head = self.head
        if head is None:
            greedy = last.argmax(dim=-1).tolist()
            return [greedy[i] if row.request.sampling.greedy
                    else _sample(last[i:i + 1], row.request.sampling, row.generator)
                    for i, row in enumerate(rows)]
        picks: list[int | None] = [None] * len(rows)
        greedy_rows = [i for i, row in enumerate(rows) if row.request.sampling.greedy]
        if greedy_rows and head.can_screen:
            got = head.screened_argmax(last[greedy_rows], settle_ties=self.mode == "quantized")
            for i, t in zip(greedy_rows, got):
                picks[i] = t
            self.screened += sum(t is not None for t in got)
        rest = [i for i, t in enumerate(picks) if t is None]
        if rest:
            # as decoding alone does: the file's head for quantized sampling, else the exact one
            full = head.sample_logits if self.mode == "quantized" else head.logits
            logits = full(last[rest])
            for j, i in enumerate(rest):
                row = rows[i]
                picks[i] = (int(logits[j].argmax()) if row.request.sampling.greedy
                            else _sample(logits[j:j + 1], row.request.sampling, row.generator))
        return [int(t) for t in picks if t is not None]

    def _choose(self, rows: list[_Row], last: Any, *, only: list[_Row]) -> None:
        """Pick the next token of each row in ``only`` (the last ``len(only)`` rows of ``last``)."""
        tokens = self._tokens(last[-len(only):], only)
        now = self.clock()
        for i, row in enumerate(only):
            r = row.request
            token = tokens[i]
            row.tokens.append(token)
            row.last = token
            if row.first is None:
                row.first = now - row.start
            row.decoder.add((token,))
            if row.decoder.stopped:
                row.reason = "stop"
            elif row.deadline is not None and now >= row.deadline:
                row.reason = "timeout"
            elif token in self.eos:
                row.reason = "stop"
            elif len(row.tokens) >= r.max_new_tokens:
                row.reason = "length"

    def _retire(self, rows: list[_Row], on_done: Callable[[BatchOutput], None]) -> list[_Row]:
        """Hand finished rows to ``on_done`` and drop them from the batch."""
        done = [row for row in rows if row.reason is not None]
        if not done:
            return rows
        keep = [i for i, row in enumerate(rows) if row.reason is None]
        self._select(keep)
        now = self.clock()
        for row in done:
            text = row.decoder.finish()
            on_done(BatchOutput(
                request=row.request, tokens=row.tokens, text=text, finish_reason=row.reason or "stop",
                prompt_tokens=len(row.request.input_ids), first_token_s=row.first,
                total_s=now - row.start,
            ))
        return [rows[i] for i in keep]

    # --- the padded cache ----------------------------------------------------------------------------
    def _merge(self, cache: Any, mask: Any, pos: Any) -> None:
        import torch

        if self._cache is None:
            self._cache, self._mask, self._pos = cache, mask, pos
            return
        old_t, new_t = int(self._mask.shape[1]), int(mask.shape[1])
        width = max(old_t, new_t)
        for old, add in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(add.keys, width)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(add.values, width)], dim=0)
            if hasattr(old, "cumulative_length"):
                old.cumulative_length = width
        self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self._pos = torch.cat([self._pos, pos])

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` and trim the columns no kept row uses."""
        import torch

        if not keep:
            self._cache = self._mask = self._pos = None
            return
        if len(keep) == int(self._mask.shape[0]):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length -= start
        self._mask = mask[:, start:]
        self._pos = self._pos.index_select(0, index)


def _pad_left(t: Any, width: int, dim: int = 2) -> Any:
    import torch.nn.functional as F

    missing = width - int(t.shape[dim])
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def _cache_kwarg(model: Any) -> str:
    """Transformers 5 renamed the forward's ``past_key_values`` to ``cache`` (the old name warns)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _sliding_window(config: Any) -> int | None:
    """The smallest sliding window of the model's layers, or None when no layer slides."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except Exception:  # noqa: BLE001 - unsupported() says why
        return None
    windows = [int(layer.sliding_window) for layer in getattr(cache, "layers", [])
               if getattr(layer, "sliding_window", None)]
    return min(windows) if windows else None


def _sample(logits: Any, sampling: Sampling, generator: Any) -> int:
    """One sampled token from a (1, V) row (the warpers of ``generate``, in its order), drawn
    with ``multinomial`` on the row's own generator."""
    import torch

    probs = sampling_probs(logits, sampling)
    return int(torch.multinomial(probs, num_samples=1, generator=generator)[0, 0])
