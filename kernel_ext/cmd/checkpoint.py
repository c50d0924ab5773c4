"""``%checkpoint`` and ``%resume``.

``%checkpoint now|status|list|diff [SNAP]|track VAR... [--pickle]|untrack VAR...|ignore PATTERN|
off|on|verify|takeover``
``%resume [SNAP] [--vars a b ...] [--pickle [VAR ...]]``
"""

from __future__ import annotations

import functools
import keyword
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError

from ..checkpoint.manager import CheckpointManager
from ..checkpoint.report import fmt_time, status_lines
from ..memory import format_bytes
from ._args import MagicParser, dispatch

__all__ = ["run"]


def _manager(ext: Any) -> CheckpointManager:
    manager = ext.session.checkpoints
    if manager is None:
        raise UsageError("checkpoints are not attached; %reload_ext kernel_ext")
    return manager


def _names(prog: str, words: list[str]) -> list[str]:
    if not words:
        raise UsageError(f"{prog}: name at least one variable")
    bad = [w for w in words if not w.isidentifier() or keyword.iskeyword(w)]
    if bad:
        raise UsageError(f"{prog}: not a variable name: {', '.join(bad)}")
    return words


def _now(m: CheckpointManager, rest: list[str]) -> None:
    if rest:
        raise UsageError("%checkpoint now takes no arguments")
    result = m.checkpoint("manual", force=True)
    if result is None:
        print("nothing to save yet: no variables and no models (no snapshot written)")
        return
    print(f"snapshot {result.snapshot}: {len(m.status['tracked'])} variable(s), "
          f"{format_bytes(result.total_bytes)} ({format_bytes(result.written_bytes)} written) in "
          f"{result.duration:.3f} s; skipped {len(m.status['skipped'])}")


def _status(m: CheckpointManager, rest: list[str]) -> None:
    if rest:
        raise UsageError("%checkpoint status takes no arguments")
    m.scan_status()
    print("\n".join(status_lines(m)))


def _list(m: CheckpointManager, rest: list[str]) -> None:
    store = m.store
    history = store.snapshots()
    if not history:
        print(f"no snapshots yet in {m.location} (%checkpoint now writes one)")
        return
    mine = m.writer_token()
    for i, sid in enumerate(history, 1):
        try:
            man = store.manifest(sid)
            size = sum(int(v.get("nbytes", 0)) for v in man["variables"].values())
            writer = man.get("writer") or {}
            other = (f", kernel pid {writer.get('pid')}"
                     if writer and writer.get("token") != mine else "")
            print(f"-{i}  {sid}  {fmt_time(man['created'])}  {len(man['variables'])} vars  "
                  f"{format_bytes(size)}  ({man.get('reason', '')}{other})")
        except Exception as e:  # noqa: BLE001 - a damaged manifest is listed, not fatal
            print(f"-{i}  {sid}  unreadable: {e}")
    for t in store.tasks():
        print(f"task {t['name']!r}: {t['done']}/{t['total']} items")


def _diff(m: CheckpointManager, rest: list[str]) -> None:
    if len(rest) > 1:
        raise UsageError("%checkpoint diff [SNAP]")
    d = m.diff(rest[0] if rest else None)
    print(f"compared with snapshot {d['snapshot'][0]}:")
    for what in ("added", "removed", "changed", "unchanged"):
        print(f"  {what} ({len(d[what])}): {', '.join(d[what]) or '-'}")


_track_parser = MagicParser("%checkpoint track")
_track_parser.add_argument("names", nargs="+")
_track_parser.add_argument("--pickle", action="store_true",
                           help="store with pickle (restoring it runs code)")


def _track(m: CheckpointManager, rest: list[str]) -> None:
    args = _track_parser.parse(" ".join(rest))
    names = _names("%checkpoint track", args.names)
    m.tracked.update(names)
    m.untracked.difference_update(names)
    if args.pickle:
        m.pickled.update(names)
        print(f"warning: {', '.join(names)} will be pickled; restoring a pickle runs code, so "
              "%resume only unpickles with --pickle. Only resume checkpoints you trust.")
    print(f"tracking {', '.join(names)}")
    undefined = [n for n in names if n not in m.user_variables()]
    if undefined:
        print(f"warning: {', '.join(undefined)} {'is' if len(undefined) == 1 else 'are'} not "
              "defined (yet): saved once defined; %checkpoint status lists it until then")


def _untrack(m: CheckpointManager, rest: list[str]) -> None:
    names = _names("%checkpoint untrack", rest)
    m.tracked.difference_update(names)
    m.pickled.difference_update(names)
    m.untracked.update(names)
    print(f"no longer saving {', '.join(names)}")


def _ignore(m: CheckpointManager, rest: list[str]) -> None:
    if len(rest) != 1:
        raise UsageError("%checkpoint ignore PATTERN (one glob pattern, e.g. 'tmp_*')")
    if rest[0] not in m.ignored:
        m.ignored.append(rest[0])
    print(f"ignoring variables matching {rest[0]!r}")


def _off(m: CheckpointManager, rest: list[str]) -> None:
    m.enabled = False
    m.status["enabled"] = False
    print("automatic checkpoints off (%checkpoint now still works)")


def _on(m: CheckpointManager, rest: list[str]) -> None:
    m.enabled = True
    m.paused = None
    m.status.update(enabled=True, paused=None)
    print(f"automatic checkpoints on (after cells, at most every "
          f"{m.config.checkpoint_interval:g} s; what waits is saved before the next cell)")
    if not m.writer:
        print(f"note: {m.status.get('writer')}; %checkpoint takeover to write from here")


def _verify(m: CheckpointManager, rest: list[str]) -> None:
    if rest:
        raise UsageError("%checkpoint verify takes no arguments")
    _report, lines = m.verify()
    print("\n".join(lines))


def _takeover(m: CheckpointManager, rest: list[str]) -> None:
    if rest:
        raise UsageError("%checkpoint takeover takes no arguments")
    print("\n".join(m.takeover()))


_TABLE: dict[str, Callable[[CheckpointManager, list[str]], None]] = {
    "now": _now, "status": _status, "list": _list, "diff": _diff, "track": _track,
    "untrack": _untrack, "ignore": _ignore, "off": _off, "on": _on, "verify": _verify,
    "takeover": _takeover,
}

_resume_parser = MagicParser("%resume")
_resume_parser.add_argument("snapshot", nargs="?", default=None,
                            help="snapshot id, unique prefix or -N (default: newest intact)")
_resume_parser.add_argument("--vars", nargs="+", default=None, help="restore only these")
_resume_parser.add_argument("--pickle", nargs="*", default=None,
                            help="allow unpickling these variables (none named: all)")


def _resume(m: CheckpointManager, line: str) -> None:
    args = _resume_parser.parse(line)
    allow: Any = ()
    if args.pickle is not None:
        allow = set(args.pickle) if args.pickle else True
    _restored, lines = m.resume(args.snapshot, args.vars, allow)
    print("\n".join(lines))


def run(ext: Any, magic: str, line: str, cell: str | None = None) -> None:
    m = _manager(ext)
    if magic == "resume":
        return _resume(m, line)
    table: dict[str, Callable[[list[str]], Any]] = {
        name: functools.partial(fn, m) for name, fn in _TABLE.items()}
    return dispatch("%checkpoint", line, table, default="status")
