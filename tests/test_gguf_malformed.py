"""The reader refuses malformed GGUF files with typed errors that name the field and offset.

The corpus is built by hand (tests/gguf_bytes.py); each case states the field and byte offset
the error must name. Then: truncation at every byte, seeded random byte flips under
tracemalloc, and huge counts that must fail fast.
"""

from __future__ import annotations

import random
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from gguf_bytes import (
    F32,
    Q8_0,
    T_ARRAY,
    T_BOOL,
    T_STRING,
    T_UINT8,
    T_UINT32,
    T_UINT64,
    GGUFBytes,
    gstr,
    rewrite,
    str_items,
    u32,
    u64,
    valid_file,
)

from kernel_ext.errors import GGUFFormatError, GGUFUnsupportedError, KernelExtError
from kernel_ext.gguf import read_gguf


@dataclass
class Case:
    name: str
    make: Callable[[], GGUFBytes]
    field: str
    offset: str | int  # a key of GGUFBytes.offsets, or a literal byte offset
    says: str = ""  # a piece of the message
    error: type[Exception] = GGUFFormatError
    raw: Callable[[bytes, dict[str, int]], bytes] | None = None  # post-process the bytes
    limits: dict[str, int] | None = None  # read_gguf keywords; default max_string_bytes=256


def _v(**changes: object) -> GGUFBytes:
    g = valid_file()
    for k, val in changes.items():
        setattr(g, k, val)
    return g


def _replace_kv(key: str, vtype: int, payload: bytes) -> Callable[[], GGUFBytes]:
    def make() -> GGUFBytes:
        g = valid_file()
        for kv in g.kvs:
            if kv.key == key.encode():
                kv.vtype, kv.payload, kv.item_type = vtype, payload, None
                if vtype == T_ARRAY:
                    kv.item_type = struct.unpack_from("<I", payload)[0]
        return g
    return make


def _tensor(dims: tuple[int, ...], ggml_type: int = F32, offset: int = 0,
            n_dims: int | None = None, name: str = "x") -> Callable[[], GGUFBytes]:
    def make() -> GGUFBytes:
        g = GGUFBytes()
        g.str_kv("general.architecture", "llama")
        g.tensor(name, dims, ggml_type, offset, n_dims=n_dims)
        g.data = bytes(64)
        return g
    return make


def _two_tensors(first: tuple[int, int, int], second: tuple[int, int, int],
                 data: int = 256) -> Callable[[], GGUFBytes]:
    """Tensors a, b of (ne0, type, offset) with ``data`` bytes of data."""
    def make() -> GGUFBytes:
        g = GGUFBytes()
        g.str_kv("general.architecture", "llama")
        g.tensor("a", (first[0],), first[1], first[2])
        g.tensor("b", (second[0],), second[1], second[2])
        g.data = bytes(data)
        return g
    return make


def _dup_key() -> GGUFBytes:
    return valid_file().u32_kv("llama.context_length", 256)


def _dup_tensor() -> GGUFBytes:
    g = valid_file()
    g.tensor("a.weight", (4,), F32, 128)
    g.data += bytes(64)
    return g


def _with_kv(add: Callable[[GGUFBytes], object]) -> Callable[[], GGUFBytes]:
    def make() -> GGUFBytes:
        g = valid_file()
        add(g)
        return g
    return make


