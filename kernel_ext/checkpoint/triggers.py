"""When checkpoints are saved.

- After a cell (``post_run_cell``), at most every ``checkpoint_interval`` seconds.
- A change the interval held back is made up before the next cell starts (``pre_run_cell``) or,
  while the kernel idles, once the interval has passed: a callback on the kernel's event loop
  (:mod:`.schedule`) that never saves while a cell runs. So a kernel that dies loses at most
  what the cell it was running changed (or, dying idle, what changed within the interval).
- On the kernel's shutdown request, on SIGTERM and at exit, within a time budget: a commit that
  cannot finish in time is abandoned atomically; a SIGTERM that arrives during a commit lets it
  finish (or abandon) first, then ends the process as the previous handler would have.

The saving itself, and whether this kernel may save at all, are the manager's.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .schedule import EventLoop

if TYPE_CHECKING:  # pragma: no cover
    from .manager import CheckpointManager

__all__ = ["SHUTDOWN_BUDGET_S", "SIGTERM_BUDGET_S", "SaveTriggers"]

SIGTERM_BUDGET_S = 2.0  # JupyterLab sends SIGKILL ~2.5 s after SIGTERM
SHUTDOWN_BUDGET_S = 3.5  # from the shutdown request; SIGTERM comes at ~2.5 s, SIGKILL at ~5 s


def _register_exit(triggers: SaveTriggers) -> None:
    """Save at interpreter exit, early enough for thread pools to still accept work.

    ``threading._register_atexit`` hooks run (newest first) before ``atexit`` handlers and
    before ``concurrent.futures`` refuses new work, which Zarr's file I/O and the parallel
    fsyncs need. Falls back to ``atexit`` where that private hook does not exist.
    """
    import concurrent.futures.thread  # noqa: F401 - its exit hook must be older than ours

    ref = weakref.ref(triggers)

    def hook() -> None:
        t = ref()
        if t is not None:
            t.at_exit()

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(hook)
            return
        except RuntimeError:  # already shutting down
            return
    atexit.register(hook)


class SaveTriggers:
    """The hooks that decide when ``manager`` saves; see the module docstring.

    ``clock``: monotonic time for the interval; ``loop``: where idle saves run.
    """

    def __init__(self, manager: CheckpointManager, *, clock: Callable[[], float],
                 loop: EventLoop) -> None:
        self.m = manager
        self.clock = clock
        self.loop = loop
        self.dirty = False  # cells ran since the last save: a make-up save is due
        self.cell_running = False
        self.last_auto: float | None = None
        self.failed_at: float | None = None
        self.installed = False
        self._timer: Any = None
        self._terminate: tuple[int, Any] | None = None  # SIGTERM waiting for a commit to end
        self._prev_sigterm: Any = None

    @property
    def interval(self) -> float:
        return float(self.m.config.checkpoint_interval)

    # --- cells ----------------------------------------------------------------------------------
    def pre_run_cell(self, info: Any = None) -> None:
        """IPython ``pre_run_cell``: make up a save the interval held back. Never raises."""
        self.cell_running = True
        self.m.note_cell(info, starting=True)
        self._cancel_timer()
        if not self.dirty or not self.m.active():
            return
        if self.failed_at is not None and self.clock() - self.failed_at < self.interval:
            return  # a failing store is retried once per interval, not before every cell
        self.last_auto = self.clock()
        self.m.safe_checkpoint("before cell")

    def post_run_cell(self, result: Any = None) -> None:
        """IPython ``post_run_cell``: save if due, else make it up later. Never raises."""
        self.cell_running = False
        self.m.note_cell(None, starting=False)
        self.m.flush_tasks()
        if not self.m.writer:
            self.m.watch_holder()
            return
        if not self.m.active():
            return
        self.dirty = True
        self.m.status["pending"] = True
        now = self.clock()
        if self.last_auto is None or now - self.last_auto >= self.interval:
            self.last_auto = now
            self.m.safe_checkpoint("cell")
            return
        self._schedule_idle(self.last_auto + self.interval - now)

    def _schedule_idle(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, self.on_idle)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self.loop.cancel(self._timer)
            self._timer = None

    def on_idle(self) -> None:
        """The make-up save while the kernel idles (on its event loop, between requests)."""
        self._timer = None
        if self.cell_running or not self.dirty or not self.m.active():
            return
        now = self.clock()
        if self.last_auto is not None and now - self.last_auto < self.interval:
            self._schedule_idle(self.last_auto + self.interval - now)
            return
        self.last_auto = now
        self.m.safe_checkpoint("idle")

    # --- the end of the kernel ------------------------------------------------------------------
    def on_sigterm(self, signum: int, frame: Any) -> None:
        store = self.m.current_store
        if store is not None and store.writing:
            # A commit of this thread was interrupted: let it finish (or abandon it at the
            # deadline), then terminate from after_write.
            self._terminate = (signum, frame)
            end = time.monotonic() + SIGTERM_BUDGET_S
            current = store.backend.deadline
            store.backend.deadline = end if current is None else min(current, end)
            return
        self.m.final_save("sigterm", SIGTERM_BUDGET_S)
        self.m.finish()
        self._chain_sigterm(signum, frame)

    def after_write(self) -> None:
        """Called by the store when a commit has ended: a SIGTERM that waited ends us now."""
        pending = self._terminate
        if pending is None:
            return
        self._terminate = None
        self.m.finish()
        self._chain_sigterm(*pending)

    def _chain_sigterm(self, signum: int, frame: Any) -> None:
        prev = self._prev_sigterm
        if callable(prev):
            prev(signum, frame)
        elif prev in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exit_now(self, change: dict[str, Any]) -> None:
        """The kernel is asked to shut down (``shell.exit_now``): save within the budget.

        ipykernel sets ``exit_now`` from its control thread when a shutdown request arrives;
        the save then runs on the main thread's event loop, between requests, while the
        control thread waits for it (bounded). ``exit`` typed in a cell sets it on the main
        thread: that cell's ``post_run_cell`` saves without waiting for the interval.
        """
        if not change.get("new"):
            return
        self.last_auto = None  # the next post_run_cell saves at once
        if threading.current_thread() is threading.main_thread():
            return
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        done = threading.Event()

        def save() -> None:
            try:
                if not self.cell_running:
                    self.m.final_save("shutdown", max(0.0, deadline - time.monotonic()))
                    self.m.finish()
            finally:
                done.set()

        if self.loop.add_callback(save):
            done.wait(SHUTDOWN_BUDGET_S + 0.5)

    def at_exit(self) -> None:
        if self.installed:
            self.m.final_save("exit", None)
            self.m.finish()

    # --- registration ---------------------------------------------------------------------------
    def install(self) -> None:
        """Register the IPython hooks, the observer of the shutdown request, the SIGTERM
        handler and the exit hook."""
        if self.installed:
            return
        shell = self.m.session.shell
        if shell is not None:
            shell.events.register("pre_run_cell", self.pre_run_cell)
            shell.events.register("post_run_cell", self.post_run_cell)
            shell.observe(self.on_exit_now, names="exit_now")
        if threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self.on_sigterm)
        _register_exit(self)
        self.installed = True

    def close(self) -> None:
        """Unregister exactly what :meth:`install` registered."""
        if not self.installed:
            return
        shell = self.m.session.shell
        if shell is not None:
            for event, fn in (("pre_run_cell", self.pre_run_cell),
                              ("post_run_cell", self.post_run_cell)):
                try:
                    shell.events.unregister(event, fn)
                except ValueError:
                    continue  # already gone
            shell.unobserve(self.on_exit_now, names="exit_now")
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == self.on_sigterm):
            prev = self._prev_sigterm
            signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)
        self._cancel_timer()
        self.installed = False  # the exit hook checks this (threading's cannot be removed)
