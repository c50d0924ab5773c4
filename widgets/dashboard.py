"""The dashboard: breaker, memory, checkpoint and progress panels, live while displayed.

Nothing runs until the dashboard is shown (``_repr_mimebundle_``) or :meth:`Dashboard.start`
is called: then it subscribes to the Session's events and a daemon thread samples memory every
``interval`` seconds, pushing widget state (ipykernel sends comm messages from background
threads, so the panels move while a long cell runs). :meth:`Dashboard.close`, closing the
session (extension unload, kernel shutdown) or the front end closing the widget stops both.
"""

from __future__ import annotations

import atexit
import html
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from ipywidgets import HTML, HBox, Layout

from ._util import Panel, fmt_clock
from .breaker import BreakerPanel
from .checkpoint import CheckpointPanel
from .memory import MemoryPanel
from .progress import ProgressPanel, rate_detail

__all__ = ["Dashboard", "open_dashboards", "close_dashboards"]

log = logging.getLogger(__name__)

Waiter = Callable[[threading.Event, float], bool]
"""``waiter(stop, seconds)`` blocks up to ``seconds``; True when ``stop`` is set."""

_EVENT_KINDS = ("breaker", "breaker_call", "checkpoint", "model", "load_progress", "task",
                "alert")
_open: weakref.WeakSet[Dashboard] = weakref.WeakSet()


def _wait(stop: threading.Event, seconds: float) -> bool:
    return stop.wait(seconds)


def _default_sampler() -> Any:
    from kernel_ext.memory import sample_memory

    return sample_memory()


