"""What to do after an out-of-memory error in generation, before the retry.

A CUDA OOM raised inside a forward pass carries a traceback whose frames hold the KV cache,
the activations and the input tensors; wrapped (``raise ... from e``), kept in the fallback
chain's causes and finally in ``sys.last_exc``, it keeps them alive on the GPU during the retry
and after it. So, before retrying:

1. :func:`release` clears the locals of every finished frame in the exception's whole chain
   (``__cause__``, ``__context__``, an :class:`AllProvidersFailedError`'s causes) and of a
   previous cell's ``sys.last_exc`` when that was an OOM too, collects the garbage and gives
   the freed blocks back to the driver (``torch.cuda.empty_cache``);
2. :func:`retry_params` asks for less: half the prompt-processing chunk (the prefill of a long
   prompt is what needs the most activation memory at once) and half the ``max_new_tokens``
   (the KV cache grows with them).
"""

from __future__ import annotations

import gc
import sys
import traceback
from collections.abc import Iterator
from typing import Any

from .providers.base import GenerationParams

__all__ = ["MIN_PREFILL_CHUNK", "is_oom", "release", "retry_params"]

MIN_PREFILL_CHUNK = 16  # tokens: below this a prefill chunk saves nothing worth the slowdown


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and every exception it refers to (causes, contexts, a chain's causes)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__]
        causes = getattr(e, "causes", None)
        if isinstance(causes, dict):
            stack += [c for c in causes.values() if isinstance(c, BaseException)]


def is_oom(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was caused by, running out of (device or host) memory."""
    from .errors import ProviderOutOfMemoryError

    for e in _chain(exc):
        if isinstance(e, (ProviderOutOfMemoryError, MemoryError)):
            return True
        if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing
            return True
    return False


def release(exc: BaseException | None) -> int:
    """Drop what an OOM (and a previous cell's OOM in ``sys.last_exc``) keeps alive, then
    empty torch's CUDA cache. Returns the number of frames cleared.

    The exceptions stay usable (message, type, line numbers); only the local variables of
    frames that have finished running are dropped."""
    cleared = 0
    roots: list[BaseException | None] = [exc]
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if last is not None and last is not exc and is_oom(last):
        roots.append(last)
    for root in roots:
        for e in _chain(root):
            tb = e.__traceback__
            cleared += _count(tb)
            traceback.clear_frames(tb)  # skips (ignores) frames still running
    gc.collect()
    _empty_cuda_cache()
    return cleared


def _count(tb: Any) -> int:
    n = 0
    while tb is not None:
        n += 1
        tb = tb.tb_next
    return n


def _empty_cuda_cache() -> None:
    torch = sys.modules.get("torch")  # never import torch (or start CUDA) just for this
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except RuntimeError:
        return


def retry_params(
    params: GenerationParams, prompt_tokens: int | None = None
) -> tuple[GenerationParams, str] | None:
    """The parameters of the retry after an OOM, and what changed (for the footer); None when
    there is nothing left to shrink.

    ``prompt_tokens``: the prompt's length, when known (the provider says it): the first
    prefill chunk is half of it; later retries halve the chunk again."""
    changes: dict[str, Any] = {}
    said: list[str] = []
    current = params.prefill_chunk or prompt_tokens
    if current and current // 2 >= MIN_PREFILL_CHUNK:
        changes["prefill_chunk"] = current // 2
        said.append(f"prompt processed in chunks of {current // 2} tokens")
    if params.max_new_tokens > 1:
        changes["max_new_tokens"] = max(1, params.max_new_tokens // 2)
        said.append(f"max_new_tokens={changes['max_new_tokens']} (was {params.max_new_tokens})")
    if not changes:
        return None
    return params.replace(**changes), ", ".join(said)
