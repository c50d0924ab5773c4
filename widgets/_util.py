"""Small helpers shared by the panels: formatting, HTML escaping, closing widget trees."""

from __future__ import annotations

import dataclasses
import html
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ipywidgets import VBox, Widget
from kernel_ext.memory import format_bytes

__all__ = [
    "Panel",
    "as_dict",
    "close_tree",
    "esc",
    "fmt_age",
    "fmt_bytes",
    "fmt_clock",
    "fmt_seconds",
    "widget_tree",
]


def esc(value: Any) -> str:
    """HTML-escape ``str(value)``."""
    return html.escape(str(value), quote=True)


fmt_bytes = format_bytes  # one formatter for the whole toolkit: kernel_ext.memory.format_bytes


def fmt_seconds(s: float | None) -> str:
    """A short duration: ``0.42 s``, ``12 s``, ``3 min 5 s``; ``None`` -> ``"–"``."""
    if s is None:
        return "–"
    if s < 10:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.0f} s"
    minutes, seconds = divmod(int(round(s)), 60)
    return f"{minutes} min {seconds} s"


def fmt_clock(ts: float | None) -> str:
    """Local wall-clock time ``HH:MM:SS`` of an epoch timestamp."""
    if ts is None:
        return "–"
    return time.strftime("%H:%M:%S", time.localtime(ts))


def fmt_age(ts: float | None, now: float) -> str:
    """``HH:MM:SS (12 s ago)``."""
    if ts is None:
        return "never"
    return f"{fmt_clock(ts)} ({fmt_seconds(max(0.0, now - ts))} ago)"


def as_dict(obj: Any) -> dict[str, Any]:
    """A snapshot/status as a plain dict, whether it is a dict, a dataclass or has ``to_dict``."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    to_dict = getattr(obj, "to_dict", None) or getattr(obj, "_asdict", None)
    if callable(to_dict):
        return dict(to_dict())
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def widget_tree(root: Widget) -> Iterable[Widget]:
    """``root``, its children (recursively) and their layout/style widgets."""
    stack = [root]
    seen: set[int] = set()
    while stack:
        w = stack.pop()
        if id(w) in seen:
            continue
        seen.add(id(w))
        yield w
        for name in ("layout", "style"):
            sub = getattr(w, name, None)
            if isinstance(sub, Widget):
                stack.append(sub)
        stack.extend(c for c in getattr(w, "children", ()) if isinstance(c, Widget))


def close_tree(root: Widget) -> None:
    """Close ``root`` and everything it owns, so no comm is left behind."""
    for w in list(widget_tree(root)):
        w.close()


class Panel(VBox):
    """A ``VBox`` that closes everything it owns (children, their layouts and styles)."""

    def close(self) -> None:
        for child in list(self.children):
            close_tree(child)
        self.layout.close()
        super().close()