BIG = 2**64 - 1
CASES = [
    Case("bad magic", lambda: _v(magic=b"GGUX"), "header.magic", 0, "not a GGUF file"),
    Case("old ggjt magic", lambda: _v(magic=b"tjgg"), "header.magic", 0, "GGJT"),
    Case("empty file", valid_file, "header.magic", 0, "empty or truncated",
         raw=lambda b, o: b""),
    Case("short header", valid_file, "header.tensor_count", 10, "truncated",
         raw=lambda b, o: b[:10]),
    Case("version 1", lambda: _v(version=1), "header.version", 4, "v2 and v3"),
    Case("version 4", lambda: _v(version=4), "header.version", 4, "v2 and v3"),
    Case("version 0", lambda: _v(version=0), "header.version", 4, "unsupported GGUF version"),
    Case("big-endian", valid_file, "header.version", 4, "big-endian",
         raw=lambda b, o: b[:4] + struct.pack(">I", 3) + b[8:]),
    Case("huge kv count", lambda: _v(n_kv=BIG), "header.kv_count", 16, "metadata entries"),
    Case("kv count slightly too big", lambda: _v(n_kv=100), "header.kv_count", 16,
         "would not fit"),
    Case("huge tensor count", lambda: _v(n_tensors=2**40), "header.tensor_count", 8, "tensors"),
    Case("tensor count larger than present", lambda: _v(n_tensors=3), "tensor[2].name",
         ("b.weight.offset", 8), "empty name"),  # reads the zero padding after the table
    Case("key length above max_string_bytes", _with_kv(lambda g: g.u32_kv("zz", 1)),
         "kv[19].key", "kv[19].key", "max_string_bytes",
         raw=lambda b, o: b[:o["kv[19].key"]] + u64(2**40) + b[o["kv[19].key"] + 8:]),
    Case("key past end", _with_kv(lambda g: g.u32_kv("zzzzzz", 1)), "kv[19].key", "kv[19].key",
         "only 3 bytes are left", raw=lambda b, o: b[:o["kv[19].key"] + 8 + 3]),
    Case("empty key", _with_kv(lambda g: g.kv(b"", T_UINT8, b"\x01")), "kv[19].key",
         "kv[19].key", "empty key"),
    Case("invalid UTF-8 key", _with_kv(lambda g: g.kv(b"bad\xff", T_UINT8, b"\x01")),
         "kv[19].key", "kv[19].key", "not valid UTF-8"),
    Case("invalid UTF-8 value", _with_kv(lambda g: g.str_kv("s", b"\xc3\x28")), "s", "s",
         "not valid UTF-8"),
    Case("string value past end", _with_kv(lambda g: g.str_kv("s", "abc", length=2**40)),
         "s", "s", "bytes are left", limits={"max_string_bytes": 2**50}),
    Case("string value above max_string_bytes",
         _with_kv(lambda g: g.str_kv("s", "x" * 300)), "s", "s", "max_string_bytes"),
    Case("unknown value type", _with_kv(lambda g: g.kv("k", 13, b"\0" * 8)), "k.type", "k.type",
         "unknown value type 13"),
    Case("unknown array item type", _with_kv(lambda g: g.array_kv("k", 42, b"", 0)),
         "k.item_type", "k.item_type", "unknown item type 42"),
    Case("nested arrays", _with_kv(lambda g: g.array_kv("k", T_ARRAY, u32(T_UINT8) + u64(0), 1)),
         "k.item_type", "k.item_type", "array of arrays"),
    Case("huge numeric array count",
         _with_kv(lambda g: g.array_kv("k", T_UINT32, b"", 2**62)), "k.count", "k.count",
         "items of 4 bytes"),
    Case("numeric array past end", _with_kv(lambda g: g.array_kv("k", T_UINT64, b"", 200)),
         "k.count", "k.count", "truncated"),
    Case("huge string array count",
         _with_kv(lambda g: g.array_kv("k", T_STRING, b"", BIG)), "k.count", "k.count",
         "strings"),
    Case("string array item past end",
         _with_kv(lambda g: g.array_kv("k", T_STRING, gstr("ok") + gstr("x", length=2**33), 2)),
         "k[1]", ("k.items", 10), "bytes are left", limits={"max_string_bytes": 2**50}),
    Case("string array length prefix cut off",
         _with_kv(lambda g: g.array_kv("k", T_STRING, gstr("x" * 24) + gstr("y"), 2)),
         "k[1].length", ("k.items", 32), "needs 8 bytes",
         raw=lambda b, o: b[:o["k.items"] + 32 + 2]),
    Case("invalid UTF-8 in string array",
         _with_kv(lambda g: g.array_kv("k", T_STRING, str_items("a", b"\xed\xa0\x80"), 2)),
         "k[1]", ("k.items", 9), "not valid UTF-8"),
    Case("bool value 2", _with_kv(lambda g: g.kv("b", T_BOOL, b"\x02")), "b", "b", "not 0 or 1"),
    Case("bool array value 7", _with_kv(lambda g: g.array_kv("b", T_BOOL, b"\x01\x07", 2)),
         "b[1]", ("b.items", 1), "not 0 or 1"),
    Case("duplicate key", _dup_key, "llama.context_length", "kv[19].key", "appears twice"),
    Case("alignment 0", _replace_kv("general.alignment", T_UINT32, u32(0)), "general.alignment",
         "general.alignment", "not a power of two"),
    Case("alignment 48", _replace_kv("general.alignment", T_UINT32, u32(48)),
         "general.alignment", "general.alignment", "not a power of two"),
    Case("alignment huge", _replace_kv("general.alignment", T_UINT32, u32(1 << 30)),
         "general.alignment", "general.alignment", "largest plausible"),
    Case("alignment wrong type", _replace_kv("general.alignment", T_UINT64, u64(32)),
         "general.alignment", "general.alignment", "must be a uint32"),
    Case("alignment string", _replace_kv("general.alignment", T_STRING, gstr("32")),
         "general.alignment", "general.alignment", "must be a uint32"),
    Case("duplicate tensor", _dup_tensor, "tensor[2].name", "tensor[2].name", "appears twice"),
    Case("empty tensor name", _tensor((4,), name=""), "tensor[0].name", "tensor[0].name",
         "empty name"),
    Case("n_dims 0", _tensor((), n_dims=0), "x.n_dims", "x.n_dims", "1 to 4"),
    Case("n_dims 5", _tensor((1, 1, 1, 1, 1)), "x.n_dims", "x.n_dims", "1 to 4"),
    Case("n_dims huge", _tensor((1,), n_dims=2**31), "x.n_dims", "x.n_dims", "1 to 4"),
    Case("zero dimension", _tensor((4, 0)), "x.dims[1]", ("x.dims", 8), "dimension 1 = 0"),
    Case("dimension beyond int64", _tensor((2**63,)), "x.dims[0]", "x.dims", "2**63-1"),
    Case("dimension product overflows int64", _tensor((2**32, 2**32)), "x.dims", "x.dims",
         "overflows int64"),
    Case("dimension product beyond file", _tensor((2**31, 2**31)), "x.offset", "x.offset",
         "runs past the end"),
    Case("tensor type not a ggml type", _tensor((4,), ggml_type=1000), "x.type", "x.type",
         "not a ggml type"),
    Case("Q8_0 row not a multiple of 32", _tensor((33, 2), ggml_type=Q8_0), "x.dims[0]",
         "x.dims", "multiple of its block size 32"),
    Case("misaligned tensor", _tensor((4,), offset=4), "x.offset", "x.offset",
         "multiple of the alignment 32"),
    Case("tensor offset beyond file", _tensor((4,), offset=2**63), "x.offset", "x.offset",
         "past the end"),
    Case("tensor offset at u64 max", _tensor((4,), offset=BIG - 31), "x.offset", "x.offset",
         "past the end"),
    Case("tensor data past end", _tensor((32,), offset=32), "x.offset", "x.offset",
         "past the end"),
    Case("overlapping tensors", _two_tensors((16, F32, 0), (8, F32, 32)), "b.offset",
         "b.offset", "overlaps tensor 'a'"),
    Case("overlap, listed in reverse", _two_tensors((8, F32, 64), (32, F32, 0)), "a.offset",
         "a.offset", "overlaps tensor 'b'"),
    Case("truncated tensor table", valid_file, "b.weight.offset", "b.weight.offset",
         "truncated", raw=lambda b, o: b[:o["b.weight.offset"] + 3]),
]


