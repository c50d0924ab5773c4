"""Checkpoints against notebook habits in real kernels (jupyter_client), as JupyterLab runs them:
a crash inside a long cell right after a throttled change, ``%reload_ext`` then an idle kernel
then a crash, two kernels on one notebook (at once, in alternation, a takeover, the writer
dying), JupyterLab's shutdown right after a change, a flipped byte in one object, a fresh
folder. Waits are for events (output, a file changing), never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_checkpoint_lifecycle import flip_a_byte
from test_kernel_resume import execute, start, stop, wait_for_output

from kernel_ext.checkpoint.store import Store

pytestmark = pytest.mark.slow

jupyter_client = pytest.importorskip("jupyter_client")


def store_dir(tmp_path: Path) -> Path:
    return tmp_path / ".kernel_ext" / "nb" / "checkpoints"


def wait_until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``check`` (a file read) until it returns something truthy."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            result = check()
        except (OSError, ValueError, KeyError):
            result = None
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def saved(tmp_path: Path) -> dict[str, Any]:
    return Store(store_dir(tmp_path)).restore().values


def pid_of(kc: Any) -> int:
    return int(execute(kc, "import os; print(os.getpid())").strip())


def begin(kc: Any, code: str) -> str:
    """Send ``code`` without waiting for its reply (the msg id)."""
    return str(kc.execute(code))


def finish(kc: Any, msg_id: str, timeout: float = 120) -> str:
    """Everything ``msg_id`` printed, once the kernel is idle again."""
    out = []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)


def test_a_crash_inside_a_long_cell_loses_nothing_that_finished_cells_set(tmp_path: Path
                                                                          ) -> None:
    km, kc = start(tmp_path)
    try:
        execute(kc, "%load_ext kernel_ext")
        assert not (store_dir(tmp_path) / "HEAD").exists()  # a fresh folder: no snapshot
        execute(kc, "%config KernelExt.checkpoint_interval = 3600")
        execute(kc, "early = 1")
        execute(kc, "late = 2")  # held back by the interval...
        pid = pid_of(kc)
        kc.execute("import time; print('long cell started', flush=True); time.sleep(600)")
        wait_for_output(kc, "long cell started")  # ...and saved before this cell started
        os.kill(pid, signal.SIGKILL)
    finally:
        stop(km, kc)
    assert saved(tmp_path) == {"early": 1, "late": 2}

    km, kc = start(tmp_path)
    try:
        banner = execute(kc, "%load_ext kernel_ext")
        assert "the previous kernel of this notebook ended without shutting down" in banner
        assert f"pid {pid} on" in banner and "last heartbeat" in banner
        assert "It was running cell [" in banner and "time.sleep(600)" in banner
        assert "Last memory seen" in banner and "the guard's limit is" in banner
        assert "2 variables (early, late)" in banner and "saved before that cell started" in banner
        report = execute(kc, "%resume")
        assert "restored 2 variable(s)" in report and ": early, late" in report
        assert execute(kc, "print(early, late)").strip() == "1 2"
    finally:
        stop(km, kc)


def test_reload_ext_then_an_idle_kernel_then_a_crash(tmp_path: Path) -> None:
    km, kc = start(tmp_path)
    try:
        execute(kc, "%load_ext kernel_ext")
        execute(kc, "%config KernelExt.checkpoint_interval = 1")
        execute(kc, "a = 1")
        out = execute(kc, "%reload_ext kernel_ext")
        assert "loaded again in the same kernel" in out and "checkpoints go on" in out
        assert "a checkpoint exists" not in out  # its own checkpoint: saving does not pause
        execute(kc, "b = 2")  # the kernel then idles: saved once the interval has passed
        wait_until(lambda: saved(tmp_path).get("b") == 2, "the idle save of b")
        pid = pid_of(kc)
        os.kill(pid, signal.SIGKILL)
    finally:
        stop(km, kc)
    store = Store(store_dir(tmp_path))
    assert store.restore().values == {"a": 1, "b": 2}
    assert store.manifest(store.snapshots()[0])["reason"] == "idle"


def test_two_kernels_on_one_notebook(tmp_path: Path) -> None:
    first, second = start(tmp_path), start(tmp_path)
    try:
        ids = [begin(kc, "%load_ext kernel_ext") for _, kc in (first, second)]  # at once
        banners = [finish(kc, i) for (_, kc), i in zip((first, second), ids)]
        readers = [i for i, text in enumerate(banners)
                   if "another kernel writes this notebook's checkpoints" in text]
        assert len(readers) == 1, banners
        reader = (first, second)[readers[0]][1]
        writer = (first, second)[1 - readers[0]][1]
        assert not (store_dir(tmp_path) / "HEAD").exists()  # nothing set yet: no snapshot

        for kc, code in ((writer, "w1 = 1"), (reader, "r1 = 1"), (writer, "w2 = 2"),
                         (reader, "r2 = 2"), (writer, "pass")):  # in alternation
            assert "checkpoint failed" not in execute(kc, code)
        assert saved(tmp_path) == {"w1": 1, "w2": 2}  # only the writer writes

        assert "this kernel now writes the checkpoints" in execute(reader, "%checkpoint takeover")
        execute(reader, "pass")
        assert saved(tmp_path) == {"r1": 1, "r2": 2}
        told = execute(writer, "w3 = 3") + execute(writer, "pass") + execute(writer, "w4 = 4")
        assert told.count("no longer saves this notebook's checkpoints") == 1
        assert saved(tmp_path) == {"r1": 1, "r2": 2}
        listing = execute(reader, "%checkpoint list")
        assert "kernel pid" in listing  # the first writer's snapshot is still kept

        dead = pid_of(reader)
        os.kill(dead, signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(dead)
                   or psutil.Process(dead).status() == psutil.STATUS_ZOMBIE, "the kill")
        out = execute(writer, "w5 = 5")
        assert "has ended; this kernel writes them now" in out
        assert "ended without shutting down" in out
        execute(writer, "%checkpoint on")
        execute(writer, "pass")
        assert saved(tmp_path) == {f"w{i}": i for i in range(1, 6)}
    finally:
        for km, kc in (first, second):
            stop(km, kc)


def test_shutdown_right_after_a_change_then_one_flipped_byte(tmp_path: Path) -> None:
    km, kc = start(tmp_path)
    try:
        execute(kc, "%load_ext kernel_ext")
        execute(kc, "%config KernelExt.checkpoint_interval = 3600")
        execute(kc, "import numpy as np\nweights = np.arange(200_000.0)\nmeta = {'epoch': 1}")
        execute(kc, "meta = {'epoch': 2}")  # held back by the interval
    finally:
        kc.stop_channels()
        t0 = time.monotonic()
        km.shutdown_kernel(now=False)  # JupyterLab: request, then SIGTERM ~2.5 s, SIGKILL ~5 s
        took = time.monotonic() - t0
    assert took < 4.0, took  # well inside the ladder
    store = Store(store_dir(tmp_path))
    assert store.restore().values["meta"] == {"epoch": 2}
    assert store.manifest(store.snapshots()[0])["reason"] == "shutdown"
    assert json.loads((store_dir(tmp_path) / "LEASE").read_text())["released"]

    flip_a_byte(store, "weights")
    km, kc = start(tmp_path)
    try:
        banner = execute(kc, "%load_ext kernel_ext")
        assert "a checkpoint exists for this notebook" in banner
        assert "ended without shutting down" not in banner  # it was shut down cleanly
        report = execute(kc, "%resume")
        assert "restored 1 variable(s)" in report and ": meta" in report
        assert "DAMAGED, not restored: weights" in report and "snapshot 20" in report
        assert execute(kc, "print(meta)").strip() == "{'epoch': 2}"
        checked = execute(kc, "%checkpoint verify")
        assert "damaged in every kept snapshot: weights" in checked
    finally:
        stop(km, kc)
