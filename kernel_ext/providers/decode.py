"""A lean decode loop for Hugging Face causal language models (what ``%%infer`` runs).

The loop keeps the model's own forward (``DynamicCache``; logits or hidden state of the last
position only), one token choice per step and one callback per token for streaming and
cooperative stopping; it skips ``generate``'s input preparation, processors, criteria and
streamer. What it mainly changes is *which bytes are read per token*: on CPU, decoding is bound
by memory bandwidth, not by Python.

Measured on the demo model (Gemma 3 270M, float32, CPU; ``python -m benchmarks.bench_decode
--threads 1``, CPU time of one thread, stock ``generate`` = 1.0), and why the loop looks like this:

* Per-token Python work is not the bottleneck: the plain loop with the model's own head ran at
  1.01x. A ``StaticCache`` in eager mode attends over the whole preallocated length with a mask
  and was about 2x *slower* than the dynamic cache; it only pays under ``torch.compile``, and
  ``torch.compile(model.forward)`` with a static cache recompiled at every step here (a guard on
  the cache's length; recompile limit reached after ~5 minutes), so the loop stays eager.
* The LM head dominates the bytes read per token for small-body, large-vocabulary models
  (Gemma 3 270M: a 262,144 x 640 head, 671 MB in fp32, versus a 400 MB body). For greedy
  decoding with an fp32 head, the default ``"exact"`` mode screens the vocabulary with an fp16
  copy of the head (half the bytes), computes exact fp32 logits for the best
  :data:`SCREEN_CANDIDATES` rows only, and *certifies* the choice with a bound on the fp16
  error (see :class:`_Head`); when the bound cannot prove that no other row could win, it
  falls back to the full fp32 head. The token is the one the full head picks, so greedy text is
  unchanged. The fp16 copy costs 2 bytes per head weight of extra memory. Measured 1.56x; every
  greedy token of the benchmark was certified.
* ``"fp16"`` (opt-in) also moves the body to fp16 *weights*: every ``nn.Linear`` of the base
  model multiplies with an fp16 copy of its weight (activations stay float32 between layers:
  inputs are cast to fp16 for the product only), and the fp16 head gives all logits, sampling
  included. About half the bytes per token of the float32 model; logits change by ~1e-2, so text
  can change (it did not on the benchmark's greedy prompts). Measured 2.17x greedy, 1.9x
  sampling (llama.cpp on the Q4_K_M file: ~4.5x). fp16 rather than bf16 or int8
  because, on this CPU, torch's fp16 products ran at ~17 GB/s of weights while bf16 ran at ~4 and
  int8 (``torch._weight_int8pack_mm``, fbgemm dynamic) gained little over fp16 for much larger
  errors. Only float32 CPU models get the copies; others decode with their own weights.
* ``"full"`` always uses the model's own forward and head: what ``generate`` computes.

Sampling mirrors ``generate``'s warpers in order (temperature, top-k, top-p), ``softmax`` and
``torch.multinomial`` on the global generator, so a seed gives the same tokens as
``generate(do_sample=True, ...)`` with the same settings.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ProviderError

__all__ = [
    "DECODE_MODES",
    "SCREEN_CANDIDATES",
    "DecodeResult",
    "Sampling",
    "copy_bytes",
    "decode",
]

DECODE_MODES: tuple[str, ...] = ("exact", "full", "fp16")
"""What a decode step computes and in which precision; see the module docstring."""

SCREEN_CANDIDATES = 16
"""Rows of the head whose logits are computed exactly after the fp16 screen."""

# Model families whose ``ForCausalLM.forward`` is exactly ``lm_head(base(...))`` (plus Gemma's
# final logit soft-capping): for these the head can be computed by this module. Others (logit
# scaling, biases, ...) always run the model's own forward.
_PLAIN_HEAD_FAMILIES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
})

TokenHook = Callable[[int], bool]
"""Called with each new token id; returning True stops decoding after that token."""


@dataclass(frozen=True)
class Sampling:
    """How to choose tokens: greedy when ``temperature`` is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0 or math.isinf(self.temperature):
            raise ProviderError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ProviderError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ProviderError(f"top_k must be >= 0 (0: no top-k), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class DecodeResult:
    """What :func:`decode` produced."""

    tokens: list[int]
    finish_reason: str  # "eos" | "length" | "stopped" (the hook asked to stop)
    prompt_tokens: int
    first_token_s: float | None
    total_s: float
    mode: str  # the mode that ran: "exact", "full" or "fp16"
    screened: int = 0  # greedy tokens the fp16 screen certified
    fallbacks: int = 0  # greedy tokens that needed the full head

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after the first (prefill excluded)."""
        if len(self.tokens) < 2 or self.first_token_s is None or self.total_s <= self.first_token_s:
            return 0.0
        return (len(self.tokens) - 1) / (self.total_s - self.first_token_s)


def decode(
    model: Any,
    input_ids: Any,
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    eos_ids: Collection[int] = (),
    on_token: TokenHook | None = None,
    mode: str = "exact",
    clock: Callable[[], float] = time.perf_counter,
    prefill_chunk: int | None = None,
) -> DecodeResult:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (shape ``(1, n)``).

    ``on_token`` sees every new token (an EOS token included, as ``generate``'s streamer does)
    and is the place to stream text and to poll timeouts: it is called between tokens, and
    when it returns True decoding stops with ``finish_reason`` ``"stopped"``. Seeded sampling
    uses the global torch generator: wrap the call in ``torch.random.fork_rng`` and seed it.
    ``prefill_chunk``: feed the prompt this many tokens per forward (less activation memory at
    once; the retry after an out-of-memory error sets it, see :mod:`kernel_ext.oom`).
    """
    import torch

    if mode not in DECODE_MODES:
        raise ProviderError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    if max_new_tokens < 1:
        raise ProviderError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ProviderError(f"input_ids must have shape (1, n) with n >= 1, got {tuple(input_ids.shape)}")
    sampling = sampling or Sampling()
    eos = frozenset(int(e) for e in eos_ids)
    step = _Stepper(model, mode)
    tokens: list[int] = []
    first: float | None = None
    reason = "length"
    t0 = clock()
    with torch.inference_mode(), step.weights():
        ids = step.prefill(input_ids, prefill_chunk) if prefill_chunk else input_ids
        for _ in range(max_new_tokens):
            token = step.next_token(ids, sampling)
            tokens.append(token)
            if first is None:
                first = clock() - t0
            if on_token is not None and on_token(token):
                reason = "stopped"
                break
            if token in eos:
                reason = "eos"
                break
            ids = torch.tensor([[token]], dtype=input_ids.dtype, device=input_ids.device)
    return DecodeResult(
        tokens=tokens, finish_reason=reason, prompt_tokens=int(input_ids.shape[1]),
        first_token_s=first, total_s=clock() - t0, mode=step.mode,
        screened=step.screened, fallbacks=step.fallbacks,
    )


# --- one step ------------------------------------------------------------------------------------
class _Stepper:
    """Runs one forward with the cache and picks the next token."""

    def __init__(self, model: Any, mode: str) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.head: _Head | None = None
        if mode != "full":
            self.head = _head_for(model)
            if self.head is None:
                mode = "full"  # a head this module cannot reproduce exactly: the model's own
        self.halves: dict[Any, Any] = {}
        if mode == "fp16":
            self.halves = _fp16_linears(model.base_model)
            if not self.halves and (self.head is None or self.head.half is None):
                mode = "exact"  # not a float32 CPU model: nothing to copy, its own weights run
        self.mode = mode
        runner = model if self.head is None else model.base_model
        self.run = runner
        self.kwargs: dict[str, Any] = {_cache_kwarg(runner): self.cache, "use_cache": True}
        if self.head is None:
            self.kwargs["logits_to_keep"] = 1
        self.screened = 0
        self.fallbacks = 0

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        """While decoding, the fp16 linears (mode "fp16") replace the model's own forwards."""
        for module, half in self.halves.items():
            module.forward = _half_forward(half)
        try:
            yield
        finally:
            for module in self.halves:
                del module.forward  # the class's forward again

    def prefill(self, ids: Any, chunk: int) -> Any:
        """Feed all but the last ``chunk`` tokens of ``ids`` into the cache, ``chunk`` at a
        time; returns the rest (the next step picks a token after it)."""
        n = int(ids.shape[1])
        chunk = max(1, int(chunk))
        for start in range(0, n - chunk, chunk):
            self.run(input_ids=ids[:, start:min(start + chunk, n - chunk)], **self.kwargs)
        return ids[:, max(0, n - chunk):]

    def next_token(self, ids: Any, sampling: Sampling) -> int:
        out = self.run(input_ids=ids, **self.kwargs)
        if self.head is None:
            # generate() copies the last row to float32 before its processors: so do we
            logits = out.logits[:, -1, :].float()
            return _choose(logits, sampling)
        hidden = out.last_hidden_state[:, -1, :]
        if self.mode == "fp16":
            if self.halves and not bool(hidden.isfinite().all()):
                raise ProviderError("the fp16 weights overflowed on this model (non-finite hidden "
                                    "states); decode with mode 'exact' (%config KernelExt.decode_mode "
                                    "= 'exact')")
            return _choose(self.head.approx_logits(hidden), sampling)
        if sampling.greedy and self.head.can_screen:
            token = self.head.screened_argmax(hidden)
            if token is not None:
                self.screened += 1
                return token
            self.fallbacks += 1
        return _choose(self.head.logits(hidden), sampling)


def _choose(logits: Any, sampling: Sampling) -> int:
    """Greedy or sampled token from one row of float32 logits (``generate``'s warpers, in order)."""
    import torch

    if sampling.greedy:
        return int(torch.argmax(logits, dim=-1)[0])
    scores = logits
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, scores.size(-1))
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -math.inf)
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - sampling.top_p)
        drop_sorted[..., -1:] = 0
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    probs = torch.nn.functional.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, num_samples=1)[0, 0])


