"""A bounded, validating reader for GGUF files.

Ours, not gguf-py's ``GGUFReader`` nor Transformers' ``read_gguf_metadata``: neither validates
(they hang on huge counts, accept overlapping or out-of-file tensors, and raise raw
``struct.error``/``IndexError``/``UnicodeDecodeError`` on bad bytes), and ``GGUFReader`` takes
~20 s on a 262,144-entry vocabulary. Here every count and length is checked against the bytes
left in the file *before* anything proportional to it is allocated, the file is memory-mapped,
numeric arrays are read with ``np.frombuffer`` and string arrays with one tight loop.

Layout (v2 and v3; little-endian): ``magic "GGUF"``, ``u32 version``, ``u64 tensor_count``,
``u64 kv_count``; ``kv_count`` x (string key, u32 value type, value); ``tensor_count`` x
(string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset relative to the data
section); padding to ``general.alignment`` (default 32); the tensor data. A string is a u64
byte length and UTF-8 bytes; an array is u32 item type, u64 count, items.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import numpy as np

from ..errors import GGUFError, GGUFFormatError, GGUFUnsupportedError
from .constants import (
    BLOCK_SIZES,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MAX_ALIGNMENT,
    MAX_DIMS,
    NUMPY_DTYPES,
    REMOVED_TYPES,
    SCALAR_FORMATS,
    SUPPORTED_VERSIONS,
    GGMLType,
    GGUFValueType,
    type_name,
)

__all__ = [
    "GGUFClosedError",
    "GGUFFile",
    "GGUFFileNotFoundError",
    "GGUFIsADirectoryError",
    "GGUFOpenError",
    "TensorInfo",
    "TensorNotFoundError",
    "read_gguf",
]

_HEADER = struct.Struct("<4sIQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_INT64_MAX = (1 << 63) - 1
# Smallest possible encodings, used to refuse counts before anything is allocated for them:
# a KV is a non-empty key (8 + 1), a value type (4) and at least a 1-byte value; a tensor info
# is a non-empty name (8 + 1), n_dims (4), one dimension (8), a type (4) and an offset (8).
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8
# Tensor type ids at or above this are garbage, not a ggml type we have not heard of yet.
_MAX_PLAUSIBLE_TYPE = 256
_VALUE_TYPES = frozenset(int(t) for t in GGUFValueType)
_OLD_FORMATS = {b"ggml": "unversioned GGML", b"ggmf": "GGMF", b"ggjt": "GGJT",
                b"lmgg": "unversioned GGML", b"fmgg": "GGMF", b"tjgg": "GGJT"}
_REDO = "download or convert the file again and check its SHA-256"


# (name, dims, ggml type, offset relative to the data section, byte offset of the dims field,
#  byte offset of the offset field): a tensor-table entry before it is checked against the data.
_RawTensor = tuple[str, tuple[int, ...], int, int, int, int]
# metadata key -> (value type, item type for arrays else None)
_ValueTypes = dict[str, tuple[GGUFValueType, GGUFValueType | None]]


class GGUFClosedError(GGUFError, ValueError):
    """The GGUFFile was closed; its tensor data can no longer be read."""


class GGUFOpenError(GGUFError, OSError):
    """The path cannot be opened as a file."""


class GGUFFileNotFoundError(GGUFOpenError, FileNotFoundError):
    """No file at that path."""


class GGUFIsADirectoryError(GGUFOpenError, IsADirectoryError):
    """The path is a directory, not a .gguf file."""


class TensorNotFoundError(GGUFError, KeyError):
    """No tensor of that name in the file."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, validated against the file."""

    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] = ne0, the fastest-varying dimension
    ggml_type: int
    offset: int  # absolute file offset of the tensor's data
    nbytes: int
    n_elements: int

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


