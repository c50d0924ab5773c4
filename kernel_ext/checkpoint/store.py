"""The snapshot store: immutable content-addressed objects plus manifests behind one pointer.

Layout under the store's root (a directory or an fsspec URL)::

    zarr.json               Zarr v3 group; its attributes name the newest snapshot's arrays
                            (``arrays``: variable -> ``objects/<hash>``) for plain Zarr readers
    objects/zarr.json       Zarr v3 group holding the arrays
    objects/<hash>/         one Zarr v3 array per array part (chunked, compressed where it pays)
    blobs/<hash>            JSON, bytes, pickles, DataFrame string columns, task segments
    sealed/<hash>           the same, AES-GCM encrypted (when a key is configured)
    snapshots/<id>.json     manifests: variables, kinds, hashes, sizes, session state, writer
    tasks/<slug>.json       pointer of one resumable task to its manifest blob
    HEAD                    the pointer: current snapshot id and the retained history
    LEASE, LEASE.lock       which kernel writes this store (:mod:`.lease`)
    tmp/                    writes in progress (named by their writer)

Commit protocol: every object is written and fsync'd first (published under its final name by
an atomic rename), then the manifest (temp file, fsync, ``os.replace``, fsync of the
directory), then ``HEAD`` the same way. A crash at any instant leaves ``HEAD`` naming a
snapshot whose objects are all complete. Restore recomputes every object's xxh3-128 hash and
works per variable (:mod:`.restore`): each variable comes from the newest snapshot where its
objects verify.

One writer per store: a store opened with a ``guard`` (the kernel's :class:`.lease.Lease`)
publishes (manifest, ``HEAD``, task pointers) and collects garbage only while the guard says
this process holds the lease, checked under the lease's lock at the moment of publishing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from ..errors import CheckpointCorruptError, CheckpointError
from ._backend import Backend, CommitAbandoned, FsspecBackend, open_backend
from ._codec import Encoded, Part, array_hash, blob_hash, decode, json_bytes
from ._crypto import Cipher, is_sealed, key_from_env

__all__ = ["FORMAT", "CommitAbandoned", "CommitResult", "PublishGuard", "Restored", "Store"]

log = logging.getLogger(__name__)

FORMAT = 1
CHUNK_BYTES = 4 * 1024 * 1024  # ~ raw write speed here; 16 MiB chunks were 2x slower
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
EARLIER_WRITERS_KEPT = 3  # the newest snapshot of this many earlier writers outlives `keep`
_VIEW_NOTE = ("kernel_ext checkpoints: 'arrays' names the newest snapshot's arrays; "
              "snapshots/<id>.json has every variable")


def _root_group(attributes: dict[str, Any] | None = None) -> bytes:
    return json_bytes({"zarr_format": 3, "node_type": "group",
                       "attributes": {"kernel_ext_checkpoints": FORMAT, **(attributes or {})}})


_OBJECTS_GROUP = json_bytes({"zarr_format": 3, "node_type": "group", "attributes": {}})


class PublishGuard(Protocol):
    """What a store asks before it publishes or deletes anything (the lease of its kernel)."""

    def check(self) -> None:
        """Raise :class:`~kernel_ext.errors.CheckpointLeaseError` unless this process may write."""

    def publishing(self) -> contextlib.AbstractContextManager[None]:
        """Hold the lease's lock and :meth:`check` inside it (publishing is atomic with it)."""

    def writer(self) -> dict[str, Any]:
        """Who writes: recorded in each manifest (``token``, ``pid``, ``host``, ``kernel_id``)."""


@dataclass
class CommitResult:
    snapshot: str
    written_bytes: int
    total_bytes: int
    objects_written: int
    duration: float
    created: float


@dataclass
class Restored:
    """What a restore brought back.

    ``snapshot``/``manifest``: the snapshot whose variable list was restored (the newest
    readable one unless asked for another); ``values``: the variables; ``sources``: variables
    that came from an older snapshot because their copy in ``snapshot`` is damaged;
    ``damaged``: per variable, every damaged copy met; ``lost``: variables with no intact copy in
    any kept snapshot; ``refused``: pickles not allowed and values this version cannot rebuild;
    ``notes``: one line per fallback.
    """

    snapshot: str
    manifest: dict[str, Any]
    values: dict[str, Any]
    refused: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    damaged: dict[str, list[str]] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)


