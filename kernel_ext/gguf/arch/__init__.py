"""GGUF architectures: which path loads a file, and the adapters of the fast path.

:func:`route` decides, from the parsed metadata and tensor table alone (before the file is
hashed or any tensor is read), how a file loads:

* **fast** - an adapter of :data:`ADAPTERS` (one module per architecture in this package):
  one parse by our reader, torch dequantisation, the conversion cache;
* **transformers** - an architecture of :data:`TRANSFORMERS_ARCHITECTURES`, which stock
  Transformers loads itself (``from_pretrained(gguf_file=...)``) behind the same gate
  (see :mod:`kernel_ext.gguf.fallback`);
* otherwise a :class:`~kernel_ext.errors.GGUFUnsupportedError` that lists both.

Adding an architecture to the fast path is one module here (a subclass of
:class:`~kernel_ext.gguf.arch.base.Adapter`), one line in :data:`ADAPTERS` and one test
(``tests/test_architectures.py``); the loader names no architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import GGUFFormatError, GGUFUnsupportedError
from ..convert import check_tokenizer
from ..reader import TensorInfo
from .base import Adapter, Fill, WeightPlan
from .bloom import Bloom
from .falcon import Falcon
from .gemma2 import Gemma2
from .gemma3 import Gemma3
from .gpt2 import Gpt2
from .llama import Llama
from .nemotron import Nemotron
from .phi3 import Phi3
from .qwen2 import Qwen2
from .qwen2moe import Qwen2Moe
from .qwen3 import Qwen3
from .qwen3moe import Qwen3Moe
from .stablelm import StableLm
from .starcoder2 import Starcoder2

__all__ = [
    "ADAPTERS",
    "TRANSFORMERS_ARCHITECTURES",
    "Adapter",
    "Fill",
    "Route",
    "WeightPlan",
    "route",
    "supported_summary",
]

ADAPTERS: dict[str, type[Adapter]] = {
    cls.architecture: cls
    for cls in (Llama, Qwen2, Qwen3, Gemma2, Gemma3, Phi3, Starcoder2, StableLm, Nemotron,
                Falcon, Gpt2, Bloom, Qwen2Moe, Qwen3Moe)
}

# Architectures stock Transformers loads from GGUF that have no adapter here, and which of its
# two GGUF loaders takes them ("legacy": load_gguf_checkpoint, numpy dequantisation; "gguf": the
# GgufConfig path of transformers.integrations.gguf, run with dequantize=True). Each was loaded
# from tiny llama.cpp-style files with Transformers 5.24 (tests/test_architectures.py).
TRANSFORMERS_ARCHITECTURES: dict[str, str] = {
    "mamba": "legacy",
    "minimax-m2": "legacy",
    "lfm2": "gguf",
    "qwen35": "gguf",
    "qwen35moe": "gguf",
}

_FLOATS = (0, 1, 30)  # F32, F16, BF16


@dataclass(frozen=True)
class Route:
    """How a file loads: ``path`` is ``"fast"`` or ``"transformers"``; ``reason`` says why, in
    words for ``%model info``; ``adapter`` is set on the fast path; ``loader`` names
    Transformers' loader on the other (``"legacy"`` or ``"gguf"``)."""

    architecture: str
    path: str
    reason: str
    adapter: Adapter | None = None
    loader: str | None = None


def supported_summary() -> str:
    return (
        f"fast path: {', '.join(sorted(ADAPTERS))}; through Transformers: "
        f"{', '.join(sorted(TRANSFORMERS_ARCHITECTURES))}"
    )


def _architecture(metadata: Mapping[str, Any]) -> str:
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFFormatError(
            "the file has no 'general.architecture'; cannot tell what model it is",
            field="general.architecture",
        )
    return arch


def _check_types(tensors: Mapping[str, TensorInfo], decodable: frozenset[int], who: str) -> None:
    from ..dequant import type_name

    bad = sorted({t.ggml_type for t in tensors.values()} - decodable)
    if bad:
        names = ", ".join(type_name(t) for t in bad)
        ok = ", ".join(type_name(t) for t in sorted(decodable))
        raise GGUFUnsupportedError(
            f"the file holds tensors of type {names}, which {who} cannot dequantise "
            f"(it can: {ok}). Re-quantise the model to one of these (e.g. with llama.cpp's "
            "llama-quantize)."
        )


def _transformers_types(loader: str) -> frozenset[int]:
    if loader == "gguf":
        from transformers.integrations.gguf.dequant import GGML_BLOCK

        return frozenset(GGML_BLOCK) | frozenset(_FLOATS)
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    return frozenset(int(t) for t in _type_traits) | frozenset(
        (int(GGMLQuantizationType.F32), int(GGMLQuantizationType.F16))
    )


def route(
    metadata: Mapping[str, Any],
    tensors: Mapping[str, TensorInfo],
    read: Callable[[str], Any] | None = None,
) -> Route:
    """Which path loads this file, and why; raises ``GGUFUnsupportedError`` for a file that no
    path can load (with what is supported) and ``GGUFFormatError`` for one without an
    architecture. Reads only the metadata and the tensor table; ``read`` (a tensor's raw bytes,
    ``GGUFFile.tensor_bytes``) lets the adapter read the few small tensors that carry
    configuration (rope factors) when it builds the config."""
    arch = _architecture(metadata)
    adapter_cls = ADAPTERS.get(arch)
    loader = TRANSFORMERS_ARCHITECTURES.get(arch)
    if adapter_cls is None and loader is None:
        raise GGUFUnsupportedError(
            f"GGUF architecture {arch!r} is not supported; supported: {supported_summary()}. "
            "Use a model of one of these architectures, or a remote provider (an "
            "OpenAI-compatible server such as llama.cpp's) for this one."
        )
    check_tokenizer(metadata)
    if adapter_cls is not None:
        from ..dequant import SUPPORTED_TYPES

        adapter = adapter_cls(metadata, tensors, read)
        adapter.check()
        _check_types(tensors, SUPPORTED_TYPES, "kernel_ext")
        return Route(
            arch,
            "fast",
            f"kernel_ext's {arch} adapter: one parse of the file, torch dequantisation, "
            "conversion cache",
            adapter=adapter,
        )
    assert loader is not None
    _check_types(tensors, _transformers_types(loader), "Transformers")
    how = (
        "its GGUF path, weights dequantised at load (the packed-weight kernels it can use "
        "come from the Hugging Face hub, which kernel_ext never contacts)"
        if loader == "gguf"
        else "load_gguf_checkpoint, numpy dequantisation"
    )
    return Route(
        arch,
        "transformers",
        f"no kernel_ext adapter for {arch!r}; stock Transformers loads it ({how}; no "
        "conversion cache, about 2-3x the model's memory while loading)",
        loader=loader,
    )