class GGUFFile:
    """A parsed GGUF file: metadata, tensor table and a read-only memory map of the data.

    Use as a context manager or call :meth:`close`. Arrays returned by :meth:`tensor_bytes`
    keep the mapping alive until they are garbage-collected.
    """

    def __init__(self, *, path: Path, version: int, file_size: int, alignment: int,
                 data_offset: int, metadata: dict[str, Any],
                 value_types: _ValueTypes,
                 tensors: dict[str, TensorInfo], mm: mmap.mmap | None,
                 fd: int | None = None) -> None:
        self.path = path
        self.version = version
        self.file_size = file_size
        self.alignment = alignment
        self.data_offset = data_offset
        self.metadata = metadata
        # key -> (value type, item type for arrays else None); needed to write a value back.
        self.value_types = value_types
        self.tensors = tensors
        self._mm = mm
        # The descriptor the map was made from: hashing and tensor reads go through it, so
        # they see the very file that was parsed even if the path is replaced meanwhile.
        self._fd = fd

    # --- lifetime ------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Release the memory map and the file (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        mm, self._mm = self._mm, None
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            # Arrays from tensor_bytes() still export the buffer; dropping our reference is
            # all we can do: the mapping is unmapped when the last of them is collected.
            del mm

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<GGUFFile {str(self.path)!r} v{self.version} {len(self.tensors)} tensors "
                f"{len(self.metadata)} keys {state}>")

    # --- access --------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFFormatError(
                "the file has no string 'general.architecture' in its metadata, so the model "
                f"type is unknown; {_REDO}", field="general.architecture", path=str(self.path))
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of tensor ``name``: a read-only ``uint8`` view into the memory map."""
        info = self.tensors.get(name)
        if info is None:
            near = [n for n in self.tensors if name.split(".")[-1] in n][:5]
            hint = f"; similar names: {', '.join(near)}" if near else ""
            raise TensorNotFoundError(
                f"{self.path}: no tensor named {_label(name)!r} among its {len(self.tensors)} "
                f"tensors{hint}")
        if self._mm is None:
            raise GGUFClosedError(f"{self.path} was closed; open it again with read_gguf()")
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def open_data(self) -> BinaryIO:
        """A new unbuffered binary file object on the file that was parsed (not the path).

        Replacing or deleting the path after :func:`read_gguf` does not change what it reads.
        It has its own file position; the caller closes it."""
        if self._fd is None:
            raise GGUFClosedError(f"{self.path} was closed; open it again with read_gguf()")
        proc = Path(f"/proc/self/fd/{self._fd}")
        if proc.exists():  # Linux: a new open file description of the same inode
            return open(proc, "rb", buffering=0)
        return os.fdopen(os.dup(self._fd), "rb", buffering=0)  # shares the position: one reader

    def sha256(self, progress: Callable[[int, int], object] | None = None,
               chunk: int = 8 << 20) -> str:
        """The SHA-256 of the parsed file's bytes, read through the same open file.

        Unlike hashing the path again, a file swapped in after :func:`read_gguf` cannot pass
        for the one that was parsed. ``progress(done, total)`` follows every chunk."""
        if self._fd is None:
            raise GGUFClosedError(f"{self.path} was closed; open it again with read_gguf()")
        h = hashlib.sha256()
        buf = bytearray(chunk)
        view = memoryview(buf)
        done = 0
        if progress is not None:
            progress(0, self.file_size)
        while done < self.file_size:
            n = os.preadv(self._fd, [view[:min(chunk, self.file_size - done)]], done)
            if not n:
                raise GGUFFormatError(
                    f"{self.path} ended at byte {done} while it was hashed: it was truncated "
                    f"after it was opened; {_REDO}", field="file", offset=done,
                    path=str(self.path))
            h.update(view[:n])
            done += n
            if progress is not None:
                progress(done, self.file_size)
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Architecture, name, parameter count, tensor type counts and sizes at a glance."""
        arch = self.metadata.get("general.architecture")
        arch = arch if isinstance(arch, str) else None
        counts = Counter(t.type_name for t in self.tensors.values())
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, list) else None
        if vocab is None and arch is not None:
            vocab = _as_int(self.metadata.get(f"{arch}.vocab_size"))
        return {
            "architecture": arch,
            "name": self.metadata.get("general.name"),
            "n_params": sum(t.n_elements for t in self.tensors.values()),
            "quant_types": dict(counts.most_common()),
            "file_size": self.file_size,
            "n_tensors": len(self.tensors),
            "vocab_size": vocab,
            "context_length": (_as_int(self.metadata.get(f"{arch}.context_length"))
                               if arch is not None else None),
        }