def _write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_file_is_refused_naming_field_and_offset(case: Case, tmp_path: Path) -> None:
    g = case.make()
    data = g.build()
    if case.raw is not None:
        data = case.raw(data, g.offsets)
    if isinstance(case.offset, tuple):
        base, delta = case.offset
        offset = g.offsets[base] + delta
    else:
        offset = g.offsets[case.offset] if isinstance(case.offset, str) else case.offset
    p = _write(tmp_path, data)
    with pytest.raises(case.error) as info:
        read_gguf(p, **(case.limits or {"max_string_bytes": 256}))
    err = info.value
    assert err.field == case.field
    assert err.offset == offset
    assert f"field {case.field!r}" in str(err) and f"byte offset {offset}" in str(err)
    assert case.says in str(err)
    assert str(p) in str(err)


def test_every_case_is_distinct_and_named() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


def test_unknown_tensor_type_is_unsupported_listing_supported_types(tmp_path: Path) -> None:
    p = _write(tmp_path, _tensor((4,), ggml_type=99)().build())
    with pytest.raises(GGUFUnsupportedError) as info:
        read_gguf(p)
    msg = str(info.value)
    assert "x (type 99, type id 99)" in msg
    for supported in ("F32", "Q4_K", "Q5_0", "Q8_0", "Q6_K", "BF16"):
        assert f"{supported} (" in msg
    assert isinstance(info.value, NotImplementedError)


