"""Crash consistency of the commit protocol.

A forked writer is killed (os._exit through the store's step hook) at every write, rename and
fsync of a commit, and by SIGALRM at random instants; each time the parent restores exactly
the old or the new snapshot, never fill values and never an exception. EIO/ENOSPC injected
into fsync or replace never publishes a snapshot and leaves no temporary files.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import shutil
import signal
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kernel_ext.checkpoint._codec import encode
from kernel_ext.checkpoint.store import Store
from kernel_ext.errors import CheckpointError

FORK = mp.get_context("fork")
N = 20_000


def old_values() -> dict:
    return {"arr": np.full(N, 1.0), "n": 1, "raw": b"old", "same": np.arange(100)}


def new_values() -> dict:
    return {"arr": np.full(N, 2.0), "n": 2, "raw": b"new", "same": np.arange(100),
            "extra": {"k": "v"}}


def commit(store: Store, values: dict) -> str:
    return store.commit({k: encode(v) for k, v in values.items()}).snapshot


def assert_old_or_new(root: Path) -> int:
    """Restore and check it is exactly one of the two snapshots; returns its ``n``."""
    store = Store(root)
    assert list((root / "tmp").iterdir()) == []  # leftovers removed on open
    restored = store.restore()
    assert restored.notes == []
    values = restored.values
    expected = old_values() if values["n"] == 1 else new_values()
    assert set(values) == set(expected)
    for name, value in expected.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(values[name], value)
        else:
            assert values[name] == value
    return int(values["n"])


def _run_killed_at(root: Path, k: int, action: Callable[[Store], None]) -> int:
    def child() -> None:
        store = Store(root)
        steps = 0

        def on_step(name: str) -> None:
            nonlocal steps
            steps += 1
            if steps == k:
                os._exit(17)

        store.backend.on_step = on_step
        action(store)
        os._exit(0)

    proc = FORK.Process(target=child)
    proc.start()
    proc.join()
    return int(proc.exitcode or 0)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    root = tmp_path / "base"
    commit(Store(root), old_values())
    return root


def count_steps(base: Path, tmp_path: Path, action: Callable[[Store], None]) -> int:
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    store = Store(probe)
    names: list[str] = []
    store.backend.on_step = names.append
    action(store)
    assert {"write", "fsync", "replace", "fsync_dir", "rename"} <= set(names)
    return len(names)


def test_killed_at_every_step_of_a_commit_leaves_old_or_new(base: Path, tmp_path: Path) -> None:
    def action(store: Store) -> None:
        commit(store, new_values())

    total = count_steps(base, tmp_path, action)
    seen = set()
    for k in range(1, total + 2):
        run = tmp_path / f"run{k}"
        shutil.copytree(base, run)
        code = _run_killed_at(run, k, action)
        assert code == (17 if k <= total else 0)
        seen.add(assert_old_or_new(run))
        commit(Store(run), new_values())  # the store keeps working after the crash
        assert assert_old_or_new(run) == 2
        shutil.rmtree(run)
    assert seen == {1, 2}


def test_killed_at_every_step_of_a_task_commit(base: Path, tmp_path: Path) -> None:
    Store(base).commit_task("t", [(0, None, "a")], total=3)

    def action(store: Store) -> None:
        store.commit_task("t", [(1, None, "b"), (2, None, encode(np.arange(50)))], total=3)

    total = count_steps(base, tmp_path, action)
    outcomes = set()
    for k in range(1, total + 2):
        run = tmp_path / f"task{k}"
        shutil.copytree(base, run)
        _run_killed_at(run, k, action)
        entries = Store(run).load_task("t")
        keys = [e[0] for e in entries]
        assert keys in ([0], [0, 1, 2])
        if len(entries) == 3:
            np.testing.assert_array_equal(entries[2][2], np.arange(50))
        outcomes.add(len(keys))
        shutil.rmtree(run)
    assert outcomes == {1, 3}


def test_killed_at_random_instants_never_shows_a_torn_snapshot(tmp_path: Path) -> None:
    """SIGALRM (default action: terminate) fires at a random instant inside a stream of
    commits, also inside Zarr's own chunk writes, which have no step hook."""
    root = tmp_path / "rand"
    commit(Store(root), old_values())
    rng = np.random.default_rng(1234)
    probe = tmp_path / "probe"
    shutil.copytree(root, probe)
    t0 = os.times().elapsed
    commit(Store(probe), new_values())
    one_commit = max(os.times().elapsed - t0, 0.005)
    outcomes = set()
    for _ in range(60):
        delay = float(rng.uniform(0.0, 4 * one_commit))

        def child(delay: float = delay) -> None:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            store = Store(root)
            signal.setitimer(signal.ITIMER_REAL, delay)
            for i in range(4):
                values = new_values() if i % 2 == 0 else old_values()
                commit(store, values)
            os._exit(0)

        proc = FORK.Process(target=child)
        proc.start()
        proc.join()
        outcomes.add(proc.exitcode)
        assert_old_or_new(root)
    assert -signal.SIGALRM in outcomes  # some runs really were killed mid-way


@pytest.mark.parametrize("which", ["fsync", "replace"])
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_io_errors_never_publish_a_snapshot(base: Path, tmp_path: Path, which: str,
                                            code: int) -> None:
    probe = Store(base)
    calls = {"fsync": 0, "replace": 0}
    real = {"fsync": os.fsync, "replace": os.replace}

    def counting(name: str) -> Callable[..., None]:
        def call(*args: object) -> None:
            calls[name] += 1
            real[name](*args)
        return call

    shutil.copytree(base, tmp_path / "count")
    counter = Store(tmp_path / "count")
    counter.backend._os = types.SimpleNamespace(fsync=counting("fsync"),
                                                replace=counting("replace"))
    commit(counter, new_values())
    total = calls[which]
    assert total >= 3
    for k in range(1, total + 1):
        run = tmp_path / f"{which}{k}"
        shutil.copytree(base, run)
        store = Store(run)
        seen = {"n": 0}

        def failing(*args: object, k: int = k, seen: dict = seen) -> None:
            seen["n"] += 1
            if seen["n"] == k:
                raise OSError(code, os.strerror(code))
            real[which](*args)

        store.backend._os = types.SimpleNamespace(**{**real, which: failing})
        head_before = store.head()
        published = True
        try:
            commit(store, new_values())
        except CheckpointError as e:
            published = False
            assert os.strerror(code) in str(e) and "previous snapshot is intact" in str(e)
            assert isinstance(e.__cause__, OSError)
        assert not published
        assert store.head() == head_before
        assert assert_old_or_new(run) == 1
        assert list((run / "tmp").iterdir()) == []
        shutil.rmtree(run)
    assert probe.head() is not None


@pytest.mark.slow
def test_random_kills_of_whole_kernels_never_give_a_bad_restore(tmp_path: Path) -> None:
    """The crash benchmark at CI size: forked shells with the lease and make-up saves, each
    SIGKILLed at a random instant, each restore checked (benchmarks/bench_checkpoint_crash.py
    runs 200)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_checkpoint_crash",
                           "--kills", "6", "--dir", str(tmp_path)], cwd=repo,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bad restores: 0" in done.stdout
    assert "unclean ends reported by the next kernel: 5 of 5" in done.stdout
