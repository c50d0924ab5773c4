"""Live ipywidgets for kernel_ext, built from stock widgets only (no custom JavaScript).

They observe a :class:`kernel_ext.session.Session` through its events; kernel_ext imports this
package only lazily (``%dashboard``).
"""

from __future__ import annotations

from .breaker import BreakerPanel
from .checkpoint import CheckpointPanel
from .dashboard import Dashboard, close_dashboards, open_dashboards
from .memory import MemoryPanel
from .progress import ProgressPanel

__all__ = [
    "BreakerPanel",
    "CheckpointPanel",
    "Dashboard",
    "MemoryPanel",
    "ProgressPanel",
    "close_dashboards",
    "open_dashboards",
]
