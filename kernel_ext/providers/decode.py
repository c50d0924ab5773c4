"""A lean decode loop for Hugging Face causal language models (what ``%%infer`` runs).

The loop keeps the model's own forward (``DynamicCache``; the hidden state of the last
position only), one token choice per step and one callback per token for streaming; it skips
``generate``'s input preparation, processors, criteria and streamer. On CPU, decoding is bound
by memory bandwidth, so what it mainly changes is *which bytes are read per token*
(``decode_mode``):

* ``"exact"`` (default): the model's own float32 weights, and for greedy tokens an int4 or
  int8 *screen* of the LM head whose choice is certified against exact float32 rows
  (:mod:`kernel_ext.providers.head`): greedy text is the text of ``model.generate``. The screen
  kind is picked by timing on this machine; where none is faster, the full head runs.
  Sampling computes the full float32 head.
* ``"quantized"``: every linear layer is computed from the GGUF file's own blocks, as
  llama.cpp computes: the *block kernels* (:mod:`kernel_ext.gguf.blockdot`, C compiled on
  first use) multiply 8-bit activations with Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K blocks
  read through the file's map, and run the layer's norms, rotary, attention and residuals
  beside them. Without a C compiler (or with ``KERNEL_EXT_BLOCKDOT=0``) torch's int4 kernel
  runs instead on copies repacked once and kept in the conversion cache
  (:mod:`kernel_ext.gguf.qlinear`, with bf16 activations; Q6_K and other types stay dense).
  Greedy tokens use the same certified head; sampled ones the head from the file's blocks.
  Logits differ slightly from the float32 model's (on the demo model: up to 0.003 with the
  block kernels, ~0.2 with the int4 fallback; llama.cpp: ~1), so text can change.
* ``"full"``: the model's own forward and whole head every token: what ``generate`` computes.

Measured on the demo model: see ``benchmarks/bench_decode.py`` and the README.

**The per-token step.** Prompts run through the model's own forward (a ``DynamicCache``); in
``exact`` and ``quantized`` mode each later token then runs the *fused step* of
:mod:`kernel_ext.providers.fused` where the model's family supports it (llama, mistral, qwen2,
qwen3, gemma3; float32 on CPU): a static KV cache continued from the prefill's, fused
projections, precomputed rotary tables, no per-step masks. With dense weights its hidden
states are bitwise the model's own, so ``exact`` keeps ``generate``'s greedy text. Other models
keep the model's own forward per token and say so in :attr:`DecodeResult.notes`. Stock
``StaticCache`` was not used: in eager mode it attends over the whole preallocated length
(about 2x slower here), and ``torch.compile(model.forward)`` recompiled at every step (a guard
on the cache length) and changes the rounding, which the exact mode may not.

**Prompts are processed in chunks** of :data:`PREFILL_CHUNK` tokens; ``should_stop`` is polled
between chunks (and between tokens), and the stop button (``KeyboardInterrupt``) is caught, so a
deadline or an interrupt bounds the whole call, prompt included: :func:`decode` then returns what
it has with ``finish_reason`` ``"cancelled"`` or ``"interrupted"``. A chunk also bounds the
attention's temporary memory (chunk x context instead of prompt x prompt).

Growing it:

* *Budgets before work* (issue 11): every byte a call will need is known before
  :meth:`_Stepper.prefill`: ``input_ids.shape`` (prompt tokens), ``max_new_tokens``, and the
  model's config (layers, KV heads, head size, sliding windows) give the KV cache; a guard
  belongs in :func:`decode` just before ``step.prefill`` (or in the caller before it calls).
* *Batches* (issue 14): :class:`_Stepper` works on ``(B, n)`` ids and the head certifies each
  row on its own (:meth:`Head.screened_argmax` takes ``(B, K)``); a batched loop adds left
  padding with an ``attention_mask``, per-row EOS and per-row callbacks around ``step.next``.

The per-mode copies live with the model (weakly referenced) and follow in-place changes of the
head's weight. Decoding swaps the quantised layers' ``forward`` for the duration of a call: one
call at a time per model.

Sampling mirrors ``generate``'s warpers in order (temperature, top-k, top-p), ``softmax`` and
``torch.multinomial`` on the global generator, so a seed gives the same tokens as
``generate(do_sample=True, ...)`` with the same settings (exact and full modes).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ProviderError
from .head import SCREEN_KINDS, Head, choose_screen

__all__ = [
    "DECODE_MODES",
    "PREFILL_CHUNK",
    "DecodeResult",
    "Prepared",
    "Sampling",
    "Source",
    "copy_bytes",
    "decode",
    "int4_forwards",
    "prepare",
    "sampling_probs",
]

DECODE_MODES: tuple[str, ...] = ("exact", "full", "quantized")
"""What a decode step computes and in which precision; see the module docstring."""

PREFILL_CHUNK = 512
"""Prompt tokens per forward while prefilling (stop checks happen between chunks)."""

FUSED_MODES: frozenset[str] = frozenset({"exact", "quantized"})
"""Modes whose single-token steps run the fused step of :mod:`kernel_ext.providers.fused`
(static KV cache, fused int4 projections) where the model's family supports it. With dense
weights its hidden states are bitwise the model's own (``tests/test_fused.py``), so ``exact``
keeps ``generate``'s greedy text; ``full`` always runs the model's own forward."""
"""Prompt tokens per forward while prefilling (stop checks happen between chunks)."""

# Model families whose ``ForCausalLM.forward`` is exactly ``lm_head(base(...))`` (plus Gemma's
# final logit soft-capping): for these the head can be computed by this module. Others (logit
# scaling, biases, ...) always run the model's own forward.
_PLAIN_HEAD_FAMILIES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
})

_STATIC_AHEAD = 512
"""Positions past the prompt the fused step's static cache allocates at first."""

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
    # "eos" | "length" | "stopped" (on_token asked) | "cancelled" (should_stop said so) |
    # "interrupted" (KeyboardInterrupt: the stop button)
    finish_reason: str
    prompt_tokens: int
    first_token_s: float | None
    total_s: float
    mode: str  # the mode that ran: "exact", "full" or "quantized"
    screened: int = 0  # greedy tokens the head's screen certified
    fallbacks: int = 0  # greedy tokens that needed the full head
    prefilled: int = 0  # prompt tokens processed before the end (all, unless stopped early)
    notes: list[str] = field(default_factory=list)  # degradations, e.g. a mode that fell back

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after the first (prefill excluded)."""
        if len(self.tokens) < 2 or self.first_token_s is None or self.total_s <= self.first_token_s:
            return 0.0
        return (len(self.tokens) - 1) / (self.total_s - self.first_token_s)


# --- what a mode needs, prepared once per model ------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where a model came from: its GGUF file, and the conversion-cache entry keeping the
    decoding copies (``entry`` None: build them in memory each time the process needs them)."""

    path: Path
    entry: Path | None = None


