"""The checkpoint panel: last snapshot time, size, duration, variables saved and skipped (with
the reasons the save gave), which kernel writes the store, unsaved changes, variables kept from
a restored snapshot (damaged or not restored), last failure.

Fed with the checkpoint status dict (``last_time, size_bytes, duration_s, tracked, skipped,
writer, pending, carried, last_failure``) from the Session's ``checkpoint`` events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ipywidgets import HTML

from ._util import Panel, as_dict, esc, fmt_age, fmt_bytes, fmt_seconds

__all__ = ["CheckpointPanel"]

_ACTION_COLOURS = {"committed": "#2e7d32", "restored": "#1565c0", "skipped": "#757575",
                   "failed": "#c62828", "takeover": "#1565c0", "lease_lost": "#b45309"}


class CheckpointPanel(Panel):
    """What the last checkpoint saved, skipped and how it went."""

    def __init__(self, clock: Callable[[], float] = time.time, **kwargs: Any) -> None:
        self.title = HTML("<b>Checkpoints</b>")
        self.body = HTML()
        super().__init__(children=[self.title, self.body], **kwargs)
        self.add_class("kernel-ext-checkpoints")
        self._clock = clock
        self._lock = threading.RLock()
        self.status: dict[str, Any] = {}
        self.last_action: str | None = None
        self._render()

    def update(self, status: Any, action: str | None = None) -> None:
        """Show a checkpoint status (``action``: committed | failed | restored | skipped |
        takeover | lease_lost)."""
        with self._lock:
            self.status = as_dict(status)
            if action is not None:
                self.last_action = str(action)
            self._render()

    def tick(self) -> None:
        """Refresh the "N s ago"."""
        with self._lock:
            if self.status.get("last_time") is not None:
                self._render()

    def _render(self) -> None:
        s = self.status
        if not s:
            self.body.value = (
                "<span style='color:#757575'>no checkpoint yet (one is taken after a cell runs; "
                "<code>%checkpoint now</code> takes one at once)</span>"
            )
            return
        now = self._clock()
        tracked = list(s.get("tracked") or [])
        action = self.last_action or ""
        colour = _ACTION_COLOURS.get(action, "#424242")
        lines = [
            (f"<div><span class='kernel-ext-ckpt-action' data-action='{esc(action)}' "
            f"style='color:{colour};font-weight:bold'>{esc(action or 'status')}</span> · "
            f"last snapshot {esc(fmt_age(s.get('last_time'), now))} · "
            f"size {fmt_bytes(s.get('size_bytes'))} · "
            f"took {fmt_seconds(s.get('duration_s'))}</div>"),
            (f"<div class='kernel-ext-tracked'>tracked ({len(tracked)}): "
            f"{esc(', '.join(map(str, tracked))) or '<i>none</i>'}</div>"),
        ]
        writer = s.get("writer")
        if writer and not str(writer).startswith("this kernel"):
            lines.append(f"<div class='kernel-ext-writer' style='color:#b45309'>writer: "
                         f"{esc(writer)}</div>")
        if s.get("pending"):
            lines.append("<div class='kernel-ext-pending' style='color:#757575'>unsaved changes: "
                         "saved before the next cell, or when idle</div>")
        for key, title, colour in (("skipped", "skipped", "inherit"),
                                   ("carried", "kept from the restored snapshot", "#b45309")):
            entries = dict(s.get(key) or {})
            if not entries:
                continue
            items = "".join(
                f"<li data-var='{esc(k)}'><code>{esc(k)}</code>: {esc(v)}</li>"
                for k, v in sorted(entries.items())
            )
            lines.append(
                f"<div class='kernel-ext-{key}' style='color:{colour}'>{title} ({len(entries)}):"
                f"<ul style='margin:0'>{items}</ul></div>"
            )
        failure = s.get("last_failure")
        if failure:
            lines.append(
                "<div class='kernel-ext-failure' style='color:#c62828'>last failure: "
                f"{esc(failure)}</div>"
            )
        self.body.value = "".join(lines)
