# ruff: noqa: F811 - the fixtures `shell` and `state` come from test_checkpoint_shell
"""How checkpoints live with a notebook's habits, in a real IPython shell on a real store:
our own %%infer results saved as plain data, %reload_ext, %config state_dir after load, the
lease (one writer per store), damaged objects, a fresh folder, SIGTERM during a commit, and
what a kernel says about how its predecessor ended. (Real kernels: test_kernel_checkpoint.py.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell
from test_checkpoint_shell import (  # noqa: F401 - shell and state are fixtures
    FakeClock,
    close_shell,
    make_shell,
    manager,
    run,
    shell,
    state,
)

import kernel_ext
from kernel_ext.checkpoint import register_plain_type
from kernel_ext.checkpoint._codec import decode, encode
from kernel_ext.checkpoint.lease import Identity, Lease
from kernel_ext.checkpoint.store import Store
from kernel_ext.errors import CheckpointLeaseError
from kernel_ext.providers.base import GenerationResult


def store_at(state: Path) -> Store:
    return Store(state / "checkpoints")


def flip_a_byte(store: Store, name: str) -> None:
    """Flip one byte of the (first) stored object of variable ``name`` in the newest snapshot."""
    ref = store.manifest(store.snapshots()[0])["variables"][name]["parts"][0]
    root = Path(store.backend.root)
    path = (max((p for p in (root / "objects" / ref["hash"] / "c").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
            if ref["type"] == "array" else root / "blobs" / ref["hash"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# --- our own results ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinymodels import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", seed=1)


def test_infer_results_and_lists_of_them_are_saved_as_plain_data(shell: InteractiveShell,
                                                                 state: Path,
                                                                 tiny_model: Path) -> None:
    run(shell, f"%model load {tiny_model} --name tiny")
    run(shell, "%%infer -o answer --max-new-tokens 3 --quiet\nhello world")
    answer = shell.user_ns["answer"]
    assert type(answer).__name__ == "GenerationResult" and answer.completion_tokens >= 1
    shell.user_ns["answers"] = [answer, answer]  # what an --into list of results holds
    shell.user_ns["by_name"] = {"first": answer, "$kernel_ext": "a user key that looks like ours"}
    run(shell, "%checkpoint now")
    saved = store_at(state).restore()
    assert not saved.manifest["skipped"].get("answer"), saved.manifest["skipped"]
    assert saved.manifest["variables"]["answer"]["kind"] == "plain"
    assert not any(p["type"] == "blob" and "pickle" in json.dumps(p) for p in
                   saved.manifest["variables"]["answer"]["parts"])
    assert type(saved.values["answer"]) is GenerationResult
    assert dataclasses.asdict(saved.values["answer"]) == dataclasses.asdict(answer)
    assert saved.values["answers"] == [answer, answer]
    assert saved.values["by_name"] == shell.user_ns["by_name"]
    assert saved.values["answer"].attempts == answer.attempts  # the chain's records too


@dataclasses.dataclass
class _ResultV1:
    text: str
    tokens: int = 0


@dataclasses.dataclass
class _ResultV2:  # the same class after another engineer added a field (and one went away)
    text: str
    finish_reason: str = "stop"


def test_plain_dataclasses_survive_added_and_removed_fields() -> None:
    register_plain_type(_ResultV1, "tests.Result")
    enc = encode([_ResultV1("hi", 3)])
    tree = json.loads(enc.parts[0].data)
    assert tree[0]["fields"] == {"text": "hi", "tokens": 3}  # every field, read generically
    register_plain_type(_ResultV2, f"{_ResultV1.__module__}.{_ResultV1.__qualname__}")
    back = decode(enc.kind, enc.meta, [enc.parts[0].data])
    assert back == [_ResultV2("hi", "stop")]  # the new field takes its default


# --- extension lifecycle ------------------------------------------------------------------------
def test_reload_ext_keeps_saving_models_and_settings(state: Path, tiny_model: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sh = make_shell(state)
    try:
        m = manager()
        m.clock = clock = FakeClock()
        run(sh, f"%model load {tiny_model} --name tiny")
        run(sh, "%config KernelExt.checkpoint_interval = 60")
        run(sh, "%checkpoint ignore scratch_*")
        run(sh, "a = 1")
        capsys.readouterr()
        run(sh, "%reload_ext kernel_ext")
        out = capsys.readouterr().out
        assert "kernel_ext unloaded; model(s) tiny stay in memory" in out
        assert "loaded again in the same kernel: kept model(s) tiny (tiny active)" in out
        assert "checkpoints go on" in out
        assert "a checkpoint exists" not in out  # this kernel's own checkpoint: no pause
        new = manager()
        assert new is not m and new.paused is None and new.writer
        assert new.ignored == ["scratch_*"] and new.config.checkpoint_interval == 60
        assert kernel_ext.current_session().models.names() == ["tiny"]
        new.clock = clock
        run(sh, "b = 2")
        run(sh, "pass")  # b is made up before this cell
        saved = store_at(state).restore()
        assert saved.values["a"] == 1 and saved.values["b"] == 2
        assert [s["name"] for s in saved.manifest["session"]["models"]] == ["tiny"]
        run(sh, "%%infer --max-new-tokens 2 --quiet -o r\nhi")  # the kept model still answers
        run(sh, "%unload_ext kernel_ext")
        run(sh, "%load_ext kernel_ext")
        assert manager().writer and manager().paused is None
    finally:
        close_shell(sh)


def test_config_state_dir_after_load_moves_the_store_or_is_refused(
        shell: InteractiveShell, state: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run(shell, "a = 1")
    assert store_at(state).snapshots()
    capsys.readouterr()
    new = tmp_path / "elsewhere"
    run(shell, f"%config KernelExt.state_dir = {str(new)!r}")
    out = capsys.readouterr().out
    assert f"checkpoints now go to {new / 'checkpoints'}" in out
    assert f"the 1 snapshot(s) in {state / 'checkpoints'} stay there" in out
    assert f"audit log and offline answer cache now live in {new}" in out
    run(shell, "b = 2")
    run(shell, "pass")
    assert Store(new / "checkpoints").restore().values == {"a": 1, "b": 2}
    assert kernel_ext.current_session().audit.path == new / "audit.jsonl"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run(shell, f"%config KernelExt.state_dir = {str(blocker / 'sub')!r}")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "state_dir not changed" in out
    assert shell.run_line_magic("config", "KernelExt.state_dir") == str(new)
    assert manager().location == str(new / "checkpoints")


# --- the lease ----------------------------------------------------------------------------------
def _identity(n: int, pid: int | None = None) -> Identity:
    me = Identity.current()
    return dataclasses.replace(me, pid=pid or me.pid, instance=f"test{n}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_one_writer_per_store_takeover_and_dead_holders(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    first = Lease(root, identity=_identity(1), heartbeat_s=0.05, sample_s=0.01)
    second = Lease(root, identity=_identity(2), heartbeat_s=0.05, sample_s=0.01)
    writer, reader = Store(root, guard=first), Store(root, guard=second)
    try:
        assert first.acquire().acquired
        got = second.acquire()
        assert not got.acquired and got.holder["token"] == first.me.token
        writer.commit({"a": encode(1)})
        with pytest.raises(CheckpointLeaseError, match="takeover"):
            reader.commit({"b": encode(2)})
        with pytest.raises(CheckpointLeaseError):
            reader.collect()  # a reader never deletes
        assert reader.restore().values == {"a": 1}  # but reads
        took = second.acquire(takeover=True)
        assert took.acquired and took.took_over and not took.unclean
        with pytest.raises(CheckpointLeaseError):
            writer.commit({"a": encode(3)})  # the former writer stops at its next publish
        assert not first.held and first.lost_to["token"] == second.me.token
        reader.commit({"b": encode(2)})
        assert Store(root).restore().values == {"b": 2}
        second.note_cell({"count": 7, "source": "train()", "started": time.time()})
        deadline = time.time() + 5
        while (second.read() or {}).get("cell") is None and time.time() < deadline:
            time.sleep(0.01)
        assert second.read()["cell"]["source"] == "train()"  # the heartbeat wrote it
    finally:
        first.release()
        second.release()
    assert second.read()["released"] is not None
    # a holder whose process is gone is taken over at once, and reported as an unclean end
    ghost = Lease(root, identity=_identity(3, pid=_dead_pid()))
    ghost._write({**ghost._record(None), "cell": {"count": 3, "source": "x = big()"}})
    third = Lease(root, identity=_identity(4))
    got = third.acquire()
    try:
        assert got.acquired and got.unclean and got.previous["cell"]["source"] == "x = big()"
    finally:
        third.release()


def test_a_second_shell_reads_and_takes_over_when_asked(state: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    holder = Lease(str(state / "checkpoints"), identity=_identity(9))
    assert holder.acquire().acquired
    try:
        sh = make_shell(state)
        try:
            out = capsys.readouterr().out
            assert out.count("another kernel writes this notebook's checkpoints") == 1
            assert "%checkpoint takeover" in out
            run(sh, "mine = 1")
            assert not store_at(state).snapshots()  # a reader writes nothing
            run(sh, "%checkpoint status")
            assert "writer: another kernel: kernel pid" in capsys.readouterr().out
            run(sh, "%checkpoint takeover")
            assert "this kernel now writes the checkpoints" in capsys.readouterr().out
            run(sh, "pass")
            assert store_at(state).restore().values == {"mine": 1}
            assert not holder.held or holder.read()["token"] != holder.me.token
        finally:
            close_shell(sh)
    finally:
        holder.release()


# --- damage -------------------------------------------------------------------------------------
def test_one_flipped_byte_costs_only_its_variable_and_is_never_published_poorer(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sh = make_shell(state)
    try:
        run(sh, "import numpy as np\nweights = np.arange(100_000.0)\nnotes = {'k': 'v'}\nn = 1")
        run(sh, "%checkpoint now")
        run(sh, "n = 2")
        run(sh, "%checkpoint now")  # weights is shared by both snapshots
        flip_a_byte(store_at(state), "weights")
        run(sh, "%checkpoint verify")
        out = capsys.readouterr().out
        assert "damaged: weights" in out and "damaged in every kept snapshot: weights" in out
        assert "repaired: weights (rewritten from the value this kernel holds)" in out
        assert "verdict after the repair: all intact" in out
        flip_a_byte(store_at(state), "weights")
    finally:
        close_shell(sh)
    sh = make_shell(state)
    try:
        capsys.readouterr()
        run(sh, "%resume")
        out = capsys.readouterr().out
        assert "restored 2 variable(s)" in out and ": n, notes" in out
        assert "DAMAGED, not restored: weights" in out and "snapshot " in out
        assert sh.user_ns["n"] == 2 and "weights" not in sh.user_ns
        run(sh, "extra = 1")
        run(sh, "%checkpoint now")
        newest = store_at(state).manifest(store_at(state).snapshots()[0])
        assert "weights" in newest["variables"]  # kept, not dropped from the newer snapshot
        run(sh, "%checkpoint status")
        assert "weights: DAMAGED in every kept snapshot" in capsys.readouterr().out
    finally:
        close_shell(sh)


# --- nothing to save ----------------------------------------------------------------------------
def test_fresh_folder_writes_no_snapshot_and_resume_says_so(shell: InteractiveShell,
                                                            state: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    run(shell, "import os\ndef helper(): pass")
    run(shell, "%checkpoint now")
    assert "nothing to save yet" in capsys.readouterr().out
    assert store_at(state).snapshots() == []
    run(shell, "%resume")
    out = capsys.readouterr().out
    assert "no checkpoint yet for this notebook" in out and "restored 0" not in out


# --- small truths -------------------------------------------------------------------------------
def test_tracking_an_undefined_name_warns(shell: InteractiveShell,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run(shell, "%checkpoint track nonexistent_var")
    out = capsys.readouterr().out
    assert "tracking nonexistent_var" in out and "warning: nonexistent_var is not defined" in out


def test_a_failure_is_printed_once_not_logged_twice(shell: InteractiveShell,
                                                    caplog: pytest.LogCaptureFixture,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import errno
    import types

    m = manager()

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    m.store.backend._os = types.SimpleNamespace(fsync=disk_full, replace=os.replace)
    with caplog.at_level(logging.WARNING):
        run(shell, "a = 1")
    err = capsys.readouterr().err
    assert err.count("checkpoint failed") == 1
    assert not [r for r in caplog.records if "checkpoint failed" in r.getMessage()]


# --- SIGTERM during a commit --------------------------------------------------------------------
_SIGTERM_CHILD = """
import os, signal, sys, numpy as np
from kernel_ext.checkpoint._codec import encode
from kernel_ext.checkpoint import manager as manager_module
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config
import kernel_ext
c = Config(); c.HistoryManager.enabled = False
c.KernelExt.state_dir = sys.argv[1]; c.KernelExt.checkpoint_interval = 3600.0
manager_module.SIGTERM_BUDGET_S = float(sys.argv[2])
sh = InteractiveShell.instance(config=c)
sh.extension_manager.load_extension("kernel_ext")
m = kernel_ext.current_session().checkpoints
sh.run_cell("import numpy as np\\nx = np.zeros(1000)")
sh.run_cell("x = np.ones(1000)\\ny = 'new'")  # throttled: pending
steps = []
def on_step(name):
    steps.append(name)
    if len(steps) == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the commit
    if len(steps) > 2 and float(sys.argv[2]) < 0.5:
        import time; time.sleep(0.2)  # a slow disk: the budget runs out