@dataclass
class Prepared:
    """The copies one mode decodes with (see :func:`prepare`)."""

    mode: str  # the mode that will run (a mode that cannot run falls back, with a note)
    head: Head | None  # None: the model's own forward and head ("full")
    linears: dict[Any, Any] = field(default_factory=dict)  # nn.Linear -> Int4Weight
    notes: list[str] = field(default_factory=list)
    summary: str = ""  # for %model info / logs: what was repacked, what stayed dense
    nbytes: int = 0  # memory held by the copies (the head's screen included)
    screen: str = "auto"  # the screen that was asked for
    fused: bool = False  # single-token steps run the fused step (:mod:`.fused`)
    fused_groups: dict[Any, Any] = field(default_factory=dict)  # its fused int4 copies

    def _with_notes(self, notes: list[str]) -> Prepared:
        self.notes = [*notes, *self.notes]
        return self


_SOURCES: weakref.WeakKeyDictionary[Any, Source] = weakref.WeakKeyDictionary()
_PREPARED: weakref.WeakKeyDictionary[Any, dict[str, Prepared]] = weakref.WeakKeyDictionary()


def prepare(model: Any, mode: str, *, source: Source | None = None, screen: str = "auto") -> Prepared:
    """Build (or read from the conversion cache) what ``mode`` needs for ``model``; cached per
    model, so a later :func:`decode` starts at once. ``source`` is remembered for the model
    (``"quantized"`` reads the GGUF file's blocks). ``screen``: ``"auto"`` (timed on this
    machine), ``"int4"``, ``"int8"`` or ``"none"``.
    """
    import torch

    _check_mode(mode)
    if screen not in ("auto", "none", *SCREEN_KINDS):
        raise ProviderError(f"screen must be auto, none, {', '.join(SCREEN_KINDS)}; got {screen!r}")
    if source is not None:
        _SOURCES[model] = source
    per_model = _PREPARED.setdefault(model, {})
    ready = per_model.get(mode)
    weight, softcap = _plain_head(model)
    if ready is None or not _fresh(ready, weight) or screen != "auto":
        if screen == "auto" and ready is not None:
            screen = ready.screen  # a rebuild keeps a screen that was asked for
        with torch.inference_mode():
            ready = _build(model, mode, _SOURCES.get(model), screen)
        ready.screen = screen
        per_model[mode] = ready
    if ready.head is not None:
        ready.head.softcap = softcap  # read from the config at every call, like the model's forward
    return ready