class Store:
    """A checkpoint store at ``location`` (path or fsspec URL); thread-safe within a process.

    ``keep`` snapshots are retained; ``key_env`` names the environment variable with the
    AES-GCM key (read at each operation; empty or unset: no encryption).
    """

    def __init__(self, location: str | Path, *, keep: int = 5, key_env: str = "",
                 clock: Callable[[], float] = time.time, background_gc: bool = False,
                 guard: PublishGuard | None = None) -> None:
        self.location = str(location)
        self.background_gc = background_gc
        self._gc_thread: threading.Thread | None = None
        self.keep = keep
        self.key_env = key_env
        self.clock = clock
        self.guard = guard
        self.lock = threading.RLock()
        self.writing = False  # True during a commit (a signal handler must not re-enter)
        self.on_written: Callable[[], None] | None = None  # called when a commit has ended
        self.damaged: set[str] = set()  # hashes found damaged: the next write replaces them
        self._manifests: dict[str, dict[str, Any]] = {}
        try:
            self.backend: Backend = open_backend(location)
            self.backend.clean_tmp()  # only leftovers of dead writers
            if not self.backend.exists("zarr.json"):
                self.backend.put("zarr.json", _root_group())
        except OSError as e:
            raise CheckpointError(f"cannot open the checkpoint store at {location}: {e}; check "
                                  "the path and its permissions, or set "
                                  "%config KernelExt.checkpoint_url") from e
        except (ImportError, ValueError) as e:  # fsspec: backend not installed, unknown protocol
            raise CheckpointError(f"cannot open the checkpoint store at {location}: {e}; install "
                                  "the fsspec package for that protocol (e.g. s3fs for s3://) "
                                  "or fix %config KernelExt.checkpoint_url") from e

    # --- one writer -----------------------------------------------------------------------------
    def _publishing(self) -> contextlib.AbstractContextManager[None]:
        return self.guard.publishing() if self.guard is not None else contextlib.nullcontext()

    def _check_writer(self) -> None:
        if self.guard is not None:
            self.guard.check()

    @contextlib.contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        """Writes inside this block are abandoned (undone, nothing published) once ``seconds``
        have passed; None: no deadline. The last step, the swap of ``HEAD``, always finishes."""
        previous = self.backend.deadline
        if seconds is not None:
            end = time.monotonic() + max(0.0, seconds)
            self.backend.deadline = end if previous is None else min(previous, end)
        try:
            yield
        finally:
            self.backend.deadline = previous

    # --- keys -----------------------------------------------------------------------------------
    def _cipher(self) -> Cipher | None:
        key = key_from_env(self.key_env)
        return Cipher(key) if key is not None else None

    # --- the pointer ----------------------------------------------------------------------------
    def head(self) -> dict[str, Any] | None:
        """The published pointer (``snapshot``, ``history`` newest first), or None."""
        try:
            data = self.backend.get("HEAD")
        except FileNotFoundError:
            return None
        try:
            head = json.loads(data)
            if not isinstance(head, dict) or not isinstance(head.get("history"), list):
                raise TypeError("not a HEAD object")
        except (ValueError, TypeError) as e:
            raise CheckpointCorruptError(f"{self.location}/HEAD is unreadable: {e}") from e
        return head

    def snapshots(self) -> list[str]:
        head = self.head()
        return list(head["history"]) if head else []

    def writers(self) -> dict[str, str]:
        """Snapshot id -> the token of the kernel that wrote it (for retained snapshots)."""
        head = self.head()
        writers = head.get("writers") if head else None
        return dict(writers) if isinstance(writers, dict) else {}

    def manifest(self, snapshot: str) -> dict[str, Any]:
        cached = self._manifests.get(snapshot)
        if cached is not None:
            return cached
        key = f"snapshots/{snapshot}.json"
        try:
            data = self.backend.get(key)
        except FileNotFoundError as e:
            raise CheckpointCorruptError(f"snapshot {snapshot}: its manifest is missing") from e
        data = self._unseal_manifest(key, data)
        try:
            manifest = json.loads(data)
        except ValueError as e:
            raise CheckpointCorruptError(f"snapshot {snapshot}: unreadable manifest: {e}") from e
        if (not isinstance(manifest, dict) or not isinstance(manifest.get("variables"), dict)
                or not all(isinstance(v, dict) for v in manifest["variables"].values())
                or not isinstance(manifest.get("created"), (int, float))
                or not isinstance(manifest.get("id"), str)):
            raise CheckpointCorruptError(f"snapshot {snapshot}: malformed manifest (no "
                                         "'id', 'variables' table or 'created' time)")
        self._manifests[snapshot] = manifest
        return manifest

    def _unseal_manifest(self, key: str, data: bytes) -> bytes:
        cipher = self._cipher()
        if is_sealed(data):
            if cipher is None:
                raise CheckpointError(f"{key} is encrypted: set ${self.key_env} to its key")
            return cipher.open(key, data)
        if cipher is not None:
            raise CheckpointCorruptError(f"{key} is not encrypted although a key is set; "
                                         "refusing it (it may have been replaced)")
        return data

    def _seal(self, key: str, data: bytes, cipher: Cipher | None) -> bytes:
        return cipher.seal(key, data) if cipher is not None else data

    # --- writing --------------------------------------------------------------------------------
    def _write_parts(self, parts: Iterable[Part], cipher: Cipher | None) -> tuple[int, int]:
        """Write the objects that do not exist yet (all durable on return); returns
        ``(bytes written, objects written)``."""
        new: dict[str, int] = {}  # hash -> logical size of what gets written
        arrays: list[tuple[str, Callable[[Any], None]]] = []
        blobs: list[tuple[str, bytes | memoryview]] = []
        replace: set[str] = set()
        for part in parts:
            if part.hash in new:
                continue
            damaged = part.hash in self.damaged  # rewrite a copy known to be damaged
            if cipher is not None:
                key = f"sealed/{part.hash}"
                if not damaged and self.backend.exists(key):
                    continue
                raw = (part.array.reshape(-1).view(np.uint8) if part.array is not None
                       else part.data or b"")
                blobs.append((key, cipher.seal(key, memoryview(cast(Any, raw)))))
            elif part.is_array:  # before reading .array: a device part copies it to the host
                key = f"objects/{part.hash}"
                if not damaged and self.backend.has_array(key):
                    continue
                arrays.append((key, _zarr_writer(part.array)))
                if damaged:
                    replace.add(key)
            else:
                key = f"blobs/{part.hash}"
                if not damaged and self.backend.exists(key):
                    continue
                blobs.append((key, part.data or b""))
            new[part.hash] = part.nbytes
        if arrays:
            if not self.backend.exists("objects/zarr.json"):
                self.backend.put("objects/zarr.json", _OBJECTS_GROUP)
            self.backend.write_arrays(arrays, frozenset(replace))
        if blobs:
            self.backend.put_many(blobs)
        self.damaged -= new.keys()
        return sum(new.values()), len(new)

    def commit(self, variables: dict[str, Encoded], *, skipped: dict[str, str] | None = None,
               session_state: dict[str, Any] | None = None,
               settings: dict[str, Any] | None = None, reason: str = "manual",
               carried: dict[str, dict[str, Any]] | None = None) -> CommitResult:
        """Write a snapshot of ``variables`` and publish it; raises :class:`CheckpointError`
        (:class:`CommitAbandoned` past a :meth:`deadline`, ``CheckpointLeaseError`` when
        another kernel writes this store).

        ``carried``: manifest entries of an earlier snapshot kept as they are (variables that
        were not restored, e.g. pickles the user did not allow); their objects are reused.
        """
        start = time.perf_counter()
        with self.lock, _writing(self):
            try:
                self._check_writer()  # before writing anything: a reader never writes
                cipher = self._cipher()
                written, count = self._write_parts(
                    (p for enc in variables.values() for p in enc.parts), cipher)
                entries = {**{n: e for n, e in (carried or {}).items() if n not in variables},
                           **{name: _entry(enc, sealed=cipher is not None)
                              for name, enc in variables.items()}}
                with self._publishing():
                    created = self.clock()
                    snapshot = _new_id(created)
                    head = self.head()
                    history = list(head["history"]) if head else []
                    writer = self.guard.writer() if self.guard is not None else None
                    manifest = {
                        "format": FORMAT, "id": snapshot, "created": created, "reason": reason,
                        "parent": history[0] if history else None,
                        "encrypted": cipher is not None, "writer": writer,
                        "variables": entries,
                        "skipped": dict(skipped or {}),
                        "session": session_state or {},
                        "settings": settings or {},
                    }
                    key = f"snapshots/{snapshot}.json"
                    self.backend.put(key, self._seal(key, json_bytes(manifest), cipher))
                    history, writers = _retain(snapshot, history, self.writers(),
                                               writer["token"] if writer else None, self.keep)
                    self.backend.deadline = None  # the point of no return: HEAD always swaps
                    self._swap_head(json_bytes({"format": FORMAT, "snapshot": snapshot,
                                                "history": history, "writers": writers}))
                    self._manifests[snapshot] = manifest
                    if cipher is None:
                        self._update_view(snapshot, entries)
            except OSError as e:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"checkpoint not written to {self.location}: {e} "
                                      "(the previous snapshot is intact)") from e
            if self.background_gc:
                self._gc_thread = threading.Thread(target=self._collect_quietly, daemon=True,
                                                   name="kernel_ext-checkpoint-gc")
                self._gc_thread.start()
            else:
                self._collect_quietly()
        total = sum(enc.nbytes for enc in variables.values())
        return CommitResult(snapshot, written, total, count, time.perf_counter() - start, created)

    def _update_view(self, snapshot: str, entries: dict[str, dict[str, Any]]) -> None:
        """Name the newest snapshot's arrays in the root group's attributes (plain Zarr users
        open ``objects/<hash>`` by variable name); best effort, after the snapshot is published."""
        arrays = {name: f"objects/{e['parts'][0]['hash']}" for name, e in sorted(entries.items())
                  if e.get("kind") in ("ndarray", "torch") and len(e.get("parts", ())) == 1}
        try:
            self.backend.put("zarr.json", _root_group({"snapshot": snapshot, "arrays": arrays,
                                                       "note": _VIEW_NOTE}), durable=False)
        except OSError as e:
            log.debug("kernel_ext: the Zarr view of %s was not updated: %s", snapshot, e)

    def _swap_head(self, data: bytes) -> None:
        """Publish ``data`` as HEAD; if that fails after the rename (the directory fsync),
        put the previous HEAD back so a failed commit never stays published."""
        try:
            previous: bytes | None = self.backend.get("HEAD")
        except FileNotFoundError:
            previous = None
        try:
            self.backend.put("HEAD", data)
        except OSError:
            try:
                if self.backend.get("HEAD") == data:
                    if previous is None:
                        self.backend.remove("HEAD")
                    else:
                        self.backend.put("HEAD", previous)
            except OSError as e:
                log.warning("kernel_ext: could not roll HEAD back after a failed commit: %s", e)
            raise

    # --- reading --------------------------------------------------------------------------------
    def _read_part(self, ref: dict[str, Any], cipher: Cipher | None, what: str) -> Any:
        h = ref["hash"]
        try:
            if ref.get("sealed"):
                if cipher is None:
                    raise CheckpointError(f"{what} is encrypted: set ${self.key_env} to its key")
                raw = cipher.open(f"sealed/{h}", self.backend.get(f"sealed/{h}"))
                if ref["type"] == "array":
                    value: Any = np.frombuffer(bytearray(raw), dtype=np.dtype(ref["dtype"]))
                    value = value.reshape(ref["shape"])
                else:
                    value = raw
            elif ref["type"] == "array":
                value = self._read_array(f"objects/{h}", ref)
            else:
                value = self.backend.get(f"blobs/{h}")
        except FileNotFoundError as e:
            raise CheckpointCorruptError(f"{what}: object {h[:12]} is missing") from e
        except CheckpointError:
            raise
        except Exception as e:  # zarr/numcodecs raise many types on damaged chunks
            raise CheckpointCorruptError(
                f"{what}: object {h[:12]} is damaged ({type(e).__name__}: {e})") from e
        actual = array_hash(value) if ref["type"] == "array" else blob_hash(value)
        if actual != h:
            raise CheckpointCorruptError(
                f"{what}: object {h[:12]} does not match its hash (a chunk is missing or damaged)")
        return value

    def _read_array(self, key: str, ref: dict[str, Any]) -> np.ndarray:
        import zarr

        if not self.backend.has_array(key):
            raise FileNotFoundError(key)
        z = zarr.open_array(store=self.backend.array_store(key), mode="r")
        if z.dtype != np.dtype(ref["dtype"]) or list(z.shape) != list(ref["shape"]):
            raise ValueError(f"array is {z.dtype}{tuple(z.shape)}, expected "
                             f"{ref['dtype']}{tuple(ref['shape'])}")
        root = getattr(self.backend, "root", None)
        if root is not None and z.size and _plain_row_chunks(z):
            return _read_row_chunks(Path(root) / key, z.dtype, tuple(z.shape), z.chunks[0])
        return np.ascontiguousarray(np.asarray(z[...]))

    def read_part(self, ref: dict[str, Any], what: str) -> Any:
        """One object, read and verified against its hash (:class:`CheckpointCorruptError`)."""
        return self._read_part(ref, self._cipher(), what)

    def restore(self, snapshot: str | None = None, names: Iterable[str] | None = None,
                allow_pickle: Callable[[str], bool] = lambda name: False) -> Restored:
        """Load and verify the variables of a snapshot (default: the newest), each from the
        newest snapshot (that one or older) where its objects verify; see :class:`Restored`.

        Raises :class:`CheckpointError` when there is no snapshot yet or a named variable is
        not in the snapshot, :class:`CheckpointCorruptError` when no manifest can be read.
        """
        from .restore import restore

        with self.lock:
            return restore(self, snapshot, names, allow_pickle)

    def resolve(self, snapshot: str) -> str:
        """A full snapshot id from an id, a unique prefix, or ``-N`` (N-th newest, from 1)."""
        history = self.snapshots()
        if re.fullmatch(r"-\d+", snapshot):
            n = int(snapshot[1:])
            if 1 <= n <= len(history):
                return history[n - 1]
        matches = [s for s in history if s == snapshot] or \
                  [s for s in history if s.startswith(snapshot)]
        if len(matches) == 1:
            return matches[0]
        raise CheckpointError(f"no single snapshot matches {snapshot!r}; "
                              f"see %checkpoint list ({len(history)} kept)")

    # --- resumable tasks ------------------------------------------------------------------------
    def _task_key(self, name: str) -> str:
        slug = _SLUG.sub("_", name)[:60] or "task"
        return f"tasks/{slug}-{blob_hash(name.encode())[:8]}.json"

    def task_manifest(self, name: str) -> dict[str, Any] | None:
        try:
            pointer = json.loads(self.backend.get(self._task_key(name)))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise CheckpointCorruptError(f"task {name!r}: unreadable pointer: {e}") from e
        h = pointer["manifest"]
        return json.loads(self._read_blob_ref(h, pointer.get("sealed", False), f"task {name!r}"))

    def _read_blob_ref(self, h: str, sealed: bool, what: str) -> bytes:
        cipher = self._cipher()
        if cipher is not None and not sealed:  # the flag itself is not authenticated
            raise CheckpointCorruptError(f"{what} is not encrypted although a key is set; "
                                         "refusing it (it may have been replaced)")
        data = self._read_part({"hash": h, "type": "blob", "sealed": sealed}, cipher, what)
        return bytes(data)

    def load_task(self, name: str) -> list[tuple[Any, Any, Any]]:
        """Every stored ``(key, fingerprint, value)`` of task ``name``, in recording order."""
        with self.lock:
            manifest = self.task_manifest(name)
            if manifest is None:
                return []
            cipher = self._cipher()
            out: list[tuple[Any, Any, Any]] = []
            for seg in manifest["segments"]:
                entries = json.loads(self._read_blob_ref(seg, manifest.get("sealed", False),
                                                         f"task {name!r}"))
                for key, fp, stored in entries:
                    key = tuple(key) if isinstance(key, list) else key
                    if "json" in stored:
                        value = stored["json"]
                    else:
                        parts = [self._read_part(r, cipher, f"task {name!r} item {key!r}")
                                 for r in stored["parts"]]
                        value = decode(stored["kind"], stored["meta"], parts)
                    out.append((key, fp, value))
            return out

    def commit_task(self, name: str, entries: list[tuple[Any, Any, Any]], *, total: int) -> int:
        """Append ``(key, fingerprint, json-or-Encoded)`` entries to task ``name`` and publish
        its new manifest atomically; returns the number of items stored in all."""
        with self.lock, _writing(self):
            try:
                self._check_writer()
                cipher = self._cipher()
                sealed = cipher is not None
                prev = self.task_manifest(name) or {"segments": [], "refs": [], "done": 0}
                rows, parts = [], []
                for key, fp, value in entries:
                    if isinstance(value, Encoded):
                        parts.extend(value.parts)
                        rows.append([key, fp, _entry(value, sealed=sealed)])
                    else:
                        rows.append([key, fp, {"json": value}])
                self._write_parts(parts, cipher)
                segment = Part(hash="", data=json_bytes(rows))
                segment.hash = blob_hash(segment.data or b"")
                self._write_parts([segment], cipher)
                manifest = {
                    "format": FORMAT, "name": name, "total": total, "sealed": sealed,
                    "updated": self.clock(), "done": prev["done"] + len(rows),
                    "segments": [*prev["segments"], segment.hash],
                    "refs": sorted({*prev["refs"], segment.hash, *(p.hash for p in parts)}),
                }
                mpart = Part(hash="", data=json_bytes(manifest))
                mpart.hash = blob_hash(mpart.data or b"")
                self._write_parts([mpart], cipher)
                with self._publishing():
                    self.backend.put(self._task_key(name), json_bytes(
                        {"name": name, "manifest": mpart.hash, "sealed": sealed}))
            except OSError as e:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"task {name!r}: progress not saved to {self.location}: "
                                      f"{e} (the previous progress is intact)") from e
            return int(manifest["done"])

    def drop_task(self, name: str) -> None:
        """Forget a task's stored progress (its objects are collected later)."""
        with self.lock, self._publishing():
            self.backend.remove(self._task_key(name))

    def tasks(self) -> list[dict[str, Any]]:
        """Stored tasks: ``name``, ``done``, ``total``, ``updated``."""
        out = []
        for entry in self.backend.listdir("tasks"):
            try:
                pointer = json.loads(self.backend.get(f"tasks/{entry}"))
                m = self.task_manifest(pointer["name"]) or {}
            except (OSError, ValueError, KeyError) as e:
                log.warning("kernel_ext: unreadable task pointer %s: %s", entry, e)
                continue
            out.append({"name": pointer["name"], "done": m.get("done", 0),
                        "total": m.get("total"), "updated": m.get("updated")})
        return out

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for a background collection to finish."""
        thread = self._gc_thread
        if thread is not None:
            thread.join(timeout)

    # --- retention ------------------------------------------------------------------------------
    def _collect_quietly(self) -> None:
        try:
            self.collect()
        except CheckpointError as e:
            log.debug("kernel_ext: checkpoint garbage collection skipped: %s", e)
        except (OSError, ValueError, KeyError) as e:
            log.warning("kernel_ext: checkpoint garbage collection skipped: %s", e)

    def collect(self) -> int:
        """Remove snapshots beyond the retained history and objects nothing refers to.

        Only the writer collects, holding the lease's lock throughout (no other kernel can
        take over and start publishing meanwhile). Nothing is removed when any retained
        manifest or task cannot be read (it might refer to the objects). Returns the number of
        entries removed.
        """
        with self.lock, self._publishing():
            history = self.snapshots()
            removed = 0
            keep = {f"{sid}.json" for sid in history}
            for name in self.backend.listdir("snapshots"):
                if name not in keep:
                    self.backend.remove(f"snapshots/{name}")
                    self._manifests.pop(name.removesuffix(".json"), None)
                    removed += 1
            live: set[str] = set()
            try:
                for sid in history:
                    for entry in self.manifest(sid)["variables"].values():
                        live.update(ref["hash"] for ref in entry["parts"])
                for entry in self.backend.listdir("tasks"):
                    pointer = json.loads(self.backend.get(f"tasks/{entry}"))
                    live.add(pointer["manifest"])
                    m = self.task_manifest(pointer["name"]) or {}
                    live.update(m.get("refs", []))
            except CheckpointError as e:
                log.warning("kernel_ext: not collecting objects: %s", e)
                return removed
            for prefix in ("objects", "blobs", "sealed"):
                for name in self.backend.listdir(prefix):
                    h = name.removesuffix(".ok")
                    if h in live or name == "zarr.json":
                        continue
                    if isinstance(self.backend, FsspecBackend) and prefix == "objects":
                        self.backend.remove_array(f"objects/{h}")
                    else:
                        self.backend.remove(f"{prefix}/{name}")
                    removed += 1
            removed += self.backend.clean_tmp()
            return removed


@contextlib.contextmanager
def _writing(store: Store) -> Iterator[None]:
    store.writing = True
    try:
        yield
    finally:
        store.writing = False
        if store.on_written is not None:
            store.on_written()  # e.g. a SIGTERM that arrived meanwhile now ends the process


def _entry(enc: Encoded, *, sealed: bool) -> dict[str, Any]:
    refs = []
    for p in enc.parts:
        ref = p.ref()
        if sealed:
            ref["sealed"] = True
        refs.append(ref)
    return {"kind": enc.kind, "meta": enc.meta, "parts": refs, "nbytes": enc.nbytes,
            "digest": enc.digest}


def _retain(snapshot: str, history: list[str], writers: dict[str, str], writer: str | None,
            keep: int) -> tuple[list[str], dict[str, str]]:
    """The history after publishing ``snapshot``: the ``keep`` newest, plus the newest snapshot
    of each of up to :data:`EARLIER_WRITERS_KEPT` earlier writers that would otherwise drop out
    (a kernel taking over a notebook never prunes all of another kernel's work)."""
    if writer is not None:
        writers = {**writers, snapshot: writer}
    ordered = [snapshot, *history]
    kept = ordered[: max(1, keep)]
    seen = {writers.get(s) for s in kept}
    extra = []
    for sid in ordered[len(kept):]:
        w = writers.get(sid)
        if w is not None and w not in seen and len(extra) < EARLIER_WRITERS_KEPT:
            extra.append(sid)
            seen.add(w)
    kept += extra
    return kept, {s: writers[s] for s in kept if s in writers}


def _new_id(created: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created))
    return f"{stamp}.{int(created * 1e6) % 1_000_000:06d}Z-{uuid.uuid4().hex[:6]}"


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    chunks = [max(1, n) for n in shape]
    for i in range(len(chunks)):
        rest = int(np.prod(chunks[i + 1:], dtype=np.int64)) * itemsize
        if rest * chunks[i] <= CHUNK_BYTES:
            break
        chunks[i] = max(1, CHUNK_BYTES // rest) if rest <= CHUNK_BYTES else 1
    return tuple(chunks)


def _compressors(arr: np.ndarray) -> Any:
    """Blosc/LZ4 with shuffle when a sample compresses to < 80 %, else none."""
    import numcodecs
    from zarr.codecs import BloscCodec

    flat = arr.reshape(-1).view(np.uint8)
    if flat.size < 4096:
        return None
    step = max(1, flat.size // 4)
    sample = b"".join(bytes(flat[i:i + 65536]) for i in range(0, flat.size, step)[:4])
    typesize = max(1, arr.dtype.itemsize)
    word = typesize if typesize in (1, 2, 4, 8) else 1
    usable = len(sample) // word * word
    codec = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    probe = np.frombuffer(sample[:usable], dtype=f"u{word}")
    ratio = len(codec.encode(probe)) / max(1, usable)
    if ratio >= 0.8:
        return None
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=typesize)]


