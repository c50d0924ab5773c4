"""Resumable tasks: progress saved every N items / T seconds (injected clock), re-runs skip the
finished items, plain Python without a session, inside a shell with the extension loaded."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

import kernel_ext
from kernel_ext.checkpoint.store import Store
from kernel_ext.checkpoint.tasks import Task, TaskError, task
from kernel_ext.errors import KernelExtError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def stored_keys(name: str, root: Path) -> list:
    return [k for k, _fp, _v in Store(root).load_task(name)]


DEFAULT = Path(".kernel_ext/_default/checkpoints")


def test_plain_python_loop_records_and_orders_results(cwd: Path) -> None:
    t = task("squares", [3, 1, 2], progress=False)
    for item in t:
        t.record(item * item)
    assert t.results == [9, 1, 4] and t.done == 3 and len(t) == 0
    assert stored_keys("squares", cwd / DEFAULT) == [0, 1, 2]
    again = task("squares", [3, 1, 2], progress=False)
    assert list(again) == [] and again.results == [9, 1, 4] and again.restored == 3


def test_every_items_saves_during_the_loop(cwd: Path) -> None:
    t = task("n", range(10), every_items=3, every_seconds=0, progress=False)
    saved_during = []
    for i in t:
        t.record(i)
        saved_during.append(len(stored_keys("n", cwd / DEFAULT)))
    assert saved_during == [0, 0, 3, 3, 3, 6, 6, 6, 9, 9]
    assert len(stored_keys("n", cwd / DEFAULT)) == 10  # the rest when the loop ends


def test_every_seconds_uses_the_injected_clock(cwd: Path) -> None:
    clock = FakeClock()
    t = Task("timed", range(6), every_items=0, every_seconds=30, progress=False, clock=clock)
    saved = []
    for i in t:
        clock.now += 12
        t.record(i)
        saved.append(len(stored_keys("timed", cwd / DEFAULT)))
    assert saved == [0, 0, 3, 3, 3, 6]


def test_crash_mid_loop_loses_at_most_one_interval(cwd: Path) -> None:
    log = cwd / "computed.log"

    def work(stop_after: int | None) -> None:
        t = task("crashy", list(range(20)), every_items=4, progress=False)
        for item in t:
            with open(log, "a") as f:
                f.write(f"{item}\n")
            t.record(item * 10)
            if stop_after is not None and t.done == stop_after:
                os._exit(9)  # like SIGKILL: no finally, no flush
        assert t.results == [i * 10 for i in range(20)]
        os._exit(0)

    proc = mp.get_context("fork").Process(target=work, args=(11,))
    proc.start()
    proc.join()
    assert proc.exitcode == 9
    assert stored_keys("crashy", cwd / DEFAULT) == list(range(8))
    t = task("crashy", list(range(20)), every_items=4, progress=False)
    assert t.restored == 8
    for item in t:
        with open(log, "a") as f:
            f.write(f"{item}\n")
        t.record(item * 10)
    assert t.results == [i * 10 for i in range(20)]
    computed = [int(x) for x in log.read_text().split()]
    recomputed = {i for i in computed if computed.count(i) > 1}
    assert recomputed == {8, 9, 10} and sorted(set(computed)) == list(range(20))


def test_keys_fingerprints_and_array_results(cwd: Path) -> None:
    docs = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]
    t = task("docs", docs, key=lambda d: d["id"], progress=False)
    for d in t:
        t.record(None, np.full(3, ord(d["text"])))
    changed = [{"id": "a", "text": "x"}, {"id": "b", "text": "CHANGED"}]
    t2 = task("docs", changed, key=lambda d: d["id"], progress=False)
    assert [d["id"] for d in t2] == ["b"]  # only the changed item runs again
    np.testing.assert_array_equal(t2.results_by_key["a"], np.full(3, ord("x")))
    t2.record("b", np.zeros(2))
    assert len(t2.results) == 2
    t2.reset()
    assert task("docs", changed, key=lambda d: d["id"], progress=False).done == 0


def test_unstorable_results_stay_in_memory_with_a_warning(cwd: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    t = task("objs", [1, 2], progress=False)
    for i in t:
        t.record(object() if i == 1 else "fine")
    assert len(t.results) == 2
    assert "kept in memory only" in capsys.readouterr().err
    assert stored_keys("objs", cwd / DEFAULT) == [1]


@pytest.mark.parametrize("build, message", [
    (lambda: task("", [1]), "non-empty name"),
    (lambda: task("k", [1, 1], key=lambda x: x), "occurs more than once"),
    (lambda: task("k", [1], key=lambda x: 1.5), "must be str, int"),
    (lambda: task("k", [1], key="nope"), "key must be a function"),
    (lambda: task("k", [1], every_items=-1), ">= 0"),
])
def test_bad_arguments_raise_typed_errors(build, message: str) -> None:
    with pytest.raises(TaskError, match=message) as info:
        build()
    assert isinstance(info.value, KernelExtError) and isinstance(info.value, ValueError)


def test_bad_record_calls(cwd: Path) -> None:
    t = task("r", ["a"], progress=False)
    with pytest.raises(TaskError, match="outside the loop"):
        t.record(1)
    with pytest.raises(TaskError, match="no item has key 5"):
        t.record(5, 1)
    with pytest.raises(TaskError, match="record"):
        t.record(1, 2, 3)


def test_in_a_shell_tasks_use_the_notebook_store_and_emit_events(tmp_path: Path) -> None:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    config.KernelExt.state_dir = str(tmp_path / "nb")
    config.KernelExt.task_checkpoint_items = 2
    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance(config=config)
    sh.extension_manager.load_extension("kernel_ext")
    try:
        events: list = []
        kernel_ext.current_session().events.subscribe("task", events.append)
        result = sh.run_cell("import kernel_ext\nt = kernel_ext.task('sq', range(5), "
                             "progress=True)\nfor i in t:\n    t.record(i * i)\n")
        assert result.success
        assert sh.user_ns["t"].results == [0, 1, 4, 9, 16]
        assert [(e["done"], e["total"]) for e in events] == [(i, 5) for i in range(6)]
        assert stored_keys("sq", tmp_path / "nb" / "checkpoints") == list(range(5))
        # an interrupted loop is flushed by the post_run_cell hook
        sh.run_cell("u = kernel_ext.task('intr', range(5), every_items=0, every_seconds=0, "
                    "progress=False)\nfor i in u:\n    u.record(i)\n    if i == 2: raise "
                    "KeyboardInterrupt\n")
        assert stored_keys("intr", tmp_path / "nb" / "checkpoints") == [0, 1, 2]
        _, skipped = kernel_ext.current_session().checkpoints.scan()
        assert "resumable task" in skipped["t"]
    finally:
        sh.extension_manager.unload_extension("kernel_ext")
        InteractiveShell.clear_instance()


def test_damaged_progress_starts_over_with_a_warning(cwd: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    t = task("fragile", ["a", "b"], progress=False)
    for item in t:
        t.record(item.upper())
    for blob in (cwd / DEFAULT / "blobs").iterdir():
        blob.write_bytes(b"garbage")
    again = task("fragile", ["a", "b"], progress=False)
    assert again.done == 0 and list(again) == ["a", "b"]
    assert "damaged" in capsys.readouterr().err


def test_a_result_encode_chokes_on_stays_in_memory_the_others_are_saved(
        cwd: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    t = task("meta", [0, 1, 2], every_items=1, progress=False)
    for i in t:
        t.record(torch.empty(2, device="meta") if i == 1 else i)  # .to("cpu") raises
    assert len(t.results) == 3
    assert "kept in memory only" in capsys.readouterr().err
    assert stored_keys("meta", cwd / DEFAULT) == [0, 2]


def test_any_save_failure_warns_once_and_the_loop_goes_on(cwd: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    store = Store(cwd / "s")
    t = task("broken", range(4), every_items=1, progress=False, store=store)

    def fails(*args: object, **kwargs: object) -> int:  # a fault the real store cannot raise
        raise RuntimeError("backend bug")

    store.commit_task = fails  # type: ignore[method-assign]
    for i in t:
        t.record(i)
    assert t.results == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert err.count("progress not saved") == 1 and "RuntimeError: backend bug" in err