def read_gguf(path: str | os.PathLike[str], *, max_string_bytes: int = 1 << 20,
              strict: bool = True) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor table; map its data.

    ``max_string_bytes`` bounds every single string (a key, a value, a vocabulary entry).
    ``strict=False`` tolerates what is odd but harmless: tensor offsets that are not
    multiples of the alignment, booleans other than 0/1 (read as true) and invalid UTF-8 in
    string *values* (replaced by U+FFFD). Everything that could read out of bounds, allocate
    without bound or make the data ambiguous is refused either way.

    Raises :class:`GGUFFormatError` (with ``field`` and ``offset``) for malformed files,
    :class:`GGUFUnsupportedError` for well-formed files with a tensor type we cannot read,
    :class:`GGUFFileNotFoundError` / :class:`GGUFIsADirectoryError` / :class:`GGUFOpenError`
    when the path is not a readable file.
    """
    p = Path(os.fspath(path))
    if max_string_bytes < 1:
        raise ValueError(f"max_string_bytes must be positive, got {max_string_bytes}")
    fd = _open(p)
    keep = False
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise _is_a_directory(p, errno.EISDIR)
        if not stat.S_ISREG(st.st_mode):
            raise GGUFOpenError(errno.EINVAL, f"{p} is not a regular file (a pipe, socket or "
                                "device): save the model to a file and pass that path", str(p))
        size = st.st_size
        if size < _HEADER.size:
            _check_magic(os.pread(fd, _HEADER.size, 0), p)
            raise GGUFFormatError(
                f"the file is only {size} bytes long, shorter than the {_HEADER.size}-byte "
                f"GGUF header; it is truncated: {_REDO}",
                field=_header_field_at(size), offset=size, path=str(p))
        try:
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFOpenError(e.errno, f"cannot memory-map {p}: {e.strerror}; copy it to a "
                                "local disk", str(p)) from e
        try:
            gf = _Parser(mm, size, p, max_string_bytes, strict).parse(fd)
        except Exception:
            mm.close()  # nothing else references the map yet; the error goes on unchanged
            raise
        keep = True
        return gf
    finally:
        if not keep:
            os.close(fd)


# --- opening -----------------------------------------------------------------------------------
def _open(p: Path) -> int:
    # O_NONBLOCK: opening a named pipe must not wait for a writer (it is refused right after).
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(p, flags)
    except FileNotFoundError as e:
        raise GGUFFileNotFoundError(
            e.errno, f"no GGUF file at {p}: check the path (relative paths are resolved "
            f"against {os.getcwd()})", str(p)) from e
    except IsADirectoryError as e:
        raise _is_a_directory(p, e.errno) from e
    except OSError as e:
        raise GGUFOpenError(e.errno, f"cannot open {p} for reading: {e.strerror}",
                            str(p)) from e


def _is_a_directory(p: Path, err: int | None) -> GGUFIsADirectoryError:
    found = sorted(x.name for x in p.glob("*.gguf"))[:5]
    hint = f"; it contains {', '.join(found)}" if found else "; it contains no .gguf files"
    return GGUFIsADirectoryError(
        err, f"{p} is a directory, not a GGUF file: pass the path of the .gguf file{hint}",
        str(p))


def _header_field_at(offset: int) -> str:
    if offset < 4:
        return "header.magic"
    if offset < 8:
        return "header.version"
    if offset < 16:
        return "header.tensor_count"
    return "header.kv_count"


def _check_magic(head: bytes, p: Path) -> None:
    if len(head) < 4:
        raise GGUFFormatError(
            f"the file is {len(head)} bytes long, too short to hold the GGUF magic: it is "
            f"empty or truncated; {_REDO}", field="header.magic", offset=0, path=str(p))
    magic = head[:4]
    if magic == GGUF_MAGIC:
        return
    if magic == b"FUGG":
        hint = " (byte-swapped: a big-endian GGUF file; only little-endian files are supported)"
    elif magic.lower() in _OLD_FORMATS:
        hint = (f" (the old {_OLD_FORMATS[magic.lower()]} format that predates GGUF; convert it "
                "with llama.cpp's convert scripts)")
    elif magic[:2] == b"PK":
        hint = " (a zip archive: a PyTorch checkpoint? load it with Transformers instead)"
    else:
        hint = ""
    raise GGUFFormatError(
        f"not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}{hint}",
        field="header.magic", offset=0, path=str(p))


def _label(name: str) -> str:
    """``name`` shortened for error messages and field names."""
    return name if len(name) <= 120 else f"{name[:100]}...({len(name)} characters)"


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return None


# --- parsing -----------------------------------------------------------------------------------
class _Parser:
    """One pass over the header, metadata and tensor table; raises on the first problem."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path, max_string_bytes: int,
                 strict: bool) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.spath = str(path)
        self.max_string_bytes = max_string_bytes
        self.strict = strict
        self.pos = 0
        self.value_errors = "strict" if strict else "replace"

    # -- primitives ----------------------------------------------------------------------------
    def fail(self, message: str, field: str, offset: int) -> GGUFFormatError:
        return GGUFFormatError(message, field=field, offset=offset, path=self.spath)

    def need(self, n: int, field: str) -> None:
        if n > self.size - self.pos:
            raise self.truncated(n, field)

    def truncated(self, n: int, field: str) -> GGUFFormatError:
        return self.fail(
            f"the file ends at byte {self.size} but {field} needs {n} bytes from byte "
            f"{self.pos}: the file is truncated or corrupt; {_REDO}", field, self.pos)

    def u32(self, field: str) -> int:
        self.need(4, field)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, field: str) -> int:
        self.need(8, field)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def string(self, field: str, *, is_key: bool = False) -> str:
        at = self.pos
        n = self.u64(f"{field}.length")
        self.check_length(n, field, at)
        raw = self.buf[self.pos:self.pos + n]
        try:
            s = raw.decode("utf-8", "strict" if is_key else self.value_errors)
        except UnicodeDecodeError as e:
            raise self.fail(f"{field} is not valid UTF-8 ({e.reason} at byte {e.start} of the "
                            f"string); {_REDO}", field, at) from e
        self.pos += n
        return s

    def check_length(self, n: int, field: str, at: int) -> None:
        if n > self.max_string_bytes:
            raise self.fail(
                f"{field} claims a string of {n} bytes, more than max_string_bytes="
                f"{self.max_string_bytes}; if the file is genuine, pass a larger "
                "max_string_bytes to read_gguf()", field, at)
        if n > self.size - self.pos:
            raise self.fail(
                f"{field} claims a string of {n} bytes but only {self.size - self.pos} bytes "
                f"are left in the file; it is truncated or corrupt: {_REDO}", field, at)

    # -- sections ------------------------------------------------------------------------------
    def parse(self, fd: int | None = None) -> GGUFFile:
        version, n_tensors, n_kv = self.header()
        metadata, value_types, kv_at = self.metadata(n_kv)
        alignment = self.alignment(metadata, value_types, kv_at)
        raw = self.tensor_table(n_tensors)
        data_offset = -(-self.pos // alignment) * alignment
        tensors = self.tensors(raw, data_offset, alignment)
        return GGUFFile(path=self.path, version=version, file_size=self.size,
                        alignment=alignment, data_offset=data_offset, metadata=metadata,
                        value_types=value_types, tensors=tensors, mm=self.buf, fd=fd)

    def header(self) -> tuple[int, int, int]:
        head = self.buf[:_HEADER.size]
        _check_magic(head, self.path)
        _, version, n_tensors, n_kv = _HEADER.unpack(head)
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(head[4:8], "big")
            supported = " and ".join(f"v{v}" for v in SUPPORTED_VERSIONS)
            if swapped in (1, 2, 3):
                msg = ("this is a big-endian GGUF file (its version field reads "
                       f"{version:#010x}, byte-swapped {swapped}); only little-endian files are "
                       "supported: convert it with gguf-py's gguf_convert_endian.py")
            elif version == 1:
                msg = (f"GGUF v1 (the 2023 draft with 32-bit counts) is not supported; supported "
                       f"versions: {supported}. Convert the model again with current llama.cpp")
            else:
                msg = (f"unsupported GGUF version {version}; supported versions: {supported}. "
                       "A newer file needs a newer kernel_ext; otherwise the file is corrupt")
            raise self.fail(msg, "header.version", 4)
        self.pos = _HEADER.size
        left = self.size - self.pos
        if n_kv > left // _MIN_KV_BYTES:
            raise self.fail(
                f"the header claims {n_kv} metadata entries, but at least {_MIN_KV_BYTES} bytes "
                f"each would not fit in the {left} bytes after the header; the file is corrupt: "
                f"{_REDO}", "header.kv_count", 16)
        if n_tensors > (left - n_kv * _MIN_KV_BYTES) // _MIN_TENSOR_INFO_BYTES:
            raise self.fail(
                f"the header claims {n_tensors} tensors, but at least {_MIN_TENSOR_INFO_BYTES} "
                f"bytes each (plus {n_kv} metadata entries) would not fit in the {left} bytes "
                f"after the header; the file is corrupt: {_REDO}", "header.tensor_count", 8)
        return version, n_tensors, n_kv

    def metadata(self, n_kv: int) -> tuple[dict[str, Any], _ValueTypes, dict[str, int]]:
        metadata: dict[str, Any] = {}
        value_types: _ValueTypes = {}
        kv_at: dict[str, int] = {}
        for i in range(n_kv):
            at = self.pos
            key = self.string(f"kv[{i}].key", is_key=True)
            label = _label(key)  # for messages: a key may be up to max_string_bytes long
            if not key:
                raise self.fail(f"metadata entry {i} has an empty key; {_REDO}",
                                f"kv[{i}].key", at)
            if key in metadata:
                raise self.fail(
                    f"metadata key {label!r} appears twice (its first value is at byte "
                    f"{kv_at[key]}), so its value is ambiguous; {_REDO}", label, at)
            type_at = self.pos
            vtype = self.u32(f"{label}.type")
            if vtype not in _VALUE_TYPES:
                raise self.fail(
                    f"metadata key {label!r} has unknown value type {vtype} (known: 0-12); "
                    f"the file is corrupt or from a newer GGUF version", f"{label}.type", type_at)
            metadata[key], item = self.value(label, GGUFValueType(vtype))
            value_types[key] = (GGUFValueType(vtype), item)
            kv_at[key] = type_at + 4
        return metadata, value_types, kv_at

    def value(self, key: str, vtype: GGUFValueType) -> tuple[Any, GGUFValueType | None]:
        at = self.pos
        if vtype == GGUFValueType.STRING:
            return self.string(key), None
        if vtype != GGUFValueType.ARRAY:
            fmt = SCALAR_FORMATS[vtype]
            width = struct.calcsize(fmt)
            self.need(width, key)
            (v,) = struct.unpack_from(fmt, self.buf, at)
            self.pos += width
            if vtype == GGUFValueType.BOOL:
                if v > 1 and self.strict:
                    raise self.fail(f"boolean {key!r} holds {v}, not 0 or 1; {_REDO}", key, at)
                v = bool(v)
            return v, None
        item_at = self.pos
        itype = self.u32(f"{key}.item_type")
        if itype == GGUFValueType.ARRAY:
            raise self.fail(f"{key!r} is an array of arrays, which GGUF metadata does not allow "
                            f"(and this reader refuses); {_REDO}", f"{key}.item_type", item_at)
        if itype not in _VALUE_TYPES:
            raise self.fail(f"array {key!r} has unknown item type {itype} (known: 0-8, 10-12); "
                            "the file is corrupt or from a newer GGUF version",
                            f"{key}.item_type", item_at)
        count_at = self.pos
        count = self.u64(f"{key}.count")
        left = self.size - self.pos
        item = GGUFValueType(itype)
        if item == GGUFValueType.STRING:
            if count > left // 8:
                raise self.fail(
                    f"array {key!r} claims {count} strings, but even empty ones (8 bytes each) "
                    f"would not fit in the {left} bytes left; the file is corrupt: {_REDO}",
                    f"{key}.count", count_at)
            return self.string_array(key, count), item
        dtype = np.dtype(NUMPY_DTYPES[item])
        if count > left // dtype.itemsize:
            raise self.fail(
                f"array {key!r} claims {count} items of {dtype.itemsize} bytes, but only {left} "
                f"bytes are left in the file; it is truncated or corrupt: {_REDO}",
                f"{key}.count", count_at)
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        if item == GGUFValueType.BOOL:
            if self.strict and count and int(arr.max()) > 1:
                bad = int(np.argmax(arr > 1))
                raise self.fail(f"boolean array {key!r} holds {int(arr[bad])} at index {bad}, "
                                f"not 0 or 1; {_REDO}", f"{key}[{bad}]", self.pos + bad)
            arr = arr != 0
        self.pos += count * dtype.itemsize
        return arr, item

    def string_array(self, key: str, count: int) -> list[str]:
        # The hot loop of the reader (262,144 vocabulary entries in the demo model): locals
        # only, and the rare failures (a short length prefix, bad UTF-8) left to exceptions.
        # Each length is checked against both limits before its bytes are touched; the list
        # grows to at most count * 8 bytes <= the bytes left (checked by the caller).
        buf, size, limit, errors = self.buf, self.size, self.max_string_bytes, self.value_errors
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        pos = self.pos
        i = 0
        try:
            for i in range(count):
                (n,) = unpack(buf, pos)
                start = pos + 8
                end = start + n
                if end > size or n > limit:
                    self.pos = start
                    self.check_length(n, f"{key}[{i}]", pos)
                append(buf[start:end].decode("utf-8", errors))
                pos = end
        except struct.error as e:  # fewer than 8 bytes left for the length
            self.pos = pos
            raise self.truncated(8, f"{key}[{i}].length") from e
        except UnicodeDecodeError as e:
            raise self.fail(f"{key}[{i}] is not valid UTF-8 ({e.reason} at byte {e.start} "
                            f"of the string); {_REDO}", f"{key}[{i}]", pos) from e
        self.pos = pos
        return out

    def alignment(self, metadata: dict[str, Any],
                  value_types: _ValueTypes,
                  kv_at: dict[str, int]) -> int:
        key = "general.alignment"
        if key not in metadata:
            return DEFAULT_ALIGNMENT
        at = kv_at[key]
        vtype = value_types[key][0]
        if vtype != GGUFValueType.UINT32:
            raise self.fail(f"{key} must be a uint32, but it is stored as {vtype.name}; "
                            f"{_REDO}", key, at)
        value = int(metadata[key])
        if value == 0 or value & (value - 1):
            raise self.fail(f"{key} is {value}, not a power of two; {_REDO}", key, at)
        if value > MAX_ALIGNMENT:
            raise self.fail(f"{key} is {value}, beyond the largest plausible alignment "
                            f"({MAX_ALIGNMENT}); the field is corrupt: {_REDO}", key, at)
        return value

    def tensor_table(self, n_tensors: int) -> list[_RawTensor]:
        raw: list[_RawTensor] = []
        seen: dict[str, int] = {}
        for i in range(n_tensors):
            at = self.pos
            name = self.string(f"tensor[{i}].name", is_key=True)
            label = _label(name)
            if not name:
                raise self.fail(f"tensor {i} has an empty name; {_REDO}", f"tensor[{i}].name", at)
            if name in seen:
                raise self.fail(f"tensor name {label!r} appears twice (entries {seen[name]} and "
                                f"{i}), so its data is ambiguous; {_REDO}", f"tensor[{i}].name",
                                at)
            seen[name] = i
            nd_at = self.pos
            n_dims = self.u32(f"{label}.n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self.fail(f"tensor {label!r} has {n_dims} dimensions; GGUF allows 1 to "
                                f"{MAX_DIMS}; {_REDO}", f"{label}.n_dims", nd_at)
            dims_at = self.pos
            self.need(8 * n_dims, f"{label}.dims")
            dims = struct.unpack_from(f"<{n_dims}Q", self.buf, dims_at)
            self.pos += 8 * n_dims
            n_elements = 1
            for k, d in enumerate(dims):
                if d == 0 or d > _INT64_MAX:
                    raise self.fail(f"tensor {label!r} has dimension {k} = {d}; each must be "
                                    f"between 1 and 2**63-1; {_REDO}", f"{label}.dims[{k}]",
                                    dims_at + 8 * k)
                n_elements *= d
            if n_elements > _INT64_MAX:
                raise self.fail(f"tensor {label!r} has shape {list(dims)}, whose element count "
                                f"overflows int64; {_REDO}", f"{label}.dims", dims_at)
            type_at = self.pos
            ggml_type = self.u32(f"{label}.type")
            if ggml_type >= _MAX_PLAUSIBLE_TYPE:
                raise self.fail(f"tensor {label!r} has tensor type {ggml_type}, which is not a "
                                f"ggml type; the file is corrupt: {_REDO}", f"{label}.type",
                                type_at)
            off_at = self.pos
            offset = self.u64(f"{label}.offset")
            raw.append((name, tuple(int(d) for d in dims), ggml_type, offset, dims_at, off_at))
        return raw

    def tensors(self, raw: list[_RawTensor], data_offset: int,
                alignment: int) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        unsupported: list[str] = []
        data_size = self.size - data_offset
        for name, dims, ggml_type, offset, dims_at, off_at in raw:
            label = _label(name)
            if self.strict and offset % alignment:
                raise self.fail(f"tensor {label!r} starts at data offset {offset}, not a multiple "
                                f"of the alignment {alignment}; {_REDO}", f"{label}.offset",
                                off_at)
            if ggml_type not in BLOCK_SIZES:
                if offset > data_size:
                    raise self.fail(f"tensor {label!r} starts {offset} bytes into the data "
                                    f"section, beyond the end of the file; {_REDO}",
                                    f"{label}.offset", off_at)
                unsupported.append(f"{label} ({type_name(ggml_type)}, type id {ggml_type})")
                continue
            block_elems, block_bytes = BLOCK_SIZES[ggml_type]
            n_elements = 1
            for d in dims:
                n_elements *= d
            if dims[0] % block_elems:
                raise self.fail(
                    f"tensor {label!r} is {GGMLType(ggml_type).name} with {dims[0]} elements per "
                    f"row, not a multiple of its block size {block_elems}; {_REDO}",
                    f"{label}.dims[0]", dims_at)
            nbytes = n_elements // block_elems * block_bytes
            if offset > data_size or nbytes > data_size - offset:
                raise self.fail(
                    f"tensor {label!r} ({nbytes} bytes at data offset {offset}) runs past the end "
                    f"of the file (data section of {max(data_size, 0)} bytes from byte "
                    f"{data_offset}); the file is truncated or corrupt: {_REDO}",
                    f"{label}.offset", off_at)
            tensors[name] = TensorInfo(name=name, shape=dims, ggml_type=ggml_type,
                                       offset=data_offset + offset, nbytes=nbytes,
                                       n_elements=n_elements)
        self.check_overlaps(tensors, raw)
        if unsupported:
            known = ", ".join(f"{t.name} ({int(t)})" for t in GGMLType if t in BLOCK_SIZES)
            removed = (" (removed from ggml: re-quantise the model with current llama.cpp)"
                       if any(r[2] in REMOVED_TYPES for r in raw) else "")
            raise GGUFUnsupportedError(
                f"{self.spath}: tensors of a type this reader cannot read{removed}: "
                f"{', '.join(unsupported[:5])}{' ...' if len(unsupported) > 5 else ''}. "
                f"Supported types: {known}")
        return tensors

    def check_overlaps(self, tensors: dict[str, TensorInfo],
                       raw: list[_RawTensor]) -> None:
        ordered = sorted(tensors.values(), key=lambda t: t.offset)
        for prev, cur in pairwise(ordered):
            if cur.offset < prev.offset + prev.nbytes:
                off_at = next(r[5] for r in raw if r[0] == cur.name)
                raise self.fail(
                    f"tensor {_label(cur.name)!r} (bytes {cur.offset}-{cur.offset + cur.nbytes}) "
                    f"overlaps tensor {_label(prev.name)!r} (bytes {prev.offset}-"
                    f"{prev.offset + prev.nbytes}); {_REDO}", f"{_label(cur.name)}.offset", off_at)