def _fresh(ready: Prepared, weight: Any) -> bool:
    """Whether the copies still belong to the model's head (in-place changes, a new dtype or a
    new tensor invalidate them)."""
    head = ready.head
    if head is None:
        return weight is None or ready.mode == "full"
    return weight is head.weight and head.key == Head.key_of(weight)


def _check_mode(mode: str) -> None:
    if mode not in DECODE_MODES:
        raise ProviderError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")


def _build(model: Any, mode: str, source: Source | None, screen: str) -> Prepared:
    if mode == "full":
        return Prepared("full", None)
    weight, softcap = _plain_head(model)
    if weight is None:
        # a head this module cannot reproduce exactly: the model's own
        return Prepared("full", None, notes=[] if mode == "exact" else
                        [f"{mode} decoding needs a plain LM head; decoded with the model's own"])
    notes: list[str] = []
    linears: dict[Any, Any] = {}
    fast: Callable[[], Any] | None = None
    rows = None
    summary = ""
    nbytes = 0
    if mode == "quantized":
        why = _quantized_unavailable(model, source)
        if why is not None:
            notes.append(f"quantized decoding unavailable ({why}); decoded exactly")
            mode = "exact"
        else:
            assert source is not None
            from ..errors import KernelExtError
            from ..gguf import blockdot
            from .quantized import block_model, head_rows, repack_model

            blocks = blockdot.unavailable() is None
            try:
                if blocks:  # the file's blocks as they are (blockdot.c)
                    q = block_model(model, source.path, part="body")
                else:  # torch's int4 kernel on repacked copies
                    q = repack_model(model, source.path, entry=source.entry, part="body")
                rows = head_rows(model, source.path)
            except (KernelExtError, OSError, ValueError) as e:
                notes.append(f"quantized decoding unavailable ({e}); decoded exactly")
                return _build(model, "exact", source, screen)._with_notes(notes)
            summary = q.summary()
            if not blocks:  # %model info says why the slower kernel runs
                summary += f" (block kernels unavailable: {blockdot.unavailable()})"
            nbytes += q.nbytes
            modules = dict(_named_linears(model))
            for name, w in q.weights.items():
                module = modules.get(name)
                if module is not None and "forward" not in vars(module):  # accelerate hooks
                    linears[module] = w  # keep their own forward
            if not q.weights:
                notes.append("no layer of this file has a quantised form the kernels take; "
                             "decoded exactly")
                mode = "exact"
            else:
                fast = _head_of_file(model, source, blocks)
    screen_obj = None
    record = source.entry.parent / "decode-screens.json" if source and source.entry else None
    kind = _screen_kind(weight, screen, record)
    if kind is not None:
        from .quantized import head_screen

        screen_obj = _shared_screen(model, weight, kind) or head_screen(
            kind, weight, entry=source.entry if source is not None else None)
        nbytes += screen_obj.nbytes + 8 * int(weight.shape[0])
    head = Head(weight, softcap, screen_obj, fast=fast, rows=rows)
    fused, why = _fused_choice(model, mode)
    step = "fused decode step" if fused else f"the model's own forward per token ({why})"
    summary = "; ".join(p for p in (summary, f"LM head screen: {kind or 'none'}", step) if p)
    if not fused and mode == "quantized":  # the opt-in speed mode says when it is slower
        notes.append(f"decoded with the model's own forward per token: {why}")
    return Prepared(mode, head, linears, notes, summary, nbytes, fused=fused)


