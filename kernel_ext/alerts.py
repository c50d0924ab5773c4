"""Alerts: conditions a user must see, raised once and kept until they clear.

An alert is an audit record of kind ``alert`` (``state: "raised"``, later ``"cleared"``), a
one-line notice printed in the cell that caused it, and a banner in ``%dashboard`` (the
``alert`` event). It is deduplicated: while an alert of the same kind and subject is active,
further occurrences only count up (``occurrences``), with no new record or notice; once the
condition clears, the next occurrence raises it again. Alerts watch the session's events, so
no subsystem needs to know about them:

- ``breaker_trip_rate`` (subject: the provider): breaker trips over calls to that provider in
  the last ``alert_window_seconds`` above ``alert_trip_rate`` (default 5 %); cleared when the
  rate falls back to the threshold (more good calls, or old trips leaving the window).
- ``memory_pressure`` (subject: ``ram``, ``cuda:N``, ``load`` or ``inference``): this process's
  RSS (or a GPU's used memory) over the memory guard's limit (``memory_fraction`` of the
  total), checked after each cell, load and inference; a load refused by the guard
  (:class:`MemoryBudgetError`); an inference refused for memory (the provider ran out of
  memory, ``out_of_memory``, or the request budget guard refused the request's KV cache and
  prefill, :class:`RequestMemoryError`). Cleared when usage is under the limit again, or the
  next load / inference succeeds.
- ``checkpoint_failure`` (subject: ``store`` or ``task:NAME``): a checkpoint that could not be
  written; cleared by the next successful one.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Alert", "Alerts"]

log = logging.getLogger(__name__)

_TRIP_STATES = ("open", "forced_open")


@dataclass
class Alert:
    """One active alert."""

    alert: str
    subject: str
    message: str
    raised_at: float
    correlation_id: str | None
    occurrences: int = 1

    @property
    def key(self) -> tuple[str, str]:
        return (self.alert, self.subject)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Alerts:
    """``session.alerts``: watches the session's events and raises / clears alerts.

    ``clock`` (monotonic) times the trip-rate window, ``wall_clock`` dates alerts, ``sampler``
    (default :func:`kernel_ext.memory.sample_memory`) gives memory samples, ``out`` receives
    the one-line notices (default: the cell's stdout). All injectable for tests.
    """

    def __init__(
        self,
        session: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sampler: Callable[[], Any] | None = None,
        out: Callable[[str], None] | None = None,
    ) -> None:
        self.session = session
        self._clock = clock
        self._wall_clock = wall_clock
        self._sampler = sampler
        self._out = out
        self._lock = threading.RLock()
        self.active: dict[tuple[str, str], Alert] = {}
        # provider -> (time, was a trip) for calls, and times of trips, inside the window
        self._calls: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._trips: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        bus = session.events
        self._unsubscribe = [bus.subscribe("audit", self._on_audit),
                             bus.subscribe("breaker_call", self._on_breaker_call),
                             bus.subscribe("infer", self._on_infer)]

    def close(self) -> None:
        for fn in self._unsubscribe:
            fn()
        self._unsubscribe = []

    # --- raising and clearing -------------------------------------------------------------------
    def raise_alert(self, alert: str, subject: str, message: str, **fields: Any) -> bool:
        """Raise (True) or, when already active, count another occurrence (False)."""
        with self._lock:
            current = self.active.get((alert, subject))
            if current is not None:
                current.occurrences += 1
                repeated = current.to_dict()
            else:
                cid = self.session.trace.current() if hasattr(self.session, "trace") else None
                item = Alert(alert, subject, message, self._wall_clock(), cid)
                self.active[item.key] = item
        if current is not None:  # no record, no notice: the banner's count goes up
            self.session.events.emit("alert", action="repeated", alert=repeated,
                                     active=self.snapshot())
            return False
        self.session.audit.write("alert", alert=alert, subject=subject, state="raised",
                                 message=message, **fields)
        self._notice(f"⚠ kernel_ext alert ({alert}): {message}")
        self.session.events.emit("alert", action="raised", alert=item.to_dict(),
                                 active=self.snapshot())
        return True

    def clear(self, alert: str, subject: str, why: str) -> bool:
        """Clear an active alert (True), or do nothing (False)."""
        with self._lock:
            item = self.active.pop((alert, subject), None)
        if item is None:
            return False
        self.session.audit.write("alert", alert=alert, subject=subject, state="cleared",
                                 message=why, occurrences=item.occurrences)
        self.session.events.emit("alert", action="cleared", alert=item.to_dict(),
                                 active=self.snapshot())
        return True

    def snapshot(self) -> list[dict[str, Any]]:
        """The active alerts, oldest first (what the dashboard banner shows)."""
        with self._lock:
            return [a.to_dict() for a in sorted(self.active.values(), key=lambda a: a.raised_at)]

    def _notice(self, line: str) -> None:
        try:
            if self._out is not None:
                self._out(line)
            else:
                print(line, file=sys.stdout, flush=True)
        except Exception:  # noqa: BLE001 - a notice must never break the cell
            log.warning("%s", line)

    # --- sources --------------------------------------------------------------------------------
    def _on_audit(self, event: Mapping[str, Any]) -> None:
        rec = event.get("record") or {}
        kind = rec.get("kind")
        if kind == "breaker":
            if rec.get("new") in _TRIP_STATES and not rec.get("restored"):
                name = str(rec.get("name"))
                with self._lock:
                    self._trips[name].append(self._clock())
                self._check_trip_rate(name)
        elif kind == "model.load_failed":
            from .errors import MemoryBudgetError

            if isinstance(rec.get("error"), MemoryBudgetError):
                self.raise_alert("memory_pressure", "load",
                                 f"loading {rec.get('name')} was refused for memory: "
                                 f"{rec.get('error')}", model=rec.get("name"))
        elif kind == "model.load":
            self.clear("memory_pressure", "load", f"{rec.get('name')} loaded")
            self.check_memory()
        elif kind == "infer":
            oom = [a for a in rec.get("attempts") or [] if a.get("outcome") == "out_of_memory"]
            if oom:
                self.raise_alert(
                    "memory_pressure", "inference",
                    f"an inference on {oom[0].get('provider')} was refused for memory: "
                    f"{oom[0].get('error')}", provider=oom[0].get("provider"))
            elif rec.get("outcome") in ("ok", "timeout"):
                self.clear("memory_pressure", "inference", "an inference succeeded")
            self.check_memory()
        elif kind == "checkpoint.failure":
            subject = f"task:{rec['task']}" if rec.get("task") else "store"
            self.raise_alert("checkpoint_failure", subject,
                             f"checkpoint{' of task ' + str(rec['task']) if rec.get('task') else ''}"
                             f" failed: {rec.get('error')}; your work goes on, the last good "
                             "snapshot is kept (%checkpoint status)", error=rec.get("error"))
        elif kind == "checkpoint.commit":
            self.clear("checkpoint_failure", "store", "a checkpoint was written")

    def _on_infer(self, event: Mapping[str, Any]) -> None:
        """A request the budget guard refused for memory (its KV cache and prefill over the
        limit) never reaches a provider, so no attempt records it: the failed call does."""
        from .errors import RequestMemoryError

        error = event.get("error")
        if event.get("action") == "error" and isinstance(error, RequestMemoryError):
            name = event.get("model") or getattr(self.session.models, "active", None)
            self.raise_alert("memory_pressure", "inference",
                             f"an inference on {name} was refused for memory: {error}",
                             provider=name, **error.numbers)

    def _on_breaker_call(self, event: Mapping[str, Any]) -> None:
        if event.get("outcome") in ("rejected", "ignored"):
            return  # not a call that reached the provider
        name = str(event.get("name"))
        with self._lock:
            self._calls[name].append(self._clock())
        self._check_trip_rate(name)

    def _check_trip_rate(self, name: str) -> None:
        cfg = self.session.config
        threshold = float(cfg.alert_trip_rate)
        now = self._clock()
        with self._lock:
            calls, trips = self._calls[name], self._trips[name]
            for q in (calls, trips):
                while q and q[0] < now - float(cfg.alert_window_seconds):
                    q.popleft()
            n_calls, n_trips = len(calls), len(trips)
        if not n_trips:
            rate = 0.0
        else:
            rate = n_trips / max(n_calls, n_trips)
        if rate > threshold:
            self.raise_alert(
                "breaker_trip_rate", name,
                f"the breaker of {name} tripped {n_trips} time(s) in {max(n_calls, n_trips)} "
                f"call(s) over the last {cfg.alert_window_seconds:g} s ({rate:.0%} > "
                f"{threshold:.0%}); see %breaker", trips=n_trips, calls=n_calls,
                rate=round(rate, 4))
        else:
            self.clear("breaker_trip_rate", name, f"trip rate back to {rate:.0%}")

    def check_memory(self) -> None:
        """Compare this process's RSS and each GPU's used memory with the guard's limit."""
        if self._sampler is None:
            from .memory import sample_memory

            self._sampler = sample_memory
        try:
            sample = self._sampler()
        except Exception as e:  # noqa: BLE001 - a probe failure is not an alert
            log.debug("kernel_ext alerts: memory sample failed: %s", e)
            return
        fraction = float(self.session.config.memory_fraction)
        from .memory import format_bytes

        checks = [("ram", "this kernel's RSS", int(sample.process_rss), int(sample.ram_total))]
        checks += [(f"cuda:{g.index}", f"GPU {g.index} ({g.name})", int(g.used), int(g.total))
                   for g in sample.gpus]
        for subject, what, used, total in checks:
            limit = int(total * fraction)
            if total and used > limit:
                self.raise_alert(
                    "memory_pressure", subject,
                    f"{what} uses {format_bytes(used)}, over the memory guard's limit "
                    f"{format_bytes(limit)} ({fraction:.0%} of {format_bytes(total)}); "
                    "%model unload a model or free variables", used=used, limit=limit)
            else:
                self.clear("memory_pressure", subject, f"{what} back under the limit")
