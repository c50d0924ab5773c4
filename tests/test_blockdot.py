"""The block kernels (kernel_ext.gguf.blockdot): products on GGUF's own blocks with 8-bit
activations, checked against gguf-py's dequantisation; the C steps of the quantized layer
against torch; the build, its cache and the fallback when no compiler is there."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants
from quant_blocks import SCALES_AT, random_blocks

from kernel_ext.gguf import blockdot

_T = GGMLQuantizationType


def _weight(name: str, rows: int, k: int, seed: int = 0) -> tuple[blockdot.BlockWeight, torch.Tensor]:
    raw = random_blocks(name, rows, k, seed)
    w = blockdot.BlockWeight(torch.from_numpy(raw.copy()), int(_T[name]), rows, k, name)
    want = torch.from_numpy(quants.dequantize(raw, _T[name]).reshape(rows, k))
    return w, want


@pytest.mark.parametrize("name", sorted(SCALES_AT))
@pytest.mark.parametrize("m", [1, 3, 11])  # 11: more rows than one pass over the weights takes
def test_products_are_the_dequantised_blocks_times_the_int8_activations(name: str, m: int) -> None:
    rows, k = 40, 512
    w, want = _weight(name, rows, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 3
    y = w(x)
    assert y.shape == (m, rows) and y.dtype == torch.float32
    xq = torch.stack([blockdot.q8_roundtrip(r) for r in x]).double()
    ref = xq @ want.double().T
    scale = xq.abs() @ want.double().abs().T
    # integer block sums are exact; the float32 scaling and accumulation round a little
    assert bool(((y.double() - ref).abs() <= 2.0**-18 * scale + 1e-12).all())
    # and the products are those of the weight: activations count with ~16 bits (two int8 levels)
    exact = x.double() @ want.double().T
    assert float((y.double() - exact).abs().max()) <= 2.0**-11 * float(scale.max())


@pytest.mark.parametrize("name", sorted(SCALES_AT))
def test_rows_decode_to_gguf_pys_floats(name: str) -> None:
    w, want = _weight(name, 24, 256, seed=5)
    index = torch.tensor([3, 0, 23, 7])
    torch.testing.assert_close(w.rows(index), want[index], rtol=2.0**-22, atol=0.0)
    h = torch.randn(256)
    got = w.rows_dot(h, index).double()
    ref = want[index].double() @ h.double()
    assert bool(((got - ref).abs() <= 2.0**-20 * (want[index].double().abs() @ h.double().abs())).all())


def test_int8_activations_round_each_block_to_its_own_scale() -> None:
    x = torch.randn(96) * torch.tensor([1.0, 100.0, 0.0]).repeat_interleave(32)
    q = blockdot.q8_roundtrip(x)
    for b in range(3):
        xb, qb = x[32 * b:32 * b + 32], q[32 * b:32 * b + 32]
        step = float(xb.abs().max()) / 127
        assert float((qb - xb).abs().max()) <= step / 2 * (1 + 1e-6)
    assert bool((q[64:] == 0).all())  # an all-zero block stays zero (no division by zero)


def test_a_group_quantises_once_normalises_and_writes_side_by_side() -> None:
    k = 256
    a, wa = _weight("Q5_0", 48, k, seed=1)
    b, wb = _weight("Q4_K", 20, k, seed=2)
    group = blockdot.BlockGroup([a, b])
    x = torch.randn(1, k)
    plain = group(x, torch.get_num_threads()).clone()
    assert plain.shape == (1, 68)
    torch.testing.assert_close(plain, torch.cat([a(x), b(x)], dim=1), rtol=0, atol=0)
    norm = torch.rand(k) + 0.5
    got = group(x, 1, norm, 1e-6).clone()
    xn = F.rms_norm(x, (k,), norm, 1e-6)
    want = torch.cat([a(xn), b(xn)], dim=1)
    scale = float((xn.abs() @ torch.cat([wa, wb]).abs().T).max())
    assert float((got - want).abs().max()) <= scale / 127  # at most a flipped int8 rounding


def test_layer_steps_equal_torch() -> None:
    lib = blockdot.library()
    torch.manual_seed(0)
    heads, kv_heads, d, slots = 4, 2, 64, 10
    # RMS norm with weight, then rotary (x * cos + roll(x, D/2) * sin, sin's first half negated)
    x = torch.randn(heads, d)
    w = torch.rand(d) + 0.5
    cos, sin = torch.rand(d), torch.rand(d)
    got = x.clone()
    lib.bd_norm_rope(got.data_ptr(), heads, d, w.data_ptr(), 1e-6, cos.data_ptr(), sin.data_ptr())
    n = F.rms_norm(x, (d,), w, 1e-6)
    torch.testing.assert_close(got, n * cos + torch.roll(n, d // 2, -1) * sin, rtol=1e-5, atol=1e-6)
    got = x.clone()
    lib.bd_norm_rope(got.data_ptr(), heads, d, None, 0.0, cos.data_ptr(), sin.data_ptr())
    torch.testing.assert_close(got, x * cos + torch.roll(x, d // 2, -1) * sin)
    # the new key and value stored at two slots (a doubled ring), then the attention of one
    # query over slots [lo, hi), two query heads per key head
    q = torch.randn(heads, d)
    keys, values = torch.randn(1, kv_heads, slots, d), torch.randn(1, kv_heads, slots, d)
    k_new, v_new = torch.randn(kv_heads, d), torch.randn(kv_heads, d)
    out = torch.empty(heads, d)
    lib.bd_attend(q.data_ptr(), heads, kv_heads, d, keys.data_ptr(), values.data_ptr(), slots,
                  k_new.data_ptr(), v_new.data_ptr(), 3, 8, 2, 9, 0.125, out.data_ptr())
    for at in (3, 8):
        assert torch.equal(keys[0, :, at], k_new) and torch.equal(values[0, :, at], v_new)
    want = F.scaled_dot_product_attention(q.view(1, heads, 1, d), keys[:, :, 2:9], values[:, :, 2:9],
                                          scale=0.125, enable_gqa=True)
    torch.testing.assert_close(out, want.view(heads, d), rtol=1e-5, atol=1e-6)
    before = keys.clone()
    lib.bd_attend(q.data_ptr(), heads, kv_heads, d, keys.data_ptr(), values.data_ptr(), slots,
                  k_new.data_ptr(), v_new.data_ptr(), 0, -1, 0, 1, 0.125, out.data_ptr())
    assert torch.equal(keys[0, :, 0], k_new) and torch.equal(keys[:, :, 1:], before[:, :, 1:])
    torch.testing.assert_close(out.view(kv_heads, 2, d), v_new[:, None].expand(kv_heads, 2, d))
    # residual: h += rms_norm(a) * w, or h += a
    h, a, wh = torch.randn(1, 96), torch.randn(1, 96), torch.rand(96)
    got = h.clone()
    lib.bd_add_norm(got.data_ptr(), a.data_ptr(), wh.data_ptr(), 96, 1e-6)
    torch.testing.assert_close(got, h + F.rms_norm(a, (96,), wh, 1e-6), rtol=1e-5, atol=1e-6)
    got = h.clone()
    lib.bd_add_norm(got.data_ptr(), a.data_ptr(), None, 96, 0.0)
    torch.testing.assert_close(got, h + a)


def test_gated_activations_equal_torch() -> None:
    """gelu-tanh and SiLU through a rational tanh: within a few float32 ulps of torch, on the
    scale of ``gate * up`` (where 1 + tanh cancels, the absolute error stays that small)."""
    lib = blockdot.library()
    gate = torch.cat([torch.linspace(-12, 12, 2001), torch.randn(1000) * 3])
    up = torch.randn(gate.numel())
    for kind, want in ((1, F.gelu(gate, approximate="tanh") * up), (2, F.silu(gate) * up)):
        out = torch.empty_like(gate)
        lib.bd_gated(gate.data_ptr(), up.data_ptr(), gate.numel(), kind, out.data_ptr())
        assert bool(((out - want).abs() <= 1e-6 * (1 + (gate * up).abs())).all()), kind


def test_certificate_scans_equal_torch() -> None:
    from kernel_ext.providers.head import _argmax_finite, _at_least

    a = torch.randn(100_003)
    a[777] = a[90_001] = float(a.max()) + 1  # equal maxima: the first one
    assert _argmax_finite(a) == 777 == int(torch.argmax(a))
    assert torch.equal(_at_least(a, 1.5), torch.nonzero(a >= 1.5).flatten())
    assert _at_least(a, 1e9).numel() == 0
    for bad in (float("nan"), float("inf"), -float("inf")):
        b = a.clone()
        b[5] = bad
        assert _argmax_finite(b) is None


def test_shapes_and_types_the_kernels_do_not_take_are_refused() -> None:
    assert blockdot.row_bytes(int(_T.Q4_K), 100) == 0  # not whole super-blocks
    assert blockdot.row_bytes(int(_T.IQ4_NL), 256) == 0
    assert blockdot.row_bytes(int(_T.F16), 256) == 0
    with pytest.raises(ValueError, match="do not hold"):
        blockdot.BlockWeight(torch.zeros(4, 10, dtype=torch.uint8), int(_T.Q8_0), 4, 64, "Q8_0")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the portable build is checked on x86-64")
def test_the_portable_build_computes_what_the_vectorised_one_does(tmp_path: Path) -> None:
    """CPUs without AVX2 get plain C of the same arithmetic (built here for baseline x86-64)."""
    import ctypes

    cc = blockdot._compiler()
    assert cc is not None
    target = tmp_path / "portable.so"
    blockdot._build(cc, target, arch=("-march=x86-64",))
    portable = blockdot._declare(ctypes.CDLL(str(target)), target)
    native = blockdot.library()
    for name in sorted(SCALES_AT):
        w, _ = _weight(name, 24, 512, seed=7)
        for m in (1, 5):
            x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
            ys = []
            for lib in (native, portable):
                y = torch.empty(m, 24)
                assert lib.bd_matmul(int(_T[name]), w.blocks.data_ptr(), w.blocks.shape[1], 24, 512,
                                     x.data_ptr(), m, y.data_ptr(), 24, 1) == 0
                ys.append(y)
            torch.testing.assert_close(ys[1], ys[0], rtol=1e-5, atol=1e-5, msg=name)
        out = [torch.empty(512) for _ in range(2)]
        for lib, o in zip((native, portable), out):
            lib.bd_q8_roundtrip(x[0].contiguous().data_ptr(), 512, o.data_ptr())
        assert torch.equal(out[0], out[1])


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, **env}, timeout=300)


def test_the_build_is_kept_per_cpu_and_compiler_and_reused(tmp_path: Path) -> None:
    code = ("from kernel_ext.gguf import blockdot; import os; print(blockdot.unavailable()); "
            "print(sorted(os.listdir(os.environ['KERNEL_EXT_CACHE'] + '/native')))")
    first = _python(code, {"KERNEL_EXT_CACHE": str(tmp_path)})
    assert first.returncode == 0, first.stderr
    lines = first.stdout.split("\n")
    assert lines[0] == "None" and "blockdot-" in lines[1] and ".so" in lines[1]
    built = next((tmp_path / "native").glob("blockdot-*.so"))
    stamp = built.stat().st_mtime_ns
    again = _python(code, {"KERNEL_EXT_CACHE": str(tmp_path)})
    assert again.stdout == first.stdout and built.stat().st_mtime_ns == stamp  # not rebuilt
