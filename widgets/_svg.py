"""An inline SVG sparkline (stock ``HTML`` widget, no custom JavaScript)."""

from __future__ import annotations

from collections.abc import Sequence

from ._util import esc

__all__ = ["sparkline"]


def sparkline(
    series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]],
    *,
    t0: float,
    t1: float,
    y_max: float,
    limit: float | None = None,
    width: int = 260,
    height: int = 44,
    title: str = "",
) -> str:
    """Polylines of ``(t, y)`` points, one per ``(name, colour, points)`` in ``series``.

    The x axis spans ``t0..t1``, the y axis ``0..y_max``; ``limit`` draws a dashed red line.
    """
    span = max(t1 - t0, 1e-9)
    top = max(y_max, 1e-9)

    def xy(t: float, y: float) -> str:
        x = (t - t0) / span * (width - 2) + 1
        yy = height - 1 - min(max(y / top, 0.0), 1.0) * (height - 2)
        return f"{x:.1f},{yy:.1f}"

    parts = [
        f"<svg class='kernel-ext-sparkline' xmlns='http://www.w3.org/2000/svg' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        f"style='background:#fafafa;border:1px solid #e0e0e0'>"
    ]
    if title:
        parts.append(f"<title>{esc(title)}</title>")
    if limit is not None and limit > 0:
        y = xy(t0, limit).split(",")[1]
        parts.append(
            f"<line class='kernel-ext-limit' x1='0' x2='{width}' y1='{y}' y2='{y}' "
            "stroke='#c62828' stroke-dasharray='4 3' stroke-width='1'/>"
        )
    for name, colour, points in series:
        if not points:
            continue
        pts = " ".join(xy(t, v) for t, v in points)
        if len(points) == 1:
            pts = f"{pts} {xy(t1, points[0][1])}"
        parts.append(
            f"<polyline data-series='{esc(name)}' fill='none' stroke='{esc(colour)}' "
            f"stroke-width='1.5' points='{pts}'/>"
        )
    parts.append("</svg>")
    return "".join(parts)
