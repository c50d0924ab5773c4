"""Hand-built GGUF bytes for the reader's tests.

``gguf.GGUFWriter`` refuses most malformed shapes, so the malformed corpus is assembled here
with ``struct``. :class:`GGUFBytes` records the byte offset of every field it writes in
``offsets`` (same names as the reader's ``GGUFFormatError.field``), so a test can assert
exactly where the reader says the problem is.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

__all__ = [
    "F16",
    "F32",
    "Q8_0",
    "T_ARRAY",
    "T_BOOL",
    "T_FLOAT32",
    "T_FLOAT64",
    "T_INT8",
    "T_INT16",
    "T_INT32",
    "T_INT64",
    "T_STRING",
    "T_UINT8",
    "T_UINT16",
    "T_UINT32",
    "T_UINT64",
    "GGUFBytes",
    "gstr",
    "rewrite",
    "str_items",
    "u32",
    "u64",
    "valid_file",
]

T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = 8, 9, 10, 11, 12
F32, F16, Q8_0 = 0, 1, 8


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes, *, length: int | None = None) -> bytes:
    """A GGUF string: u64 length (``length`` overrides it) and the bytes."""
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b) if length is None else length) + b


def str_items(*items: str | bytes) -> bytes:
    return b"".join(gstr(s) for s in items)


@dataclass
class _KV:
    key: bytes
    vtype: int
    payload: bytes  # everything after the type field
    item_type: int | None = None  # arrays: where .item_type/.count sit in the payload


@dataclass
class _Tensor:
    name: bytes
    dims: tuple[int, ...]
    ggml_type: int
    offset: int
    n_dims: int | None = None  # overrides len(dims) in the file


@dataclass
class GGUFBytes:
    """A GGUF file under construction; every count and field can be overridden."""

    magic: bytes = b"GGUF"
    version: int = 3
    n_tensors: int | None = None  # None: the real count
    n_kv: int | None = None
    alignment: int = 32  # used for padding only; add the KV yourself to declare it
    kvs: list[_KV] = field(default_factory=list)
    tensors: list[_Tensor] = field(default_factory=list)
    data: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)

    # --- metadata ------------------------------------------------------------------------------
    def kv(self, key: str | bytes, vtype: int, payload: bytes) -> GGUFBytes:
        k = key.encode() if isinstance(key, str) else key
        self.kvs.append(_KV(k, vtype, payload))
        return self

    def scalar(self, key: str, vtype: int, fmt: str, value: object) -> GGUFBytes:
        return self.kv(key, vtype, struct.pack("<" + fmt, value))

    def u32_kv(self, key: str, value: int) -> GGUFBytes:
        return self.kv(key, T_UINT32, u32(value))

    def str_kv(self, key: str, value: str | bytes, *, length: int | None = None) -> GGUFBytes:
        return self.kv(key, T_STRING, gstr(value, length=length))

    def array_kv(self, key: str, item_type: int, items: bytes, count: int) -> GGUFBytes:
        k = key.encode()
        self.kvs.append(_KV(k, T_ARRAY, u32(item_type) + u64(count) + items, item_type))
        return self

    # --- tensors -------------------------------------------------------------------------------
    def tensor(self, name: str | bytes, dims: tuple[int, ...], ggml_type: int, offset: int,
               *, n_dims: int | None = None) -> GGUFBytes:
        n = name.encode() if isinstance(name, str) else name
        self.tensors.append(_Tensor(n, dims, ggml_type, offset, n_dims))
        return self

    # --- output --------------------------------------------------------------------------------
    def build(self) -> bytes:
        out = bytearray()
        self.offsets = {"header.magic": 0, "header.version": 4, "header.tensor_count": 8,
                        "header.kv_count": 16}
        n_t = len(self.tensors) if self.n_tensors is None else self.n_tensors
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        out += self.magic + u32(self.version) + u64(n_t) + u64(n_kv)
        for i, kv in enumerate(self.kvs):
            key = kv.key.decode(errors="replace")
            self.offsets.setdefault(f"kv[{i}].key", len(out))
            self.offsets[f"{key}@kv"] = len(out)
            out += gstr(kv.key)
            self.offsets[f"{key}.type"] = len(out)
            out += u32(kv.vtype)
            self.offsets[key] = len(out)
            if kv.item_type is not None:
                self.offsets[f"{key}.item_type"] = len(out)
                self.offsets[f"{key}.count"] = len(out) + 4
                self.offsets[f"{key}.items"] = len(out) + 12
            out += kv.payload
        for i, t in enumerate(self.tensors):
            name = t.name.decode(errors="replace")
            self.offsets[f"tensor[{i}].name"] = len(out)
            out += gstr(t.name)
            self.offsets[f"{name}.n_dims"] = len(out)
            out += u32(len(t.dims) if t.n_dims is None else t.n_dims)
            self.offsets[f"{name}.dims"] = len(out)
            out += b"".join(u64(d) for d in t.dims)
            self.offsets[f"{name}.type"] = len(out)
            out += u32(t.ggml_type)
            self.offsets[f"{name}.offset"] = len(out)
            out += u64(t.offset)
        out += b"\0" * (-len(out) % self.alignment)
        self.offsets["data"] = len(out)
        out += self.data
        return bytes(out)


def valid_file() -> GGUFBytes:
    """A small well-formed file: every value type, arrays, an F32 and a Q8_0 tensor.

    The file ends exactly where the last tensor's data ends, so cutting off any byte makes it
    malformed.
    """
    g = GGUFBytes()
    g.str_kv("general.architecture", "llama")
    g.str_kv("general.name", "tiny ünïcode")
    g.scalar("test.u8", T_UINT8, "B", 200)
    g.scalar("test.i8", T_INT8, "b", -100)
    g.scalar("test.u16", T_UINT16, "H", 60000)
    g.scalar("test.i16", T_INT16, "h", -30000)
    g.u32_kv("llama.context_length", 128)
    g.scalar("test.i32", T_INT32, "i", -2_000_000_000)
    g.scalar("test.f32", T_FLOAT32, "f", 0.5)
    g.scalar("test.bool", T_BOOL, "B", 1)
    g.scalar("test.u64", T_UINT64, "Q", 2**63 + 5)
    g.scalar("test.i64", T_INT64, "q", -(2**62))
    g.scalar("test.f64", T_FLOAT64, "d", -1.25)
    g.array_kv("tokenizer.ggml.tokens", T_STRING, str_items("<s>", "</s>", "héllo", ""), 4)
    g.array_kv("tokenizer.ggml.scores", T_FLOAT32, struct.pack("<4f", 0, -1, -2.5, 3), 4)
    g.array_kv("tokenizer.ggml.token_type", T_INT32, struct.pack("<4i", 1, 3, 1, 1), 4)
    g.array_kv("test.bools", T_BOOL, bytes([1, 0, 1]), 3)
    g.array_kv("test.empty", T_UINT64, b"", 0)
    g.u32_kv("general.alignment", 32)
    # F32 [ne0=4, ne1=2] = 32 bytes at 0; Q8_0 [ne0=32, ne1=2] = 2 blocks of 34 bytes at 32
    g.tensor("a.weight", (4, 2), F32, 0)
    g.tensor("b.weight", (32, 2), Q8_0, 32)
    g.data = struct.pack("<8f", *range(8)) + bytes(range(68))
    return g


def rewrite(path: str | os.PathLike[str], data: bytes) -> None:
    """Make the file at ``path`` hold exactly ``data``, in place.

    Loops that rewrite one scratch file thousands of times use this: truncating a file to zero
    and writing it again (``write_bytes``) makes ext4 flush it (auto_da_alloc), ~4 ms a time.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