def test_removed_tensor_type_says_requantise(tmp_path: Path) -> None:
    p = _write(tmp_path, _tensor((32,), ggml_type=4)().build())  # Q4_2, removed in 2023
    with pytest.raises(GGUFUnsupportedError, match="removed from ggml: re-quantise"):
        read_gguf(p)


def test_format_errors_take_precedence_over_unsupported_types(tmp_path: Path) -> None:
    # b overlaps a: the overlap is a format error even though c has an unknown type
    g = _two_tensors((16, F32, 0), (8, F32, 32))()
    g.tensor("c", (4,), 99, 128)
    with pytest.raises(GGUFFormatError, match="overlaps"):
        read_gguf(_write(tmp_path, g.build()))


def test_unknown_type_tensor_offset_still_checked(tmp_path: Path) -> None:
    with pytest.raises(GGUFFormatError, match="beyond the end of the file"):
        read_gguf(_write(tmp_path, _tensor((4,), ggml_type=99, offset=1 << 40)().build()))


def test_non_strict_mode_tolerates_harmless_oddities(tmp_path: Path) -> None:
    g = valid_file()
    g.str_kv("s", b"ok\xff")
    g.kv("b", T_BOOL, b"\x02")
    g.array_kv("bs", T_BOOL, b"\x00\x05", 2)
    g.tensor("c", (4,), F32, 100 + 4)  # misaligned but inside the data and not overlapping
    g.data += bytes(64)
    p = _write(tmp_path, g.build())
    with pytest.raises(GGUFFormatError):
        read_gguf(p)
    with read_gguf(p, strict=False) as f:
        assert f.metadata["s"] == "ok\ufffd"
        assert f.metadata["b"] is True
        assert f.metadata["bs"].tolist() == [False, True]
        assert f.tensors["c"].offset == f.data_offset + 104


def test_non_strict_mode_still_refuses_invalid_utf8_keys(tmp_path: Path) -> None:
    p = _write(tmp_path, valid_file().kv(b"k\xff", T_UINT8, b"\x01").build())
    with pytest.raises(GGUFFormatError, match="not valid UTF-8"):
        read_gguf(p, strict=False)


def test_long_names_are_shortened_in_messages(tmp_path: Path) -> None:
    key = "k" * 10_000
    p = _write(tmp_path, valid_file().kv(key, 13, b"").build())
    with pytest.raises(GGUFFormatError, match="unknown value type 13") as info:
        read_gguf(p)
    assert info.value.field is not None and info.value.field.startswith("k" * 100 + "...")
    assert "10000 characters" in str(info.value) and len(str(info.value)) < 1000


def test_max_string_bytes_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_string_bytes"):
        read_gguf(_write(tmp_path, valid_file().build()), max_string_bytes=0)


