"""The checkpoint manager: one per Session (``session.checkpoints``).

It holds the store and its lease (:mod:`.lease`: only the kernel holding the lease writes; a
kernel that finds another live kernel writing says so once and only reads; one that takes over
from a dead kernel says how that kernel ended, :mod:`.report`), saves what
:class:`.selection.Selection` selects when :class:`.triggers.SaveTriggers` says so, and
restores, verifies and compares snapshots. A fresh kernel that finds another kernel's
checkpoint pauses automatic saving until ``%resume`` or ``%checkpoint on``, so that the old
snapshot is not pushed out by an empty namespace; the same kernel after ``%reload_ext`` just
goes on.

Hooks never raise into the user's cell: a failure warns once on stderr, stays in
:attr:`CheckpointManager.status` and is published as a ``checkpoint`` event and a
``checkpoint.failure`` audit record.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, CheckpointLeaseError
from ..paths import notebook_path, notebook_state_dir
from . import report, vitals
from ._codec import Encoded
from .lease import Identity, Lease, describe_holder, shell_instance
from .report import fmt_time
from .restore import VerifyReport, verify
from .schedule import EventLoop, kernel_loop
from .selection import IPYTHON_NAMES, Selection
from .store import CommitResult, Restored, Store
from .triggers import SHUTDOWN_BUDGET_S, SIGTERM_BUDGET_S, SaveTriggers

__all__ = ["IPYTHON_NAMES", "SHUTDOWN_BUDGET_S", "SIGTERM_BUDGET_S", "CheckpointManager",
           "fmt_time"]

log = logging.getLogger(__name__)

EARLIER_KERNEL = "a checkpoint from an earlier kernel exists; %resume or %checkpoint on"


class CheckpointManager:
    """Checkpoints of one session's variables; see the module docstring.

    ``clock``: monotonic time for the interval; ``loop``: where idle saves run (default: the
    kernel's event loop, if any); ``lease``: makes the lease of a store location (tests inject
    short heartbeats).
    """

    def __init__(self, session: Any, *, clock: Callable[[], float] = time.monotonic,
                 stderr: Callable[[str], None] | None = None, loop: EventLoop | None = None,
                 lease: Callable[[str], Lease] | None = None) -> None:
        self.session = session
        self.config = session.config
        self.selection = Selection(session)
        self.triggers = SaveTriggers(self, clock=clock, loop=loop if loop is not None
                                     else kernel_loop(session.shell))
        self._stderr = stderr
        self._make_lease = lease or self._default_lease
        self.paused: str | None = None
        self._store: Store | None = None
        self._store_key: tuple[str, int, str] | None = None
        self._lease: Lease | None = None
        self._last_digests: dict[str, str] | None = None
        self._last_session: str | None = None
        self._warned = False
        self._lease_warned = False
        self._carried: dict[str, dict[str, Any]] = {}  # saved, not restored (refused, damaged)
        self._carried_why: dict[str, str] = {}
        self._tasks: weakref.WeakSet[Any] = weakref.WeakSet()
        self._finished = False  # saved at shutdown and gave the lease back
        self._relocating = False
        self._installed = False
        self.status: dict[str, Any] = {
            "enabled": self.enabled, "paused": None, "location": self.location,
            "last_snapshot": None, "last_time": None, "size_bytes": None,
            "written_bytes": None, "duration_s": None, "tracked": [], "skipped": {},
            "last_failure": None, "failures": 0, "snapshots": 0, "writer": None,
            "pending": False, "carried": {}, "idle_saves": self.loop.description,
        }

    # --- the parts, for commands and tests ------------------------------------------------------
    @property
    def clock(self) -> Callable[[], float]:
        return self.triggers.clock

    @clock.setter
    def clock(self, value: Callable[[], float]) -> None:
        self.triggers.clock = value

    @property
    def loop(self) -> EventLoop:
        return self.triggers.loop

    @loop.setter
    def loop(self, value: EventLoop) -> None:
        self.triggers.loop = value

    @property
    def tracked(self) -> set[str]:
        return self.selection.tracked

    @property
    def pickled(self) -> set[str]:
        return self.selection.pickled

    @property
    def untracked(self) -> set[str]:
        return self.selection.untracked

    @property
    def ignored(self) -> list[str]:
        return self.selection.ignored

    def user_variables(self) -> dict[str, Any]:
        return self.selection.user_variables()

    @property
    def enabled(self) -> bool:
        """Automatic saving on? Read live from ``KernelExt.checkpoint_enabled`` (which
        ``%checkpoint on|off`` and ``%config`` both set)."""
        return bool(self.config.checkpoint_enabled)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.config.checkpoint_enabled = bool(value)

    @property
    def writer(self) -> bool:
        """Does this kernel hold the store's lease (and so write it)?"""
        return self._lease is not None and self._lease.held

    def writer_token(self) -> str | None:
        """This kernel's token in manifests and the lease (None before the store is open)."""
        return self._lease.me.token if self._lease is not None else None

    def active(self) -> bool:
        """Does automatic saving run now (on, not paused, this kernel writes, not ended)?"""
        return self.enabled and not self.paused and self.writer and not self._finished

    # --- the store and its lease ----------------------------------------------------------------
    @property
    def location(self) -> str:
        url = self.config.checkpoint_url
        return url if url else str(Path(self.session.state_dir) / "checkpoints")

    def _default_lease(self, location: str) -> Lease:
        shell = self.session.shell
        fraction = lambda: float(self.config.memory_fraction)  # read live
        return Lease(location, notebook=notebook_path(shell.user_ns if shell else None),
                     identity=Identity.current(shell_instance(shell)),
                     vitals=lambda: vitals.sample(fraction()))

    def _open(self, location: str) -> tuple[Store, Lease]:
        """The store at ``location`` and its lease (not taken yet); raises CheckpointError."""
        store = Store(location, keep=int(self.config.checkpoint_keep),
                      key_env=self.config.checkpoint_key_env, background_gc=True)
        try:
            lease = self._make_lease(location)
        except OSError as e:
            raise CheckpointError(f"cannot use the checkpoint store at {location}: {e}") from e
        store.guard = lease
        store.on_written = self.triggers.after_write
        return store, lease

    @property
    def store(self) -> Store:
        """The store for the current settings (reopened when ``keep`` or the key change)."""
        if self._store is None or self._store.location != self.location:
            lines = self.relocate()
            if lines:
                print("\n".join(lines))
        assert self._store is not None
        key = (self._store.location, int(self.config.checkpoint_keep),
               self.config.checkpoint_key_env)
        if self._store_key != key:
            store = Store(key[0], keep=key[1], key_env=key[2], background_gc=True,
                          guard=self._lease)
            store.on_written = self.triggers.after_write
            store.damaged = self._store.damaged
            self._store, self._store_key = store, key
        return self._store

    @property
    def current_store(self) -> Store | None:
        """The open store, without opening or moving one (for signal handlers)."""
        return self._store

    def start(self, handover: dict[str, Any] | None = None) -> list[str]:
        """Open the store and take its lease; returns what to tell the user. Raises
        :class:`CheckpointError` when the store cannot be opened."""
        if handover:
            self._adopt(handover)
        self._store, self._lease = self._open(self.location)
        self._store_key = (self.location, int(self.config.checkpoint_keep),
                           self.config.checkpoint_key_env)
        return self._take_lease()

    def _take_lease(self, *, takeover: bool = False) -> list[str]:
        assert self._lease is not None and self._store is not None
        acq = self._lease.acquire(takeover=takeover)
        self._update_status(writer=self._writer_text())
        store = self._store
        if not acq.acquired:
            assert acq.holder is not None
            self._audit("checkpoint.lease", action="reader", holder=_who(acq.holder))
            return report.reader_notice(acq.holder, store)
        self._lease_warned = False
        history = store.snapshots()
        ours = acq.same_kernel or (
            bool(history) and store.writers().get(history[0]) == self._lease.me.token)
        self._audit("checkpoint.lease", action="took_over" if acq.took_over else "acquired",
                    previous=_who(acq.previous), unclean=acq.unclean)
        lines: list[str] = []
        if acq.unclean:
            assert acq.previous is not None
            lines = report.unclean_end(acq.previous, store)
            self._audit("checkpoint.unclean_end", previous=acq.previous)
        if history and not ours and not takeover:
            self.paused = EARLIER_KERNEL
            self._update_status()
            lines = lines or report.existing_checkpoint(store)
        return lines

    def _writer_text(self) -> str:
        lease = self._lease
        if lease is None:
            return "-"
        if lease.held:
            return f"this kernel (lease taken {fmt_time(lease.acquired_at)})"
        rec = lease.read()
        if rec is not None and not lease.mine(rec) and lease.alive(rec):
            return f"another kernel: {describe_holder(rec)}; this kernel only reads"
        return "nobody: this kernel takes the lease after its next cell"

    def takeover(self) -> list[str]:
        """``%checkpoint takeover``: make this kernel the store's writer now."""
        store = self.store
        assert self._lease is not None
        if self._lease.held:
            return [f"this kernel already writes the checkpoints in {store.location}"]
        holder = self._lease.read()
        lines = self._take_lease(takeover=True)
        self.paused = None
        self.triggers.dirty = True
        text = f"this kernel now writes the checkpoints in {store.location}"
        if holder is not None and not holder.get("released") and self._lease.alive(holder):
            text += (f"; {describe_holder(holder)} stops saving at its next attempt (its newest "
                     "snapshot stays kept)")
        self._update_status(writer=self._writer_text(), paused=None)
        self.session.events.emit("checkpoint", action="takeover", status=dict(self.status))
        return [text, *[line for line in lines if "%resume" not in line]]

    def relocate(self) -> list[str]:
        """Follow a changed ``checkpoint_url``/``state_dir``: open the new location first (a bad
        one changes nothing), save what is pending to the old one, give its lease back, take
        the new one's. Raises :class:`CheckpointError`."""
        old, old_lease = self._store, self._lease
        location = self.location
        if old is not None and old.location == location:
            return []
        store, lease = self._open(location)
        count = 0
        if old is not None and old_lease is not None:
            if self.active() and self.triggers.dirty:
                self.safe_checkpoint("move")
            count = len(old.snapshots())
            old_lease.release()
        self._store, self._lease = store, lease
        self._store_key = (location, int(self.config.checkpoint_keep),
                           self.config.checkpoint_key_env)
        self._last_digests = None
        self.triggers.dirty = True
        self.paused = None
        lines = []
        if old is not None:
            lines.append(f"kernel_ext: checkpoints now go to {location}"
                         + (f" (the {count} snapshot(s) in {old.location} stay there)"
                            if count else ""))
        lines += self._take_lease()
        self._audit("checkpoint.moved", location=location, previous=old and old.location)
        return lines

    def _on_config(self, change: dict[str, Any]) -> None:
        """``%config KernelExt.state_dir|checkpoint_url = ...`` after load: applied, or refused
        (and put back) with one line when the new place cannot be used."""
        if self._relocating or not self._installed:
            return
        name = change["name"]
        old_dir = Path(self.session.state_dir)
        if name == "state_dir":
            shell = self.session.shell
            new = change["new"]
            self.session.move_state_dir(Path(new).expanduser() if new else notebook_state_dir(
                shell.user_ns if shell is not None else None))
        try:
            lines = self.relocate()
        except CheckpointError as e:
            self._relocating = True
            try:
                setattr(self.config, name, change["old"])
                self.session.move_state_dir(old_dir)
            finally:
                self._relocating = False
            print(f"kernel_ext: {name} not changed (still {change['old']!r}): {e}")
            return
        if name == "state_dir":
            lines.insert(1 if lines else 0, f"kernel_ext: the audit log and offline answer cache "
                         f"now live in {self.session.state_dir}")
        if lines:
            print("\n".join(lines))

    # --- what is saved --------------------------------------------------------------------------
    def scan(self) -> tuple[dict[str, Encoded], dict[str, str]]:
        """Encode every tracked variable; returns ``(encoded, skipped-with-reason)``."""
        return self.selection.scan(self._carried)

    def scan_status(self) -> None:
        """Refresh ``tracked`` / ``skipped`` in :attr:`status` without saving, by the rules a
        save applies (bulk data is judged by its structure, not copied or hashed)."""
        tracked, skipped = self.selection.judge(self._carried)
        self._update_status(tracked=tracked, skipped=skipped, writer=self._writer_text())

    def settings(self) -> dict[str, Any]:
        return self.selection.settings()

    def _session_state(self) -> dict[str, Any]:
        try:
            state = self.session.state()
            json.dumps(state)
            return dict(state)
        except Exception as e:  # noqa: BLE001 - another subsystem must not stop checkpoints
            log.warning("kernel_ext: session state not saved with the checkpoint: %s", e)
            return {}

    # --- saving ---------------------------------------------------------------------------------
    def checkpoint(self, reason: str = "manual", *, force: bool = False) -> CommitResult | None:
        """Save what changed now; returns None when nothing changed (unless ``force``) and when
        there is nothing to save at all (no variables, no models: no empty snapshot).

        Raises :class:`CheckpointError` (recorded in :attr:`status`), and
        :class:`~kernel_ext.errors.CheckpointLeaseError` when another kernel writes the store.
        """
        start = time.perf_counter()
        try:
            encoded, skipped = self.scan()
            state = self._session_state()
            digests = {name: enc.digest for name, enc in encoded.items()}
            for name in [n for n in self._carried if n in encoded]:
                del self._carried[name]  # defined again: the new value wins
                self._carried_why.pop(name, None)
            carried = dict(self._carried)
            digests.update({n: f"carried:{e['digest']}" for n, e in carried.items()})
            state_json = json.dumps(state, sort_keys=True)
            self._update_status(tracked=sorted(encoded), skipped=skipped,
                                carried=dict(self._carried_why))
            unchanged = digests == self._last_digests and state_json == self._last_session
            if (not force and unchanged) or (not digests and not state.get("models")
                                             and not self.store.snapshots()):
                self.triggers.dirty = False
                self._last_digests, self._last_session = digests, state_json
                self.status["check_s"] = time.perf_counter() - start
                self._update_status(pending=False)
                self.session.events.emit("checkpoint", action="skipped", status=dict(self.status))
                return None
            result = self.store.commit(encoded, skipped=skipped, session_state=state,
                                       settings=self.settings(), reason=reason,
                                       carried=carried)
        except CheckpointLeaseError as e:
            self._lost_lease(e)
            raise
        except CheckpointError as e:
            self._record_failure(e, reason)
            raise
        self.triggers.dirty = False
        self.triggers.failed_at = None
        self._last_digests, self._last_session = digests, state_json
        self._warned = False
        self._update_status(last_snapshot=result.snapshot, last_time=result.created,
                            size_bytes=result.total_bytes, written_bytes=result.written_bytes,
                            duration_s=time.perf_counter() - start, last_failure=None,
                            snapshots=len(self.store.snapshots()), pending=False)
        self.session.events.emit("checkpoint", action="committed", status=dict(self.status))
        self._audit("checkpoint.commit", snapshot=result.snapshot, reason=reason,
                    variables=len(encoded), size_bytes=result.total_bytes,
                    written_bytes=result.written_bytes, duration_s=round(result.duration, 6),
                    skipped=dict(sorted(skipped.items())))
        return result

    def _audit(self, kind: str, **fields: Any) -> None:
        self.session.audit.write(kind, **fields)

    def _update_status(self, **fields: Any) -> None:
        self.status.update(fields)
        self.status["enabled"] = self.enabled
        self.status["paused"] = self.paused
        self.status["location"] = self._store.location if self._store else self.location

    def _record_failure(self, error: BaseException, reason: str) -> None:
        message = f"{type(error).__name__}: {error}"
        self.triggers.failed_at = self.clock()
        self.status["last_failure"] = message
        self.status["last_failure_time"] = time.time()
        self.status["failures"] = int(self.status.get("failures") or 0) + 1
        self.session.events.emit("checkpoint", action="failed", status=dict(self.status))
        self._audit("checkpoint.failure", reason=reason, error=message)
        if not self._warned:
            self._warned = True
            self._warn(f"kernel_ext: checkpoint failed: {message}\n  Your work continues; the "
                       "last good snapshot is kept. Details: %checkpoint status")

    def _lost_lease(self, error: CheckpointLeaseError) -> None:
        self._update_status(writer=self._writer_text())
        self.session.events.emit("checkpoint", action="lease_lost", status=dict(self.status))
        if self._lease_warned:
            return
        self._lease_warned = True
        self._audit("checkpoint.lease", action="lost", error=str(error))
        self._warn(f"kernel_ext: this kernel no longer saves this notebook's checkpoints: {error}")

    def _warn(self, text: str) -> None:
        log.debug("%s", text)  # printed once below; a log line as well would print it twice
        if self._stderr is not None:
            self._stderr(text)
        else:
            print(text, file=sys.stderr)

    def safe_checkpoint(self, reason: str, *, force: bool = False) -> None:
        """:meth:`checkpoint` for hooks: never raises (failures are recorded and warned)."""
        try:
            self.checkpoint(reason, force=force)
        except CheckpointError:
            return  # recorded and warned by checkpoint()
        except Exception as e:  # noqa: BLE001 - a hook never raises into the user's cell
            self._record_failure(e, reason)

    def final_save(self, reason: str, budget: float | None) -> None:
        """The last save of this kernel (shutdown, SIGTERM, exit), bounded by ``budget``."""
        self.flush_tasks()
        if not self.active() or self._store is None:
            return
        with self._store.deadline(budget):
            self.safe_checkpoint(reason)

    def finish(self) -> None:
        """This kernel is ending: give the lease back as a clean end; no more saves."""
        self._finished = True
        if self._lease is not None:
            self._lease.release()

    def flush_tasks(self) -> None:
        for t in list(self._tasks):
            t._flush_quietly()

    def register_task(self, task: Any) -> None:
        self._tasks.add(task)

    def note_cell(self, info: Any, *, starting: bool) -> None:
        """Tell the lease's heartbeat that a cell starts (``info``: IPython's ExecutionInfo)
        or ended."""
        lease = self._lease
        if lease is None or not lease.held:
            return
        lease.note_cell(_cell_info(self.session.shell, info) if starting else None)

    def watch_holder(self) -> None:
        """A reading kernel, after each cell: when the writing kernel has died, take its lease
        (and say so). A read of the small LEASE file and a process lookup: ~0.2 ms."""
        lease = self._lease
        if lease is None or self._finished:
            return
        if lease.lost_to is not None and not self._lease_warned:
            self._lost_lease(CheckpointLeaseError(lease.not_holder(lease.lost_to)))
        rec = lease.read()
        if rec is not None and not lease.mine(rec) and lease.alive(rec):
            return
        try:
            lines = self._take_lease()
        except OSError as e:
            log.debug("kernel_ext: could not take the lease: %s", e)
            return
        if lease.held:
            first = (f"kernel_ext: the kernel that wrote this notebook's checkpoints has ended; "
                     f"this kernel writes them now ({self.location}).")
            print("\n".join([first, *lines]))

    def install(self) -> None:
        """Register the save triggers and the observer of the store's location settings."""
        if self._installed:
            return
        self.triggers.install()
        self.config.observe(self._on_config, names=["state_dir", "checkpoint_url"])
        self._installed = True

    def close(self) -> None:
        """Save what is pending, give the lease back, unregister exactly what :meth:`install`
        registered (extension unload)."""
        if not self._installed:
            return
        if self.active() and self.triggers.dirty:
            self.final_save("unload", None)
        self.triggers.close()
        self.config.unobserve(self._on_config, names=["state_dir", "checkpoint_url"])
        if self._lease is not None:
            self._lease.release()
        self._installed = False

    def disable(self, error: BaseException) -> None:
        """Turn automatic saving off after a start-up failure: warn once, keep it in status."""
        self.enabled = False
        self._update_status()
        self._warned = True  # this warning replaces the usual one
        self._record_failure(error, "startup")
        self._warn(f"kernel_ext: checkpoints are off: {type(error).__name__}: {error}\n  Fix "
                   "the store (%config KernelExt.checkpoint_url = ...), then %checkpoint on. "
                   "Details: %checkpoint status")

    # --- %reload_ext: the same kernel goes on ---------------------------------------------------
    def handover(self) -> dict[str, Any]:
        """What the next manager of this same kernel takes over (``%reload_ext``)."""
        return {"settings": self.selection.settings(), "carried": dict(self._carried),
                "carried_why": dict(self._carried_why), "paused": self.paused,
                "last_auto": self.triggers.last_auto}

    def _adopt(self, h: dict[str, Any]) -> None:
        self.selection.replace(h["settings"])
        self._carried, self._carried_why = dict(h["carried"]), dict(h["carried_why"])
        self.paused = h["paused"]
        self.triggers.last_auto = h["last_auto"]

    # --- resume, verify, diff -------------------------------------------------------------------
    def resume(self, snapshot: str | None = None, names: Iterable[str] | None = None,
               allow_pickle: Iterable[str] | bool = ()) -> tuple[Restored | None, list[str]]:
        """Restore variables into the shell, then the session state; returns the report lines
        (``(None, lines)`` when there is no checkpoint yet)."""
        if isinstance(allow_pickle, bool):
            allowed: Callable[[str], bool] = lambda name: bool(allow_pickle)
        else:
            chosen = set(allow_pickle)
            allowed = chosen.__contains__
        store = self.store
        if not store.snapshots():
            return None, [(f"no checkpoint yet for this notebook ({store.location}): nothing to "
                           "resume. Variables are saved after cells; %checkpoint now saves at "
                           "once.")]
        restored = store.restore(snapshot, names, allowed)
        m = restored.manifest
        shell = self.session.shell
        rejected = [n for n in restored.values if self.selection.hidden(n)]
        for name in rejected:
            del restored.values[name]  # a manifest must not replace IPython's own names
        if shell is not None:
            shell.user_ns.update(restored.values)
        self.selection.apply(m.get("settings", {}))
        lines = report.resume_lines(restored, names is not None)
        lines += [f"not restored: {n}: not a user variable name" for n in rejected]
        if names is None:
            try:
                lines.extend(self.session.restore_state(m.get("session", {})) or [])
            except Exception as e:  # noqa: BLE001 - report, keep the restored variables
                lines.append(f"session state not restored: {type(e).__name__}: {e}")
        for t in store.tasks():
            todo = "complete" if t["total"] is not None and t["done"] >= t["total"] else \
                "re-run its cell to continue"
            lines.append(f"task {t['name']!r}: {t['done']}/{t['total']} items saved; {todo}")
        if names is None:  # a full resume: saving goes on from here
            keep = {**{n: f"not restored ({why})" for n, why in restored.refused.items()},
                    **{n: "DAMAGED in every kept snapshot" for n in restored.lost}}
            self._carried = {n: m["variables"][n] for n in keep if n in m["variables"]}
            self._carried_why = {n: keep[n] for n in self._carried}
            self.paused = None
        self._last_digests = None
        self._update_status(last_snapshot=restored.snapshot, last_time=m["created"],
                            carried=dict(self._carried_why))
        self.session.events.emit("checkpoint", action="restored", status=dict(self.status))
        self._audit("checkpoint.restore", snapshot=restored.snapshot,
                    variables=sorted(restored.values), refused=sorted(restored.refused),
                    from_older=restored.sources, damaged=sorted(restored.lost),
                    notes=restored.notes)
        return restored, lines

    def verify(self) -> tuple[VerifyReport, list[str]]:
        """``%checkpoint verify``: check every object; when this kernel writes and still holds a
        damaged object's value, write it again (every snapshot sharing it is repaired)."""
        store = self.store
        found = verify(store)
        repaired: list[str] = []
        after: VerifyReport | None = None
        if found.damaged_objects and self.writer:
            encoded, _ = self.scan()
            bad = set(found.damaged_objects)
            repaired = sorted(n for n, e in encoded.items() if {p.hash for p in e.parts} & bad)
            if repaired:
                store.damaged |= bad
                self.checkpoint("repair", force=True)
                after = verify(store)
        self._audit("checkpoint.verify", damaged=sorted(found.damaged_objects),
                    lost=sorted(found.lost), recoverable=found.recoverable, repaired=repaired)
        return after or found, report.verify_lines(found, repaired, after)

    def diff(self, snapshot: str | None = None) -> dict[str, list[str]]:
        """Compare the current variables with a snapshot (default: the newest)."""
        store = self.store
        history = store.snapshots()
        if not history:
            raise CheckpointError("no checkpoint yet: %checkpoint now writes one")
        sid = store.resolve(snapshot) if snapshot else history[0]
        saved = {n: e["digest"] for n, e in store.manifest(sid)["variables"].items()}
        encoded, _ = self.scan()
        now = {n: e.digest for n, e in encoded.items()}
        return {
            "snapshot": [sid],
            "added": sorted(now.keys() - saved.keys()),
            "removed": sorted(saved.keys() - now.keys()),
            "changed": sorted(n for n in now.keys() & saved.keys() if now[n] != saved[n]),
            "unchanged": sorted(n for n in now.keys() & saved.keys() if now[n] == saved[n]),
        }


def _cell_info(shell: Any, info: Any) -> dict[str, Any]:
    """What the heartbeat says about the running cell: its number, first line and start."""
    raw = getattr(info, "raw_cell", None) or ""
    lines = [line for line in str(raw).splitlines() if line.strip()]
    source = lines[0].strip() if lines else ""
    if len(source) > 80:
        source = source[:77] + "..."
    elif len(lines) > 1:
        source += f" (+{len(lines) - 1} lines)"
    count = getattr(shell, "execution_count", None)
    return {"count": count, "source": source, "started": time.time()}


def _who(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {k: rec.get(k) for k in ("pid", "host", "kernel_id", "heartbeat", "released")}

