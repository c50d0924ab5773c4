"""Conversion cache: what converting a GGUF file produced, keyed by the file's SHA-256.

Layout (one directory per file content, so a changed file can never hit a stale entry)::

    <cache_dir>/<sha256>/
        meta.json                      source name and size, format version, created/used times
        config.json                    the Transformers config (always)
        tokenizer/                     tokenizer.json, tokenizer_config.json, ... (always)
        weights-<dtype>.safetensors    dequantised weights (optional, under the size cap)
        decode-<kind>.safetensors      decoding copies: int4 repacks of the file's blocks and the
                                       LM head's screen (:mod:`kernel_ext.providers.quantized`)
        digests.json                   xxh3-128 of every file above, bound to <sha256>

Writes are atomic (a temporary file or directory, then ``os.replace``). A piece that cannot be
read back (truncated, not JSON, a safetensors header that does not match the file) is reported
with a log warning, deleted and rebuilt by the caller. Weight files are read memory-mapped
(copy-on-write): loading them costs page faults, not copies.

Integrity: every file written into an entry (by :func:`write_json`, :func:`write_tree`,
:class:`WeightsWriter`, :func:`save_weights`, or any later artifact through :func:`seal`) gets
its digest recorded in ``digests.json``: xxh3-128 seeded from the entry's source SHA-256, so
a digest (and a file) copied into another entry does not verify there. :func:`read_json`,
:func:`load_weights` and :func:`verify_tree` check the bytes they hand out against it (xxh3
runs at ~16 GB/s here); a mismatch or a missing digest is a :class:`TamperedEntryError`,
which callers treat like any corrupt piece: :func:`discard` it and rebuild from the GGUF.
Every discard is reported to the :func:`collect_discards` collector active in the caller, so
the model registry can audit it. This catches corruption and edits of the cached files; a
writer who can also rewrite ``digests.json`` is outside what an unkeyed digest can detect.

The weights are plain safetensors files (``safetensors.safe_open`` reads them); they are
written tensor by tensor from the live model, so writing needs no second copy in memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from ..errors import KernelExtError

__all__ = [
    "DIGESTS",
    "FORMAT_VERSION",
    "CacheEntryInfo",
    "CacheError",
    "CorruptEntryError",
    "TamperedEntryError",
    "WeightsWriter",
    "clear",
    "collect_discards",
    "decode_path",
    "discard",
    "enforce_cap",
    "entry_dir",
    "list_entries",
    "load_weights",
    "read_json",
    "save_weights",
    "seal",
    "touch",
    "verify",
    "verify_tree",
    "weights_metadata",
    "weights_path",
    "write_json",
    "write_tree",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: digests.json (entries of version 1 have none and are rebuilt)
DIGESTS = "digests.json"
_UNSEALED = frozenset({"meta.json", DIGESTS, ".lock"})
_HEX = frozenset("0123456789abcdef")
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int8: "I8",
}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}
_NP_VIEW = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "U8": np.uint8, "I8": np.int8}


class CorruptEntryError(ValueError):
    """A cache piece that cannot be used; callers log it, discard it and rebuild."""


class TamperedEntryError(CorruptEntryError):
    """A cached file whose bytes differ from the digest recorded when it was written (or
    that has no recorded digest): it is never used, only rebuilt."""


class CacheError(KernelExtError, ValueError):
    """A bad request to the conversion cache (e.g. a key that is not a SHA-256 digest)."""


@dataclass(frozen=True)
class CacheEntryInfo:
    sha256: str
    path: Path
    size_bytes: int
    source: str | None
    created: float | None
    last_used: float
    weights: tuple[str, ...]  # dtypes with cached weights, e.g. ("float32",)


def _check_sha(sha: str) -> str:
    s = str(sha).strip().lower()
    if len(s) != 64 or not set(s) <= _HEX:
        raise CacheError(
            f"{sha!r} is not a conversion cache key: keys are SHA-256 digests, 64 hexadecimal "
            "characters (0-9, a-f), as `%model cache list` shows them"
        )
    return s


def entry_dir(cache_dir: str | os.PathLike[str], sha: str) -> Path:
    return Path(cache_dir) / _check_sha(sha)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_path(entry: Path, dtype: torch.dtype) -> Path:
    return entry / f"weights-{_dtype_name(dtype)}.safetensors"


def decode_path(entry: Path, kind: str) -> Path:
    """Where decoding copies of kind ``kind`` (e.g. ``"body-int4-v3"``) are kept."""
    return entry / f"decode-{kind}.safetensors"


# --- small atomic writes -------------------------------------------------------------------------
def _tmp_near(target: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent
    )
    os.close(fd)
    return Path(name)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_near(path)
    done = False
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON atomically; inside an entry its digest is recorded too."""
    data = json.dumps(value, indent=1, sort_keys=True).encode("utf-8")
    _write_bytes(path, data)
    if _sealable(path):
        seal(path, data=data)


