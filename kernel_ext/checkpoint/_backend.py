"""Where the bytes go: a local directory (fsync + atomic rename) or any fsspec URL.

The store above only needs a handful of operations: durable atomic ``put`` of small files,
``get``, listing, removal, and writing one Zarr array so that it appears all at once.

On a local directory every publish follows the same protocol: write a temporary file, fsync
it, ``os.replace`` it into place, fsync the directory. The ``_os`` attribute (``fsync``,
``replace``) and the ``on_step`` hook are seams for tests that inject I/O errors or kill the
writer at each step.

On an fsspec URL (``memory://``, ``s3://``) single-object writes are atomic by the storage's
own contract; an array is complete once its ``.ok`` marker exists (written last).

Temporary names carry their writer (``tmp/<host>~<pid>~<uuid>``): cleaning removes only what
a dead process on this host left (or what is a day old from another host), never a write
that another live process may still publish. A write can be given a deadline
(:attr:`Backend.deadline`): past it, the next step raises :class:`CommitAbandoned` and the
write is undone like any failed one (its temporary files removed, nothing published).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
import types
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = ["Backend", "CommitAbandoned", "FsspecBackend", "LocalBackend", "open_backend"]

TMP = "tmp"
_FOREIGN_TMP_AGE_S = 24 * 3600.0  # leftovers of another host are removed after a day
_HOST = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname())[:60] or "host"


class CommitAbandoned(CheckpointError):
    """A write passed its deadline and was undone (nothing published; the store is as before)."""


def _tmp_owner() -> str:
    return f"{_HOST}~{os.getpid()}"


def _leftover(name: str, mtime: float) -> bool:
    """Whether ``tmp/<name>`` is a leftover that no live process may still publish."""
    parts = name.split("~")
    if len(parts) != 3 or not parts[1].isdigit():
        return True  # not ours to interpret: a torn write of an older version
    host, pid = parts[0], int(parts[1])
    if host != _HOST:
        return time.time() - mtime > _FOREIGN_TMP_AGE_S
    if pid == os.getpid():
        return False  # this process's own writes clean up after themselves
    import psutil

    return not psutil.pid_exists(pid)


class Backend:
    """The operations the snapshot store needs from its storage."""

    url: str
    deadline: float | None = None  # time.monotonic() after which a write is abandoned

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise CommitAbandoned("the write ran out of time and was abandoned (nothing was "
                                  "published; the previous snapshot is intact)")

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        """Publish ``data`` at ``key`` atomically; ``durable=False``: without fsync and outside
        the fault-injection seams (for derived, best-effort files: a lost one is harmless)."""
        raise NotImplementedError  # pragma: no cover - interface

    def get(self, key: str) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def exists(self, key: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def listdir(self, prefix: str) -> list[str]:  # pragma: no cover - interface
        """Names directly under ``prefix`` (no error when it does not exist)."""
        raise NotImplementedError

    def remove(self, key: str) -> None:  # pragma: no cover - interface
        """Remove a file or a whole tree; missing is fine."""
        raise NotImplementedError

    def has_array(self, key: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def write_arrays(self, items: list[tuple[str, Callable[[Any], None]]],
                     replace: frozenset[str] = frozenset()) -> None:
        """For each ``(key, write)``, call ``write(zarr_store)`` to write one array at the
        store's root, then publish it at ``key`` atomically (each all or nothing). Keys in
        ``replace`` overwrite what is there (a damaged copy); others keep an existing array."""
        raise NotImplementedError  # pragma: no cover - interface

    def put_many(self, items: list[tuple[str, bytes | memoryview]]) -> None:
        """``put`` several objects (each atomic and durable when this returns)."""
        for key, data in items:
            self.put(key, data)  # type: ignore[arg-type]

    def array_store(self, key: str) -> Any:  # pragma: no cover - interface
        """A read-only Zarr store whose root is the array at ``key``."""
        raise NotImplementedError

    def clean_tmp(self) -> int:  # pragma: no cover - interface
        """Remove leftovers of interrupted writes; returns how many were removed."""
        raise NotImplementedError


class LocalBackend(Backend):
    """A directory on a local file system."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)
        # Seams for fault-injection tests: replace with objects whose fsync/replace fail.
        self._os: Any = types.SimpleNamespace(fsync=os.fsync, replace=os.replace)
        self.on_step: Callable[[str], None] | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / TMP).mkdir(exist_ok=True)

    # --- helpers --------------------------------------------------------------------------------
    def _step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)
        self.check_deadline()

    def _path(self, key: str) -> Path:
        return self.root / key

    def _tmp_path(self, suffix: str = "") -> Path:
        return self.root / TMP / f"{_tmp_owner()}~{uuid.uuid4().hex}{suffix}"

    def _fsync_dir(self, path: Path) -> None:
        self._fsync_path(str(path), step="fsync_dir")

    def _fsync_path(self, path: str, step: str = "fsync") -> None:
        self._step(step)  # the crash tests kill the writer at each named step
        fd = os.open(path, os.O_RDONLY)
        try:
            self._os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_all(self, paths: list[str]) -> None:
        """fsync files and directories concurrently: on virtual disks one flush then covers
        many files (sequential fsyncs of 50 chunk files take ~4x longer here)."""
        if len(paths) <= 2:
            for path in paths:
                self._fsync_path(path)
            return
        try:
            pool = ThreadPoolExecutor(max_workers=min(16, len(paths)))
            futures = [pool.submit(self._fsync_path, path) for path in paths]
        except RuntimeError:  # interpreter shutting down: no new threads; go one by one
            for path in paths:
                self._fsync_path(path)
            return
        with pool:
            for future in futures:
                future.result()

    @staticmethod
    def _tree(top: Path) -> list[str]:
        out: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(top):
            out.extend(os.path.join(dirpath, name) for name in filenames)
            out.append(dirpath)
        return out

    # --- operations -----------------------------------------------------------------------------
    def _write_tmp(self, data: bytes | memoryview) -> Path:
        tmp = self._tmp_path(".part")
        done = False
        try:
            self._step("write")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data).cast("B")
                half = len(view) // 2
                _write_all(fd, view[:half])
                self._step("write_half")
                _write_all(fd, view[half:])
            finally:
                os.close(fd)
            done = True
        finally:
            if not done:
                _unlink(tmp)
        return tmp

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        if durable:
            self.put_many([(key, data)])
            return
        final = self._path(key)
        tmp = self._tmp_path(".part")
        try:
            tmp.write_bytes(bytes(data))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            _unlink(tmp)

    def put_many(self, items: list[tuple[str, bytes | memoryview]]) -> None:
        tmps: list[Path] = []
        done = False
        try:
            for _key, data in items:
                tmps.append(self._write_tmp(data))
            self._fsync_all([str(t) for t in tmps])
            parents: dict[Path, None] = {}
            for (key, _data), tmp in zip(items, tmps):
                final = self._path(key)
                final.parent.mkdir(parents=True, exist_ok=True)
                self._step("replace")
                self._os.replace(tmp, final)
                parents[final.parent] = None
            done = True
        finally:
            if not done:
                for tmp in tmps:
                    _unlink(tmp)
        for parent in parents:
            self._fsync_dir(parent)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def listdir(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(prefix)))
        except FileNotFoundError:
            return []

    def remove(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=False)
        else:
            _unlink(path)

    def has_array(self, key: str) -> bool:
        return (self._path(key) / "zarr.json").exists()

    def write_arrays(self, items: list[tuple[str, Callable[[Any], None]]],
                     replace: frozenset[str] = frozenset()) -> None:
        from zarr.storage import LocalStore

        tmps: list[Path] = []
        done = False
        try:
            for _key, write in items:
                tmp = self._tmp_path()
                tmps.append(tmp)
                self._step("array_write")
                write(LocalStore(tmp))
            self._fsync_all([p for tmp in tmps for p in self._tree(tmp)])
            parents: dict[Path, None] = {}
            for (key, _write), tmp in zip(items, tmps):
                final = self._path(key)
                final.parent.mkdir(parents=True, exist_ok=True)
                self._step("rename")
                if key in replace and final.exists():
                    shutil.rmtree(final)  # a damaged copy: the new one takes its place
                try:
                    self._os.replace(tmp, final)
                except OSError as e:
                    # The same content-addressed array was published first: fine.
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.has_array(key):
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)
                parents[final.parent] = None
            done = True
        finally:
            if not done:
                for tmp in tmps:
                    shutil.rmtree(tmp, ignore_errors=True)
        for parent in parents:
            self._fsync_dir(parent)

    def array_store(self, key: str) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self._path(key), read_only=True)

    def clean_tmp(self) -> int:
        tmp = self.root / TMP
        count = 0
        for name in self.listdir(TMP):
            try:
                mtime = (tmp / name).lstat().st_mtime
            except FileNotFoundError:
                continue
            if _leftover(name, mtime):
                self.remove(f"{TMP}/{name}")
                count += 1
        tmp.mkdir(exist_ok=True)
        return count