# --- truncation, byte flips, huge counts -------------------------------------------------------
def test_truncation_at_every_byte_is_a_format_error(tmp_path: Path) -> None:
    data = valid_file().build()
    p = _write(tmp_path, data)
    read_gguf(p).close()  # the whole file is fine
    fields: set[str] = set()
    for cut in range(len(data)):
        rewrite(p, data[:cut])
        with pytest.raises(GGUFFormatError) as info:
            read_gguf(p)
        assert info.value.field and info.value.offset is not None
        assert 0 <= info.value.offset <= cut
        fields.add(info.value.field.split(".")[-1])
    # the cuts hit every part of the format, not one early check over and over
    assert {"magic", "version", "length", "type", "count", "n_dims", "offset"} <= fields


def _peak_during(fn: Callable[[], object]) -> int:
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    fn()
    return tracemalloc.get_traced_memory()[1] - before


def _read_and_close(p: Path) -> None:
    try:
        read_gguf(p).close()
    except KernelExtError:
        return


def test_random_byte_flips_raise_only_library_errors_and_allocate_little(tmp_path: Path) -> None:
    base = valid_file()
    base.array_kv("test.u16s", 2, bytes(range(64)), 32)
    data = base.build()
    rng = random.Random(20261126)
    p = _write(tmp_path, data)
    limit = 2 * len(data) + 64 * 1024
    outcomes = {"ok": 0, "refused": 0}
    tracemalloc.start()
    try:
        worst = 0
        for _ in range(3000):
            b = bytearray(data)
            for _ in range(rng.choice((1, 1, 2, 4))):
                pos = rng.randrange(len(b))
                b[pos] = rng.choice((rng.randrange(256), 0xFF, 0x00, b[pos] ^ 0x80))
            rewrite(p, bytes(b))
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            try:
                read_gguf(p).close()
                outcomes["ok"] += 1
            except KernelExtError:
                outcomes["refused"] += 1
            worst = max(worst, tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    print(f"flips: {outcomes}, worst peak {worst} bytes (limit {limit})")
    assert worst < limit, f"a flipped file made the reader allocate {worst} bytes"
    assert outcomes["refused"] > 500 and outcomes["ok"] > 50  # both paths were exercised


@pytest.mark.timeout(20)
@pytest.mark.parametrize("builder", [
    lambda: _v(n_kv=BIG, n_tensors=BIG),
    lambda: valid_file().array_kv("k", T_STRING, b"", BIG // 2),
    lambda: valid_file().array_kv("k", T_UINT8, b"", BIG),
    lambda: valid_file().str_kv("k", "", length=BIG),
    lambda: _tensor((2**62, 2**62, 2**62, 2**62))(),
    lambda: _tensor((1,), n_dims=BIG & 0xFFFFFFFF)(),
], ids=["header counts", "string array", "u8 array", "string", "dims", "n_dims"])
def test_huge_counts_fail_fast_without_allocating(builder: Callable[[], GGUFBytes],
                                                  tmp_path: Path) -> None:
    p = _write(tmp_path, builder().build())
    tracemalloc.start()
    try:
        peak = _peak_during(lambda: _read_and_close(p))
    finally:
        tracemalloc.stop()
    with pytest.raises(GGUFFormatError):
        read_gguf(p)
    assert peak < 64 * 1024


def test_max_count_of_empty_strings_is_read_within_bounds(tmp_path: Path) -> None:
    # the largest count the size check lets through: every remaining byte is a length prefix
    n = 50_000
    g = GGUFBytes()
    g.str_kv("general.architecture", "llama")
    g.array_kv("tokenizer.ggml.tokens", T_STRING, u64(0) * n, n)
    p = _write(tmp_path, g.build())
    tracemalloc.start()
    try:
        peak = _peak_during(lambda: _read_and_close(p))
    finally:
        tracemalloc.stop()
    with read_gguf(p) as f:
        assert f.metadata["tokenizer.ggml.tokens"] == [""] * n
    assert peak < 2 * p.stat().st_size + 64 * 1024
