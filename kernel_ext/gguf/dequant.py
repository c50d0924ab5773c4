"""Torch dequantisation of GGUF tensor data, straight into the target dtype and device.

What is reused and what is ours:

* Q4_0, Q4_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (and the IQ types) call Transformers' torch kernels in
  ``transformers.integrations.gguf.dequant`` unchanged.
* Q5_0, Q5_1, F16, BF16, F32 are written here in the same style (Transformers has no kernel for
  them; ``gguf.quants`` has numpy ones at ~60 Melem/s).
* Q8_0 is ours too: Transformers' kernel multiplies an ``int8`` view by a broadcast ``float16``
  scale (~80 Melem/s); converting into a preallocated output and scaling in place is several
  times faster.

Every kernel takes ``(n_blocks, bytes_per_block)`` ``uint8`` blocks already on the target device,
so on a GPU only the quantised bytes cross the bus.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from transformers.integrations.gguf import dequant as _hf

from ..errors import GGUFFormatError, GGUFUnsupportedError

__all__ = ["dequantize", "SUPPORTED_TYPES", "supported_type_names", "type_name", "tensor_nbytes"]

_T = GGMLQuantizationType
_Kernel = Callable[[torch.Tensor, torch.dtype], torch.Tensor]


def _half(blocks: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """One fp16 scalar per block as ``(nb, 1)`` of ``dtype`` (fp16 -> fp32 is exact)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(dtype)


# Five-bit quants, eight at a time: the 16 ``qs`` bytes are read as two ``int64`` words, so a
# nibble mask or shift handles eight values per element instead of one (torch's ``uint8`` ops
# are the bottleneck otherwise). The fifth bits (the little-endian ``uint32`` ``qh``, bit ``j``
# for element ``j``) are spread to one byte each through a 256-entry table of ``int64`` words.
_NIBBLES = 0x0F0F0F0F0F0F0F0F


def _spread_table(one: int, zero: int) -> torch.Tensor:
    """byte ``v`` -> an int64 whose byte ``k`` is ``one`` if bit ``k`` of ``v`` is set, else
    ``zero``."""
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
    table = np.where(bits == 1, one, zero).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(table)).view(torch.int64).reshape(256)