class Dashboard(Panel):
    """Live breaker, memory and checkpoint panels for one Session.

    ``sampler`` (default :func:`kernel_ext.memory.sample_memory`), ``clock`` (wall time, for
    "updated at"), ``monotonic`` (breaker countdowns) and ``waiter`` (the pause between
    samples) are injectable so tests drive the dashboard without sleeping.
    """

    def __init__(
        self,
        session: Any,
        *,
        interval: float | None = None,
        history_seconds: float = 300.0,
        sampler: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        waiter: Waiter = _wait,
        **kwargs: Any,
    ) -> None:
        self.session = session
        self.interval = float(session.config.dashboard_interval if interval is None else interval)

        def box() -> Layout:
            return Layout(border="1px solid #e0e0e0", padding="4px 8px", margin="2px")

        self.breakers = BreakerPanel(clock=monotonic, layout=box())
        self.memory = MemoryPanel(history_seconds=history_seconds, layout=box())
        self.checkpoints = CheckpointPanel(clock=clock, layout=box())
        self.progress = ProgressPanel(layout=box())
        self.header = HTML("<b style='font-size:110%'>kernel_ext dashboard</b>")
        self.banner = HTML(layout=Layout(display="none"))  # active alerts, one line each
        self.footer = HTML()
        row = HBox([self.memory, self.checkpoints], layout=Layout(flex_flow="row wrap"))
        super().__init__(children=[self.header, self.banner, self.breakers, row, self.progress,
                                   self.footer], **kwargs)
        self.add_class("kernel-ext-dashboard")
        self._sampler = sampler or _default_sampler
        self._clock = clock
        self._waiter = waiter
        self._lock = threading.RLock()
        self._tick_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._started = False
        self._closed = False
        self._tick_error: str | None = None
        self.ticks = 0
        self._set_footer("not started")

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """True while subscribed to the session (and sampling, when ``interval`` > 0)."""
        return self._started and not self._closed

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def start(self) -> Dashboard:
        """Subscribe, show the current state and start sampling. Idempotent."""
        with self._lock:
            if self._started or self._closed:
                return self
            self._started = True
            bus = self.session.events
            self._unsubscribe = [bus.subscribe(k, self._on_event) for k in _EVENT_KINDS]
            ref = weakref.ref(self)

            def on_session_close() -> None:
                dash = ref()
                if dash is not None:
                    dash.stop("kernel_ext session closed")

            self.session.on_close(on_session_close)
            _open.add(self)
        self._load_current_state()
        self.tick()
        if self.interval > 0:
            self._thread = threading.Thread(
                target=self._run, name="kernel_ext-dashboard", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, reason: str = "stopped", *, show: bool = True) -> None:
        """Stop sampling and unsubscribe; the panels keep their last state.

        ``show``: say so in the footer (not at interpreter exit, when the comm may be gone).
        """
        with self._lock:
            unsubscribe, self._unsubscribe = self._unsubscribe, []
            self._stop.set()
            was_live = self._started and not self._closed
            self._closed = True
        for fn in unsubscribe:
            fn()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, 3 * self.interval))
        if was_live and show and self.comm is not None:
            self._set_footer(reason)
        _open.discard(self)

    def close(self) -> None:
        """Stop, then close every widget of the dashboard (no comm is left behind)."""
        self.stop("closed")
        super().close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        # Being displayed is what starts the dashboard: no thread, no subscription before.
        if not self._closed:
            self.start()
        return super()._repr_mimebundle_(**kwargs)

    # --- updates --------------------------------------------------------------------------------
    def tick(self) -> None:
        """One update: a memory sample, breaker countdowns, checkpoint ages, the footer."""
        if self.comm is None:  # closed by the front end or by close()
            self._stop.set()
            return
        with self._tick_lock:
            self._tick()

    def _tick(self) -> None:
        try:
            sample = self._sampler()
            self.memory.update(sample, footprints=self._footprints(), limits=self._limits(sample))
            self.breakers.tick()
            self.checkpoints.tick()
            self._tick_error = None
        except Exception as e:  # a failing probe must not kill the live view; it shows instead
            if self._tick_error is None:  # logged once per run of failures; the footer shows it
                log.info("kernel_ext dashboard: update failed: %s", e, exc_info=True)
            self._tick_error = f"{type(e).__name__}: {e}"
        self.ticks += 1
        self._set_footer("live")

    def _run(self) -> None:
        while not self._waiter(self._stop, self.interval):
            if self._stop.is_set():
                break
            try:
                self.tick()
            except Exception:  # e.g. the comm went away under us: stop quietly, once
                log.warning("kernel_ext dashboard: live updates stopped", exc_info=True)
                break

    def _on_event(self, event: Mapping[str, Any]) -> None:
        if self._closed:
            return
        kind = event.get("kind")
        if kind in ("breaker", "breaker_call"):
            snap = event.get("snapshot")
            if snap is not None:
                self.breakers.update(snap)
        elif kind == "checkpoint":
            self.checkpoints.update(event.get("status") or {}, event.get("action"))
        elif kind == "model":
            self.tick()  # footprints changed: show them now rather than at the next sample
        elif kind == "load_progress":
            self.progress.update("load", str(event.get("name", "?")), int(event.get("done", 0)),
                                 event.get("total"), str(event.get("stage") or ""))
        elif kind == "task":
            detail = rate_detail(event.get("tokens_per_s"), event.get("eta_s"), event.get("failed"))
            self.progress.update("task", str(event.get("name", "?")), int(event.get("done", 0)),
                                 event.get("total"), detail=detail)
        elif kind == "alert":
            self._show_alerts(event.get("active") or [])

    def _show_alerts(self, active: list[Mapping[str, Any]]) -> None:
        """The banner: one line per active alert (deduplicated by the session's alerts)."""
        if not active:
            self.banner.value = ""
            self.banner.layout.display = "none"
            return
        lines = "".join(
            f"<div class='kernel-ext-alert' data-alert='{html.escape(str(a.get('alert')))}'>"
            f"⚠ <b>{html.escape(str(a.get('alert')))}</b> "
            f"({html.escape(str(a.get('subject')))}): {html.escape(str(a.get('message')))}"
            + (f" · ×{int(a['occurrences'])}" if int(a.get("occurrences") or 1) > 1 else "")
            + "</div>"
            for a in active
        )
        self.banner.value = (
            "<div style='background:#fff3e0;border-left:4px solid #e65100;padding:4px 8px;"
            f"color:#bf360c'>{lines}</div>")
        self.banner.layout.display = None

    def _set_footer(self, what: str) -> None:
        every = f"every {self.interval:g} s" if self.interval > 0 else "on events only"
        err = (f" · <span style='color:#c62828'>last update failed: {self._tick_error}</span>"
               if self._tick_error else "")
        self.footer.value = (
            f"<span class='kernel-ext-footer' data-ticks='{self.ticks}' "
            f"style='font-size:85%;color:#616161'>{what} · {every} · {self.ticks} updates · "
            f"updated {fmt_clock(self._clock())}{err}</span>"
        )

    # --- reading the session --------------------------------------------------------------------
    def _footprints(self) -> dict[str, int]:
        return self.session.models.footprints()

    def _limits(self, sample: Any) -> dict[str, int | None]:
        """Per device, the usage level a new load may bring memory to: used + the guard's budget.

        The budget is the guard's own rule (:func:`kernel_ext.memory.guard_budget`).
        """
        from kernel_ext.memory import guard_budget

        fraction = float(self.session.config.memory_fraction)
        devices = [("cpu", int(sample.ram_used), int(sample.ram_available))]
        devices += [(f"cuda:{g.index}", int(g.used), int(g.free))
                    for g in sample.gpus]
        out: dict[str, int | None] = {}
        for device, used, available in devices:
            budget = guard_budget(available, fraction)
            out[device] = used + int(budget)
        return out

    def _load_current_state(self) -> None:
        alerts = getattr(self.session, "alerts", None)
        if alerts is not None:
            self._show_alerts(alerts.snapshot())
        for snap in _breaker_snapshots(self.session):
            self.breakers.update(snap)
        status = _checkpoint_status(self.session)
        if status:
            self.checkpoints.update(status)


def _breaker_snapshots(session: Any) -> list[Any]:
    return [b.snapshot() for b in list(session.breakers.values())]


def _checkpoint_status(session: Any) -> dict[str, Any] | None:
    """The checkpoint manager's status dict, if checkpoints are attached."""
    return dict(session.checkpoints.status) if session.checkpoints is not None else None


@atexit.register
def _stop_all_at_exit() -> None:
    """The kernel is shutting down: stop every sampling thread before the sockets close."""
    for d in list(_open):
        d.stop("kernel shut down", show=False)


def open_dashboards(session: Any | None = None) -> list[Dashboard]:
    """The live dashboards (of ``session``, when given)."""
    return [d for d in list(_open) if d.live and (session is None or d.session is session)]


def close_dashboards(session: Any | None = None) -> int:
    """Close the live dashboards (of ``session``); returns how many were closed."""
    dashes = open_dashboards(session)
    for d in dashes:
        d.close()
    return len(dashes)
