"""The offline response cache: answers kept on disk, served (marked) when no provider can.

One JSON file per answer under ``<state_dir>/offline_cache/``, named by the SHA-256 of the key
``(identity, prompt, params.cache_key())``. ``identity`` is the model file's SHA-256 for a local
model, or the provider's identity (URL + model) for a remote one. Writes are atomic (temp file
+ ``os.replace``), so a crash never leaves a torn entry.

Size cap: after each write, while the entries take more than ``max_bytes`` the least recently
used ones (a hit refreshes an entry's modification time) are deleted. ``entries()`` lists what
is kept and ``clear()`` removes all of it or one identity's answers (``%model answers``).

Every byte read or written goes through :meth:`OfflineCache._write_entry` and
:meth:`OfflineCache._read_entry`: the one storage layer. With a checkpoint key set
(``checkpoint_key_env``) it seals entries with the checkpoint store's AES-GCM
(:mod:`kernel_ext.checkpoint._crypto`), bound to their file name: prompts and answers are not on
disk in the clear, and an entry moved to another name does not open. Entries written before
the key was set are still served; sealed entries are skipped (with a warning) when no key, or
another key, is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KernelExtError
from .base import GenerationParams, GenerationResult

__all__ = ["CachedAnswer", "OfflineCache", "cache_key"]

log = logging.getLogger(__name__)


def _aad_name(path: Path) -> str:
    return f"offline_cache/{path.stem}"


def cache_key(identity: str, prompt: str, params: GenerationParams) -> str:
    blob = json.dumps([identity, prompt, params.cache_key()], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """One kept answer, as ``%model answers list`` shows it."""

    key: str
    identity: str
    prompt: str
    text: str
    model: str
    provider: str
    created: float  # wall-clock seconds
    last_used: float  # wall-clock seconds (the file's modification time)
    size_bytes: int


class OfflineCache:
    """Store and look up answers. ``clock`` gives wall-clock seconds (for the age);
    ``max_bytes`` caps the total size of the entries (``None``: no cap)."""

    name = "offline_cache"

    def __init__(
        self,
        root: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        max_bytes: int | None = None,
        cipher: Callable[[], Any] | None = None,
    ) -> None:
        """``cipher()`` gives the :class:`~kernel_ext.checkpoint._crypto.Cipher` to seal
        entries with, or None (read at each use: the key may be set later)."""
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._clock = clock
        self._cipher = cipher or (lambda: None)
        self._lock = threading.Lock()
        self._size: int | None = None  # bytes of all entries; None until first counted

    # --- the storage layer (every byte in or out goes through these two) ----------------------
    def _write_entry(self, path: Path, entry: dict[str, Any]) -> int:
        """Write ``entry`` atomically; returns its size in bytes."""
        data = json.dumps(entry, ensure_ascii=False).encode("utf-8")
        cipher = self._cipher()
        if cipher is not None:
            data = cipher.seal(_aad_name(path), data)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(data)

    def _read_entry(self, path: Path) -> dict[str, Any]:
        """The entry at ``path``; ``FileNotFoundError``, or ``ValueError`` for a bad one."""
        from ..checkpoint._crypto import is_sealed

        data = path.read_bytes()
        if is_sealed(data):
            cipher = self._cipher()
            if cipher is None:
                raise ValueError("it is encrypted and no checkpoint key is set")
            try:
                data = cipher.open(_aad_name(path), data)
            except KernelExtError as e:
                raise ValueError(str(e)) from e
        entry = json.loads(data.decode("utf-8"))
        if isinstance(entry, dict):
            return entry
        raise ValueError(f"not a JSON object but a {type(entry).__name__}")

    # --- paths ----------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def _files(self) -> list[Path]:
        if not self.root.exists():
            return []
        return list(self.root.glob("*/*.json"))

    # --- answers --------------------------------------------------------------------------------
    def put(
        self, identity: str, prompt: str, params: GenerationParams, result: GenerationResult
    ) -> Path:
        """Keep ``result`` for this key (partial answers are never kept), then apply the cap."""
        if result.partial:
            raise ValueError(f"a partial answer ({result.finish_reason}) is not kept")
        key = cache_key(identity, prompt, params)
        path = self._path(key)
        entry = {
            "identity": identity,
            "prompt": prompt,
            "params": params.cache_key(),
            "text": result.text,
            "model": result.model,
            "provider": result.provider,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "finish_reason": result.finish_reason,
            "created": self._clock(),
        }
        with self._lock:
            old = _size_of(path)
            size = self._write_entry(path, entry)
            if self._size is not None:
                self._size += size - old
            self._enforce_cap(keep=path)
        return path

    def get(
        self, identities: Iterable[str], prompt: str, params: GenerationParams
    ) -> GenerationResult | None:
        """The first answer kept for any of ``identities`` (in order), marked cached, or None."""
        for identity in identities:
            path = self._path(cache_key(identity, prompt, params))
            try:
                entry = self._read_entry(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                log.warning("kernel_ext: unreadable offline-cache entry %s: %s", path, e)
                continue
            if entry.get("identity") != identity or entry.get("prompt") != prompt:
                continue  # a hash collision or a foreign file: never serve a wrong answer
            try:
                os.utime(path)  # recently used: the last to be evicted
            except OSError:
                pass
            age = max(0.0, self._clock() - float(entry.get("created", 0.0)))
            return GenerationResult(
                text=str(entry.get("text", "")),
                prompt=prompt,
                model=str(entry.get("model", "")),
                provider=self.name,
                prompt_tokens=int(entry.get("prompt_tokens", 0)),
                completion_tokens=int(entry.get("completion_tokens", 0)),
                finish_reason="cached",
                cached=True,
                cache_age_s=age,
                notes=[
                    f"answered from the offline cache ({age:.0f} s old, first answered by "
                    f"{entry.get('provider', '?')})"
                ],
            )
        return None

    # --- listing, size, clearing ----------------------------------------------------------------
    def entries(self) -> list[CachedAnswer]:
        """Every readable entry, most recently used first."""
        out: list[CachedAnswer] = []
        for path in self._files():
            try:
                stat = path.stat()
                entry = self._read_entry(path)
            except (OSError, ValueError):
                continue
            out.append(
                CachedAnswer(
                    key=path.stem,
                    identity=str(entry.get("identity", "")),
                    prompt=str(entry.get("prompt", "")),
                    text=str(entry.get("text", "")),
                    model=str(entry.get("model", "")),
                    provider=str(entry.get("provider", "")),
                    created=float(entry.get("created", 0.0)),
                    last_used=stat.st_mtime,
                    size_bytes=stat.st_size,
                )
            )
        out.sort(key=lambda e: e.last_used, reverse=True)
        return out

    def size_bytes(self) -> int:
        with self._lock:
            return self._count()

    def __len__(self) -> int:
        return len(self._files())

    def clear(self, identity: str | None = None) -> int:
        """Delete every entry (or only those of ``identity``); returns how many."""
        n = 0
        with self._lock:
            for p in self._files():
                if identity is not None:
                    try:
                        if self._read_entry(p).get("identity") != identity:
                            continue
                    except (OSError, ValueError):
                        continue
                p.unlink(missing_ok=True)
                n += 1
            self._size = None
        return n

    # --- the cap (call with the lock held) ------------------------------------------------------
    def _count(self) -> int:
        if self._size is None:
            self._size = sum(_size_of(p) for p in self._files())
        return self._size

    def _enforce_cap(self, keep: Path) -> None:
        if self.max_bytes is None or self._count() <= self.max_bytes:
            return
        new_size = _size_of(keep)
        if new_size > self.max_bytes:  # the new answer alone is over the cap: only it goes
            keep.unlink(missing_ok=True)
            self._size = None
            log.warning(
                (
                    "kernel_ext: an answer of %d bytes is larger than the offline cache's "
                    "cap (%d bytes, KernelExt.offline_cache_max_mb); not kept"
                ),
                new_size,
                self.max_bytes,
            )
            return
        # Another kernel may share the directory: count afresh before deleting anything.
        files = []
        for p in self._files():
            try:
                st = p.stat()
            except OSError:
                continue
            if p != keep:
                files.append((st.st_mtime, st.st_size, p))
        files.sort(key=lambda f: f[0])  # least recently used first
        total = new_size + sum(size for _, size, _ in files)
        for _, size, p in files:
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
        self._size = total


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