def read_json(path: Path) -> Any:
    """Parsed JSON, or :class:`CorruptEntryError` if the file is unreadable, not JSON or (inside
    an entry) not the bytes that were written. ``FileNotFoundError`` passes through (a miss)."""
    try:
        data = path.read_bytes()
        if _sealable(path):
            verify(path, data=data)
        return json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptEntryError(f"{path}: {e}") from e


# --- digests -------------------------------------------------------------------------------------
def _locate(path: Path) -> tuple[Path, str] | None:
    """(entry directory, path inside it) when ``path`` lies in a cache entry, else None."""
    path = Path(path)
    for parent in path.parents:
        if len(parent.name) == 64 and set(parent.name) <= _HEX:
            return parent, path.relative_to(parent).as_posix()
    return None


def _sealable(path: Path) -> bool:
    where = _locate(path)
    return where is not None and where[1] not in _UNSEALED


def _hasher(entry: Path) -> Any:
    """xxh3-128 seeded from the entry's source SHA-256 (its directory name)."""
    return xxhash.xxh3_128(seed=int(entry.name[:16], 16))


class _Chunks:
    """An open file's bytes from the start, read in chunks (for :func:`verify`'s ``data``)."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh


def _digest_of(entry: Path, path: Path, data: Any = None) -> str:
    h = _hasher(entry)
    if data is not None and not isinstance(data, _Chunks):
        h.update(data)
        return h.hexdigest()
    fh = data.fh if isinstance(data, _Chunks) else open(path, "rb", buffering=0)  # noqa: SIM115
    try:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        offset = 0
        while n := os.preadv(fh.fileno(), [buf], offset):
            h.update(view[:n])
            offset += n
    finally:
        if not isinstance(data, _Chunks):
            fh.close()
    return h.hexdigest()


@contextlib.contextmanager
def _locked(entry: Path) -> Iterator[None]:
    """Serialise read-modify-write of ``digests.json`` (two kernels may fill one entry)."""
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_digests(entry: Path) -> dict[str, Any]:
    try:
        doc = json.loads((entry / DIGESTS).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(doc, dict) or doc.get("source_sha256") != entry.name:
        return {}
    files = doc.get("files")
    return files if isinstance(files, dict) else {}


def _update_digests(entry: Path, changes: Mapping[str, dict[str, Any] | None]) -> None:
    with _locked(entry):
        files = _read_digests(entry)
        for rel, rec in changes.items():
            if rec is None:
                files.pop(rel, None)
            else:
                files[rel] = rec
        doc = {"source_sha256": entry.name, "algorithm": "xxh3-128, seed = first 64 bits of "
               "source_sha256", "files": files}
        _write_bytes(entry / DIGESTS, json.dumps(doc, indent=1, sort_keys=True).encode())


def seal(path: Path, *, data: Any = None, digest: str | None = None) -> None:
    """Record the digest of ``path`` (a file inside a cache entry) in the entry's digests.

    Any artifact a loader adds to an entry is sealed this way after it is written (atomically);
    ``data`` (the bytes just written) or ``digest`` (from :func:`hasher_for`) spare a re-read."""
    where = _locate(path)
    if where is None:
        raise CacheError(f"{path} is not inside a conversion cache entry")
    entry, rel = where
    if digest is None:
        digest = _digest_of(entry, path, data)
    _update_digests(entry, {rel: {"xxh3_128": digest, "size": Path(path).stat().st_size}})


def hasher_for(path: Path) -> Any:
    """A fresh hasher whose ``hexdigest()`` :func:`seal` accepts for ``path`` (to hash while
    writing instead of reading the file again)."""
    where = _locate(path)
    if where is None:
        raise CacheError(f"{path} is not inside a conversion cache entry")
    return _hasher(where[0])


def verify(path: Path, *, data: Any = None) -> None:
    """Check ``path`` (or ``data``, its bytes as the caller holds them: read or mapped) against
    the digest recorded for it; :class:`TamperedEntryError` if it differs or none is recorded."""
    where = _locate(path)
    if where is None:
        raise CacheError(f"{path} is not inside a conversion cache entry")
    entry, rel = where
    rec = _read_digests(entry).get(rel)
    if not isinstance(rec, dict) or not isinstance(rec.get("xxh3_128"), str):
        raise TamperedEntryError(
            f"{path}: no digest recorded for it (written by an older version, or not by "
            "kernel_ext); it is not trusted")
    actual = _digest_of(entry, path, data)
    if actual != rec["xxh3_128"]:
        raise TamperedEntryError(
            f"{path}: its content changed after it was cached (xxh3-128 {actual}, recorded "
            f"{rec['xxh3_128']}); it was modified or corrupted on disk")


def verify_tree(directory: Path) -> None:
    """:func:`verify` every file under ``directory`` (e.g. a cached tokenizer), and check that
    no recorded file is missing."""
    where = _locate(directory / "x")
    if where is None:
        raise CacheError(f"{directory} is not inside a conversion cache entry")
    entry = where[0]
    prefix = Path(directory).relative_to(entry).as_posix() + "/"
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    recorded = {rel for rel in _read_digests(entry) if rel.startswith(prefix)}
    present = {p.relative_to(entry).as_posix() for p in files}
    if recorded - present:
        raise TamperedEntryError(
            f"{directory}: {min(recorded - present)} was removed after it was cached")
    for p in files:
        verify(p)


# --- discards, reported to the caller ------------------------------------------------------------
_discards: contextvars.ContextVar[list[dict[str, str]] | None] = contextvars.ContextVar(
    "kernel_ext_cache_discards", default=None)


@contextlib.contextmanager
def collect_discards() -> Iterator[list[dict[str, str]]]:
    """Collect what :func:`discard` throws away in this context (``{"path", "why",
    "tampered"}`` each), so the caller can audit it."""
    notes: list[dict[str, str]] = []
    token = _discards.set(notes)
    try:
        yield notes
    finally:
        _discards.reset(token)


def write_tree(target: Path, fill: Callable[[Path], None]) -> None:
    """Create directory ``target`` atomically: ``fill(tmpdir)`` writes it, then a rename.
    Inside an entry, the digest of every file in it is recorded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    done = False
    try:
        fill(tmp)
        where = _locate(target / "x")
        changes: dict[str, dict[str, Any] | None] = {}
        if where is not None:
            entry = where[0]
            base = target.relative_to(entry).as_posix()
            for rel in _read_digests(entry):
                if rel.startswith(base + "/"):
                    changes[rel] = None  # files of the old tree
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    rel = f"{base}/{p.relative_to(tmp).as_posix()}"
                    changes[rel] = {"xxh3_128": _digest_of(entry, p), "size": p.stat().st_size}
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        done = True
        if where is not None:
            _update_digests(where[0], changes)
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)


