"""The checkpoint manager: which variables to save, when, and what happened.

One per Session (``session.checkpoints``). It saves the user's variables after cells
(``post_run_cell``, at most every ``checkpoint_interval`` seconds), on SIGTERM (then chains to
the previous handler) and at exit. Hooks never raise into the user's cell: a failure warns
once on stderr, stays in :attr:`CheckpointManager.status` and is published as a
``checkpoint`` event and a ``checkpoint.failure`` audit record.

A fresh kernel that finds a checkpoint for its notebook pauses automatic saving until
``%resume`` or ``%checkpoint on``, so that the old snapshot is not pushed out of the retained
history by an empty namespace.
"""

from __future__ import annotations

import atexit
import fnmatch
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..memory import format_bytes
from ._codec import Encoded, Unstorable, encode, is_bulk, never_reason
from .store import CommitResult, Restored, Store

__all__ = ["IPYTHON_NAMES", "CheckpointManager"]

log = logging.getLogger(__name__)

IPYTHON_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython", "open"})


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _register_exit(manager: CheckpointManager) -> None:
    """Save at interpreter exit, early enough for thread pools to still accept work.

    ``threading._register_atexit`` hooks run (newest first) before ``atexit`` handlers and
    before ``concurrent.futures`` refuses new work, which Zarr's file I/O and the parallel
    fsyncs need. Falls back to ``atexit`` where that private hook does not exist.
    """
    import concurrent.futures.thread  # noqa: F401 - its exit hook must be older than ours

    ref = weakref.ref(manager)

    def hook() -> None:
        m = ref()
        if m is not None:
            m._at_exit()

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(hook)
            return
        except RuntimeError:  # already shutting down
            return
    atexit.register(hook)


