"""One writer per checkpoint store: the lease.

The store's ``LEASE`` file names the kernel that writes the store: a token that identifies the
kernel (host, boot, pid, process start time and its IPython shell: the same for a kernel across
``%reload_ext``), its pid,
host, kernel id and notebook, when it took the lease, its latest heartbeat, the cell it is
running and its memory (:mod:`.vitals`). Every change of the file happens under a lock:
``LEASE.lock`` (:mod:`filelock`) on a directory; on other fsspec stores a lock of this process
plus a read-back after writing, which is best effort (fsspec offers no compare-and-swap).

- A kernel that finds no lease, a released one, or the lease of a dead kernel takes it; the
  record it replaced comes back (:class:`Acquisition`), so the caller can say how the previous
  kernel ended.
- While the holder lives, another kernel reads the store but never writes or collects;
  :meth:`Lease.acquire` with ``takeover=True`` takes the lease anyway, and the former holder
  finds out at its next publish (checked under the lock) and stops writing.
- A holder is dead when, on the same host and boot, its pid is gone, a zombie or another
  process; on another host, when its heartbeat is older than ``ttl_s``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from ..errors import CheckpointLeaseError
from ._backend import Backend, LocalBackend, open_backend
from ._codec import json_bytes

__all__ = ["Acquisition", "Identity", "Lease", "describe_holder", "shell_instance"]

log = logging.getLogger(__name__)

LEASE = "LEASE"
BEAT = "LEASE.beat"  # the holder's heartbeat, cell and memory; trusted when its token matches
HEARTBEAT_S = 2.0  # how often the holder rewrites its record (sooner when the cell changes)
SAMPLE_S = 1.0  # how often it looks at its memory (a jump is written at once)
TTL_S = 60.0  # a holder on another host whose heartbeat is this old is dead

_process_locks: dict[str, threading.RLock] = {}
_process_locks_guard = threading.Lock()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"boot-{int(psutil.boot_time())}"


def _kernel_id() -> str:
    """The Jupyter kernel id (from the connection file's name), or ""."""
    if "ipykernel" not in sys.modules:
        return ""
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).stem
    except Exception:  # noqa: BLE001 - not in a kernel, or an unusual launcher
        return ""
    return name.removeprefix("kernel-")


@dataclass(frozen=True)
class Identity:
    """Who this kernel is, as other kernels see it. ``instance`` tells apart two shells of one
    process (tests run several one after another); a kernel has one for its whole life."""

    host: str
    boot_id: str
    pid: int
    started: float
    kernel_id: str = ""
    instance: str = ""

    @property
    def token(self) -> str:
        return f"{self.host}:{self.boot_id[:8]}:{self.pid}:{self.started:.2f}:{self.instance}"

    @classmethod
    def current(cls, instance: str = "") -> Identity:
        return cls(socket.gethostname(), _boot_id(), os.getpid(),
                   psutil.Process().create_time(), _kernel_id(), instance)


def shell_instance(shell: Any) -> str:
    """A name for ``shell`` that survives ``%reload_ext`` (kept on the shell itself)."""
    if shell is None:
        return ""
    import uuid

    return str(shell.__dict__.setdefault("_kernel_ext_instance", uuid.uuid4().hex[:8]))


@dataclass
class Acquisition:
    """What :meth:`Lease.acquire` found. ``acquired``: this kernel writes now; ``holder``: the
    live kernel that does instead; ``previous``: the record this kernel replaced (a released
    one, a dead kernel's, this kernel's own, or, after a takeover, the live one's)."""

    acquired: bool
    holder: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    took_over: bool = False
    same_kernel: bool = False

    @property
    def unclean(self) -> bool:
        """The previous holder died without releasing the lease."""
        p = self.previous
        return (p is not None and not self.same_kernel and not self.took_over
                and not p.get("released"))


def describe_holder(rec: dict[str, Any], now: float | None = None) -> str:
    """``kernel pid 123 on host, kernel id 1a2b3c4d, heartbeat 3 s ago``"""
    now = time.time() if now is None else now
    parts = [f"kernel pid {rec.get('pid')} on {rec.get('host')}"]
    if rec.get("kernel_id"):
        parts.append(f"kernel id {str(rec['kernel_id'])[:8]}")
    beat = rec.get("heartbeat")
    if isinstance(beat, (int, float)):
        parts.append(f"heartbeat {max(0.0, now - beat):.0f} s ago")
    return ", ".join(parts)


