"""Everything about the GGUF file format: a bounded, validating reader and integrity checks.

``read_gguf(path)`` parses and validates a file's header, metadata and tensor table against
its size and memory-maps the data; ``verify_sha256(path, pin)`` checks a file against a pin.
Dequantisation and conversion to Transformers live in sibling modules that build on these:
``arch`` (one adapter per architecture, and the routing between kernel_ext's fast path and stock
Transformers), ``loader`` (the staged load), ``sources`` (which GGUF rows filled each parameter:
:class:`WeightSource`).
"""

from __future__ import annotations

from .constants import BLOCK_SIZES, GGMLType, GGUFValueType
from .integrity import sha256_file, verify_sha256
from .reader import (
    GGUFClosedError,
    GGUFFile,
    GGUFFileNotFoundError,
    GGUFIsADirectoryError,
    GGUFOpenError,
    TensorInfo,
    TensorNotFoundError,
    read_gguf,
)
from .sources import RowRange, WeightSource

__all__ = [
    "BLOCK_SIZES",
    "GGMLType",
    "GGUFClosedError",
    "GGUFFile",
    "GGUFFileNotFoundError",
    "GGUFIsADirectoryError",
    "GGUFOpenError",
    "GGUFValueType",
    "RowRange",
    "TensorInfo",
    "TensorNotFoundError",
    "WeightSource",
    "read_gguf",
    "sha256_file",
    "verify_sha256",
]
