"""Crash-safe checkpoints of notebook variables to Zarr, and resumable tasks.

- :mod:`.store`: the snapshot store (content-addressed objects, manifests, atomic pointer).
- :mod:`.restore`: restoring and verifying per variable (damage costs only what is damaged).
- :mod:`.lease`: one writer per store (pid, host, kernel id, heartbeat).
- :mod:`.manager`: what to save and when (after cells, made up before the next cell or when
  idle, at shutdown, SIGTERM and exit), resume, verify.
- :mod:`.schedule`: saves on the kernel's event loop, between requests.
- :mod:`.report`: what the user is told (status, how the previous kernel ended, ...).
- :mod:`.tasks`: resumable loops (``kernel_ext.task``).
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from ._codec import register_plain_type
from .manager import CheckpointManager
from .store import Store
from .tasks import Task, task

__all__ = ["CheckpointManager", "Store", "Task", "attach", "register_plain_type", "task"]


def attach(session: Any, handover: dict[str, Any] | None = None) -> CheckpointManager:
    """Create ``session.checkpoints``, register its hooks (undone on close), take the store's
    lease and tell the user what it found (a checkpoint of this notebook, how the previous
    kernel ended, another kernel writing). ``handover``: what the manager of this same kernel
    left at ``%reload_ext`` (:meth:`CheckpointManager.handover`). Never raises a
    :class:`CheckpointError`: an unusable store turns automatic saving off with a warning (see
    ``%checkpoint status``)."""
    manager = CheckpointManager(session)
    session.checkpoints = manager
    manager.install()
    session.on_close(manager.close)
    try:
        lines = manager.start(handover)
    except CheckpointError as e:  # %load_ext must not fail: saving stays off, visibly
        manager.disable(e)
        return manager
    if lines:
        print("\n".join(lines))
    return manager
