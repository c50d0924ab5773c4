"""Crash-safe checkpoints of notebook variables to Zarr (issue: checkpoints)."""

from __future__ import annotations

from typing import Any

__all__ = ["attach"]


def attach(session: Any) -> None:
    """Create the checkpoint manager for ``session`` and register the IPython hooks."""
    # Filled in by the checkpoint work: see kernel_ext/checkpoint/.
