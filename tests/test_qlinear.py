"""int4 repacking of GGUF blocks (kernel_ext.gguf.qlinear) and the model-level copies built
from them (kernel_ext.providers.quantized): checked against gguf-py's own dequantisation, the
kernel's products, the loader's tensor mapping, and the conversion cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from quant_blocks import SCALES_AT, random_blocks
from tinymodels import write_tiny_gemma3, write_tiny_llama

from kernel_ext.gguf import qlinear
from kernel_ext.gguf.cache import decode_path
from kernel_ext.providers import quantized

_T = GGMLQuantizationType
_REPACKABLE = sorted(name for name in SCALES_AT if name != "Q6_K")  # Q6_K has no int4 form


def _reader(raw: np.ndarray) -> Any:
    def read(first: int, n: int) -> torch.Tensor:
        return torch.from_numpy(raw[first:first + n].copy()).reshape(-1)
    return read


@pytest.mark.parametrize("name", _REPACKABLE)
def test_repacking_round_trips_against_gguf_py(name: str) -> None:
    """The parts reproduce gguf-py's dequantisation: exactly with float32 scales, and within
    the bf16 rounding of each group's scale and zero with the scales the kernel uses."""
    rows, k = 40, 512
    raw = random_blocks(name, rows, k)
    want = torch.from_numpy(quants.dequantize(raw, _T[name]).reshape(rows, k)).double()
    parts = qlinear.repack_rows(torch.from_numpy(raw).reshape(-1), int(_T[name]), k)
    assert len(parts) == (1 if name in ("Q4_0", "Q4_1", "Q4_K") else 2)
    terms = sum(((p.q.double() - 8).abs().reshape(rows, -1, 32) * p.s.double().abs()[..., None]
                 + p.z.double().abs()[..., None]).reshape(rows, k) for p in parts)
    exact = sum(p.dequantize(torch.float32).double() for p in parts)
    # the same numbers, up to float32 rounding of the zero points (z = 8s - m)
    assert bool(((exact - want).abs() <= 2.0**-21 * terms).all())
    got = sum(p.dequantize(torch.bfloat16).double() for p in parts)
    assert bool(((got - want).abs() <= 2.0**-8 * terms + 1e-12).all())
    assert float((got - want).abs().max()) > 0 or name == "Q4_0"  # bf16 did round something


@pytest.mark.parametrize("name", _REPACKABLE)
def test_the_packed_kernel_computes_with_the_repacked_values(name: str) -> None:
    rows, k = 40, 512  # 40 rows: padded to 48 for the packing kernel, cut off again
    raw = random_blocks(name, rows, k, seed=1)
    w = qlinear.repack(_reader(raw), int(_T[name]), (k, rows))
    assert (w.out_features, w.in_features, w.source) == (rows, k, name)
    assert w.repeat == (1 if name in ("Q4_0", "Q4_1", "Q4_K") else 2)
    values = sum(p.dequantize().double()
                 for p in qlinear.repack_rows(torch.from_numpy(raw).reshape(-1), int(_T[name]), k))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    y = w(x)
    assert y.shape == (3, rows) and y.dtype == torch.float32
    xb = x.to(torch.bfloat16).double()
    ref = xb @ values.T
    # the product is rounded to bf16 (and may sum bf16 products): a generous bound
    scale = xb.abs() @ values.abs().T
    assert bool(((y.double() - ref).abs() <= 2.0**-6 * scale + 1e-9).all())


def test_a_row_order_moves_whole_rows() -> None:
    rows, k = 64, 256
    raw = random_blocks("Q4_K", rows, k, seed=3)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(4))
    plain = qlinear.repack(_reader(raw), int(_T.Q4_K), (k, rows))
    moved = qlinear.repack(_reader(raw), int(_T.Q4_K), (k, rows), order)
    x = torch.randn(2, k)
    torch.testing.assert_close(moved(x), plain(x)[:, order])
    with pytest.raises(qlinear.NotRepackable, match="not a permutation"):
        qlinear.repack(_reader(raw), int(_T.Q4_K), (k, rows), torch.zeros(rows, dtype=torch.long))


@pytest.mark.parametrize("name, why", [
    ("Q6_K", "scales every 16 values"), ("Q3_K", "scales every 16 values"),
    ("Q2_K", "scales every 16 values"), ("F32", "not quantised"), ("F16", "not quantised"),
    ("IQ4_NL", "has no int4 form"),
])
def test_types_without_a_faithful_form_say_why(name: str, why: str) -> None:
    with pytest.raises(qlinear.NotRepackable, match=why):
        qlinear.repack(lambda r, n: torch.zeros(0, dtype=torch.uint8), int(_T[name]), (256, 16))


def test_requantize_builds_a_screen_within_its_measured_error() -> None:
    w = torch.randn(100, 96)
    seen: list[torch.Tensor] = []
    int4 = qlinear.requantize(w, on_rows=lambda dense, approx, r0: seen.append(approx))
    approx = torch.cat(seen)
    assert approx.shape == w.shape and float((approx - w).abs().max()) < float(w.abs().max()) / 8
    x = torch.randn(2, 96)
    ref = x.to(torch.bfloat16).double() @ approx.double().T
    assert bool(((int4(x).double() - ref).abs() <= 2.0**-6 * (x.abs().double() @ approx.abs().double().T)).all())


# --- the model's copies -----------------------------------------------------------------------------
def _model(path: Path) -> Any:
    from kernel_ext.gguf.loader import load_transformers

    return load_transformers(path).model


