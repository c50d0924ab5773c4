"""GGUF quantised blocks as operands of torch's int4 CPU matmul (``decode_mode='quantized'``).

torch ships a CPU kernel for weight-only 4-bit matmuls (written for torchao's int4 CPU path)::

    y = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)
    # y = x @ W.T with W[n, k] = (q[n, k] - 8) * s[k // 32, n] + z[k // 32, n]

where ``q`` are 4-bit values packed by ``torch._convert_weight_to_int4pack_for_cpu`` (a layout
that depends on the CPU: 64-row blocks with AVX-512, 32 with AVX2) and ``s, z`` one scale and
one zero per group of 32 inputs. ``x`` and ``scales_and_zeros`` are bfloat16 here: that is the
kernel's vectorised path (with float32 activations it ran ~20x slower on our CPU, see
``benchmarks/bench_decode.py``), so activations are rounded to bf16 for the product, as
llama.cpp rounds them to 8 bits.

A GGUF block type maps onto that form *faithfully* (the same numbers, up to the bf16 rounding
of each group's scale and zero) when its scales are per group of 32 or coarser:

==========  =====================================================================================
``Q4_0``    ``d * (q - 8)``: one part, ``s = d``, ``z = 0``
``Q4_1``    ``d * q + m``: one part, ``s = d``, ``z = 8d + m``
``Q4_K``    sub-block of 32 ``d*sc * q - dmin*m``: one part, ``s = d*sc``, ``z = 8s - dmin*m``
``Q5_0``    5-bit ``q = lo + 16 hi``: two parts, the low nibbles (``s = d, z = 0``) and the
            fifth bits stored as ``hi + 7`` (``s = 16d``, ``z = 8d``)
``Q5_1``    as Q5_0, the minimum added to the second part's zero
``Q5_K``    as Q4_K with a fifth bit: two parts, as Q5_1
``Q8_0``    ``q + 128 = lo + 16 hi``: two parts (low and high nibbles, ``z = 0`` and ``8d``)
==========  =====================================================================================

The parts of a weight are stored side by side along the inputs and multiplied by the input
repeated, so the kernel sums them in float32 in one call: a
5- or 8-bit type reads one byte per weight, as int8 would, but keeps the file's own per-block
scales (``torch._weight_int8pack_mm`` only takes one scale per output row, so Q8_0 would have
to be requantised to use it). Types with scales per 16 values (``Q6_K``, ``Q3_K``, ``Q2_K``:
the kernel's smallest group is 32), codebooks (``IQ*``) or no blocks (``F32``/``F16``/``BF16``)
have no faithful form: :func:`repack` raises :class:`NotRepackable` with the reason, and the
caller keeps the dense weight.

:func:`requantize` makes an int4 copy of any float weight (min/max per group of 32): not
faithful, it is the *screen* of the LM head (:mod:`kernel_ext.providers.head`), whose error is
measured per row and certified.

Reused from Transformers: the 6-bit scale unpacking of Q4_K/Q5_K (``_k_scales``) and the
nibble/bit-plane splitting (``_shifted``) of ``transformers.integrations.gguf.dequant``
(checked against gguf-py's dequantisation in ``tests/test_qlinear.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from transformers.integrations.gguf import dequant as _hf

from ..errors import GGUFUnsupportedError
from .dequant import type_name

__all__ = [
    "GROUP",
    "REPACKABLE",
    "Int4Part",
    "Int4Rows",
    "Int4Weight",
    "NotRepackable",
    "available",
    "repack",
    "repack_rows",
    "requantize",
]

GROUP = 32
"""Inputs per scale/zero group (the kernel's smallest group size)."""

_ROW_ALIGN = 16  # the packing kernel needs a multiple of 16 output rows
_CHUNK_ROWS = 8192  # rows converted at a time (a multiple of every packing block, 64 and 32)
_T = GGMLQuantizationType


class NotRepackable(GGUFUnsupportedError):
    """A tensor whose blocks have no faithful int4 form; it stays dense (the message says why)."""


def available() -> str | None:
    """None when torch has the int4 CPU kernels, else why not (older torch)."""
    for op in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"):
        if not hasattr(torch, op):
            return f"torch {torch.__version__} has no torch.{op} (needs torch >= 2.6)"
    return None


# --- canonical rows: 4-bit values with float32 scales and zeros --------------------------------
@dataclass
class Int4Rows:
    """One part of a weight, unpacked: ``W[n, k] = (q[n, k] - 8) * s[n, g] + z[n, g]``.

    ``q`` is ``uint8`` in 0..15 of shape ``(rows, K)``; ``s`` and ``z`` are ``float32`` of shape
    ``(rows, K / 32)``, exact as the block parameters give them (rounded to bf16 on packing).
    """

    q: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The part's values in float32, with the scales and zeros rounded to ``dtype`` first
        (bf16: what the kernel multiplies with)."""
        rows, k = self.q.shape
        s = self.s.to(dtype).float()[..., None]
        z = self.z.to(dtype).float()[..., None]
        w = (self.q.float().reshape(rows, k // GROUP, GROUP) - 8.0) * s + z
        return w.reshape(rows, k)

    def take(self, index: torch.Tensor) -> Int4Rows:
        return Int4Rows(self.q[index], self.s[index], self.z[index])


# --- the packed form ----------------------------------------------------------------------------
@dataclass
class Int4Part:
    """One part in torch's CPU layout: ``packed`` (uint8, ``(N_pad, K/2)``) and
    ``scales_zeros`` (bf16, ``(K/32, N_pad, 2)``)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __post_init__(self) -> None:
        # torch's int4 CPU kernel reads with vector loads; tensors mapped from the conversion
        # cache can sit at any offset: give those an aligned copy (as for the int8 screen)
        for name in ("packed", "scales_zeros"):
            t = getattr(self, name)
            if t.data_ptr() % 64 or not t.is_contiguous():
                setattr(self, name, t.clone(memory_format=torch.contiguous_format))


@dataclass
class Int4Weight:
    """A linear layer's weight ``(out_features, in_features)`` as a sum of ``repeat`` int4
    parts, stored side by side along the inputs: ``W x = [W_1 .. W_r] [x .. x]``, so one
    kernel call sums the parts in float32 (one bf16 rounding of the output, not one per part;
    measured ~5-12 % faster than one call per part)."""

    parts: tuple[Int4Part, ...]  # one packed part of ``repeat * in_features`` inputs
    out_features: int
    in_features: int
    source: str  # the GGUF type it came from ("Q5_0"), or "int4" for a requantised copy
    repeat: int = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape ``(..., in_features)``, in ``x``'s dtype."""
        lead = x.shape[:-1]
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.repeat > 1:
            xb = torch.cat([xb] * self.repeat, dim=1)  # (cheaper than Tensor.repeat here)
        part = self.parts[0]
        y = torch._weight_int4pack_mm_for_cpu(xb, part.packed, GROUP, part.scales_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*lead, self.out_features).to(x.dtype)

    @property
    def nbytes(self) -> int:
        return sum(
            p.packed.numel() + p.scales_zeros.numel() * p.scales_zeros.element_size()
            for p in self.parts
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors to store (``<prefix>.packed`` / ``.sz``), for the conversion cache."""
        part = self.parts[0]
        return {f"{prefix}.packed": part.packed, f"{prefix}.sz": part.scales_zeros}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, repeat: int, out_features: int,
        in_features: int, source: str,
    ) -> Int4Weight:
        """The inverse of :meth:`tensors`; raises ``KeyError``/``ValueError`` on a mismatch."""
        n_pad, k = _padded(out_features), repeat * in_features
        packed, sz = tensors[f"{prefix}.packed"], tensors[f"{prefix}.sz"]
        if (
            tuple(packed.shape) != (n_pad, k // 2) or packed.dtype != torch.uint8
            or tuple(sz.shape) != (k // GROUP, n_pad, 2) or sz.dtype != torch.bfloat16
        ):
            raise ValueError(f"{prefix}: stored shapes do not fit a {out_features}x{in_features} weight")
        return cls((Int4Part(packed, sz),), out_features, in_features, source, repeat)


def _padded(n: int) -> int:
    return -(-n // _ROW_ALIGN) * _ROW_ALIGN


def _pack(chunks: Iterator[list[Int4Rows]], n_rows: int, n_parts: int, source: str,
          in_features: int) -> Int4Weight:
    """Pack row chunks (each a list of ``n_parts`` :class:`Int4Rows`) into an :class:`Int4Weight`,
    the parts side by side along the inputs.

    Chunks are packed one at a time (the packing kernel needs the values as int32, 4 bytes
    each) and concatenated: chunks of a multiple of 64 rows pack exactly as the whole would.
    """
    packed: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    done = 0
    for chunk in chunks:
        q = torch.cat([p.q for p in chunk], dim=1)
        s = torch.cat([p.s for p in chunk], dim=1)
        z = torch.cat([p.z for p in chunk], dim=1)
        done += q.shape[0]
        pad = _padded(done) - done if done == n_rows else 0
        if pad:  # rows of q = 8, s = z = 0: they contribute nothing and are cut off
            q = torch.cat([q, q.new_full((pad, q.shape[1]), 8)])
            s = torch.cat([s, s.new_zeros((pad, s.shape[1]))])
            z = torch.cat([z, z.new_zeros((pad, z.shape[1]))])
        packed.append(torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        scales.append(torch.stack([s, z], dim=-1).to(torch.bfloat16))
    if done != n_rows:
        raise ValueError(f"packed {done} rows, expected {n_rows}")
    part = Int4Part(torch.cat(packed), torch.cat(scales).transpose(0, 1).contiguous())
    return Int4Weight((part,), n_rows, in_features, source, n_parts)


# --- GGUF blocks -> parts -------------------------------------------------------------------------
_Parts = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (q (nb, E), s, z (nb, E/32))


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()  # (nb, 1)


def _nibbles(data: torch.Tensor, width: int) -> torch.Tensor:
    """Bytes ``(nb, n)`` -> low nibbles of ``width`` bytes, then their high nibbles, ..."""
    return _hf._shifted(data, (0, 4), width) & 0xF


def _bits(data: torch.Tensor) -> torch.Tensor:
    """A little-endian uint32 per block ``(nb, 4)`` -> its 32 bits ``(nb, 32)`` (bit j: element j)."""
    return _hf._shifted(data, tuple(range(8)), 4).transpose(1, 2).reshape(data.shape[0], 32) & 1


def _q4_0(b: torch.Tensor) -> _Parts:
    d = _half(b, 0)
    return [(_nibbles(b[:, 2:18], 16).reshape(-1, 32), d, torch.zeros_like(d))]


def _q4_1(b: torch.Tensor) -> _Parts:
    d, m = _half(b, 0), _half(b, 2)
    return [(_nibbles(b[:, 4:20], 16).reshape(-1, 32), d, 8 * d + m)]


# Two-part types. The kernel rounds each group's zero to bf16 (a relative error of 2^-9 that
# every value of the group shares), so the parts are arranged to need only *small* zeros: the
# fifth bit is stored as ``hi + 7`` (7 or 8), which makes its part ``16 s (hi - 1)``, and what
# is left over is ``8 s`` (plus the type's own minimum, which the weights themselves carry).
# With the constant ``120 d`` of the plain split instead, Q5_0 layers were off by ~3 %.
def _q5_0(b: torch.Tensor) -> _Parts:
    d = _half(b, 0)  # d (lo + 16 hi - 16) = d (lo - 8) + [16 d (hi + 7 - 8) + 8 d]
    lo, hi = _nibbles(b[:, 6:22], 16).reshape(-1, 32), _bits(b[:, 2:6])
    return [(lo, d, torch.zeros_like(d)), (hi + 7, 16 * d, 8 * d)]


def _q5_1(b: torch.Tensor) -> _Parts:
    d, m = _half(b, 0), _half(b, 2)  # d (lo + 16 hi) + m
    lo, hi = _nibbles(b[:, 8:24], 16).reshape(-1, 32), _bits(b[:, 4:8])
    return [(lo, d, torch.zeros_like(d)), (hi + 7, 16 * d, 24 * d + m)]


def _q8_0(b: torch.Tensor) -> _Parts:
    d = _half(b, 0)  # d (u - 128) with u = q + 128 = lo + 16 hi: d (lo - 8) + [16 d (hi - 8) + 8 d]
    u = b[:, 2:34] ^ 0x80
    return [(u & 0xF, d, torch.zeros_like(d)), (u >> 4, 16 * d, 8 * d)]


def _k_params(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: per 32-value sub-block, the scale ``d*sc`` and the minimum ``dmin*m`` (nb, 8)."""
    sc, mn = _hf._k_scales(b[:, 4:16])
    return _half(b, 0) * sc, _half(b, 2) * mn


def _q4_k(b: torch.Tensor) -> _Parts:
    s, mn = _k_params(b)
    return [(_nibbles(b[:, 16:144], 32).reshape(-1, 256), s, 8 * s - mn)]


def _q5_k(b: torch.Tensor) -> _Parts:
    s, mn = _k_params(b)  # s (lo + 16 hi) - mn
    lo = _nibbles(b[:, 48:176], 32).reshape(-1, 256)
    hi = (_hf._shifted(b[:, 16:48], tuple(range(8)), 32) & 1).reshape(-1, 256)
    return [(lo, s, torch.zeros_like(s)), (hi + 7, 16 * s, 24 * s - mn)]


_REPACK: dict[int, Callable[[torch.Tensor], _Parts]] = {
    int(_T.Q4_0): _q4_0,
    int(_T.Q4_1): _q4_1,
    int(_T.Q5_0): _q5_0,
    int(_T.Q5_1): _q5_1,
    int(_T.Q8_0): _q8_0,
    int(_T.Q4_K): _q4_k,
    int(_T.Q5_K): _q5_k,
}
REPACKABLE: frozenset[int] = frozenset(_REPACK)
"""GGUF types with a faithful int4 form."""

_WHY_NOT = {
    int(_T.Q6_K): "Q6_K scales every 16 values; torch's int4 kernel groups at least 32",
    int(_T.Q3_K): "Q3_K scales every 16 values; torch's int4 kernel groups at least 32",
    int(_T.Q2_K): "Q2_K scales every 16 values; torch's int4 kernel groups at least 32",
    int(_T.F32): "F32 is not quantised",
    int(_T.F16): "F16 is not quantised",
    int(_T.BF16): "BF16 is not quantised",
}


def _why_not(ggml_type: int) -> str:
    return _WHY_NOT.get(
        int(ggml_type), f"{type_name(ggml_type)} (a codebook or other layout) has no int4 form"
    )


def _check(ggml_type: int, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``(K, N, block_elems, block_bytes)`` of a repackable 2-D tensor (GGUF shape ``(K, N)``)."""
    if int(ggml_type) not in _REPACK:
        raise NotRepackable(_why_not(ggml_type))
    if available() is not None:
        raise NotRepackable(str(available()))
    if len(shape) != 2:
        raise NotRepackable(f"a {len(shape)}-D tensor is not a linear layer's weight")
    k, n = (int(d) for d in shape)
    elems, nbytes = GGML_QUANT_SIZES[_T(int(ggml_type))]
    if k % elems or k % GROUP or n < 1:
        raise NotRepackable(f"rows of {k} values do not split into {type_name(ggml_type)} blocks")
    return k, n, elems, nbytes


def repack_rows(raw: torch.Tensor, ggml_type: int, in_features: int) -> list[Int4Rows]:
    """The parts of whole rows of a GGUF tensor: ``raw`` holds ``rows * row_bytes`` bytes."""
    _, _, elems, nbytes = _check(ggml_type, (in_features, 1))
    blocks = raw.reshape(-1, nbytes)
    rows = blocks.shape[0] * elems // in_features
    out = []
    for q, s, z in _REPACK[int(ggml_type)](blocks):
        out.append(Int4Rows(
            q.reshape(rows, in_features).to(torch.uint8),
            s.reshape(rows, in_features // GROUP).contiguous(),
            z.expand_as(s).reshape(rows, in_features // GROUP).contiguous(),
        ))
    return out


def repack(
    read: Callable[[int, int], torch.Tensor],
    ggml_type: int,
    shape: tuple[int, ...],
    row_order: torch.Tensor | None = None,
) -> Int4Weight:
    """A GGUF tensor of GGUF shape ``(K, N)`` as an :class:`Int4Weight` of ``N`` rows.

    ``read(first_row, n_rows)`` returns those rows' raw bytes (uint8), so a large tensor is
    converted a chunk at a time. ``row_order``: the weight's row ``i`` is the file's row
    ``row_order[i]`` (the loader's row permutation, e.g. llama's q/k un-permutation; it is
    applied within chunks of whole permutation cycles, i.e. the whole tensor when given).
    Raises :class:`NotRepackable` when the type has no faithful form.
    """
    k, n, _, nbytes_block = _check(ggml_type, tuple(shape))
    row_bytes = k // GGML_QUANT_SIZES[_T(int(ggml_type))][0] * nbytes_block
    if row_order is not None:
        if row_order.shape != (n,) or not torch.equal(torch.sort(row_order).values, torch.arange(n)):
            raise NotRepackable("the row transform is not a permutation of the rows")

        def chunks() -> Iterator[list[Int4Rows]]:
            parts = repack_rows(read(0, n), ggml_type, k)
            yield [p.take(row_order) for p in parts]
    else:
        def chunks() -> Iterator[list[Int4Rows]]:
            for r0 in range(0, n, _CHUNK_ROWS):
                rows = min(_CHUNK_ROWS, n - r0)
                raw = read(r0, rows)
                if raw.numel() != rows * row_bytes:
                    raise ValueError(f"read {raw.numel()} bytes for {rows} rows of {row_bytes}")
                yield repack_rows(raw, ggml_type, k)

    n_parts = len(_REPACK[int(ggml_type)](torch.zeros((1, nbytes_block), dtype=torch.uint8)))
    return _pack(chunks(), n, n_parts, type_name(ggml_type), k)


# --- requantised copies (screens) -------------------------------------------------------------------
def requantize_rows(weight: torch.Tensor) -> Int4Rows:
    """Float rows ``(n, K)`` as 4-bit values with a bf16 scale and zero per group of 32
    (min/max), rounded against the bf16 scales the kernel will use."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    s = ((hi - lo) / 15).to(torch.bfloat16).float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: any scale, q = 8
    z = (lo + 8 * s).to(torch.bfloat16).float()
    q = torch.round((w - z[..., None]) / s[..., None] + 8).clamp_(0, 15)
    return Int4Rows(q.to(torch.uint8).reshape(n, k), s, z)


def requantize(
    weight: torch.Tensor, on_rows: Callable[[torch.Tensor, torch.Tensor, int], None] | None = None
) -> Int4Weight:
    """An int4 copy (group 32) of a float weight ``(N, K)``, built a chunk of rows at a time.

    ``on_rows(dense_rows, int4_rows_dequantised, first_row)`` sees each chunk (the LM head's
    screen measures its per-row error there)."""
    n, k = weight.shape
    if k % GROUP:
        raise NotRepackable(f"{k} inputs are not a multiple of {GROUP}")
    if available() is not None:
        raise NotRepackable(str(available()))

    def chunks() -> Iterator[list[Int4Rows]]:
        for r0 in range(0, n, _CHUNK_ROWS):
            dense = weight[r0 : r0 + _CHUNK_ROWS]
            rows = requantize_rows(dense)
            if on_rows is not None:
                on_rows(dense, rows.dequantize(), r0)
            yield [rows]

    return _pack(chunks(), n, 1, "int4", k)
