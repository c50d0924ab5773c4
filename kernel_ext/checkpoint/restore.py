"""Restoring and verifying per variable: one damaged object never costs the other variables.

Every snapshot shares the objects of the variables that did not change, so one damaged object
shows up in every snapshot. Restore therefore works variable by variable: each variable comes
from the newest snapshot (the chosen one or older) where its objects verify; a variable with no
intact copy is named, with each damaged copy, and the others are restored anyway.
:func:`verify` reads every object of every kept snapshot and task and says what is damaged and
what can still be recovered (from an older snapshot, or from the value this kernel holds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointCorruptError, CheckpointError
from ._codec import NotRestorable, PickleRefused, decode

if TYPE_CHECKING:  # pragma: no cover
    from .store import Restored, Store

__all__ = ["SnapshotCheck", "VerifyReport", "restore", "verify"]


class _Parts:
    """Objects read and verified once per operation (shared objects are read once)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ok: dict[str, Any] = {}
        self.bad: dict[str, CheckpointCorruptError] = {}

    def read(self, ref: dict[str, Any], what: str) -> Any:
        h = ref["hash"]
        if h in self.ok:
            return self.ok[h]
        if h in self.bad:
            raise self.bad[h]
        try:
            value = self.store.read_part(ref, what)
        except CheckpointCorruptError as e:
            self.bad[h] = e
            self.store.damaged.add(h)
            raise
        self.ok[h] = value
        return value


def _manifests(store: Store, chain: list[str], notes: list[str] | None,
               strict_first: bool) -> list[tuple[str, dict[str, Any]]]:
    """``(id, manifest)`` of the readable snapshots of ``chain``, newest first."""
    out = []
    for i, sid in enumerate(chain):
        try:
            out.append((sid, store.manifest(sid)))
        except CheckpointCorruptError as e:
            if strict_first and i == 0:
                raise
            if notes is not None:
                notes.append(f"snapshot {sid} is unreadable ({e}); its variables come from "
                             "older snapshots")
    return out


def restore(store: Store, snapshot: str | None, names: Iterable[str] | None,
            allow_pickle: Callable[[str], bool]) -> Restored:
    """See :meth:`Store.restore`."""
    from .store import Restored

    history = store.snapshots()
    if not history:
        raise CheckpointError(f"no checkpoint yet in {store.location}")
    start = history.index(store.resolve(snapshot)) if snapshot is not None else 0
    notes: list[str] = []
    readable = _manifests(store, history[start:], notes, strict_first=snapshot is not None)
    if not readable:
        raise CheckpointCorruptError(f"no readable snapshot in {store.location}: "
                                     + " | ".join(notes))
    base, manifest = readable[0]
    variables = manifest["variables"]
    wanted = list(variables) if names is None else list(names)
    missing = [n for n in wanted if n not in variables]
    if missing:
        raise CheckpointError(f"snapshot {base} has no variable(s) {', '.join(missing)}; "
                              f"it has: {', '.join(variables) or '-'}")
    out = Restored(base, manifest, {}, notes=notes)
    parts = _Parts(store)
    for name in wanted:
        _restore_one(name, readable, parts, allow_pickle, out)
    return out