def _cache_kwarg(module: Any) -> str:
    """Transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


# --- the LM head -------------------------------------------------------------------------------
class _Head:
    """The model's LM head, recomputed here, with an fp16 copy for screening.

    Certified screen (greedy, fp32 head ``W``, hidden state ``h``): ``a = fp16(h) @ fp16(W).T``
    approximates the exact logits ``x = h @ W.T`` row by row within

        E = |h|·D + |h - fp16(h)|·Wmax + |fp16(h)|·Wmax·(2^-10 + 2γ)

    where ``D = max_r |W_r - fp16(W_r)|`` and ``Wmax = max_r |fp16(W_r)|`` (Euclidean norms,
    computed once per head), ``2^-10`` covers rounding the fp16 output and ``γ = 1.1·n·2^-24``
    the float32 accumulation of both products (Cauchy-Schwarz on each error term). Take the
    :data:`SCREEN_CANDIDATES` rows ``C`` with the largest ``a`` and their exact logits; if the best
    exact logit ``b`` satisfies ``b - E > min_C a``, no row outside ``C`` can reach ``b``
    (``x_r <= a_r + E <= min_C a + E < b``), so the argmax over ``C`` is the argmax over the
    vocabulary. Near-ties inside ``C`` also fall back to the full head, so that a different
    summation order can never flip the choice. On the demo model E is ~0.1-0.25 while the margin
    is several logits: every token was certified in the benchmark.
    """

    def __init__(self, weight: Any, softcap: float | None) -> None:
        import torch

        self.weight = weight
        self.version = weight._version
        self.softcap = softcap
        self.half: Any = None
        self.can_screen = False
        self.d = self.wmax = 0.0
        if weight.dtype == torch.float32 and weight.device.type == "cpu":
            with torch.inference_mode():
                half = weight.to(torch.float16)
                if torch.isfinite(half).all():
                    self.half = half
                    self.d, self.wmax = _row_norm_bounds(weight, half)
                    self.can_screen = True
        n = int(weight.shape[1])
        self.gamma = 1.1 * n * 2.0**-24

    def _cap(self, logits: Any) -> Any:
        if self.softcap is None:
            return logits
        import torch

        return torch.tanh(logits / self.softcap) * self.softcap

    def logits(self, hidden: Any) -> Any:
        import torch.nn.functional as F

        return self._cap(F.linear(hidden, self.weight)).float()

    def approx_logits(self, hidden: Any) -> Any:
        import torch
        import torch.nn.functional as F

        if self.half is None:
            return self.logits(hidden)
        return self._cap(F.linear(hidden.to(torch.float16), self.half).float())

    def screened_argmax(self, hidden: Any) -> int | None:
        """The exact greedy token, or None when the screen cannot certify it."""
        import torch
        import torch.nn.functional as F

        h16 = hidden.to(torch.float16)
        if not bool(torch.isfinite(h16).all()):
            return None
        approx = F.linear(h16, self.half).float()
        top = torch.topk(approx, SCREEN_CANDIDATES, dim=-1)
        h_norm = float(hidden.norm())
        h16_norm = float(h16.float().norm())
        eta = float((hidden - h16.float()).norm())
        bound = h_norm * self.d + eta * self.wmax + h16_norm * self.wmax * (2.0**-10 + 2 * self.gamma)
        rows = torch.sort(top.indices[0]).values  # ascending: argmax keeps the lowest id on ties
        exact = self._cap(F.linear(hidden, self.weight.index_select(0, rows)))[0]
        best2 = torch.topk(exact, 2)
        best = float(best2.values[0])
        if not best - bound > float(top.values[0, -1]):
            return None
        if float(best2.values[0] - best2.values[1]) <= 1e-4 * max(1.0, abs(best)):
            return None  # a near-tie: only the full head's own rounding may decide it
        return int(rows[int(torch.argmax(exact))])


def _row_norm_bounds(weight: Any, half: Any, chunk: int = 16384) -> tuple[float, float]:
    """``max_r |W_r - half_r|`` and ``max_r |half_r|``, in chunks to bound temporary memory."""
    d = wmax = 0.0
    for start in range(0, int(weight.shape[0]), chunk):
        w = weight[start:start + chunk]
        h = half[start:start + chunk].float()
        d = max(d, float((w - h).norm(dim=1).max()))
        wmax = max(wmax, float(h.norm(dim=1).max()))
    # round up a little: the norms themselves were computed in float32
    return d * (1 + 1e-5) + 1e-12, wmax * (1 + 1e-5)


_HEADS: weakref.WeakKeyDictionary[Any, _Head] = weakref.WeakKeyDictionary()
_HALVES: weakref.WeakKeyDictionary[Any, tuple[Any, int, Any]] = weakref.WeakKeyDictionary()


def _fp16_linears(base: Any) -> dict[Any, Any]:
    """fp16 copies of the weights of ``base``'s float32 CPU linears (cached; refreshed when a
    weight changes). Modules whose ``forward`` is already replaced (accelerate hooks) keep it."""
    import torch

    halves: dict[Any, Any] = {}
    with torch.inference_mode():
        for module in base.modules():
            if type(module) is not torch.nn.Linear or "forward" in vars(module):
                continue
            w = module.weight
            if w.dtype != torch.float32 or w.device.type != "cpu":
                continue
            cached = _HALVES.get(module)
            if cached is None or cached[0] is not w or cached[1] != w._version:
                bias = None if module.bias is None else module.bias.detach().to(torch.float16)
                cached = (w, w._version, (w.detach().to(torch.float16), bias))
                _HALVES[module] = cached
            halves[module] = cached[2]
    return halves


def _half_forward(half: tuple[Any, Any]) -> Callable[[Any], Any]:
    import torch
    import torch.nn.functional as F

    weight, bias = half

    def forward(x: Any) -> Any:
        return F.linear(x.to(torch.float16), weight, bias).to(x.dtype)

    return forward


def _head_for(model: Any) -> _Head | None:
    """This model's :class:`_Head` (cached per model), or None when its head is not plain."""
    import torch

    config = model.config
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_FAMILIES:
        return None
    out = model.get_output_embeddings()
    if not isinstance(out, torch.nn.Linear) or out.bias is not None:
        return None
    if "forward" in vars(out) or out.weight.device.type == "meta":
        return None  # accelerate hooks (offloading) own this head: only its forward is right
    if getattr(model, "base_model", model) is model:
        return None
    weight = out.weight
    cap = getattr(config, "final_logit_softcapping", None)
    softcap = float(cap) if cap else None
    cached = _HEADS.get(model)
    if cached is not None and cached.weight is weight and cached.version == weight._version:
        cached.softcap = softcap  # read from the config at every call, like the model's forward
        return cached
    head = _Head(weight, softcap)
    _HEADS[model] = head
    return head


def copy_bytes(model: Any) -> int:
    """Bytes of the runtime copies this module keeps for ``model`` (the fp16 head of ``exact``
    mode, the fp16 linears of ``fp16`` mode): memory the model costs beyond its own weights,
    counted by the model registry (``%model list``/``info``, the dashboard, its LRU cap)."""
    total = 0
    head = _HEADS.get(model)
    if head is not None and head.half is not None:
        total += head.half.numel() * head.half.element_size()
    for module in model.modules():
        cached = _HALVES.get(module)
        if cached is not None:
            weight, bias = cached[2]
            total += weight.numel() * weight.element_size()
            if bias is not None:
                total += bias.numel() * bias.element_size()
    return total
