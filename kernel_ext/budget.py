"""Request budgets: a prompt is measured before anything big is allocated.

The guard answers, with numbers, before a provider tokenizes or prefills a prompt:

1. **Characters first.** No token of a model's vocabulary covers more than ``max_piece``
   characters (measured once per tokenizer), so a text of ``n`` characters is at least
   ``ceil(n / max_piece)`` tokens. A prompt whose lower bound already passes the context is
   refused without tokenizing it (a 100-million-character prompt costs a division, not the
   tokenizer's memory). With ``context_overflow = "truncate_left"`` only the tail that can
   matter is tokenized.
2. **Tokens.** ``prompt tokens + max_new_tokens`` beyond the model's context window is refused
   (or the oldest tokens are dropped, opt-in, with a note).
3. **Bytes.** The prefill's transient activations plus the KV cache for the whole request are
   estimated from the model's real attention layout (layers, KV heads, head dimension, sliding
   window layers, which keep only the window) and refused when they pass the limit: the
   ``request_memory_gb`` setting, else ``memory_fraction`` of the memory available on the
   model's device.

Refusals raise :class:`~kernel_ext.errors.ContextOverflowError` or
:class:`~kernel_ext.errors.RequestMemoryError`; both are :class:`MemoryBudgetError` (for alerts)
and :class:`PromptError` (the user's own request: breakers do not count them). The checks cost
microseconds (``python -m benchmarks.bench_guard``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ContextOverflowError, RequestMemoryError
from .memory import available_bytes, format_bytes, guard_budget

__all__ = [
    "AttentionLayout",
    "PreparedPrompt",
    "RequestGuard",
    "RequestLimits",
    "kv_cache_bytes",
    "max_piece_chars",
    "prefill_bytes",
    "request_bytes",
]

OVERFLOW_POLICIES = ("refuse", "truncate_left")

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}


@dataclass(frozen=True)
class AttentionLayout:
    """What a request's memory depends on, read from a Transformers config."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    context: int | None  # max_position_embeddings; None when the config does not say
    sliding_window: int | None = None
    sliding_layers: int = 0  # layers that attend over (and cache) the last window only
    dtype_bytes: int = 4
    attention: str = "sdpa"  # Transformers' attention implementation (eager keeps score matrices)

    @classmethod
    def from_config(cls, config: Any, dtype: Any = None) -> AttentionLayout:
        """The layout of a Transformers ``PretrainedConfig`` (or its text part)."""
        if isinstance(config, AttentionLayout):
            return config
        getter = getattr(config, "get_text_config", None)
        if callable(getter):
            config = getter()
        layers = int(_attr(config, "num_hidden_layers", "n_layer", "num_layers"))
        hidden = int(_attr(config, "hidden_size", "n_embd", "d_model"))
        # a model without attention (Mamba: a fixed-size state, no KV cache) has no heads
        heads = int(_attr(config, "num_attention_heads", "n_head", default=0) or 0)
        kv_heads = int(_attr(config, "num_key_value_heads", default=heads) or heads)
        head_dim = int(_attr(config, "head_dim", default=0) or (hidden // heads if heads else 0))
        intermediate = int(_attr(config, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden)
        vocab = int(_attr(config, "vocab_size", default=0) or 0)
        ctx = _attr(config, "max_position_embeddings", "n_positions", "max_sequence_length", default=None)
        window = _attr(config, "sliding_window", default=None)
        window = int(window) if isinstance(window, int) and window > 0 else None
        sliding = 0
        if window is not None:
            types = getattr(config, "layer_types", None)
            if isinstance(types, (list, tuple)) and types:
                sliding = sum(1 for t in types if "sliding" in str(t))
            elif getattr(config, "use_sliding_window", True) is not False:
                sliding = layers
        if sliding == 0:
            window = None
        return cls(layers, heads, kv_heads, head_dim, hidden, intermediate, vocab,
                   int(ctx) if isinstance(ctx, int) and ctx > 0 else None, window, sliding,
                   _dtype_bytes(dtype if dtype is not None else getattr(config, "dtype", None)),
                   str(getattr(config, "_attn_implementation", None) or "sdpa"))


def _attr(config: Any, *names: str, default: Any = ...) -> Any:
    for n in names:
        value = getattr(config, n, None)
        if value is not None:
            return value
    if default is ...:
        raise ValueError(f"the model config has none of {', '.join(names)}")
    return default


def _dtype_bytes(dtype: Any) -> int:
    if dtype is None:
        return 4
    itemsize = getattr(dtype, "itemsize", None)  # torch.dtype
    if isinstance(itemsize, int):
        return itemsize
    return _DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)


def kv_cache_bytes(config: Any, tokens: int, batch: int = 1, *, dtype: Any = None) -> int:
    """Bytes of the KV cache holding ``tokens`` positions for ``batch`` sequences.

    Keys and values of every layer: ``2 x kv_heads x head_dim x dtype bytes`` per position;
    sliding-window layers (Gemma 2/3, Mistral) keep the last ``sliding_window`` positions only.
    ``config``: a Transformers config or an :class:`AttentionLayout`.
    """
    lay = AttentionLayout.from_config(config, dtype)
    per_position = 2 * lay.kv_heads * lay.head_dim * lay.dtype_bytes
    full = lay.layers - lay.sliding_layers
    kept_sliding = min(tokens, lay.sliding_window) if lay.sliding_window else tokens
    return batch * per_position * (full * tokens + lay.sliding_layers * kept_sliding)


def prefill_bytes(config: Any, tokens: int, batch: int = 1, *, dtype: Any = None,
                  chunk: int | None = None) -> int:
    """Transient bytes of one prefill forward over ``tokens`` positions (``chunk`` at a time),
    beyond the weights and the KV cache: one layer's activations (hidden states, Q/K/V with
    grouped KV heads expanded, the MLP's projections) plus what attention materialises per
    query x key pair. With SDPA (Transformers' default) that is the float masks, ~12 bytes per
    pair (measured on Gemma 3 270M, CPU: +50 MiB at 2k tokens, +198 MiB at 4k); eager attention
    also keeps ``heads`` float32 score matrices."""
    lay = AttentionLayout.from_config(config, dtype)
    q = min(tokens, chunk) if chunk else tokens
    eb = lay.dtype_bytes
    hidden_states = 4 * q * lay.hidden * eb
    qkv = (q * (lay.heads + 2 * lay.kv_heads) * lay.head_dim * eb
           + 2 * tokens * lay.heads * lay.head_dim * eb)
    mlp = 3 * q * lay.intermediate * eb
    pair_bytes = 12 + (8 * lay.heads if lay.attention == "eager" else 0)
    scores = q * tokens * pair_bytes
    logits = lay.vocab * 4  # the last position's logits
    return batch * (hidden_states + qkv + mlp + scores + logits)


def request_bytes(config: Any, prompt_tokens: int, max_new_tokens: int, batch: int = 1, *,
                  dtype: Any = None, chunk: int | None = None) -> int:
    """What one request adds at its peak: the KV cache of the whole request plus the prefill's
    transient activations."""
    lay = AttentionLayout.from_config(config, dtype)
    return (kv_cache_bytes(lay, prompt_tokens + max_new_tokens, batch)
            + prefill_bytes(lay, prompt_tokens, batch, chunk=chunk))


_MAX_PIECE: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def max_piece_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` can stand for (its longest vocabulary
    piece; byte-level pieces count one character per byte, so this is an upper bound). Cached
    per tokenizer: the first call reads the vocabulary (~0.1 s for 262k pieces)."""
    try:
        return _MAX_PIECE[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        vocab = tokenizer.get_vocab()
        longest = max((len(p) for p in vocab), default=1)
    except (AttributeError, TypeError, ValueError, NotImplementedError):  # no vocabulary: no bound
        longest = 0
    value = max(int(longest), 1) if longest else 0
    try:
        _MAX_PIECE[tokenizer] = value
    except TypeError:
        pass
    return value


@dataclass(frozen=True)
class RequestLimits:
    """The settings a guard reads at each call."""

    overflow: str = "refuse"  # or "truncate_left"
    memory_limit: int | None = None  # bytes one request may add; None: memory_fraction of available
    memory_fraction: float = 0.8
    prefill_chunk: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> RequestLimits:
        """The limits ``%config KernelExt`` sets now."""
        gb = float(getattr(config, "request_memory_gb", 0.0) or 0.0)
        return cls(overflow=str(getattr(config, "context_overflow", "refuse")),
                   memory_limit=int(gb * 1024**3) if gb > 0 else None,
                   memory_fraction=float(getattr(config, "memory_fraction", 0.8)))


@dataclass
class PreparedPrompt:
    """A prompt that passed the guard: its token ids and what the guard did."""

    input_ids: Any  # a (1, n) LongTensor on the CPU
    prompt_tokens: int
    estimate_bytes: int
    limit_bytes: int
    notes: list[str] = field(default_factory=list)


class RequestGuard:
    """Checks one request against the context window and the memory limit, then tokenizes.

    ``limits``: a callable giving the live :class:`RequestLimits` (the registry passes one that
    reads ``%config KernelExt``); ``available``: memory probe (injectable for tests).
    """

    def __init__(self, limits: Callable[[], RequestLimits] | None = None, *,
                 available: Callable[[str], int] = available_bytes) -> None:
        self.limits = limits or RequestLimits
        self.available = available

    # --- the three checks (cheap; no tokenizer involved) ----------------------------------------
    def room(self, layout: AttentionLayout, max_new_tokens: int, name: str) -> int | None:
        """Prompt tokens the context leaves after ``max_new_tokens``; None: no known context."""
        if layout.context is None:
            return None
        room = layout.context - max_new_tokens
        if room < 1:
            raise ContextOverflowError(
                f"{name}: --max-new-tokens {max_new_tokens:,} leaves no room for the prompt in the "
                f"model's context of {layout.context:,} tokens; ask for fewer new tokens",
                context=layout.context, max_new_tokens=max_new_tokens,
            )
        return room

    def check_chars(self, n_chars: int, piece: int, room: int | None, max_new_tokens: int,
                    name: str, context: int | None) -> None:
        """Refuse a text that is too long whatever its tokens are (``piece``: max_piece_chars)."""
        if room is None or piece <= 0:
            return
        at_least = -(-n_chars // piece)
        if at_least > room:
            raise ContextOverflowError(
                f"{name}: the prompt is {n_chars:,} characters, so at least {at_least:,} tokens "
                f"(no token of this model covers more than {piece} characters); with "
                f"--max-new-tokens {max_new_tokens:,} that passes the model's context of "
                f"{context:,} tokens. Shorten the prompt, or set "
                "%config KernelExt.context_overflow = 'truncate_left' to keep its end",
                prompt_tokens=at_least, context=context, max_new_tokens=max_new_tokens,
            )

    def check_tokens(self, n_tokens: int, room: int | None, max_new_tokens: int, name: str,
                     context: int | None) -> None:
        if room is not None and n_tokens > room:
            raise ContextOverflowError(
                f"{name}: the prompt is {n_tokens:,} tokens + --max-new-tokens {max_new_tokens:,} "
                f"= {n_tokens + max_new_tokens:,}, more than the model's context of {context:,} "
                f"tokens (at most {room:,} prompt tokens with these settings). Shorten the "
                "prompt, lower --max-new-tokens, or set "
                "%config KernelExt.context_overflow = 'truncate_left' to keep its end",
                prompt_tokens=n_tokens, context=context, max_new_tokens=max_new_tokens,
            )

    def check_memory(self, layout: AttentionLayout, n_tokens: int, max_new_tokens: int,
                     device: str, name: str, limits: RequestLimits) -> tuple[int, int]:
        """(estimate, limit) in bytes; raises :class:`RequestMemoryError` past the limit."""
        kv = kv_cache_bytes(layout, n_tokens + max_new_tokens)
        prefill = prefill_bytes(layout, n_tokens, chunk=limits.prefill_chunk)
        need = kv + prefill
        if limits.memory_limit:
            limit, source = int(limits.memory_limit), "%config KernelExt.request_memory_gb"
        else:
            avail = self.available(device)
            limit = guard_budget(avail, limits.memory_fraction)
            source = (f"{limits.memory_fraction:.0%} of {format_bytes(avail)} available on "
                      f"{device}")
        if need > limit:
            window = (f", {layout.sliding_layers} of {layout.layers} layers keep a "
                      f"{layout.sliding_window:,}-token window" if layout.sliding_window else "")
            raise RequestMemoryError(
                f"{name}: this request needs about {format_bytes(need)} "
                f"(KV cache {format_bytes(kv)} for {n_tokens + max_new_tokens:,} tokens: "
                f"{layout.layers} layers x {layout.kv_heads} KV heads x {layout.head_dim} dims"
                f"{window}; prefill {format_bytes(prefill)} for {n_tokens:,} prompt tokens), "
                f"more than the {format_bytes(limit)} allowed ({source}). Shorten the prompt, "
                "lower --max-new-tokens, free memory (%model unload NAME) or raise "
                "%config KernelExt.request_memory_gb",
                estimate=need, limit=limit,
            )
        return need, limit

    # --- the whole preparation ------------------------------------------------------------------
    def prepare(self, model: Any, tokenizer: Any, text: str, *, max_new_tokens: int,
                add_special_tokens: bool = True, device: str = "cpu", name: str = "model",
                dtype: Any = None) -> PreparedPrompt:
        """Check ``text`` for ``model``, tokenize it (boundedly), check again; token ids back."""
        import torch

        limits = self.limits()
        layout = AttentionLayout.from_config(model.config, dtype if dtype is not None
                                             else getattr(model, "dtype", None))
        context = layout.context
        room = self.room(layout, max_new_tokens, name)
        # A text no longer than the room cannot pass it by its characters (a token covers at
        # least one): the vocabulary is only read for long texts.
        piece = max_piece_chars(tokenizer) if room is not None and len(text) > room else 0
        notes: list[str] = []
        truncate = limits.overflow == "truncate_left"
        if truncate and room is not None and piece > 0 and len(text) > (room + 8) * piece:
            # Only the last (room + margin) * piece characters can hold the kept tokens.
            dropped_chars = len(text) - (room + 8) * piece
            text = text[dropped_chars:]
        elif not truncate:
            self.check_chars(len(text), piece, room, max_new_tokens, name, context)
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        n = len(ids)
        if truncate and room is not None and n > room:
            bos = getattr(tokenizer, "bos_token_id", None)
            keep_bos = add_special_tokens and bos is not None and n and ids[0] == bos
            head = [bos] if keep_bos else []
            ids = head + ids[n - (room - len(head)):]
            notes.append(f"prompt truncated from the left to {len(ids):,} tokens to fit the "
                         f"context of {context:,} with --max-new-tokens {max_new_tokens:,}")
            n = len(ids)
        self.check_tokens(n, room, max_new_tokens, name, context)
        device = device if device else "cpu"
        need, limit = self.check_memory(layout, n, max_new_tokens, device, name, limits)
        input_ids = torch.tensor([ids], dtype=torch.long)
        return PreparedPrompt(input_ids, n, need, limit, notes)