def touch(entry: Path, *, source: str | None = None) -> None:
    """Record a use of ``entry`` (its LRU time), creating ``meta.json`` if needed."""
    meta_path = entry / "meta.json"
    now = time.time()
    try:
        meta = read_json(meta_path)
        if not isinstance(meta, dict):
            raise CorruptEntryError(f"{meta_path}: not an object")
    except (FileNotFoundError, CorruptEntryError):
        meta = {"format": FORMAT_VERSION, "created": now}
    meta["last_used"] = now
    if source is not None:
        meta["source"] = source
    write_json(meta_path, meta)


def discard(path: Path, why: str | BaseException) -> None:
    """Delete a corrupt cache piece, with a warning that says so (and a note to the active
    :func:`collect_discards`)."""
    tampered = isinstance(why, TamperedEntryError)
    log.warning("kernel_ext conversion cache: %s %s (%s); rebuilding it from the GGUF file",
                "not using unverified" if tampered else "ignoring and rebuilding", path, why)
    notes = _discards.get()
    if notes is not None:
        notes.append({"path": str(path), "why": str(why), "tampered": tampered})
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- weights -------------------------------------------------------------------------------------
def _header(
    specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    header: dict[str, Any] = {
        "__metadata__": {**(metadata or {}), "format": "pt", "writer": "kernel_ext"}
    }
    offset = 0
    for name, shape, dtype in specs:
        st = _ST_DTYPES.get(dtype)
        if st is None:
            raise TypeError(f"cannot cache weights of dtype {dtype}")
        n = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[st] if shape else _ITEMSIZE[st]
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def _write_tensor(fh: Any, t: torch.Tensor) -> memoryview | None:
    """Write ``t``'s bytes; returns them (a view), for hashing."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if not t.numel():
        return None
    data = t.view(torch.uint8).reshape(-1).numpy().data
    fh.write(data)
    return data


class WeightsWriter:
    """Write a safetensors file from a background thread, tensor by tensor, atomically.

    The loader hands each tensor (or consecutive row chunks of one) over as soon as it is
    decoded, so writing overlaps decoding (file writes release the GIL). At most ``depth``
    pieces wait in the queue, which bounds the memory held for writing. ``put`` must follow
    the order of ``specs``; ``commit`` waits for the thread, checks the size and renames the
    file into place (None and a logged warning if anything failed); ``abort`` drops it.
    """

    def __init__(
        self, path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], *, depth: int = 2
    ) -> None:
        self.path = path
        self._sizes = [
            (
                (int(np.prod(shape, dtype=np.int64)) if shape else 1)
                * _ITEMSIZE[_ST_DTYPES[dtype]],
                name,
            )
            for name, shape, dtype in specs
        ]
        self._index = 0
        self._filled = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        header = _header(specs)
        self._expected_size = len(header) + sum(n for n, _ in self._sizes)
        self._tmp = _tmp_near(path)
        # hashed while written (xxh3 is ~16 GB/s, the disk far slower): sealed on commit
        self._hasher = hasher_for(path) if _sealable(path) else None
        if self._hasher is not None:
            self._hasher.update(header)
        try:
            self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit/abort
            try:
                self._fh.write(header)
            except OSError:
                self._fh.close()
                raise
        except OSError:
            self._tmp.unlink(missing_ok=True)
            raise
        self._queue: queue.Queue[torch.Tensor | None] = queue.Queue(maxsize=max(1, depth))
        self._error: Exception | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="kernel_ext-weights-cache", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        # Any failure is recorded (commit reports it) and the queue is still drained, so the
        # loader's put() and _stop() never wait on a writer that has stopped reading.
        while True:
            t = self._queue.get()
            if t is None:
                return
            if self._error is not None:
                continue
            try:
                data = _write_tensor(self._fh, t)
                if self._hasher is not None and data is not None:
                    self._hasher.update(data)
            except Exception as e:  # noqa: BLE001 - handed to the loader by error/commit()
                self._error = e

    @property
    def error(self) -> Exception | None:
        """Why writing failed (the file will not be published), or None so far."""
        return self._error

    def _hand_over(self, item: torch.Tensor | None) -> None:
        # A bounded wait, so a writer thread that died anyway cannot block the loader.
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    if self._error is None:
                        self._error = RuntimeError("the weights writer thread stopped")
                    return

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` (all of ``name``, or its next rows) for writing."""
        if self._index >= len(self._sizes) or self._sizes[self._index][1] != name:
            raise ValueError(f"tensor {name!r} written out of order")
        self._filled += tensor.numel() * tensor.element_size()
        size = self._sizes[self._index][0]
        if self._filled > size:
            raise ValueError(f"more data for {name!r} than its {size} bytes")
        if self._filled == size:
            self._index += 1
            self._filled = 0
        if self._error is None:  # after a failure nothing more is written: do not queue
            self._hand_over(tensor)

    def _stop(self) -> None:
        if not self._closed:
            self._closed = True
            self._hand_over(None)
        self._thread.join()  # both idempotent: a stop interrupted halfway can be repeated
        self._fh.close()

    def commit(self) -> int | None:
        """Wait for the writes, then publish; the file size, or None when it failed."""
        self._stop()
        done = False
        try:
            if self._error is None and self._index != len(self._sizes):
                self._error = ValueError(
                    f"only {self._index} of {len(self._sizes)} tensors were written"
                )
            if self._error is None:
                size = self._tmp.stat().st_size
                if size != self._expected_size:
                    raise OSError(f"wrote {size} bytes, expected {self._expected_size}")
                os.replace(self._tmp, self.path)
                done = True
                if self._hasher is not None:
                    seal(self.path, digest=self._hasher.hexdigest())
                return size
        except OSError as e:
            self._error = e
        finally:
            if not done:
                self._tmp.unlink(missing_ok=True)
        log.warning(
            "kernel_ext conversion cache: weights not cached in %s: %s", self.path, self._error
        )
        return None

    def abort(self) -> None:
        """Drop the file: the thread skips what is still queued, the temporary file goes."""
        if self._error is None:
            self._error = RuntimeError("aborted")
        try:
            self._stop()
        finally:
            self._tmp.unlink(missing_ok=True)


def save_weights(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> int:
    """Write ``tensors`` (CPU or not) as one safetensors file, atomically; returns its size.

    Tensors are streamed one at a time (a GPU tensor is copied to the host on its own), so
    writing needs no second copy of the model. ``metadata`` (strings) goes to the header's
    ``__metadata__`` (:func:`weights_metadata` reads it back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _header(((name, tuple(t.shape), t.dtype) for name, t in tensors.items()), metadata)
    tmp = _tmp_near(path)
    hasher = hasher_for(path) if _sealable(path) else None
    if hasher is not None:
        hasher.update(header)
    done = False
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            for t in tensors.values():
                data = _write_tensor(fh, t)
                if hasher is not None and data is not None:
                    hasher.update(data)
        size = tmp.stat().st_size
        os.replace(tmp, path)
        done = True
        if hasher is not None:
            seal(path, digest=hasher.hexdigest())
        return size
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


def weights_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file, from its header alone (cheap; the
    bytes are checked against the entry's digest when :func:`load_weights` maps the file).
    ``FileNotFoundError`` passes through; a bad header is a :class:`CorruptEntryError`."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or n > 100 << 20:
                raise CorruptEntryError(f"{path}: no safetensors header")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptEntryError(f"{path}: unreadable header: {e}") from e
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptEntryError(f"{path}: __metadata__ is not a string map")
    return meta


def load_weights(
    path: Path, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None
) -> dict[str, torch.Tensor]:
    """Memory-map a safetensors file (copy-on-write) and return its tensors, zero-copy.

    Inside a cache entry the mapped bytes (header and data) are first checked against the
    file's recorded digest (:func:`verify`): what is returned is what was written.
    ``expected`` maps names to ``(shape, dtype)``; any difference is a :class:`CorruptEntryError`,
    as is a header that does not fit the file. ``FileNotFoundError`` passes through."""
    # One open file: hashed by reading it (cheaper than faulting the whole mapping in now:
    # the pages are mapped lazily, by the first forward pass), then mapped (copy-on-write).
    try:
        fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CorruptEntryError(f"{path}: cannot open it: {e}") from e
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if _sealable(path):
            verify(path, data=_Chunks(fh))
        if size < 8:
            raise CorruptEntryError(f"{path}: shorter than a safetensors header")
        try:
            mm = np.memmap(fh, dtype=np.uint8, mode="c")
        except (OSError, ValueError) as e:
            raise CorruptEntryError(f"{path}: cannot map it: {e}") from e
    n = int.from_bytes(mm[:8].tobytes(), "little")
    if n <= 0 or 8 + n > size or n > 100 << 20:
        raise CorruptEntryError(f"{path}: header length {n} does not fit the file ({size} bytes)")
    try:
        header = json.loads(mm[8 : 8 + n].tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptEntryError(f"{path}: unreadable header: {e}") from e
    if not isinstance(header, dict):
        raise CorruptEntryError(f"{path}: header is not an object")
    header.pop("__metadata__", None)
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, spec in header.items():
        try:
            st, shape, (start, end) = (
                spec["dtype"],
                [int(d) for d in spec["shape"]],
                spec["data_offsets"],
            )
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptEntryError(f"{path}: bad header entry for {name!r}") from e
        if st not in _ST_TORCH:
            raise CorruptEntryError(f"{path}: unsupported dtype {st!r} for {name!r}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - start != count * _ITEMSIZE[st] or start < 0 or base + end > size:
            raise CorruptEntryError(f"{path}: tensor {name!r} does not fit the file")
        arr = mm[base + start : base + end].view(_NP_VIEW[st])
        t = torch.from_numpy(arr)
        if st == "BF16":
            t = t.view(torch.bfloat16)
        out[name] = t.reshape(shape)
    if expected is not None:
        for name, (want_shape, want_dtype) in expected.items():
            got = out.get(name)
            if got is None:
                raise CorruptEntryError(f"{path}: no tensor {name!r}")
            if tuple(got.shape) != tuple(want_shape) or got.dtype != want_dtype:
                raise CorruptEntryError(
                    f"{path}: {name!r} is {tuple(got.shape)} {got.dtype}, "
                    f"expected {tuple(want_shape)} {want_dtype}"
                )
    return out


# --- management ----------------------------------------------------------------------------------
def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:
                continue
    return total


def _entries(cache_dir: Path) -> Iterable[Path]:
    if not cache_dir.is_dir():
        return []
    return [
        p for p in cache_dir.iterdir() if p.is_dir() and len(p.name) == 64 and set(p.name) <= _HEX
    ]


def list_entries(cache_dir: str | os.PathLike[str]) -> list[CacheEntryInfo]:
    """Every entry, least recently used first."""
    infos = []
    for entry in _entries(Path(cache_dir)):
        try:
            meta = read_json(entry / "meta.json")
            meta = meta if isinstance(meta, dict) else {}
        except (FileNotFoundError, CorruptEntryError):
            meta = {}
        try:
            mtime = entry.stat().st_mtime
        except OSError:
            continue
        weights = tuple(
            sorted(
                p.name[len("weights-") : -len(".safetensors")]
                for p in entry.glob("weights-*.safetensors")
            )
        )
        infos.append(
            CacheEntryInfo(
                sha256=entry.name,
                path=entry,
                size_bytes=_size(entry),
                source=meta.get("source"),
                created=meta.get("created"),
                last_used=float(meta.get("last_used", mtime)),
                weights=weights,
            )
        )
    return sorted(infos, key=lambda i: i.last_used)


def clear(cache_dir: str | os.PathLike[str], sha: str | None = None) -> int:
    """Remove one entry (``sha``) or all of them; returns the bytes freed."""
    root = Path(cache_dir)
    targets = [entry_dir(root, sha)] if sha is not None else list(_entries(root))
    freed = 0
    for entry in targets:
        if entry.is_dir():
            freed += _size(entry)
            shutil.rmtree(entry, ignore_errors=True)
    return freed


def enforce_cap(
    cache_dir: str | os.PathLike[str], max_bytes: int, *, keep: str | None = None
) -> list[str]:
    """Delete weight files, least recently used entries first, until the cache fits ``max_bytes``.

    Configs and tokenizers are small and stay; an entry's weights go first, then (if still over)
    whole entries. ``keep`` (a sha) is evicted last. Returns what was removed."""
    root = Path(cache_dir)
    infos = list_entries(root)
    total = sum(i.size_bytes for i in infos)
    removed: list[str] = []
    ordered = [i for i in infos if i.sha256 != keep] + [i for i in infos if i.sha256 == keep]
    for info in ordered:
        if total <= max_bytes:
            break
        for w in sorted(info.path.glob("*.safetensors")):  # weights-*, decode-*
            if total <= max_bytes:
                break
            try:
                size = w.stat().st_size
                w.unlink()
            except OSError:
                continue
            total -= size
            removed.append(str(w))
    for info in ordered:
        if total <= max_bytes:
            break
        if info.sha256 == keep:
            continue
        size = _size(info.path)
        shutil.rmtree(info.path, ignore_errors=True)
        total -= size
        removed.append(str(info.path))
    return removed