class Lease:
    """The lease of the store at ``location`` for this process; see the module docstring.

    ``vitals``: returns the memory sample the heartbeat records (None: none). ``clock``: wall
    time for the record. The heartbeat runs in a daemon thread while the lease is held.
    """

    def __init__(self, location: str, *, notebook: str | None = None,
                 identity: Identity | None = None,
                 vitals: Callable[[], dict[str, Any]] | None = None,
                 heartbeat_s: float = HEARTBEAT_S, sample_s: float = SAMPLE_S,
                 ttl_s: float = TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.location = location
        self.backend: Backend = open_backend(location)  # its own: no commit deadline applies
        self.me = identity or Identity.current()
        self.notebook = notebook
        self.vitals = vitals
        self.heartbeat_s = heartbeat_s
        self.sample_s = sample_s
        self.ttl_s = ttl_s
        self.clock = clock
        self.held = False
        self.lost_to: dict[str, Any] | None = None  # who took it from us
        self.acquired_at: float | None = None
        self._cell: dict[str, Any] | None = None
        self._last_cell: dict[str, Any] | None = None
        self._memory: dict[str, Any] | None = None
        self._written_memory: dict[str, Any] | None = None
        self._state_lock = threading.Lock()
        self._thread_lock = threading.Lock()  # threads of this process queue here, not polling
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        if isinstance(self.backend, LocalBackend):
            from filelock import FileLock

            self._mutex: Any = FileLock(str(self.backend.root / f"{LEASE}.lock"))
        else:
            with _process_locks_guard:
                self._mutex = _process_locks.setdefault(self.backend.url, threading.RLock())

    # --- the record -----------------------------------------------------------------------------
    def _read_json(self, key: str) -> dict[str, Any] | None:
        try:
            data = self.backend.get(key)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.debug("kernel_ext: cannot read %s/%s: %s", self.location, key, e)
            return None
        try:
            rec = json.loads(data)
        except ValueError:
            return None  # also a heartbeat read while it was being rewritten
        return rec if isinstance(rec, dict) else None

    def read(self) -> dict[str, Any] | None:
        """The current record with the holder's latest heartbeat, or None (no lease, or an
        unreadable one: nobody holds it)."""
        rec = self._read_json(LEASE)
        if rec is None or rec.get("released"):
            return rec
        beat = self._read_json(BEAT)
        if beat is not None and beat.get("token") == rec.get("token"):
            rec.update({k: beat[k] for k in ("heartbeat", "cell", "last_cell", "memory")
                        if k in beat})
        return rec

    def _write(self, rec: dict[str, Any]) -> None:
        self.backend.put(LEASE, json_bytes(rec))

    def _write_beat(self, beat: dict[str, Any]) -> None:
        """Rewrite the heartbeat in place: a small write to the page cache, which outlives a
        killed kernel (a reader that catches it half-written ignores it)."""
        data = json_bytes(beat)
        if not isinstance(self.backend, LocalBackend):
            self.backend.put(BEAT, data)
            return
        fd = os.open(self.backend.root / BEAT, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def mine(self, rec: dict[str, Any] | None) -> bool:
        return rec is not None and rec.get("token") == self.me.token

    def alive(self, rec: dict[str, Any]) -> bool:
        """Whether the kernel named by ``rec`` may still write (see the module docstring)."""
        if rec.get("released"):
            return False
        if rec.get("host") == self.me.host and rec.get("boot_id") == self.me.boot_id:
            try:
                proc = psutil.Process(int(rec["pid"]))
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return False
                return abs(proc.create_time() - float(rec.get("started", 0))) < 1.0
            except (psutil.Error, KeyError, TypeError, ValueError):
                return False
        beat = rec.get("heartbeat")
        return isinstance(beat, (int, float)) and self.clock() - beat < self.ttl_s

    def _record(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        now = self.clock()
        me = self.me
        return {
            "format": 1, "token": me.token, "pid": me.pid, "host": me.host,
            "boot_id": me.boot_id, "started": me.started, "kernel_id": me.kernel_id,
            "notebook": self.notebook, "acquired": now, "heartbeat": now, "released": None,
            "cell": None, "last_cell": None, "memory": self._memory,
            "previous": {k: previous.get(k) for k in ("pid", "host", "kernel_id", "heartbeat",
                                                      "released")} if previous else None,
        }

    # --- taking and giving back -----------------------------------------------------------------
    def acquire(self, *, takeover: bool = False) -> Acquisition:
        """Take the lease if it is free, ours, or its holder is dead (or ``takeover``)."""
        self._sample()  # the record has this kernel's memory from the start
        with self._locked():
            rec = self.read()
            same = self.mine(rec)
            live_other = rec is not None and not same and self.alive(rec)
            if live_other and not takeover:
                self.held = False
                return Acquisition(False, holder=rec)
            self._write(self._record(rec))
        if not isinstance(self.backend, LocalBackend):  # no lock across processes: read back
            time.sleep(0.05)
            if not self.mine(self.read()):
                self.held = False
                return Acquisition(False, holder=self.read())
        self.held = True
        self.lost_to = None
        self.acquired_at = self.clock()
        self._start()
        return Acquisition(True, previous=rec, took_over=live_other, same_kernel=same)

    def release(self) -> None:
        """Give the lease back, marked as a clean end (the next kernel does not report a crash)."""
        self._stop()
        if not self.held:
            return
        self.held = False
        try:
            with self._locked():
                rec = self.read()
                if self.mine(rec):
                    assert rec is not None
                    now = self.clock()
                    rec.update(released=now, heartbeat=now, cell=None,
                               last_cell=self._last_cell, memory=self._memory or rec.get("memory"))
                    self._write(rec)
        except OSError as e:
            log.warning("kernel_ext: could not release the checkpoint lease of %s: %s",
                        self.location, e)

    # --- while writing --------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`CheckpointLeaseError` unless this process holds the lease now."""
        if not self.held:
            raise CheckpointLeaseError(self.not_holder(self.read()))
        rec = self.read()
        if not self.mine(rec) or (rec or {}).get("released"):
            self.held = False
            self.lost_to = rec
            self._stop(join=False)  # (the lock may be held here: the thread ends by itself)
            raise CheckpointLeaseError(self.not_holder(rec))

    def not_holder(self, rec: dict[str, Any] | None) -> str:
        """Why this kernel may not write, given the current record ``rec``."""
        if rec is None or rec.get("released") or self.mine(rec):
            return f"this kernel does not hold the lease of {self.location}"
        return (f"{describe_holder(rec, self.clock())} writes {self.location}; this kernel "
                "does not (%checkpoint takeover to write from here)")

    @contextlib.contextmanager
    def publishing(self) -> Iterator[None]:
        """Hold the lock and check the lease: what is published inside cannot race a takeover."""
        with self._locked():
            self.check()
            yield

    def writer(self) -> dict[str, Any]:
        me = self.me
        return {"token": me.token, "pid": me.pid, "host": me.host, "kernel_id": me.kernel_id}

    # --- the heartbeat --------------------------------------------------------------------------
    def note_cell(self, cell: dict[str, Any] | None) -> None:
        """The cell now running (None: it finished). A starting cell is written at once (a
        small write without fsync, skipped if the lock is busy for 50 ms: the heartbeat
        thread then writes it), so a kernel killed right after still tells which cell ran."""
        with self._state_lock:
            if cell is None and self._cell is not None:
                self._last_cell = {**self._cell, "finished": self.clock()}
            self._cell = cell
        if cell is not None and self.held and not self._beat(wait=0.05, forced=True):
            self._wake.set()  # the lock was busy: the heartbeat thread writes it

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="kernel_ext-checkpoint-lease")
        self._thread.start()

    def _stop(self, join: bool = True) -> None:
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if join and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._thread = None

    def _run(self) -> None:
        last = 0.0
        written_cell: Any = object()
        while not self._stopping:
            self._wake.wait(self.sample_s)
            self._wake.clear()
            if self._stopping:
                return
            self._sample()
            now = self.clock()
            with self._state_lock:
                cell = self._cell
            if now - last >= self.heartbeat_s or cell is not written_cell or \
                    self._memory_jumped():
                if not self._beat():
                    return
                last = now
                written_cell = cell

    def _sample(self) -> None:
        if self.vitals is None:
            return
        try:
            self._memory = self.vitals()
        except Exception as e:  # noqa: BLE001 - a probe never stops the heartbeat
            log.debug("kernel_ext: memory sample failed: %s", e)

    def _memory_jumped(self) -> bool:
        m, w = self._memory, self._written_memory
        if not m or not w:
            return bool(m)
        grew = int(m.get("rss") or 0) - int(w.get("rss") or 0)
        return grew > max(64 << 20, int(w.get("rss") or 0) // 4)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock on ``LEASE``: this process's threads queue on a thread lock, other
        processes on the file lock."""
        with self._thread_lock, self._mutex:
            yield

    def _beat(self, wait: float | None = None, forced: bool = False) -> bool:
        """Rewrite the heartbeat. Returns False when the lease is no longer ours (the heartbeat
        thread stops) or, when ``forced`` (a starting cell: no look at ``LEASE``), when this
        process's other thread kept the heartbeat busy for ``wait`` seconds."""
        if not self._thread_lock.acquire(timeout=-1 if wait is None else wait):
            return not forced
        try:
            if not forced:
                rec = self._read_json(LEASE)
                if not self.mine(rec) or (rec or {}).get("released"):
                    self.held = False
                    self.lost_to = rec
                    return False
            with self._state_lock:
                beat = {"token": self.me.token, "heartbeat": self.clock(), "cell": self._cell,
                        "last_cell": self._last_cell, "memory": self._memory}
            self._write_beat(beat)
            self._written_memory = self._memory
        except OSError as e:
            log.debug("kernel_ext: heartbeat not written: %s", e)
        finally:
            self._thread_lock.release()
        return True