class CheckpointManager:
    """Checkpoints of one session's variables; see the module docstring."""

    def __init__(self, session: Any, *, clock: Callable[[], float] = time.monotonic,
                 stderr: Callable[[str], None] | None = None) -> None:
        self.session = session
        self.config = session.config
        self.clock = clock
        self._stderr = stderr
        self.paused: str | None = None
        self.tracked: set[str] = set()
        self.pickled: set[str] = set()
        self.untracked: set[str] = set()
        self.ignored: list[str] = []
        self._store: Store | None = None
        self._store_key: tuple[str, int, str] | None = None
        self._last_auto: float | None = None
        self._last_digests: dict[str, str] | None = None
        self._last_session: str | None = None
        self._warned = False
        self._carried: dict[str, dict[str, Any]] = {}  # saved, not restored (refused pickles)
        self._tasks: weakref.WeakSet[Any] = weakref.WeakSet()
        self._prev_sigterm: Any = None
        self._installed = False
        self.status: dict[str, Any] = {
            "enabled": self.enabled, "paused": None, "location": self.location,
            "last_snapshot": None, "last_time": None, "size_bytes": None,
            "written_bytes": None, "duration_s": None, "tracked": [], "skipped": {},
            "last_failure": None, "failures": 0, "snapshots": 0,
        }

    @property
    def enabled(self) -> bool:
        """Automatic saving on? Read live from ``KernelExt.checkpoint_enabled`` (which
        ``%checkpoint on|off`` and ``%config`` both set)."""
        return bool(self.config.checkpoint_enabled)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.config.checkpoint_enabled = bool(value)

    # --- the store ------------------------------------------------------------------------------
    @property
    def location(self) -> str:
        url = self.config.checkpoint_url
        return url if url else str(Path(self.session.state_dir) / "checkpoints")

    @property
    def store(self) -> Store:
        """The store for the current settings (reopened when they change)."""
        key = (self.location, int(self.config.checkpoint_keep), self.config.checkpoint_key_env)
        if self._store is None or self._store_key != key:
            # Deleting old objects is slow on some disks: the hook does not wait for it.
            self._store = Store(key[0], keep=key[1], key_env=key[2], background_gc=True)
            self._store_key = key
        return self._store

    # --- what is saved --------------------------------------------------------------------------
    def user_variables(self) -> dict[str, Any]:
        """The user's variables: no IPython names, no ``_``-names."""
        shell = self.session.shell
        if shell is None:
            return {}
        hidden = getattr(shell, "user_ns_hidden", {})
        out = {}
        for name, value in list(shell.user_ns.items()):
            if not self._user_name(name):
                continue
            if name in hidden and hidden[name] is value:
                continue
            out[name] = value
        return out

    @staticmethod
    def _user_name(name: str) -> bool:
        return not name.startswith("_") and name not in IPYTHON_NAMES

    def _candidates(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Tracked variables by the rules alone (nothing encoded); ``(values, skipped)``."""
        from .tasks import Task

        values: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        names = self.user_variables()
        for name in sorted(self.tracked - names.keys() - self._carried.keys()):
            skipped[name] = "tracked but not defined"
        for name, value in names.items():
            reason = self._excluded(name)
            if reason is None and isinstance(value, Task):
                reason = "resumable task (its progress is saved on its own)"
            if reason is None and name not in self.pickled:
                reason = never_reason(value)
            if reason is not None:
                skipped[name] = reason
            else:
                values[name] = value
        return values, skipped

    def _excluded(self, name: str) -> str | None:
        if name in self.tracked:
            return None
        if name in self.untracked:
            return "untracked (%checkpoint track NAME to save it again)"
        for pattern in self.ignored:
            if fnmatch.fnmatchcase(name, pattern):
                return f"ignored by pattern {pattern!r}"
        return None

    def scan(self) -> tuple[dict[str, Encoded], dict[str, str]]:
        """Encode every tracked variable; returns ``(encoded, skipped-with-reason)``.

        One variable that cannot be encoded (for any reason) is skipped with that reason; it
        never stops the others from being saved.
        """
        values, skipped = self._candidates()
        encoded: dict[str, Encoded] = {}
        for name, value in values.items():
            try:
                encoded[name] = encode(value, allow_pickle=name in self.pickled)
            except Unstorable as e:
                skipped[name] = str(e)
            except Exception as e:  # noqa: BLE001 - one bad variable must not stop the snapshot
                skipped[name] = f"cannot be saved: {type(e).__name__}: {e}"
        return encoded, skipped

    def scan_status(self) -> None:
        """Refresh ``tracked`` / ``skipped`` in :attr:`status` without saving.

        Cheap: arrays, tensors, DataFrames, bytes and pickled variables are listed by the
        rules, not encoded (a bulk value that then fails to encode is listed as skipped by
        the next save).
        """
        values, skipped = self._candidates()
        tracked = []
        for name, value in values.items():
            if name in self.pickled or is_bulk(value):
                tracked.append(name)
                continue
            try:
                encode(value)
                tracked.append(name)
            except Unstorable as e:
                skipped[name] = str(e)
            except Exception as e:  # noqa: BLE001 - status must not fail on one variable
                skipped[name] = f"cannot be saved: {type(e).__name__}: {e}"
        self._update_status(tracked=sorted(tracked), skipped=skipped)

    def settings(self) -> dict[str, Any]:
        return {"tracked": sorted(self.tracked), "pickled": sorted(self.pickled),
                "untracked": sorted(self.untracked), "ignored": list(self.ignored)}

    def _apply_settings(self, settings: dict[str, Any]) -> None:
        self.tracked |= set(settings.get("tracked", []))
        self.pickled |= set(settings.get("pickled", []))
        self.untracked |= set(settings.get("untracked", [])) - self.tracked
        self.ignored += [p for p in settings.get("ignored", []) if p not in self.ignored]

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
        """Save what changed now; returns None when nothing changed (unless ``force``).

        Raises :class:`CheckpointError` (the failure is also recorded in :attr:`status`).
        """
        start = time.perf_counter()
        try:
            encoded, skipped = self.scan()
            state = self._session_state()
            digests = {name: enc.digest for name, enc in encoded.items()}
            for name in [n for n in self._carried if n in encoded]:
                del self._carried[name]  # defined again: the new value wins
            carried = dict(self._carried)
            digests.update({n: f"carried:{e['digest']}" for n, e in carried.items()})
            state_json = json.dumps(state, sort_keys=True)
            self._update_status(tracked=sorted(encoded), skipped=skipped)
            if not force and digests == self._last_digests and state_json == self._last_session:
                self.status["check_s"] = time.perf_counter() - start
                self.session.events.emit("checkpoint", action="skipped", status=dict(self.status))
                return None
            result = self.store.commit(encoded, skipped=skipped, session_state=state,
                                       settings=self.settings(), reason=reason,
                                       carried=carried)
        except CheckpointError as e:
            self._record_failure(e, reason)
            raise
        self._last_digests, self._last_session = digests, state_json
        self._warned = False
        self._update_status(last_snapshot=result.snapshot, last_time=result.created,
                            size_bytes=result.total_bytes, written_bytes=result.written_bytes,
                            duration_s=time.perf_counter() - start, last_failure=None,
                            snapshots=len(self.store.snapshots()))
        self.session.events.emit("checkpoint", action="committed", status=dict(self.status))
        self.session.audit.write("checkpoint.commit", snapshot=result.snapshot, reason=reason,
                                 variables=len(encoded), size_bytes=result.total_bytes,
                                 written_bytes=result.written_bytes,
                                 duration_s=round(result.duration, 6), skipped=sorted(skipped))
        return result

    def _update_status(self, **fields: Any) -> None:
        self.status.update(fields)
        self.status["enabled"] = self.enabled
        self.status["paused"] = self.paused
        self.status["location"] = self.location

    def _record_failure(self, error: BaseException, reason: str) -> None:
        message = f"{type(error).__name__}: {error}"
        self.status["last_failure"] = message
        self.status["last_failure_time"] = time.time()
        self.status["failures"] = int(self.status.get("failures") or 0) + 1
        self.session.events.emit("checkpoint", action="failed", status=dict(self.status))
        self.session.audit.write("checkpoint.failure", reason=reason, error=message)
        if not self._warned:
            self._warned = True
            self._warn(f"kernel_ext: checkpoint failed: {message}\n  Your work continues; the "
                       "last good snapshot is kept. Details: %checkpoint status")

    def _warn(self, text: str) -> None:
        log.warning("%s", text)
        if self._stderr is not None:
            self._stderr(text)
        else:
            print(text, file=sys.stderr)

    def _safe_checkpoint(self, reason: str, *, force: bool = False) -> None:
        try:
            self.checkpoint(reason, force=force)
        except CheckpointError:
            return  # recorded and warned by checkpoint()
        except Exception as e:  # noqa: BLE001 - a hook never raises into the user's cell
            self._record_failure(e, reason)

    # --- hooks ----------------------------------------------------------------------------------
    def post_run_cell(self, result: Any = None) -> None:
        """IPython ``post_run_cell``: flush live tasks, then save if due. Never raises."""
        for t in list(self._tasks):
            t._flush_quietly()
        if not self.enabled or self.paused:
            return
        now = self.clock()
        interval = float(self.config.checkpoint_interval)
        if self._last_auto is not None and now - self._last_auto < interval:
            return
        self._last_auto = now
        self._safe_checkpoint("cell")

    def _final_save(self, reason: str) -> None:
        for t in list(self._tasks):
            t._flush_quietly()
        if self.enabled and not self.paused:
            self._safe_checkpoint(reason)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._store is None or not self._store.writing:  # never re-enter a commit
            self._final_save("sigterm")
        prev = self._prev_sigterm
        if callable(prev):
            prev(signum, frame)
        elif prev in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def _at_exit(self) -> None:
        if self._installed:
            self._final_save("exit")

    def register_task(self, task: Any) -> None:
        self._tasks.add(task)

    def install(self) -> None:
        """Register the IPython hook, the SIGTERM handler and the exit handler."""
        if self._installed:
            return
        shell = self.session.shell
        if shell is not None:
            shell.events.register("post_run_cell", self.post_run_cell)
        if threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)
        _register_exit(self)
        self._installed = True

    def close(self) -> None:
        """Unregister exactly what :meth:`install` registered."""
        if not self._installed:
            return
        shell = self.session.shell
        if shell is not None:
            try:
                shell.events.unregister("post_run_cell", self.post_run_cell)
            except ValueError:
                log.debug("post_run_cell hook was already gone")
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == self._on_sigterm):
            prev = self._prev_sigterm
            signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)
        self._installed = False  # the exit hook checks this (threading's cannot be removed)

    def disable(self, error: BaseException) -> None:
        """Turn automatic saving off after a start-up failure: warn once, keep it in status."""
        self.enabled = False
        self._update_status()
        self._warned = True  # this warning replaces the usual one
        self._record_failure(error, "startup")
        self._warn(f"kernel_ext: checkpoints are off: {type(error).__name__}: {error}\n  Fix "
                   "the store (%config KernelExt.checkpoint_url = ...), then %checkpoint on. "
                   "Details: %checkpoint status")

    # --- start-up and resume --------------------------------------------------------------------
    def startup_message(self) -> str | None:
        """Tell a fresh kernel that a checkpoint exists (and pause saving until %resume).

        Raises :class:`CheckpointError` when the store cannot be opened or read.
        """
        store = self.store
        history = store.snapshots()
        tasks = [t for t in store.tasks()
                 if isinstance(t.get("total"), int) and isinstance(t.get("done"), int)
                 and t["done"] < t["total"]]
        if not history:
            return None
        self.paused = "a checkpoint from an earlier kernel exists; %resume or %checkpoint on"
        self.status["paused"] = self.paused
        lines = []
        try:
            m = store.manifest(history[0])
            size = sum(int(v.get("nbytes", 0)) for v in m["variables"].values())
            lines.append(f"kernel_ext: a checkpoint exists for this notebook "
                         f"({fmt_time(m['created'])}, {len(m['variables'])} variables, "
                         f"{format_bytes(size)}).")
        except CheckpointError:
            lines.append(f"kernel_ext: a checkpoint exists for this notebook ({history[0]}).")
        for t in tasks:
            lines.append(f"  task {t['name']!r}: {t['done']}/{t['total']} items done")
        lines.append("  Run %resume to restore it (automatic saving waits until you do, or "
                     "until %checkpoint on).")
        return "\n".join(lines)

    def resume(self, snapshot: str | None = None, names: Iterable[str] | None = None,
               allow_pickle: Iterable[str] | bool = ()) -> tuple[Restored, list[str]]:
        """Restore variables into the shell, then the session state; returns the report lines."""
        if isinstance(allow_pickle, bool):
            allowed: Callable[[str], bool] = lambda name: bool(allow_pickle)
        else:
            chosen = set(allow_pickle)
            allowed = chosen.__contains__
        restored = self.store.restore(snapshot, names, allowed)
        m = restored.manifest
        lines = list(restored.notes)
        shell = self.session.shell
        hidden = getattr(shell, "user_ns_hidden", {}) if shell is not None else {}
        for name in [n for n in restored.values if not self._user_name(n) or n in hidden]:
            del restored.values[name]  # a manifest must not replace IPython's own names
            lines.append(f"not restored: {name}: not a user variable name")
        if shell is not None:
            shell.user_ns.update(restored.values)
        self._apply_settings(m.get("settings", {}))
        size = sum(int(m["variables"][n].get("nbytes", 0)) for n in restored.values)
        lines.append(f"restored {len(restored.values)} variable(s) ({format_bytes(size)}) from "
                     f"snapshot {restored.snapshot} ({fmt_time(m['created'])}): "
                     f"{', '.join(sorted(restored.values)) or '-'}")
        for name, why in sorted(restored.refused.items()):
            lines.append(f"not restored: {name}: {why}")
        for name, why in sorted(m.get("skipped", {}).items()):
            lines.append(f"was not saved: {name}: {why}")
        if names is None:
            try:
                lines.extend(self.session.restore_state(m.get("session", {})) or [])
            except Exception as e:  # noqa: BLE001 - report, keep the restored variables
                lines.append(f"session state not restored: {type(e).__name__}: {e}")
        for t in self.store.tasks():
            todo = "complete" if t["total"] is not None and t["done"] >= t["total"] else \
                "re-run its cell to continue"
            lines.append(f"task {t['name']!r}: {t['done']}/{t['total']} items saved; {todo}")
        if names is None:  # a full resume: saving goes on from here
            self._carried = {n: m["variables"][n] for n in restored.refused}
            self.paused = None
        self._last_digests = None
        self._update_status(last_snapshot=restored.snapshot, last_time=m["created"])
        self.session.events.emit("checkpoint", action="restored", status=dict(self.status))
        self.session.audit.write("checkpoint.restore", snapshot=restored.snapshot,
                                 variables=sorted(restored.values),
                                 refused=sorted(restored.refused), notes=restored.notes)
        return restored, lines

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