# Q5_0 stores q in 0..31 and means q - 16. As an int8 that is the low nibble with the high
# nibble 0x0 when the fifth bit is set and 0xF (a borrow) when it is clear.
_Q5_0_HIGH = _spread_table(0x00, 0xF0)
# Q5_1 means q itself: the fifth bit is 0x10.
_Q5_1_HIGH = _spread_table(0x10, 0x00)
_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _table(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return table
    key = (id(table), device)
    if key not in _TABLES:
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def _five_bit(blocks: torch.Tensor, qh_at: int, qs_at: int, high: torch.Tensor) -> torch.Tensor:
    """The 32 quants of a Q5_0/Q5_1 block as ``(nb, 32)`` bytes (elements 0..15 are the low
    nibbles of ``qs``, 16..31 the high ones), with the fifth bit mapped through ``high``."""
    qs = blocks[:, qs_at : qs_at + 16].contiguous().view(torch.int64)
    low = qs & _NIBBLES
    top = (qs >> 4) & _NIBBLES
    fifth = _table(high, blocks.device)[blocks[:, qh_at : qh_at + 4].long()]
    return torch.cat([low | fifth[:, :2], top | fifth[:, 2:]], dim=1).view(torch.uint8)


def _scaled(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale * q`` for ``(nb, n)`` integer quants, written once into a fresh ``dtype`` tensor."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    out.copy_(q)
    return out.mul_(scale)


def _dequant_q5_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # block: d (f16) | qh (4 bytes) | qs (16 bytes); value = d * (q - 16)
    q = _five_bit(blocks, 2, 6, _Q5_0_HIGH).view(torch.int8)
    return _scaled(q, _half(blocks, 0, dtype), dtype)


def _dequant_q5_1(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # block: d (f16) | m (f16) | qh (4 bytes) | qs (16 bytes); value = d * q + m
    q = _five_bit(blocks, 4, 8, _Q5_1_HIGH)
    return _scaled(q, _half(blocks, 0, dtype), dtype).add_(_half(blocks, 2, dtype))


def _dequant_q8_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # block: d (f16) | 32 x int8. Convert into a fresh output, then scale in place: no int8 x fp16
    # broadcast temporaries.
    return _scaled(blocks[:, 2:34].view(torch.int8), _half(blocks, 0, dtype), dtype)


def _plain(source: torch.dtype) -> _Kernel:
    def kernel(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        values = blocks.reshape(-1).view(source)
        return values.to(dtype) if source != dtype else values.clone()

    return kernel


def _hf_kernel(ggml_type: int) -> _Kernel:
    def kernel(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _hf._DEQUANT[ggml_type](blocks, dtype)

    return kernel


_KERNELS: dict[int, _Kernel] = {
    int(_T.F32): _plain(torch.float32),
    int(_T.F16): _plain(torch.float16),
    int(_T.BF16): _plain(torch.bfloat16),
    int(_T.Q5_0): _dequant_q5_0,
    int(_T.Q5_1): _dequant_q5_1,
    int(_T.Q8_0): _dequant_q8_0,
}
# Transformers' torch kernels for everything else they cover (K-quants, Q4_0/Q4_1, IQ types).
for _type_id in _hf._DEQUANT:
    _KERNELS.setdefault(int(_type_id), _hf_kernel(int(_type_id)))

SUPPORTED_TYPES: frozenset[int] = frozenset(_KERNELS)


def type_name(ggml_type: int) -> str:
    """``"Q4_K"`` for 12; ``"type 99"`` for ids gguf does not know."""
    try:
        return _T(int(ggml_type)).name
    except ValueError:
        return f"type {ggml_type}"


def supported_type_names() -> list[str]:
    return [type_name(t) for t in sorted(SUPPORTED_TYPES)]


def tensor_nbytes(ggml_type: int, n_elements: int) -> int:
    """Bytes a tensor of ``n_elements`` takes in ``ggml_type`` (raises for bad sizes/types)."""
    _check_type(ggml_type)
    block_elems, block_bytes = GGML_QUANT_SIZES[_T(int(ggml_type))]
    if n_elements % block_elems:
        raise GGUFFormatError(
            f"{n_elements} elements is not a multiple of the {type_name(ggml_type)} block size "
            f"{block_elems}; the tensor cannot be decoded"
        )
    return n_elements // block_elems * block_bytes


def _check_type(ggml_type: int) -> None:
    if int(ggml_type) not in _KERNELS:
        raise GGUFUnsupportedError(
            f"GGUF tensor type {type_name(ggml_type)} ({int(ggml_type)}) cannot be dequantised; "
            f"supported types: {', '.join(supported_type_names())}. Re-quantise the model to one "
            "of these (e.g. with llama.cpp's llama-quantize)."
        )


def _as_uint8_tensor(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise TypeError(f"raw must hold uint8 bytes, got {raw.dtype}")
        return raw.reshape(-1)
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise TypeError(f"raw must hold uint8 bytes, got {arr.dtype}")
    arr = arr.reshape(-1)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    # A read-only view into the file's mmap: the kernels only read it, so no copy is needed;
    # torch merely warns that it cannot promise that.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def dequantize(
    raw: np.ndarray | torch.Tensor,
    ggml_type: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Decode one GGUF tensor.

    ``raw`` is the tensor's bytes (``uint8``), ``shape`` its GGUF shape (``shape[0]`` is the
    fastest-varying dimension, ``ne0``). The result has ``dtype`` on ``device`` in PyTorch order
    (the reversed GGUF shape). The bytes are moved to ``device`` before decoding, so on a GPU only
    the quantised data is copied.
    """
    _check_type(ggml_type)
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise GGUFFormatError(f"negative dimension in tensor shape {dims}")
    n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
    expected = tensor_nbytes(ggml_type, n_elements)
    data = _as_uint8_tensor(raw)
    if data.numel() != expected:
        raise GGUFFormatError(
            f"{type_name(ggml_type)} tensor of shape {dims} needs {expected} bytes, "
            f"got {data.numel()}"
        )
    torch_shape = tuple(reversed(dims))
    if n_elements == 0:
        return torch.empty(torch_shape, dtype=dtype, device=device)
    data = data.to(device=device, non_blocking=False)
    _, block_bytes = GGML_QUANT_SIZES[_T(int(ggml_type))]
    blocks = data.reshape(-1, block_bytes)
    values = _KERNELS[int(ggml_type)](blocks, dtype)
    if values.dtype != dtype:
        values = values.to(dtype)
    return values.reshape(torch_shape)