def _restore_one(name: str, readable: list[tuple[str, dict[str, Any]]], parts: _Parts,
                 allow_pickle: Callable[[str], bool], out: Restored) -> None:
    damaged: list[str] = []
    failed: set[tuple[str, ...]] = set()  # copies already found damaged (shared objects)
    for sid, manifest in readable:
        entry = manifest["variables"].get(name)
        if entry is None:
            continue
        copy = tuple(str(ref.get("hash")) for ref in entry.get("parts", []))
        if copy in failed:
            continue
        what = f"snapshot {sid}, variable {name!r}"
        if entry.get("kind") == "pickle" and not allow_pickle(name):
            out.refused[name] = (f"pickled {entry.get('meta', {}).get('type', 'object')}: "
                                 f"restoring it runs code; use %resume --pickle {name} if you "
                                 "trust this checkpoint")
            return
        try:
            values = [parts.read(ref, what) for ref in entry["parts"]]
            value = decode(entry["kind"], entry["meta"], values, allow_pickle=allow_pickle(name))
        except PickleRefused:
            out.refused[name] = "pickled object (not allowed)"
            return
        except NotRestorable as e:
            out.refused[name] = str(e)
            return
        except CheckpointCorruptError as e:
            damaged.append(str(e))
            failed.add(copy)
            continue
        except (ValueError, TypeError, KeyError, IndexError) as e:
            damaged.append(f"{what}: cannot rebuild the value: {type(e).__name__}: {e}")
            failed.add(copy)
            continue
        out.values[name] = value
        if damaged:
            out.sources[name] = sid
            out.damaged[name] = damaged
            out.notes.append(f"variable {name!r}: {damaged[0]}; restored from the older "
                             f"snapshot {sid}")
        return
    out.damaged[name] = damaged
    out.lost[name] = "; ".join(damaged) or "no copy in any kept snapshot"


@dataclass
class SnapshotCheck:
    """One snapshot as :func:`verify` found it."""

    snapshot: str
    created: float | None
    unreadable: str | None = None
    intact: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)  # variable -> what is wrong


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``recoverable``: variable -> the newest snapshot holding an
    intact copy, for variables damaged in the newest snapshot; ``lost``: variables of the
    newest snapshot with no intact copy anywhere; ``tasks``: task name -> what is wrong (None:
    intact)."""

    objects: int = 0
    nbytes: int = 0
    damaged_objects: dict[str, str] = field(default_factory=dict)
    snapshots: list[SnapshotCheck] = field(default_factory=list)
    recoverable: dict[str, str] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)
    tasks: dict[str, str | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.damaged_objects and not any(s.unreadable for s in self.snapshots) \
            and not any(self.tasks.values())


def verify(store: Store) -> VerifyReport:
    """Read and hash every object of every kept snapshot and task."""
    report = VerifyReport()
    parts = _Parts(store)
    seen: set[str] = set()

    def check_refs(refs: list[dict[str, Any]], what: str) -> str | None:
        problem = None
        for ref in refs:
            try:
                parts.read(ref, what)
            except CheckpointCorruptError as e:
                report.damaged_objects.setdefault(ref["hash"], str(e))
                problem = problem or str(e)
            if ref["hash"] not in seen:
                seen.add(ref["hash"])
                report.objects += 1
                report.nbytes += int(ref.get("nbytes", 0))
        return problem

    history = store.snapshots()
    for sid in history:
        try:
            manifest = store.manifest(sid)
        except CheckpointCorruptError as e:
            report.snapshots.append(SnapshotCheck(sid, None, unreadable=str(e)))
            continue
        check = SnapshotCheck(sid, manifest.get("created"))
        for name, entry in sorted(manifest["variables"].items()):
            problem = check_refs(entry.get("parts", []), f"snapshot {sid}, variable {name!r}")
            if problem is None:
                check.intact.append(name)
            else:
                check.damaged[name] = problem
        report.snapshots.append(check)
    newest = next((c for c in report.snapshots if c.unreadable is None), None)
    if newest is not None:
        for name, problem in newest.damaged.items():
            good = next((c.snapshot for c in report.snapshots
                         if c.unreadable is None and name in c.intact), None)
            if good is not None:
                report.recoverable[name] = good
            else:
                report.lost[name] = problem
    for t in store.tasks():
        report.tasks[t["name"]] = _verify_task(store, t["name"], check_refs)
    return report


def _verify_task(store: Store, name: str,
                 check_refs: Callable[[list[dict[str, Any]], str], str | None]) -> str | None:
    try:
        manifest = store.task_manifest(name) or {}
    except CheckpointError as e:
        return str(e)
    refs = [{"hash": h, "type": "blob", "sealed": manifest.get("sealed", False)}
            for h in manifest.get("segments", [])]
    problem = check_refs(refs, f"task {name!r}")
    if problem is not None:
        return problem
    try:
        store.load_task(name)  # the items' own objects, verified the same way
    except CheckpointError as e:
        return str(e)
    return None