class FsspecBackend(Backend):
    """Any fsspec URL (``memory://``, ``s3://``, ``gs://``): each object is one atomic put."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.url)
        self._root = self._root.rstrip("/")

    def _p(self, key: str) -> str:
        return f"{self._root}/{key}" if key else self._root

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        if durable:
            self.check_deadline()
        self.fs.pipe_file(self._p(key), bytes(data))

    def get(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._p(key)))

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._p(key)))

    def listdir(self, prefix: str) -> list[str]:
        try:
            entries = self.fs.ls(self._p(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove(self, key: str) -> None:
        path = self._p(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def has_array(self, key: str) -> bool:
        return self.exists(f"{key}.ok")

    def write_arrays(self, items: list[tuple[str, Callable[[Any], None]]],
                     replace: frozenset[str] = frozenset()) -> None:
        from zarr.storage import FsspecStore

        for key, write in items:
            self.check_deadline()
            self.remove(f"{key}.ok")
            self.remove(key)  # a torn earlier attempt (no marker) or a damaged copy is replaced
            write(FsspecStore.from_url(f"{self.url}/{key}"))
            self.put(f"{key}.ok", b"")

    def array_store(self, key: str) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(f"{self.url}/{key}", read_only=True)

    def remove_array(self, key: str) -> None:
        self.remove(f"{key}.ok")
        self.remove(key)

    def clean_tmp(self) -> int:
        return 0


def open_backend(location: str | Path) -> Backend:
    """A :class:`LocalBackend` for paths and ``file://`` URLs, else a :class:`FsspecBackend`."""
    text = str(location)
    if text.startswith("file://"):
        return LocalBackend(text[len("file://"):])
    if "://" in text:
        return FsspecBackend(text)
    return LocalBackend(text)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
