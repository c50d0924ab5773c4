"""kernel_ext.gguf.dequant against gguf-py's numpy reference, type by type."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from kernel_ext.errors import GGUFFormatError, GGUFUnsupportedError
from kernel_ext.gguf.dequant import SUPPORTED_TYPES, dequantize, supported_type_names

T = GGMLQuantizationType
# types gguf-py can quantise, so the reference data is a real quantisation of random values
QUANTISABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# K-quants: gguf-py only dequantises them, so the blocks are random valid bytes
K_QUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# where each K-quant block keeps its fp16 super-block scale(s)
_K_HALVES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32) * 3
    x.flat[:7] = [0.0, -0.0, 1e-8, -65000.0, 65000.0, 0.5, -2.25]  # zeros, tiny, fp16 extremes
    return x


def _quantised(qtype: T, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw bytes, numpy reference values) for values of numpy shape ``shape``."""
    x = _values(np.random.default_rng(seed), shape)
    if qtype == T.F32:
        raw = x
    elif qtype == T.F16:
        raw = x.astype(np.float16)
    else:
        raw = quants.quantize(x, qtype)
    raw_u8 = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    ref = (
        quants.dequantize(raw_u8.reshape(*shape[:-1], -1), qtype)
        if qtype not in (T.F32, T.F16)
        else raw.astype(np.float32)
    )
    return raw_u8, ref.reshape(shape)


def _k_blocks(qtype: T, n_blocks: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for at in _K_HALVES[qtype]:
        scales = (rng.uniform(-1, 1, n_blocks) * 0.01).astype(np.float16)
        raw[:, at : at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


@pytest.mark.parametrize("qtype", QUANTISABLE, ids=lambda t: t.name)
def test_matches_gguf_reference_exactly(qtype: T) -> None:
    shape = (6, 256)  # numpy/PyTorch order: 6 rows of 256
    raw, ref = _quantised(qtype, shape)
    got = dequantize(raw, int(qtype), (256, 6))  # GGUF order: ne0 first
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quants_match_gguf_reference(qtype: T) -> None:
    raw = _k_blocks(qtype, 12)
    ref = quants.dequantize(raw, qtype).reshape(-1)
    got = dequantize(raw, int(qtype), (256 * 12,)).numpy()
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_are_close_to_fp32(qtype: T, dtype: torch.dtype) -> None:
    raw = _k_blocks(qtype, 8) if qtype in K_QUANTS else _quantised(qtype, (8, 256))[0]
    shape = (256, 8)
    full = dequantize(raw, int(qtype), shape)
    half = dequantize(raw, int(qtype), shape, dtype=dtype)
    assert half.dtype == dtype and half.shape == full.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(half.float(), full, rtol=tol, atol=tol * full.abs().max().item())


def test_q8_0_agrees_with_transformers_kernel() -> None:
    from transformers.integrations.gguf import dequant as hf

    raw, _ = _quantised(T.Q8_0, (4, 512))
    ours = dequantize(raw, int(T.Q8_0), (512, 4)).reshape(-1)
    theirs = hf.dequantize(torch.from_numpy(raw.copy()), int(T.Q8_0))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_shape_is_reversed_for_3d_tensors() -> None:
    raw, ref = _quantised(T.Q8_0, (3, 2, 64))
    got = dequantize(raw, int(T.Q8_0), (64, 2, 3))
    assert tuple(got.shape) == (3, 2, 64)
    np.testing.assert_array_equal(got.numpy(), ref)


def test_read_only_mmap_views_and_tensors_are_accepted_without_copy_warnings() -> None:
    raw, ref = _quantised(T.Q5_0, (2, 64))
    readonly = np.frombuffer(raw.tobytes(), dtype=np.uint8)
    assert not readonly.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = dequantize(readonly, int(T.Q5_0), (64, 2))
    np.testing.assert_array_equal(got.numpy(), ref)
    got_t = dequantize(torch.from_numpy(raw.copy()), int(T.Q5_0), (64, 2))
    np.testing.assert_array_equal(got_t.numpy(), ref)


def test_f32_result_does_not_alias_the_input() -> None:
    raw, _ = _quantised(T.F32, (1, 32))
    got = dequantize(raw, int(T.F32), (32, 1))
    got.add_(1.0)
    assert np.frombuffer(raw.tobytes(), dtype=np.float32)[10] != got[0, 10].item()


@pytest.mark.parametrize("type_id", [9, 15, 34, 99])  # Q8_1, Q8_K, TQ1_0, unknown
def test_unsupported_type_names_the_supported_ones(type_id: int) -> None:
    with pytest.raises(GGUFUnsupportedError) as info:
        dequantize(np.zeros(64, dtype=np.uint8), type_id, (32,))
    message = str(info.value)
    assert "Q4_K" in message and "Q5_0" in message and "BF16" in message
    assert type_id not in SUPPORTED_TYPES


def test_required_types_are_supported() -> None:
    names = set(supported_type_names())
    assert {
        "F32",
        "F16",
        "BF16",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
    } <= names


def test_wrong_byte_count_is_a_format_error() -> None:
    raw, _ = _quantised(T.Q8_0, (1, 64))
    with pytest.raises(GGUFFormatError, match="needs 68 bytes, got 67"):
        dequantize(raw[:-1], int(T.Q8_0), (64,))


def test_element_count_not_a_block_multiple_is_a_format_error() -> None:
    with pytest.raises(GGUFFormatError, match="block size 32"):
        dequantize(np.zeros(34, dtype=np.uint8), int(T.Q8_0), (31,))


def test_non_uint8_input_is_refused() -> None:
    with pytest.raises(TypeError, match="uint8"):
        dequantize(np.zeros(8, dtype=np.float32), int(T.F32), (8,))


def test_empty_tensor() -> None:
    got = dequantize(np.zeros(0, dtype=np.uint8), int(T.Q4_K), (256, 0))
    assert tuple(got.shape) == (0, 256)
