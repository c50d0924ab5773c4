"""Resumable loops inside one cell.

::

    t = kernel_ext.task("summaries", items)
    for item in t:
        t.record(summarise(item))        # keyed by the item's index (or by key(item))
    t.results                            # results in the order of ``items``

Progress is saved to the notebook's checkpoint store every ``every_items`` items or
``every_seconds`` seconds (defaults: ``KernelExt.task_checkpoint_items`` /
``task_checkpoint_seconds``), when the loop ends or is interrupted, and after the cell — with
the same atomic protocol as snapshots, independent of the ``post_run_cell`` hook, so a kernel
that is SIGKILLed loses at most one interval. Re-running the cell (after a crash, in a fresh
kernel) skips the items already done and keeps their results. An item whose value changed
since its result was saved (for JSON-able and bytes items, which are fingerprinted) is
computed again.

Results that are JSON-able, arrays, tensors, bytes or DataFrames are saved; others stay in
memory only (a warning says so once) and would be recomputed after a crash.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import xxhash

from ..config import KernelExtConfig
from ..errors import CheckpointCorruptError, CheckpointError, KernelExtError
from ._codec import Unstorable, _is_json, encode, json_bytes
from .store import Store

__all__ = ["Task", "TaskError", "default_store", "task"]

log = logging.getLogger(__name__)


class TaskError(KernelExtError, ValueError):
    """A resumable task was used wrongly (bad name, key, or record() call)."""


def default_store(config: KernelExtConfig | None = None) -> Store:
    """The store used without a session: ``./.kernel_ext/_default/checkpoints``."""
    config = config or KernelExtConfig()
    root = config.checkpoint_url or str(Path.cwd() / ".kernel_ext" / "_default" / "checkpoints")
    return Store(root, keep=config.checkpoint_keep, key_env=config.checkpoint_key_env)


def _fingerprint(item: Any) -> str | None:
    if type(item) is bytes:
        return xxhash.xxh3_64_hexdigest(item)
    if _is_json(item):
        return xxhash.xxh3_64_hexdigest(json_bytes(item))
    return None


def _check_key(key: Any) -> Any:
    if type(key) in (str, int):
        return key
    if type(key) is tuple and all(type(k) in (str, int) for k in key):
        return key
    raise TaskError(f"task keys must be str, int or tuples of them, got {type(key).__name__} "
                    f"{key!r}; make key= return one")


class Task:
    """A resumable loop over ``items``; see the module docstring and :func:`task`.

    Attributes: ``name``, ``total``, ``done`` (items with a result), ``restored`` (results
    loaded from an earlier run), ``results`` (in item order), ``results_by_key``.
    """

    def __init__(self, name: str, items: Iterable[Any], *,
                 key: Callable[[Any], Any] | None = None, every_items: int | None = None,
                 every_seconds: float | None = None, progress: bool = True,
                 session: Any = None, store: Store | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(name, str) or not name.strip():
            raise TaskError("a task needs a non-empty name, e.g. task('summaries', items)")
        if key is not None and not callable(key):
            raise TaskError(f"key must be a function item -> key, got {type(key).__name__}")
        self.name = name
        self.items = list(items)
        keys = [_check_key(key(it)) if key is not None else i for i, it in enumerate(self.items)]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise TaskError(f"task {name!r}: key {dup!r} occurs more than once; keys must be "
                            "unique (pass key= that tells items apart)")
        self.keys = keys
        self._index = {k: i for i, k in enumerate(keys)}
        self._fps = [_fingerprint(it) for it in self.items]
        self.session = session
        config = session.config if session is not None else KernelExtConfig()
        self.every_items = int(every_items if every_items is not None
                               else config.task_checkpoint_items)
        self.every_seconds = float(every_seconds if every_seconds is not None
                                   else config.task_checkpoint_seconds)
        if self.every_items < 0 or self.every_seconds < 0:
            raise TaskError("every_items and every_seconds must be >= 0 (0: disabled)")
        self.progress = progress
        self.clock = clock
        self.store = store if store is not None else self._session_store(session, config)
        self._results: dict[Any, Any] = {}
        self._pending: list[Any] = []
        self._current: Any = None
        self._warned: set[str] = set()
        self._bar: Any = None
        self._load()
        self.restored = len(self._results)
        self._last_flush = clock()
        manager = getattr(session, "checkpoints", None)
        if manager is not None:
            manager.register_task(self)
        self._emit()

    @staticmethod
    def _session_store(session: Any, config: KernelExtConfig) -> Store:
        manager = getattr(session, "checkpoints", None)
        if manager is not None:
            return manager.store
        if session is not None:
            return Store(config.checkpoint_url or Path(session.state_dir) / "checkpoints",
                         keep=config.checkpoint_keep, key_env=config.checkpoint_key_env)
        return default_store(config)

    def _load(self) -> None:
        try:
            stored = self.store.load_task(self.name)
        except CheckpointCorruptError as e:
            self._warn_once("damaged", f"kernel_ext: task {self.name!r}: its saved progress is "
                            f"damaged ({e}); starting over")
            return
        for key, fp, value in stored:
            i = self._index.get(key)
            if i is None:
                continue
            if fp is not None and self._fps[i] is not None and fp != self._fps[i]:
                self._results.pop(key, None)  # the item changed: compute it again
                continue
            self._results[key] = value

    # --- the loop -------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return len(self.items)

    @property
    def done(self) -> int:
        return len(self._results)

    def __len__(self) -> int:
        return self.total - self.done

    def __iter__(self) -> Iterator[Any]:
        """Yield the items that have no result yet, in order."""
        self._open_bar()
        try:
            for i, item in enumerate(self.items):
                k = self.keys[i]
                if k in self._results:
                    continue
                self._current = k
                yield item
            self._current = None
        finally:
            self._current = None
            self._flush_quietly()
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def record(self, *args: Any) -> None:
        """``record(value)`` for the current item, or ``record(key, value)`` (key None: current).

        Saves progress when ``every_items`` results are pending or ``every_seconds`` passed.
        """
        if len(args) == 1:
            k, value = None, args[0]
        elif len(args) == 2:
            k, value = args
        else:
            raise TaskError("record(value) or record(key, value)")
        if k is None:
            if self._current is None:
                raise TaskError(f"task {self.name!r}: record(value) needs the loop's current "
                                "item; outside the loop use record(key, value)")
            k = self._current
        elif type(k) is list:
            k = tuple(k)
        if k not in self._index:
            raise TaskError(f"task {self.name!r}: no item has key {k!r}")
        self._results[k] = value
        self._pending.append(k)
        if self._bar is not None:
            self._bar.update(1)
        self._emit()
        if self._due():
            self._flush_quietly()

    def _due(self) -> bool:
        if self.every_items and len(self._pending) >= self.every_items:
            return True
        return bool(self.every_seconds) and self.clock() - self._last_flush >= self.every_seconds

    # --- results --------------------------------------------------------------------------------
    @property
    def results(self) -> list[Any]:
        """Results of the finished items, in the order of ``items``."""
        return [self._results[k] for k in self.keys if k in self._results]

    @property
    def results_by_key(self) -> dict[Any, Any]:
        return {k: self._results[k] for k in self.keys if k in self._results}

    # --- saving ---------------------------------------------------------------------------------
    def checkpoint(self) -> int:
        """Save pending results now; returns how many were saved. Raises CheckpointError."""
        if not self._pending:
            return 0
        entries = []
        for k in dict.fromkeys(self._pending):
            value = self._results[k]
            fp = self._fps[self._index[k]]
            if _is_json(value):
                entries.append((list(k) if isinstance(k, tuple) else k, fp, value))
                continue
            try:
                entries.append((list(k) if isinstance(k, tuple) else k, fp, encode(value)))
            except Exception as e:  # noqa: BLE001 - Unstorable, or a value encode() chokes on
                if not isinstance(e, Unstorable):
                    e = Unstorable(f"{type(e).__name__}: {e}")
                self._warn_once("unstorable", f"kernel_ext: task {self.name!r}: some results are "
                                f"kept in memory only ({e}); they are recomputed after a crash")
        self.store.commit_task(self.name, entries, total=self.total)
        self._pending.clear()
        self._last_flush = self.clock()
        return len(entries)

    def _flush_quietly(self) -> None:
        """Save pending results; a failure warns once and is published, never raised (this
        runs inside the user's loop and in the ``post_run_cell`` hook)."""
        try:
            self.checkpoint()
        except Exception as e:  # noqa: BLE001 - saving progress never breaks the user's loop
            message = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
            self._last_flush = self.clock()  # retry at the next interval, not at every item
            self._warn_once("failure", f"kernel_ext: task {self.name!r}: progress not saved: "
                            f"{message}")
            if self.session is not None:
                self.session.events.emit("checkpoint", action="failed",
                                         status={"last_failure": message, "task": self.name})
                self.session.audit.write("checkpoint.failure", task=self.name, error=message)

    def reset(self) -> None:
        """Forget every result, in memory and in the store."""
        self.store.drop_task(self.name)
        self._results.clear()
        self._pending.clear()
        self.restored = 0
        self._emit()

    # --- helpers --------------------------------------------------------------------------------
    def _warn_once(self, what: str, text: str) -> None:
        if what in self._warned:
            return
        self._warned.add(what)
        log.warning("%s", text)
        print(text, file=sys.stderr)

    def _emit(self) -> None:
        if self.session is not None:
            self.session.events.emit("task", name=self.name, done=self.done, total=self.total)

    def _open_bar(self) -> None:
        if not self.progress or self._bar is not None:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=self.total, initial=self.done, desc=self.name)

    def __repr__(self) -> str:
        return f"<Task {self.name!r}: {self.done}/{self.total} done>"


def task(name: str, items: Iterable[Any], *, key: Callable[[Any], Any] | None = None,
         every_items: int | None = None, every_seconds: float | None = None,
         progress: bool = True, session: Any = None, **kwargs: Any) -> Task:
    """A resumable loop over ``items`` named ``name`` (unique per notebook).

    ``key``: function item -> key (str/int/tuple; default: the item's index).
    ``every_items`` / ``every_seconds``: save progress this often (0 disables that trigger;
    None: the session's ``task_checkpoint_items`` / ``task_checkpoint_seconds``).
    ``progress``: show a tqdm bar. ``session``: the kernel_ext Session (None: plain Python,
    store in ``./.kernel_ext/_default``). Extra keyword arguments (``store``, ``clock``) go to
    :class:`Task`.
    """
    return Task(name, items, key=key, every_items=every_items, every_seconds=every_seconds,
                progress=progress, session=session, **kwargs)