def test_weight_sources_carry_llamas_row_permutation(tmp_path: Path) -> None:
    """The llama q/k rows are un-permuted by the loader: the mapping says how, exactly."""
    from kernel_ext.gguf.dequant import dequantize
    from kernel_ext.gguf.reader import read_gguf

    path = write_tiny_llama(tmp_path / "perm.gguf", seed=2, heads=4, kv_heads=2)
    model = _model(path)
    with read_gguf(path) as gf:
        sources = quantized.weight_sources(model, gf)
        q = sources["model.layers.0.self_attn.q_proj.weight"]
        assert q.tensor == "blk.0.attn_q.weight" and q.row_order is not None
        assert sources["model.layers.0.self_attn.v_proj.weight"].row_order is None
        info = gf.tensors[q.tensor]
    with open(path, "rb") as fh:
        fh.seek(info.offset)
        raw = np.frombuffer(fh.read(info.nbytes), dtype=np.uint8).copy()
    plain = dequantize(raw, info.ggml_type, info.shape)
    dense = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(dense, plain[q.row_order])


@pytest.fixture
def q8_llama(tmp_path: Path) -> tuple[Any, Path]:
    path = write_tiny_llama(tmp_path / "q8.gguf", seed=3, quant="Q8_0", heads=4, kv_heads=2)
    return _model(path), path


def test_every_linear_is_repacked_and_computes_like_the_model(q8_llama: tuple[Any, Path]) -> None:
    model, path = q8_llama
    q = quantized.repack_model(model, path)
    head = quantized.repack_model(model, path, part="head")
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(q.weights) == set(linears) - {"lm_head.weight"} and q.dense == {}
    assert set(head.weights) == {"lm_head.weight"}
    assert "Q8_0" in q.summary() and q.nbytes > 0 and not q.from_cache
    x = torch.randn(2, model.config.hidden_size)
    for name, w in {**q.weights, **head.weights}.items():
        if w.in_features != x.shape[1]:
            continue
        ref = torch.nn.functional.linear(x, linears[name].weight.detach())
        assert float((w(x) - ref).abs().max()) <= 0.02 * float(ref.abs().max()) + 1e-4, name


def test_a_wrong_mapping_stays_dense(q8_llama: tuple[Any, Path], monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """If the mapping named the wrong tensor, the check against the dense weight keeps the layer
    dense (and says so) instead of decoding with another layer's numbers."""
    model, path = q8_llama
    real = quantized.weight_sources

    def swapped(m: Any, gf: Any) -> dict[str, quantized.RowSource]:
        sources = dict(real(m, gf))
        up, gate = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"
        sources[up], sources[gate] = sources[gate], sources[up]
        return sources

    monkeypatch.setattr(quantized, "weight_sources", swapped)
    q = quantized.repack_model(model, path)
    assert set(q.dense) == {"model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"}
    assert all("does not match the model's weight" in why for why in q.dense.values())
    assert "does not match the model" in caplog.text


def test_the_copies_are_cached_checked_and_rebuilt(q8_llama: tuple[Any, Path], tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    model, path = q8_llama
    entry = tmp_path / ("ab" * 32)  # a cache entry is named by the file's SHA-256
    first = quantized.repack_model(model, path, entry=entry)
    file = decode_path(entry, f"body-int4-v{quantized._FORMAT}")
    assert file.is_file() and not first.from_cache
    again = quantized.repack_model(model, path, entry=entry)
    assert again.from_cache and set(again.weights) == set(first.weights)
    x = torch.randn(1, model.config.hidden_size)
    name = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(again.weights[name](x), first.weights[name](x))
    data = bytearray(file.read_bytes())  # one flipped byte near the end (tensor data)
    data[-5] ^= 0xFF
    file.write_bytes(bytes(data))
    rebuilt = quantized.repack_model(model, path, entry=entry)
    assert not rebuilt.from_cache and "content changed after it was cached" in caplog.text
    assert quantized.repack_model(model, path, entry=entry).from_cache  # stored afresh


def test_a_cache_file_from_another_packing_layout_is_rebuilt(
        q8_llama: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, path = q8_llama
    entry = tmp_path / ("ab" * 32)  # a cache entry is named by the file's SHA-256
    quantized.repack_model(model, path, entry=entry)
    monkeypatch.setattr(quantized, "_layout", lambda: "another CPU")
    assert not quantized.repack_model(model, path, entry=entry).from_cache


def test_a_cached_screen_is_only_used_for_its_own_head(tmp_path: Path) -> None:
    entry = tmp_path / ("ab" * 32)  # a cache entry is named by the file's SHA-256
    a, b = torch.randn(300, 64), torch.randn(300, 64)
    sa = quantized.head_screen("int4", a, entry=entry)
    again = quantized.head_screen("int4", a, entry=entry)
    torch.testing.assert_close(again.w_norm, sa.w_norm)
    other = quantized.head_screen("int4", b, entry=entry)  # same shape, another head: rebuilt
    assert torch.allclose(other.w_norm, b.double().norm(dim=1).float(), rtol=1e-5)


def test_gemma_ties_its_head_to_the_embedding(tmp_path: Path) -> None:
    """A tied head is found through the embedding's GGUF tensor and repacked once."""
    path = write_tiny_gemma3(tmp_path / "g.gguf", seed=4, quant="Q4_0")
    model = _model(path)
    q = quantized.repack_model(model, path, part="head")
    assert set(q.weights) == {"lm_head.weight"}
    assert q.sources["lm_head.weight"].tensor == "token_embd.weight"
    rows = quantized.head_rows(model, path)
    assert rows is not None
    index = torch.tensor([3, 400, 7])
    assert torch.equal(rows(index), model.lm_head.weight[index])