def _zarr_writer(arr: np.ndarray) -> Callable[[Any], None]:
    def write(store: Any) -> None:
        import zarr
        from zarr.storage import LocalStore

        chunks = _chunks(arr.shape, arr.dtype.itemsize)
        compressors = _compressors(arr)
        z = zarr.create_array(store=store, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                              compressors=compressors, fill_value=0, zarr_format=3)
        if not arr.size:
            return
        if (compressors is None and isinstance(store, LocalStore) and arr.ndim >= 1
                and tuple(chunks[1:]) == tuple(arr.shape[1:])
                and (sys.byteorder == "little" or arr.dtype.itemsize == 1)):
            _write_row_chunks(Path(str(store.root)), arr, chunks[0])
        else:
            z[...] = arr

    return write


def _write_row_chunks(root: Path, arr: np.ndarray, rows: int) -> None:
    """Write the chunks of an uncompressed array chunked along its first axis only.

    Each such chunk is a contiguous slice of the C-ordered buffer, so it is written straight
    from the array's memory, sequentially (Zarr's own path copies every chunk and writes them
    concurrently: 2.0-2.5x slower to write and 1.6-2.1x slower to read here, medians of six
    interleaved runs of ``benchmarks/bench_checkpoint.py`` item 6). The bytes are exactly what Zarr writes:
    the ``bytes`` codec (little endian), default chunk keys ``c/<i>/0/...``, edge chunks
    padded with the fill value 0.
    """
    buf = arr.reshape(-1).view(np.uint8)
    per_chunk = rows * (arr.nbytes // arr.shape[0])
    suffix = "/0" * (arr.ndim - 1)
    for i in range(-(-arr.shape[0] // rows)):
        path = root / "c" / f"{i}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        piece = buf[i * per_chunk:(i + 1) * per_chunk]
        with open(path, "wb") as f:
            f.write(memoryview(cast(Any, piece)))
            if len(piece) < per_chunk:
                f.write(bytes(per_chunk - len(piece)))


def _plain_row_chunks(z: Any) -> bool:
    """An uncompressed little-endian array chunked along its first axis only?"""
    from zarr.codecs import BytesCodec

    serializer = getattr(z, "serializer", None)
    return (z.ndim >= 1 and not z.compressors and not z.filters
            and isinstance(serializer, BytesCodec)
            and (serializer.endian is None or serializer.endian.value == "little")
            and sys.byteorder == "little"
            and tuple(z.chunks[1:]) == tuple(z.shape[1:])
            and z.metadata.chunk_key_encoding.name == "default"
            and getattr(z.metadata.chunk_key_encoding, "separator", "/") == "/")


def _read_row_chunks(root: Path, dtype: np.dtype, shape: tuple[int, ...],
                     rows: int) -> np.ndarray:
    """Read what :func:`_write_row_chunks` wrote straight into one array (missing chunks are
    the fill value 0, as in Zarr; a chunk file of the wrong size is an error)."""
    out = np.zeros(shape, dtype=dtype)
    buf = out.reshape(-1).view(np.uint8)
    per_chunk = rows * (out.nbytes // shape[0])
    suffix = "/0" * (len(shape) - 1)
    for i in range(-(-shape[0] // rows)):
        target = buf[i * per_chunk:(i + 1) * per_chunk]
        path = root / "c" / f"{i}{suffix}"
        if not path.exists():
            continue
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != per_chunk:
                raise ValueError(f"chunk {i} has {size} bytes, expected {per_chunk}")
            view = memoryview(cast(Any, target))
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"chunk {i} ended early")
                got += n
    return out
