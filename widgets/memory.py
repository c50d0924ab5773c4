"""The memory panel: RAM and each GPU (used / total with the guard's limit marked), the loaded
models' footprints, and a sparkline of the last few minutes so a leak or a spike is visible.

Fed with :class:`kernel_ext.memory.MemorySample` objects (``ts, ram_total, ram_available,
ram_used, process_rss, gpus``), the registry's footprints and the guard's limits per device.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ipywidgets import HTML

from ._svg import sparkline
from ._util import Panel, esc, fmt_bytes, fmt_clock

__all__ = ["MemoryPanel", "DeviceReading"]

_METER_W = 220
_METER_H = 14
_COLOURS = {"used": "#1565c0", "rss": "#6a1b9a", "gpu": "#00838f"}


@dataclass(frozen=True)
class DeviceReading:
    """One device's numbers as last shown."""

    device: str  # "cpu" or "cuda:N"
    label: str
    used: int
    total: int
    limit: int | None = None  # the level a new load may bring usage to (the guard's budget)
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def over_limit(self) -> bool:
        return self.limit is not None and self.used > self.limit


@dataclass
class _Point:
    ts: float
    ram_used: int
    rss: int
    gpus: dict[int, int]


class MemoryPanel(Panel):
    """RAM, GPUs, model footprints and a short history."""

    def __init__(self, history_seconds: float = 300.0, **kwargs: Any) -> None:
        self.title = HTML("<b>Memory</b>")
        self.devices = HTML()
        self.models = HTML()
        self.history = HTML()
        super().__init__(children=[self.title, self.devices, self.models, self.history], **kwargs)
        self.add_class("kernel-ext-memory")
        self.history_seconds = float(history_seconds)
        self._lock = threading.RLock()
        self._points: deque[_Point] = deque()
        self._limits: dict[str, int | None] = {}
        self.readings: dict[str, DeviceReading] = {}
        self.samples = 0
        self.devices.value = "<span style='color:#757575'>waiting for the first sample…</span>"

    def update(
        self,
        sample: Any,
        *,
        footprints: Mapping[str, int] | None = None,
        limits: Mapping[str, int | None] | None = None,
    ) -> None:
        """Show one memory sample (plus model footprints and the guard's limit per device)."""
        limits = dict(limits or {})
        gpus = list(getattr(sample, "gpus", None) or [])
        with self._lock:
            self.samples += 1
            self._limits = limits
            readings = {
                "cpu": DeviceReading(
                    "cpu", "RAM", int(sample.ram_used), int(sample.ram_total), limits.get("cpu"),
                    {"kernel RSS": int(sample.process_rss)},
                )
            }
            for g in gpus:
                dev = f"cuda:{g.index}"
                readings[dev] = DeviceReading(
                    dev, f"GPU {g.index}", int(g.used), int(g.total), limits.get(dev),
                    {}
                )
            self.readings = readings
            ts = float(sample.ts)
            self._points.append(_Point(ts, int(sample.ram_used), int(sample.process_rss),
                                       {g.index: int(g.used) for g in gpus}))
            while self._points and self._points[0].ts < ts - self.history_seconds:
                self._points.popleft()
            self.devices.value = self._render_devices(gpus)
            if footprints is not None:
                self.models.value = self._render_models(footprints)
            self.history.value = self._render_history(sample, gpus)

    @property
    def history_length(self) -> int:
        with self._lock:
            return len(self._points)

    # --- rendering ------------------------------------------------------------------------------
    def _render_devices(self, gpus: list[Any]) -> str:
        rows = []
        for r in self.readings.values():
            name = next((g.name for g in gpus if f"cuda:{g.index}" == r.device), "")
            rows.append(_device_row(r, name))
        return f"<table class='kernel-ext-devices'>{''.join(rows)}</table>"

    @staticmethod
    def _render_models(footprints: Mapping[str, int]) -> str:
        if not footprints:
            return "<div class='kernel-ext-models' style='color:#757575'>no model loaded</div>"
        items = "".join(
            f"<tr data-model='{esc(n)}'><td style='padding:0 8px'>{esc(n)}</td>"
            f"<td style='padding:0 8px;text-align:right'>{fmt_bytes(b)}</td></tr>"
            for n, b in sorted(footprints.items())
        )
        total = fmt_bytes(sum(footprints.values()))
        return (
            "<div class='kernel-ext-models'><i>loaded models (measured: weights, runtime "
            "copies, tokenizers; shared weights once)</i>"
            f"<table>{items}<tr><td style='padding:0 8px'><i>total</i></td>"
            f"<td style='padding:0 8px;text-align:right'><i>{total}</i></td></tr></table></div>"
        )

    def _render_history(self, sample: Any, gpus: list[Any]) -> str:
        pts = list(self._points)
        t1 = pts[-1].ts
        t0 = min(pts[0].ts, t1 - 1.0)
        ram = sparkline(
            [
                ("ram_used", _COLOURS["used"], [(p.ts, p.ram_used) for p in pts]),
                ("kernel_rss", _COLOURS["rss"], [(p.ts, p.rss) for p in pts]),
            ],
            t0=t0, t1=t1, y_max=float(sample.ram_total), limit=self._limits.get("cpu"),
            title="RAM used (blue) and kernel RSS (purple)",
        )
        plots = [f"<div><span style='font-size:90%'>RAM</span><br>{ram}</div>"]
        for g in gpus:
            gp = sparkline(
                [(f"gpu{g.index}", _COLOURS["gpu"],
                  [(p.ts, p.gpus[g.index]) for p in pts if g.index in p.gpus])],
                t0=t0, t1=t1, y_max=float(g.total), limit=self._limits.get(f"cuda:{g.index}"),
                title=f"GPU {g.index} used",
            )
            plots.append(f"<div><span style='font-size:90%'>GPU {g.index}</span><br>{gp}</div>")
        span = t1 - t0
        legend = (
            f"<span style='font-size:85%;color:#616161'>last {span:.0f} s "
            f"({fmt_clock(t0)}–{fmt_clock(t1)}); <span style='color:{_COLOURS['used']}'>"
            f"used</span>, <span style='color:{_COLOURS['rss']}'>kernel RSS</span>, "
            "<span style='color:#c62828'>- - guard limit</span></span>"
        )
        return (
            "<div class='kernel-ext-history'><div style='display:flex;gap:12px'>"
            f"{''.join(plots)}</div>{legend}</div>"
        )


