"""Crash-safe checkpoints of notebook variables to Zarr, and resumable tasks.

- :mod:`.store`: the snapshot store (content-addressed objects, manifests, atomic pointer).
- :mod:`.manager`: what to save and when (post_run_cell, SIGTERM, exit), status, resume.
- :mod:`.tasks`: resumable loops (``kernel_ext.task``).
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .manager import CheckpointManager
from .store import Store
from .tasks import Task, task

__all__ = ["CheckpointManager", "Store", "Task", "attach", "task"]


def attach(session: Any) -> CheckpointManager:
    """Create ``session.checkpoints``, register its hooks (undone on close) and tell a fresh
    kernel when a checkpoint of its notebook exists. Never raises a :class:`CheckpointError`: an
    unusable store turns automatic saving off with a warning (see ``%checkpoint status``)."""
    manager = CheckpointManager(session)
    session.checkpoints = manager
    manager.install()
    session.on_close(manager.close)
    try:
        message = manager.startup_message()
    except CheckpointError as e:  # %load_ext must not fail: saving stays off, visibly
        manager.disable(e)
        return manager
    if message:
        print(message)
    return manager
