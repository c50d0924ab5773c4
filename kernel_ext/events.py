"""A tiny synchronous event bus: the Session publishes, widgets and the audit log listen.

Listeners never break the publisher: an exception in a listener is logged and the listener
stays subscribed.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

__all__ = ["Event", "EventBus", "Listener"]

log = logging.getLogger(__name__)


class Event(dict[str, Any]):
    """An event is a dict with at least ``kind``; attribute access for convenience."""

    @property
    def kind(self) -> str:
        return str(self["kind"])


Listener = Callable[[Event], None]


class EventBus:
    """Publish/subscribe by event kind; ``"*"`` receives everything."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = defaultdict(list)
        self._lock = threading.RLock()

    def subscribe(self, kind: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` for each event of ``kind``; returns an unsubscribe function."""
        with self._lock:
            self._listeners[kind].append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners.get(kind, []):
                    self._listeners[kind].remove(listener)

        return unsubscribe

    def emit(self, kind: str, **payload: Any) -> Event:
        event = Event(kind=kind, **payload)
        with self._lock:
            listeners = list(self._listeners.get(kind, ())) + list(self._listeners.get("*", ()))
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not break inference or checkpoints
                log.exception("kernel_ext event listener %r failed on %s", listener, kind)
        return event

    def listener_count(self, kind: str | None = None) -> int:
        with self._lock:
            if kind is None:
                return sum(len(v) for v in self._listeners.values())
            return len(self._listeners.get(kind, ()))
