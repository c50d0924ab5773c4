"""What checkpoints tell the user, in words: start-up notices (an existing checkpoint, how the
previous kernel ended, another kernel writing), ``%checkpoint status``, ``%resume`` and
``%checkpoint verify`` reports. Plain functions over the store, the lease records and the
manager's status; nothing here writes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..memory import format_bytes
from . import vitals
from .lease import describe_holder

if TYPE_CHECKING:  # pragma: no cover
    from .manager import CheckpointManager
    from .restore import VerifyReport
    from .store import Restored, Store

__all__ = [
    "existing_checkpoint",
    "fmt_time",
    "reader_notice",
    "resume_lines",
    "status_lines",
    "unclean_end",
    "verify_lines",
]

RESUME_HINT = ("  Run %resume to restore it (automatic saving waits until you do, or until "
               "%checkpoint on).")


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def snapshot_summary(store: Store, sid: str) -> str:
    """``2026-01-02 14:01:49, 3 variables (a, b, c), 12.0 KiB``"""
    try:
        m = store.manifest(sid)
    except CheckpointError:
        return sid
    variables = sorted(m["variables"])
    size = sum(int(v.get("nbytes", 0)) for v in m["variables"].values())
    names = f" ({_names(variables)})" if variables else ""
    return f"{fmt_time(m['created'])}, {len(variables)} variables{names}, {format_bytes(size)}"


def _unfinished_tasks(store: Store) -> list[str]:
    return [f"  task {t['name']!r}: {t['done']}/{t['total']} items done" for t in store.tasks()
            if isinstance(t.get("total"), int) and isinstance(t.get("done"), int)
            and t["done"] < t["total"]]


def existing_checkpoint(store: Store) -> list[str]:
    """A fresh kernel finds a checkpoint of its notebook (written by another kernel)."""
    history = store.snapshots()
    if not history:
        return []
    try:
        m = store.manifest(history[0])
        size = sum(int(v.get("nbytes", 0)) for v in m["variables"].values())
        first = (f"kernel_ext: a checkpoint exists for this notebook ({fmt_time(m['created'])}, "
                 f"{len(m['variables'])} variables, {format_bytes(size)}).")
    except CheckpointError:
        first = f"kernel_ext: a checkpoint exists for this notebook ({history[0]})."
    return [first, *_unfinished_tasks(store), RESUME_HINT]


def unclean_end(prev: dict[str, Any], store: Store, now: float | None = None) -> list[str]:
    """How the previous kernel of this notebook ended, from its last lease record."""
    now = time.time() if now is None else now
    beat = prev.get("heartbeat")
    when = (f"last heartbeat {fmt_time(beat)}, {max(0.0, now - beat):.0f} s ago"
            if isinstance(beat, (int, float)) else "no heartbeat recorded")
    lines = [(f"kernel_ext: the previous kernel of this notebook ended without shutting down "
              f"(pid {prev.get('pid')} on {prev.get('host')}; {when}).")]
    cell, last = prev.get("cell"), prev.get("last_cell")
    if cell:
        lines.append(f"  It was running cell [{cell.get('count')}] since "
                     f"{fmt_time(cell.get('started'))}: {cell.get('source', '')!r}")
    elif last:
        lines.append(f"  No cell was running (the last one, [{last.get('count')}], finished "
                     f"at {fmt_time(last.get('finished'))}).")
    memory = prev.get("memory")
    if memory:
        verdict = vitals.judge_end(memory, vitals.oom_kills())
        lines.append(f"  Last memory seen ({fmt_time(memory.get('ts'))}): "
                     f"{vitals.memory_line(memory)}" + (f": {verdict}." if verdict else "."))
    history = store.snapshots()
    if history:
        created = None
        try:
            created = store.manifest(history[0])["created"]
        except CheckpointError:
            pass
        before = ""
        if cell and isinstance(created, (int, float)) and created <= (cell.get("started") or 0):
            before = " (saved before that cell started: everything earlier cells set)"
        lines.append(f"  Newest snapshot: {snapshot_summary(store, history[0])}{before}.")
        lines += _unfinished_tasks(store)
        lines.append(RESUME_HINT)
    else:
        lines.append("  Nothing had been saved (no variables yet).")
    return lines


def reader_notice(holder: dict[str, Any], store: Store) -> list[str]:
    """The one line a second kernel on the same notebook gets (plus what it can resume)."""
    lines = [(f"kernel_ext: another kernel writes this notebook's checkpoints "
              f"({describe_holder(holder)}); this kernel does not save its variables there. "
              "%checkpoint takeover makes this kernel the writer.")]
    history = store.snapshots()
    if history:
        lines.append(f"  Its newest snapshot: {snapshot_summary(store, history[0])} "
                     "(%resume restores it here).")
    return lines


def status_lines(m: CheckpointManager) -> list[str]:
    s = m.status
    state = "off" if not m.enabled else (f"paused ({m.paused})" if m.paused else "on")
    lines = [
        (f"checkpoints: {state}, every {m.config.checkpoint_interval:g} s, keep "
         f"{m.config.checkpoint_keep}, store {m.location}"),
        f"writer: {s.get('writer') or '-'}",
        (f"last snapshot: {s.get('last_snapshot') or '-'} at {fmt_time(s.get('last_time'))}, "
         f"size {format_bytes(s.get('size_bytes'))}, took "
         f"{'-' if s.get('duration_s') is None else format(s['duration_s'], '.3f') + ' s'}"),
        (f"unsaved changes: {'yes' if s.get('pending') else 'no'} (made up before the next "
         f"cell; while idle {m.loop.description})"),
        f"tracked ({len(s.get('tracked') or [])}): {', '.join(s.get('tracked') or []) or '-'}",
    ]
    skipped = s.get("skipped") or {}
    lines.append(f"skipped ({len(skipped)}):" + ("" if skipped else " -"))
    lines += [f"  {name}: {why}" for name, why in sorted(skipped.items())]
    carried = s.get("carried") or {}
    if carried:
        lines.append(f"kept from the restored snapshot, not in memory ({len(carried)}):")
        lines += [f"  {name}: {why}" for name, why in sorted(carried.items())]
    if m.pickled:
        lines.append(f"pickled (restoring runs code): {', '.join(sorted(m.pickled))}")
    if m.ignored:
        lines.append(f"ignore patterns: {', '.join(m.ignored)}")
    if s.get("last_failure"):
        lines.append(f"last failure ({s.get('failures', 0)} in all): {s['last_failure']}")
    return lines


def resume_lines(restored: Restored, names_given: bool) -> list[str]:
    m = restored.manifest
    lines = list(restored.notes)
    values = sorted(restored.values)
    size = sum(int(m["variables"][n].get("nbytes", 0)) for n in values if n in m["variables"])
    if not m["variables"]:
        lines.append(f"snapshot {restored.snapshot} ({fmt_time(m['created'])}) holds no "
                     "variables: nothing to restore")
    elif values or not (restored.lost or restored.refused):
        lines.append(f"restored {len(values)} variable(s) ({format_bytes(size)}) from snapshot "
                     f"{restored.snapshot} ({fmt_time(m['created'])}): {', '.join(values) or '-'}")
    for name, sid in sorted(restored.sources.items()):
        lines.append(f"  {name}: from the older snapshot {sid} (the newer copy is damaged)")
    for name, why in sorted(restored.lost.items()):
        lines.append(f"DAMAGED, not restored: {name}: no intact copy in any kept snapshot "
                     f"({why})")
    for name, why in sorted(restored.refused.items()):
        lines.append(f"not restored: {name}: {why}")
    if not names_given:
        for name, why in sorted(m.get("skipped", {}).items()):
            lines.append(f"was not saved: {name}: {why}")
    return lines


def verify_lines(report: VerifyReport, repaired: list[str],
                 after: VerifyReport | None = None) -> list[str]:
    """What :func:`.restore.verify` found, what was repaired, and (``after``) the verdict of
    a second pass after the repair."""
    lines = [(f"checked {report.objects} object(s), {format_bytes(report.nbytes)}, in "
              f"{len(report.snapshots)} snapshot(s) and {len(report.tasks)} task(s)")]
    for c in report.snapshots:
        if c.unreadable:
            lines.append(f"  {c.snapshot}: UNREADABLE manifest: {c.unreadable}")
        elif c.damaged:
            lines.append(f"  {c.snapshot}: {len(c.intact)} intact, damaged: "
                         f"{', '.join(sorted(c.damaged))}")
        else:
            lines.append(f"  {c.snapshot}: all {len(c.intact)} variable(s) intact")
    for name, sid in sorted(report.recoverable.items()):
        lines.append(f"recoverable: {name}: %resume takes it from snapshot {sid}")
    for name, why in sorted(report.lost.items()):
        lines.append(f"damaged in every kept snapshot: {name}: {why}")
    for name, why in sorted(report.tasks.items()):
        if why:
            lines.append(f"task {name!r}: damaged: {why}")
    for name in repaired:
        lines.append(f"repaired: {name} (rewritten from the value this kernel holds)")
    final = after or report
    lines.append(("verdict after the repair: " if after else "verdict: ")
                 + ("all intact" if final.ok else
                    f"{len(final.damaged_objects)} damaged object(s)"))
    return lines