def _device_row(r: DeviceReading, name: str) -> str:
    frac = r.used / r.total if r.total else 0.0
    colour = "#c62828" if r.over_limit else "#1565c0"
    used_w = min(max(frac, 0.0), 1.0) * _METER_W
    limit_svg = ""
    limit_txt = ""
    if r.limit is not None and r.total:
        x = min(max(r.limit / r.total, 0.0), 1.0) * _METER_W
        limit_svg = (
            f"<line class='kernel-ext-limit' x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{_METER_H}' "
            "stroke='#c62828' stroke-width='2'/>"
        )
        room = r.limit - r.used
        limit_txt = (f" · guard limit {fmt_bytes(r.limit)} (a new load may take "
                     f"{fmt_bytes(max(room, 0))})")
    meter = (
        f"<svg class='kernel-ext-meter' width='{_METER_W}' height='{_METER_H}'>"
        f"<rect width='{_METER_W}' height='{_METER_H}' fill='#eeeeee'/>"
        f"<rect width='{used_w:.1f}' height='{_METER_H}' fill='{colour}'/>{limit_svg}</svg>"
    )
    extra = "".join(f" · {esc(k)} {fmt_bytes(v)}" for k, v in r.extra.items())
    label = esc(r.label) + (f" <span style='color:#757575'>({esc(name)})</span>" if name else "")
    text = f"{fmt_bytes(r.used)} / {fmt_bytes(r.total)} ({100 * frac:.0f}%){limit_txt}{extra}"
    return (
        f"<tr data-device='{esc(r.device)}' data-over-limit='{str(r.over_limit).lower()}'>"
        f"<td style='padding:0 8px'>{label}</td><td>{meter}</td>"
        f"<td style='padding:0 8px'>{text}</td></tr>"
    )
