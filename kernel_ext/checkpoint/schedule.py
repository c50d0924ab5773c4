"""Running a save between requests, on the kernel's own event loop.

ipykernel runs a tornado ``IOLoop`` (over asyncio) on the main thread and handles one request
at a time on it; a callback scheduled there runs only between requests (or while an async cell
awaits: the checkpoint manager checks that no cell is running before it saves). A plain
IPython shell has no such loop: :func:`kernel_loop` then returns a :class:`NoLoop`, and changes
are made up before the next cell and at exit only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["EventLoop", "IOLoopScheduler", "NoLoop", "kernel_loop"]


class EventLoop(Protocol):
    """Where deferred saves run. ``available``: False where nothing would ever run them."""

    available: bool
    description: str

    def call_later(self, delay: float, fn: Callable[[], None]) -> Any:
        """Run ``fn`` on the loop after ``delay`` seconds; returns a handle for :meth:`cancel`."""

    def cancel(self, handle: Any) -> None:
        """Forget a call scheduled with :meth:`call_later` (fine if it already ran)."""

    def add_callback(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the loop soon; callable from any thread. False: there is no loop."""


class IOLoopScheduler:
    """The kernel's tornado ``IOLoop``."""

    available = True
    description = "on the kernel's event loop"

    def __init__(self, io_loop: Any) -> None:
        self.io_loop = io_loop

    def call_later(self, delay: float, fn: Callable[[], None]) -> Any:
        if threading.current_thread() is threading.main_thread():
            return self.io_loop.call_later(max(0.0, delay), fn)
        box: dict[str, Any] = {}  # call_later is not thread-safe; add_callback is
        self.io_loop.add_callback(lambda: box.setdefault("h", self.io_loop.call_later(
            max(0.0, delay), fn)))
        return box

    def cancel(self, handle: Any) -> None:
        if isinstance(handle, dict):
            handle = handle.get("h")
        if handle is not None:
            self.io_loop.remove_timeout(handle)

    def add_callback(self, fn: Callable[[], None]) -> bool:
        self.io_loop.add_callback(fn)
        return True


class NoLoop:
    """No event loop (a plain IPython shell, a script)."""

    available = False
    description = "unavailable (no kernel event loop): saved before the next cell and at exit"

    def call_later(self, delay: float, fn: Callable[[], None]) -> Any:
        return None

    def cancel(self, handle: Any) -> None:
        return None

    def add_callback(self, fn: Callable[[], None]) -> bool:
        return False


def kernel_loop(shell: Any) -> EventLoop:
    """The event loop of the ipykernel that runs ``shell``, or :class:`NoLoop`."""
    kernel = getattr(shell, "kernel", None)
    io_loop = getattr(kernel, "io_loop", None)
    if io_loop is None or not hasattr(io_loop, "call_later"):
        return NoLoop()
    return IOLoopScheduler(io_loop)