def describe(model: Any, mode: str) -> str | None:
    """What :func:`prepare` built for ``model`` in ``mode`` (``%model info``), or None when it
    has not been prepared yet (nothing is built here)."""
    ready = _PREPARED.get(model, {}).get(mode)
    if ready is None:
        return None
    text = ready.mode + (f" ({ready.summary})" if ready.summary else "")
    return "; ".join([text, *ready.notes])


def _fused_choice(model: Any, mode: str) -> tuple[bool, str]:
    """Whether single-token steps of ``mode`` run the fused step, else why not."""
    if mode not in FUSED_MODES:
        return False, f"{mode} decoding keeps it"
    from .fused import unsupported

    why = unsupported(model)
    return why is None, why or ""


def _shared_screen(model: Any, weight: Any, kind: str) -> Any:
    """The screen another mode of ``model`` already holds for this head, if any (switching
    modes must not keep two copies)."""
    for other in _PREPARED.get(model, {}).values():
        head = other.head
        if (head is not None and head.screen is not None and head.screen.kind == kind
                and head.weight is weight and head.key == Head.key_of(weight)):
            return head.screen
    return None


def _head_of_file(model: Any, source: Source, blocks: bool = False) -> Callable[[], Any]:
    """The LM head computed from the file's blocks (``blocks``: as they are, with the block
    kernels; else an int4 copy, built or read from the cache) the first time sampling or an
    uncertified greedy token needs it; None when it has no such form."""
    built: list[Any] = []
    ref = weakref.ref(model)  # the copies must not keep the model alive

    def get() -> Any:
        if not built:
            from .quantized import block_model, repack_model

            owner = ref()
            if owner is None:
                return None
            if blocks:
                q = block_model(owner, source.path, part="head")
            else:
                q = repack_model(owner, source.path, entry=source.entry, part="head")
            built.append(next(iter(q.weights.values()), None))
        return built[0]

    get.built = built  # type: ignore[attr-defined]  # Head.fast_built peeks here
    return get


def _screen_kind(weight: Any, screen: str, record: Path | None) -> str | None:
    import torch

    if screen == "none" or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None  # only float32 CPU heads are screened
    if screen == "auto":
        return choose_screen(weight, record=record)
    return screen


def _quantized_unavailable(model: Any, source: Source | None) -> str | None:
    from ..gguf import qlinear

    if source is None:
        return "the model's GGUF file is not known"
    if not Path(source.path).is_file():
        return f"the GGUF file {source.path} is not there any more"
    device = next(iter(model.parameters())).device.type
    if device != "cpu":
        return (f"it runs CPU kernels on the file's blocks and the model is on {device}; on a "
                "GPU, load with bitsandbytes 8/4-bit instead")
    from ..gguf import blockdot

    int4, blocks = qlinear.available(), blockdot.unavailable()
    if int4 is not None and blocks is not None:
        return f"{int4}; and the block kernels cannot run here ({blocks})"
    return None


def _named_linears(model: Any) -> Iterator[tuple[str, Any]]:
    import torch

    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            yield f"{name}.weight", module


def _plain_head(model: Any) -> tuple[Any, float | None]:
    """The head's weight and soft-cap when the model's logits are ``cap(h @ W.T)``."""
    import torch

    config = model.config
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_FAMILIES:
        return None, None
    out = model.get_output_embeddings()
    if not isinstance(out, torch.nn.Linear) or out.bias is not None:
        return None, None
    if "forward" in vars(out) or out.weight.device.type == "meta":
        return None, None  # accelerate hooks (offloading) own this head: only its forward is right
    if getattr(model, "base_model", model) is model:
        return None, None
    cap = getattr(config, "final_logit_softcapping", None)
    return out.weight, (float(cap) if cap else None)


