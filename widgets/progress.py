"""The progress panel: long work in the kernel as it happens (model loads, resumable tasks).

Fed with the Session's ``load_progress`` [name, done, total, stage] and ``task`` [name, done,
total] events; ``%%infer --over`` / ``infer_many`` tasks also carry ``tokens_per_s``, ``eta_s``
and ``failed``, shown after the count (``12 / 64 · 48.2 tok/s · ETA 0:41``). One row per job, a stock ``FloatProgress`` each; a finished job stays as a
one-line summary until the next one starts. Updates are coalesced to whole percents so a
236-tensor load sends a few dozen messages, not hundreds.
"""

from __future__ import annotations

import threading
from typing import Any

from ipywidgets import HTML, FloatProgress, HBox, Layout

from ._util import Panel, close_tree, esc

__all__ = ["ProgressPanel", "rate_detail"]

_MAX_ROWS = 6


class _Row:
    def __init__(self, key: str) -> None:
        self.key = key
        self.label = HTML(layout=Layout(width="260px"))
        self.bar = FloatProgress(min=0.0, max=1.0, value=0.0, layout=Layout(width="240px"))
        self.text = HTML()
        self.box = HBox([self.label, self.bar, self.text])
        self.box.add_class("kernel-ext-progress-row")
        self.percent = -1
        self.detail = ""


class ProgressPanel(Panel):
    """Model loads and resumable tasks with their progress bars."""

    def __init__(self, **kwargs: Any) -> None:
        self.title = HTML("<b>Progress</b>")
        self.rows_box = HBox(layout=Layout(flex_flow="column"))
        self.empty = HTML("<span style='color:#757575'>nothing running</span>")
        super().__init__(children=[self.title, self.empty, self.rows_box], **kwargs)
        self.add_class("kernel-ext-progress")
        self._lock = threading.RLock()
        self._rows: dict[str, _Row] = {}

    def update(self, kind: str, name: str, done: int, total: int | None, stage: str = "",
               detail: str | None = None) -> None:
        """Show ``done`` of ``total`` for the job ``kind``/``name`` (``total`` None: unknown);
        ``detail`` (rates, ETA) follows the count, and is kept when an update has none."""
        key = f"{kind}:{name}"
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                row = self._add(key)
            frac = min(max(done / total, 0.0), 1.0) if total else 0.0
            percent = int(frac * 100)
            finished = bool(total) and done >= int(total)
            detail = row.detail if detail is None else detail
            if percent == row.percent and detail == row.detail and not finished:
                return  # coalesce: nothing visible changed
            row.percent = percent
            row.detail = detail
            what = "loading" if kind == "load" else "task"
            row.label.value = (f"{what} <b>{esc(name)}</b>"
                               + (f" <span style='color:#757575'>({esc(stage)})</span>"
                                  if stage else ""))
            row.bar.value = frac
            row.bar.bar_style = "success" if finished else ""
            total_s = esc(total) if total else "?"
            row.text.value = (f"{esc(done)} / {total_s}" + (f" · {esc(detail)}" if detail else "")
                              + (" · done" if finished else ""))

    @property
    def jobs(self) -> dict[str, float]:
        """Fraction done per job key (``load:<name>``, ``task:<name>``)."""
        with self._lock:
            return {k: float(r.bar.value) for k, r in self._rows.items()}

    def _add(self, key: str) -> _Row:
        row = _Row(key)
        self._rows[key] = row
        while len(self._rows) > _MAX_ROWS:  # drop the oldest rows
            old_key = next(iter(self._rows))
            close_tree(self._rows.pop(old_key).box)
        self.rows_box.children = tuple(r.box for r in self._rows.values())
        self.empty.layout.display = "none"
        return row


def rate_detail(tokens_per_s: float | None, eta_s: float | None, failed: int | None) -> str | None:
    """``48.2 tok/s · ETA 0:41 · 2 failed`` from a task event's extras (None: the event has none)."""
    if tokens_per_s is None and eta_s is None and not failed:
        return None
    parts = []
    if tokens_per_s is not None:
        parts.append(f"{float(tokens_per_s):.1f} tok/s")
    if eta_s is not None and eta_s > 0:
        minutes, seconds = divmod(round(float(eta_s)), 60)
        parts.append(f"ETA {minutes}:{seconds:02d}")
    if failed:
        parts.append(f"{int(failed)} failed")
    return " · ".join(parts)
