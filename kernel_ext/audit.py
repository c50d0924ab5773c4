"""The audit log: one JSON object per line in ``<state_dir>/audit.jsonl``.

Every record has ``v`` (the schema version, :data:`SCHEMA_VERSION`), ``ts`` (epoch seconds),
``kind`` and ``correlation_id`` (the cell that caused it, or null); the README's "Audit log"
section documents the fields of each kind. When the file would grow past ``max_bytes`` it is
rotated (``audit.jsonl.1`` ... ``.N``, oldest dropped); :meth:`AuditLog.read` reads the rotated
files too, oldest first. Writing never raises into the caller: a failure warns once and is
counted.
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

__all__ = ["SCHEMA_VERSION", "AuditLog", "metrics"]

SCHEMA_VERSION = 1

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

    def __init__(
        self,
        path: str | Path,
        events: EventBus | None = None,
        clock: Callable[[], float] = time.time,
        *,
        correlation: Callable[[], str | None] | None = None,
        max_bytes: Callable[[], int] | int = 0,
        backups: Callable[[], int] | int = 3,
    ) -> None:
        """``correlation()`` gives the id stamped on records that bring none; ``max_bytes``
        (0: never rotate) and ``backups`` may be callables, read at each write (settings)."""
        self.path = Path(path)
        self.events = events
        self._clock = clock
        self._correlation = correlation
        self._max_bytes = max_bytes
        self._backups = backups
        self._lock = threading.Lock()
        self.failures = 0
        self._warned = False

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"v": SCHEMA_VERSION, "ts": round(self._clock(), 6),
                                  "kind": kind}
        if "correlation_id" not in fields:
            record["correlation_id"] = self._correlation() if self._correlation else None
        record.update(fields)
        line = json.dumps(record, default=_default, ensure_ascii=False)
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._rotate_for(len(line.encode("utf-8")) + 1)
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

    @staticmethod
    def _setting(value: Callable[[], int] | int) -> int:
        return int(value() if callable(value) else value)

    def files(self) -> list[Path]:
        """The log's files, oldest first: the rotated ones, then the current one."""
        n = max(0, self._setting(self._backups))
        rotated = [self.path.with_name(f"{self.path.name}.{i}") for i in range(n, 0, -1)]
        return [p for p in [*rotated, self.path] if p.exists()]

    def _rotate_for(self, incoming: int) -> None:
        limit = self._setting(self._max_bytes)
        if limit <= 0:
            return
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0 or size + incoming <= limit:
            return
        n = max(0, self._setting(self._backups))
        if n == 0:
            self.path.unlink()
            return
        for i in range(n - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def read(self, kind: str | None = None, tail: int | None = None) -> list[dict[str, Any]]:
        """Records, oldest first (rotated files included), optionally filtered by kind (prefix
        match), cut to the last N."""
        out: list[dict[str, Any]] = []
        for path in self.files():
            try:
                out.extend(self._read_file(path, kind))
            except FileNotFoundError:  # rotated away meanwhile
                continue
        return out[-tail:] if tail else out

    @staticmethod
    def _read_file(path: Path, kind: str | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line after a crash
                if not isinstance(rec, dict):
                    continue
                if kind is None or str(rec.get("kind", "")).startswith(kind):
                    out.append(rec)
        return out

    def metrics(self) -> dict[str, Any]:
        """:func:`metrics` over the whole log."""
        return metrics(self.read())


# --- metrics -----------------------------------------------------------------------------------
def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary numbers from audit records (as :meth:`AuditLog.read` returns them).

    - model loads: count and load-time mean/p50/max (``model.load`` records' ``duration_s``);
    - inferences: count by outcome, latency p50/p90/p95/p99/max (``latency_s``), tokens,
      cache hits;
    - breakers: trips (transitions into ``open``/``forced_open``), trip rate (trips per
      inference; also per 100 inferences and per hour of log);
    - checkpoints: commits and their duration p50/p95/max, failures;
    - alerts raised, by alert kind.
    """
    loads = [
        float(r["duration_s"])
        for r in records
        if r.get("kind") == "model.load" and isinstance(r.get("duration_s"), (int, float))
    ]
    infers = [r for r in records if r.get("kind") == "infer"]
    latencies = sorted(
        float(r["latency_s"]) for r in infers if isinstance(r.get("latency_s"), (int, float))
    )
    outcomes: dict[str, int] = {}
    for r in infers:
        key = str(r.get("outcome", "?"))
        outcomes[key] = outcomes.get(key, 0) + 1
    trips = [
        r
        for r in records
        if r.get("kind") == "breaker"
        and r.get("new") in ("open", "forced_open")
        and not r.get("restored")  # a state brought back from a checkpoint is not a new trip
    ]
    trips_by: dict[str, int] = {}
    for r in trips:
        trips_by[str(r.get("name"))] = trips_by.get(str(r.get("name")), 0) + 1
    commits = sorted(
        float(r["duration_s"])
        for r in records
        if r.get("kind") == "checkpoint.commit" and isinstance(r.get("duration_s"), (int, float))
    )
    alerts: dict[str, int] = {}
    for r in records:
        if r.get("kind") == "alert" and r.get("state") == "raised":
            alerts[str(r.get("alert"))] = alerts.get(str(r.get("alert")), 0) + 1
    stamps = [float(r["ts"]) for r in records if isinstance(r.get("ts"), (int, float))]
    span_h = (max(stamps) - min(stamps)) / 3600.0 if len(stamps) > 1 else 0.0
    return {
        "model_loads": len(loads),
        "load_s_mean": sum(loads) / len(loads) if loads else None,
        "load_s_p50": _percentile(sorted(loads), 50) if loads else None,
        "load_s_max": max(loads) if loads else None,
        "inferences": len(infers),
        "outcomes": outcomes,
        "latency_s_p50": _percentile(latencies, 50) if latencies else None,
        "latency_s_p90": _percentile(latencies, 90) if latencies else None,
        "latency_s_p95": _percentile(latencies, 95) if latencies else None,
        "latency_s_p99": _percentile(latencies, 99) if latencies else None,
        "latency_s_max": latencies[-1] if latencies else None,
        "completion_tokens": sum(int(r.get("completion_tokens") or 0) for r in infers),
        "cache_hits": sum(1 for r in infers if r.get("cached")),
        "breaker_trips": len(trips),
        "breaker_trips_by_name": trips_by,
        "breaker_trip_rate": (len(trips) / len(infers)) if infers else None,
        "breaker_trips_per_100_inferences": (100.0 * len(trips) / len(infers)) if infers else None,
        "breaker_trips_per_hour": (len(trips) / span_h) if span_h > 0 else None,
        "checkpoints": len(commits),
        "checkpoint_s_p50": _percentile(commits, 50) if commits else None,
        "checkpoint_s_p95": _percentile(commits, 95) if commits else None,
        "checkpoint_s_max": commits[-1] if commits else None,
        "checkpoint_failures": sum(1 for r in records if r.get("kind") == "checkpoint.failure"),
        "alerts": alerts,
    }
