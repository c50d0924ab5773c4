"""The breaker panel: one row per provider with its circuit breaker's state.

Fed with breaker snapshots (``name, state, failures_in_window, failure_rate, calls_in_window,
retry_in, last_error, trip_count``) from the Session's ``breaker`` and ``breaker_call`` events.
The countdown to the next half-open trial is kept live by :meth:`BreakerPanel.tick`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ipywidgets import HTML, Layout

from ._util import Panel, as_dict, esc, fmt_seconds

__all__ = ["BreakerPanel", "STATE_COLOURS", "STATE_LABELS"]

STATE_COLOURS = {"closed": "#2e7d32", "open": "#c62828", "half_open": "#ef6c00",
                 "forced_open": "#880e4f"}
STATE_LABELS = {"closed": "closed", "open": "open", "half_open": "half-open",
                "forced_open": "forced open"}
_UNKNOWN_COLOUR = "#616161"
_CELL = "padding:2px 8px;text-align:left;"


class BreakerPanel(Panel):
    """Every provider's breaker: state (coloured), window failures, failure rate, next trial,
    last error, trip count."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, **kwargs: Any) -> None:
        self.title = HTML("<b>Circuit breakers</b>")
        self.table = HTML(layout=Layout(width="100%"))
        super().__init__(children=[self.title, self.table], **kwargs)
        self.add_class("kernel-ext-breakers")
        self._clock = clock
        self._lock = threading.RLock()
        self._snapshots: dict[str, dict[str, Any]] = {}
        self._retry_at: dict[str, float | None] = {}
        self._render()

    # --- input ----------------------------------------------------------------------------------
    def update(self, snapshot: Any) -> None:
        """Show ``snapshot`` (a dict, a dataclass or an object with the snapshot fields)."""
        snap = as_dict(snapshot)
        name = str(snap.get("name", "?"))
        retry_in = snap.get("retry_in")
        with self._lock:
            self._snapshots[name] = snap
            self._retry_at[name] = (
                self._clock() + float(retry_in) if retry_in is not None else None
            )
            self._render()

    def remove(self, name: str) -> None:
        with self._lock:
            self._snapshots.pop(name, None)
            self._retry_at.pop(name, None)
            self._render()

    def tick(self) -> None:
        """Refresh the countdowns; a no-op when no breaker is waiting for its next trial."""
        with self._lock:
            if any(t is not None for t in self._retry_at.values()):
                self._render()

    # --- read back (tests, the dashboard) -------------------------------------------------------
    @property
    def states(self) -> dict[str, str]:
        with self._lock:
            return {n: str(s.get("state", "?")) for n, s in self._snapshots.items()}

    def retry_in(self, name: str) -> float | None:
        with self._lock:
            at = self._retry_at.get(name)
            return None if at is None else max(0.0, at - self._clock())

    # --- output ---------------------------------------------------------------------------------
    def _render(self) -> None:
        if not self._snapshots:
            self.table.value = (
                "<span class='kernel-ext-empty' style='color:#757575'>no providers yet — "
                "breakers appear after the first <code>%%infer</code> or <code>%model load</code>"
                "</span>"
            )
            return
        head = "".join(
            f"<th style='{_CELL}'>{h}</th>"
            for h in ("provider", "state", "failures (window)", "failure rate",
                      "next trial in", "last error", "trips")
        )
        rows = [self._row(name, snap) for name, snap in sorted(self._snapshots.items())]
        self.table.value = (
            "<table class='kernel-ext-breaker-table' style='border-collapse:collapse'>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )

    def _row(self, name: str, snap: dict[str, Any]) -> str:
        state = str(snap.get("state", "?"))
        colour = STATE_COLOURS.get(state, _UNKNOWN_COLOUR)
        label = STATE_LABELS.get(state, state)
        failures = snap.get("failures_in_window", 0)
        calls = snap.get("calls_in_window", 0)
        rate = snap.get("failure_rate")
        rate_s = f"{100 * float(rate):.0f}%" if rate is not None else "–"
        retry = self.retry_in(name)
        if retry is None or state == "closed":
            retry_s = "–"
        elif retry <= 0:
            retry_s = "now (next call is a trial)"
        else:
            retry_s = fmt_seconds(retry)
        err = snap.get("last_error") or ""
        err_s = esc(err if len(str(err)) <= 80 else str(err)[:77] + "...")
        badge = (
            f"<span class='kernel-ext-state' data-state='{esc(state)}' "
            f"style='background:{colour};color:white;border-radius:3px;padding:0 6px'>"
            f"{esc(label)}</span>"
        )
        cells = [
            esc(name), badge, f"{esc(failures)} of {esc(calls)}", rate_s, retry_s,
            f"<span title='{esc(err)}'>{err_s}</span>", esc(snap.get("trip_count", 0)),
        ]
        tds = "".join(f"<td style='{_CELL}'>{c}</td>" for c in cells)
        return f"<tr data-breaker='{esc(name)}' data-state='{esc(state)}'>{tds}</tr>"
