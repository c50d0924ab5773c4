"""The audit log: one JSON object per line in ``<state_dir>/audit.jsonl``.

Writing never raises into the caller: a failure warns once and is counted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .events import EventBus

__all__ = ["AuditLog"]

log = logging.getLogger(__name__)


def _default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, BaseException):
        return f"{type(o).__name__}: {o}"
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return repr(o)


class AuditLog:
    """Append-only JSON lines; every record has ``ts`` (epoch seconds) and ``kind``."""

    def __init__(self, path: str | Path, events: EventBus | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.events = events
        self._clock = clock
        self._lock = threading.Lock()
        self.failures = 0
        self._warned = False

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"ts": round(self._clock(), 6), "kind": kind, **fields}
        line = json.dumps(record, default=_default, ensure_ascii=False)
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            self.failures += 1
            if not self._warned:
                self._warned = True
                log.warning("kernel_ext: cannot write the audit log %s: %s", self.path, e)
        if self.events is not None:
            self.events.emit("audit", record=record)
        return record

    def read(self, kind: str | None = None, tail: int | None = None) -> list[dict[str, Any]]:
        """Records, oldest first, optionally filtered by kind (prefix match) and cut to the last N."""
        if not self.path.exists():
            return []
        out: list[dict[str, Any]] = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line after a crash
                if kind is None or str(rec.get("kind", "")).startswith(kind):
                    out.append(rec)
        return out[-tail:] if tail else out