m.store.backend.on_step = on_step
sh.run_cell("pass")  # its pre_run_cell commits the pending change
print("still alive", flush=True)
"""


@pytest.mark.parametrize("budget, outcome", [(2.0, "finished"), (0.1, "abandoned")])
def test_sigterm_during_a_commit_finishes_or_abandons_it_atomically(tmp_path: Path,
                                                                    budget: float,
                                                                    outcome: str) -> None:
    done = subprocess.run([sys.executable, "-c", _SIGTERM_CHILD, str(tmp_path / "st"),
                           str(budget)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == -signal.SIGTERM, done.stderr  # it did terminate...
    assert "still alive" not in done.stdout
    restored = Store(tmp_path / "st" / "checkpoints").restore()  # ...leaving a whole snapshot
    if outcome == "finished":
        assert restored.values["y"] == "new" and restored.values["x"][0] == 1.0
    else:
        assert "y" not in restored.values and restored.values["x"][0] == 0.0
    assert [p.name for p in (tmp_path / "st" / "checkpoints" / "tmp").iterdir()] == []
    lease = json.loads((tmp_path / "st" / "checkpoints" / "LEASE").read_text())
    assert lease["released"] is not None  # a clean end: the next kernel reports no crash


# --- how the previous kernel ended --------------------------------------------------------------
def test_a_fresh_kernel_says_how_the_previous_one_ended(state: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    sh = make_shell(state)
    run(sh, "early = 1")
    close_shell(sh)
    root = str(state / "checkpoints")
    ghost = Lease(root, identity=_identity(5, pid=_dead_pid()))
    total = 24 << 30
    memory = {"ts": time.time() - 30, "rss": int(total * 0.93), "peak_rss": int(total * 0.95),
              "ram_total": total, "ram_available": 300 << 20, "cgroup_limit": None,
              "oom_kills": None, "fraction": 0.8, "limit": int(total * 0.8), "gpus": []}
    ghost._write({**ghost._record(None), "heartbeat": time.time() - 30, "memory": memory,
                  "cell": {"count": 12, "source": "big = load_everything()",
                           "started": time.time()}})
    capsys.readouterr()
    sh = make_shell(state)
    try:
        out = capsys.readouterr().out
        assert "the previous kernel of this notebook ended without shutting down" in out
        assert "last heartbeat" in out and "s ago" in out
        assert "It was running cell [12]" in out and "big = load_everything()" in out
        assert "probably killed for memory" in out and "guard's limit is 19.2 GiB (80%)" in out
        assert "Newest snapshot:" in out and "1 variables (early)" in out
        assert "saved before that cell started" in out
        assert manager().paused  # another kernel's checkpoint: waits for %resume
        records = kernel_ext.current_session().audit.read("checkpoint.unclean_end")
        assert records and records[-1]["previous"]["cell"]["count"] == 12
    finally:
        close_shell(sh)