# --- the loop --------------------------------------------------------------------------------------
def decode(
    model: Any,
    input_ids: Any,
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    eos_ids: Collection[int] = (),
    on_token: TokenHook | None = None,
    should_stop: Callable[[], bool] | None = None,
    mode: str = "exact",
    prefill_chunk: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> DecodeResult:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (shape ``(1, n)``).

    ``on_token`` sees every new token (an EOS token included, as ``generate``'s streamer does);
    when it returns True decoding stops (``finish_reason`` ``"stopped"``). ``should_stop`` is
    polled between prompt chunks and between tokens (``"cancelled"``: deadlines). A
    ``KeyboardInterrupt`` anywhere inside ends the call with ``"interrupted"`` and the tokens so
    far. ``prefill_chunk``: prompt tokens per forward (None: :data:`PREFILL_CHUNK`; the retry
    after an out-of-memory error halves it, see :mod:`kernel_ext.oom`). Seeded sampling uses
    the global torch generator: wrap the call in ``torch.random.fork_rng`` and seed it.
    """
    import torch

    _check_mode(mode)
    if max_new_tokens < 1:
        raise ProviderError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ProviderError(f"input_ids must have shape (1, n) with n >= 1, got {tuple(input_ids.shape)}")
    if prefill_chunk is None:
        prefill_chunk = PREFILL_CHUNK
    if prefill_chunk < 1:
        raise ProviderError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    sampling = sampling or Sampling()
    eos = frozenset(int(e) for e in eos_ids)
    tokens: list[int] = []
    first: float | None = None
    reason = "length"
    t0 = clock()
    step: _Stepper | None = None
    try:
        step = _Stepper(model, prepare(model, mode), capacity=int(input_ids.shape[1]) + max_new_tokens)
        with torch.inference_mode(), step.weights():
            if not step.prefill(input_ids, prefill_chunk, should_stop):
                reason = "cancelled"
            else:
                while True:
                    token = step.next(sampling)
                    tokens.append(token)
                    if first is None:
                        first = clock() - t0
                    if on_token is not None and on_token(token):
                        reason = "stopped"
                        break
                    if token in eos:
                        reason = "eos"
                        break
                    if len(tokens) >= max_new_tokens:
                        break
                    if should_stop is not None and should_stop():
                        reason = "cancelled"
                        break
                    step.feed(torch.tensor([[token]], dtype=input_ids.dtype, device=input_ids.device))
    except KeyboardInterrupt:
        reason = "interrupted"
    return DecodeResult(
        tokens=tokens, finish_reason=reason, prompt_tokens=int(input_ids.shape[1]),
        first_token_s=first, total_s=clock() - t0, mode=step.mode if step else mode,
        screened=step.screened if step else 0, fallbacks=step.fallbacks if step else 0,
        prefilled=step.prefilled if step else 0, notes=list(step.notes) if step else [],
    )


class _Stepper:
    """Runs forwards with the cache and picks next tokens (rows of a batch each on their own)."""

    def __init__(self, model: Any, prepared: Prepared, capacity: int = 0) -> None:
        from transformers import DynamicCache

        self.mode = prepared.mode
        self.notes = prepared.notes
        self.head = prepared.head
        self.linears = prepared.linears
        self.cache = DynamicCache(config=model.config)
        self.run = model if self.head is None else model.base_model
        self.kwargs: dict[str, Any] = {_cache_kwarg(self.run): self.cache, "use_cache": True}
        if self.head is None:
            self.kwargs["logits_to_keep"] = 1
        self.last: Any = None  # the last position's hidden state (or logits for "full")
        self.screened = 0
        self.fallbacks = 0
        self.prefilled = 0
        self.fed = 0  # positions in the cache
        self.capacity = capacity
        self.fused: Any = None  # the fused step's plan, once the prompt is in the cache
        self.fused_state: Any = None
        if prepared.fused:
            from .fused import FusedDecoder

            self.fused = FusedDecoder(model, self.linears, prepared.fused_groups)

    def weights(self) -> contextlib.AbstractContextManager[None]:
        return int4_forwards(self.linears)

    def prefill(self, ids: Any, chunk: int, should_stop: Callable[[], bool] | None) -> bool:
        """Feed the prompt ``chunk`` tokens at a time; False when ``should_stop`` said stop."""
        n = int(ids.shape[1])
        for start in range(0, n, chunk):
            if start and should_stop is not None and should_stop():
                return False
            self.feed(ids[:, start:start + chunk])
            self.prefilled = min(n, start + chunk)
        return True

    def feed(self, ids: Any) -> None:
        n = int(ids.shape[1])
        if self.fused is not None and n == 1 and ids.shape[0] == 1 and self.fed:
            if self.fused_state is None:  # the prompt is in the model's cache: continue there
                # room for the tokens asked for, at most _STATIC_AHEAD at first (the buffers
                # double when full): a large max_new_tokens that ends early allocates little
                ahead = min(max(self.capacity - self.fed, 1), _STATIC_AHEAD)
                self.fused_state = self.fused.start(self.cache, self.fed, self.fed + ahead)
                if isinstance(getattr(self.cache, "layers", None), list):
                    self.cache.layers.clear()  # its tensors live on in the static cache only
            self.last = self.fused.step(self.fused_state, ids)
            self.fed += 1
            return
        if self.fused_state is not None:
            raise RuntimeError("the fused step owns the cache now: feed one token at a time")
        out = self.run(input_ids=ids, **self.kwargs)
        self.fed += n
        if self.head is None:
            # generate() copies the last row to float32 before its processors: so do we
            self.last = out.logits[:, -1, :].float()
        else:
            self.last = out.last_hidden_state[:, -1, :]

    def next(self, sampling: Sampling) -> int:
        return self.choose(sampling)[0]

    def choose(self, sampling: Sampling) -> list[int]:
        """The next token of each row of the last forward."""
        head, hidden = self.head, self.last
        if head is None:
            return _choose(hidden, sampling)
        # the full logits: the file's head in quantized mode (when it has a form the kernels take)
        full_logits = head.sample_logits if self.mode == "quantized" else head.logits
        if not sampling.greedy or not head.can_screen:
            return _choose(full_logits(hidden), sampling)
        picks = head.screened_argmax(hidden, settle_ties=self.mode == "quantized")
        missing = [i for i, t in enumerate(picks) if t is None]
        self.screened += len(picks) - len(missing)
        self.fallbacks += len(missing)
        if missing:
            full = _choose(full_logits(hidden[missing]), sampling)
            for i, t in zip(missing, full):
                picks[i] = t
        return [int(t) for t in picks if t is not None]


@contextlib.contextmanager
def int4_forwards(linears: dict[Any, Any]) -> Iterator[None]:
    """While decoding, the quantised linears (mode "quantized": :attr:`Prepared.linears`, block
    or int4 weights) replace the modules' forwards; the class's own forward is back afterwards."""
    for module, w in linears.items():
        module.forward = _int4_forward(w, module.bias)
    try:
        yield
    finally:
        for module in linears:
            vars(module).pop("forward", None)


def _int4_forward(w: Any, bias: Any) -> Callable[[Any], Any]:
    if bias is None:
        return w  # type: ignore[no-any-return]

    def forward(x: Any) -> Any:
        return w(x) + bias

    return forward


def sampling_probs(logits: Any, sampling: Sampling) -> Any:
    """Probabilities to sample from, for rows of float32 logits: temperature, top-k, top-p and
    softmax (``generate``'s warpers, in its order)."""
    import torch

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
    return torch.nn.functional.softmax(scores, dim=-1)


def _choose(logits: Any, sampling: Sampling) -> list[int]:
    """Greedy or sampled tokens from rows of float32 logits (``generate``'s warpers, in order)."""
    import torch

    if sampling.greedy:
        return [int(t) for t in torch.argmax(logits, dim=-1)]
    return [int(t) for t in torch.multinomial(sampling_probs(logits, sampling), num_samples=1)[:, 0]]


def _cache_kwarg(module: Any) -> str:
    """Transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def copy_bytes(model: Any) -> int:
    """Bytes of the decoding copies kept for ``model`` (the LM head's screen, the int4 repacks
    or the file's blocks, and the file's head once built): memory the model costs beyond its
    own weights (mapped blocks counted whole, as they become resident when read), counted by
    the model registry (``%model list``/``info``, the dashboard, its LRU cap)."""
    total = 0
    screens: set[int] = set()
    for ready in _PREPARED.get(model, {}).values():
        total += ready.nbytes
        head = ready.head
        if head is None:
            continue
        if head.screen is not None:  # a screen two modes share counts once
            if id(head.screen) in screens:
                total -= head.screen.nbytes + 8 * int(head.weight.shape[0])
            screens.add(id(head.screen))
        if head.fast_built() is not None:
            total += head.fast_built().nbytes
    return total
