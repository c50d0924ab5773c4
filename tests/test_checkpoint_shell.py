"""The checkpoint hook and every %checkpoint / %resume subcommand in a real InteractiveShell."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import kernel_ext
from kernel_ext.checkpoint.manager import CheckpointManager
from kernel_ext.checkpoint.store import Store


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ManualLoop:
    """Stands in for the kernel's event loop: the test runs what was scheduled."""

    available = True
    description = "on a test loop"

    def __init__(self) -> None:
        self.calls: list[tuple[float, Any]] = []

    @property
    def delays(self) -> list[float]:
        return [d for d, _ in self.calls]

    def call_later(self, delay: float, fn: Any) -> Any:
        entry = (delay, fn)
        self.calls.append(entry)
        return entry

    def cancel(self, handle: Any) -> None:
        if handle in self.calls:
            self.calls.remove(handle)

    def add_callback(self, fn: Any) -> bool:
        fn()
        return True

    def fire(self) -> None:
        calls, self.calls = self.calls, []
        for _, fn in calls:
            fn()


def make_shell(state: Path, **settings: Any) -> InteractiveShell:
    config = Config()
    config.HistoryManager.enabled = False
    config.KernelExt.state_dir = str(state)
    for name, value in settings.items():
        setattr(config.KernelExt, name, value)
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance(config=config)
    shell.extension_manager.load_extension("kernel_ext")
    return shell


def close_shell(shell: InteractiveShell) -> None:
    shell.extension_manager.unload_extension("kernel_ext")
    InteractiveShell.clear_instance()


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    return tmp_path / "state"


@pytest.fixture
def shell(state: Path) -> Iterator[InteractiveShell]:
    sh = make_shell(state)
    yield sh
    close_shell(sh)


def manager() -> CheckpointManager:
    return kernel_ext.current_session().checkpoints


def run(shell: InteractiveShell, code: str) -> Any:
    result = shell.run_cell(code)
    if result.error_in_exec is not None:
        raise result.error_in_exec
    if result.error_before_exec is not None:
        raise result.error_before_exec
    return result.result


def snapshots(state: Path) -> list[str]:
    return Store(state / "checkpoints").snapshots()


def test_hook_is_registered_and_unregistered_exactly(state: Path) -> None:
    sh = make_shell(state)
    m = manager()
    assert m.triggers.post_run_cell in sh.events.callbacks["post_run_cell"]
    before = signal.getsignal(signal.SIGTERM)
    assert before == m.triggers.on_sigterm
    close_shell(sh)
    assert m.triggers.post_run_cell not in sh.events.callbacks["post_run_cell"]
    assert signal.getsignal(signal.SIGTERM) != m.triggers.on_sigterm


def test_after_cells_at_most_every_interval_and_throttled_changes_are_made_up(
        shell: InteractiveShell, state: Path) -> None:
    m = manager()
    clock = FakeClock()
    m.clock = clock
    m.loop = loop = ManualLoop()
    events: list[dict] = []
    m.session.events.subscribe("checkpoint", events.append)
    run(shell, "import numpy as np\na = np.arange(10)\nb = {'k': [1, 2]}")
    assert len(snapshots(state)) == 1
    run(shell, "a[0] = 5")  # within the interval: not saved after this cell...
    assert len(snapshots(state)) == 1 and m.status["pending"]
    assert loop.delays == [5.0]  # ...an idle save waits for the interval's end...
    shell.user_ns["Store"] = Store
    run(shell, f"seen = int(Store({str(state / 'checkpoints')!r}).restore().values['a'][0])")
    assert shell.user_ns["seen"] == 5  # ...or the next cell saves it before it starts
    assert len(snapshots(state)) == 2
    run(shell, "c = 'text'")  # (this cell first saves `seen`)
    assert len(snapshots(state)) == 3
    loop.fire()  # too early: waits for the rest of the interval
    assert len(snapshots(state)) == 3 and loop.delays == [5.0]
    clock.now += 5.0
    loop.fire()  # idle, the interval has passed: saved without another cell
    assert len(snapshots(state)) == 4 and not loop.calls and not m.status["pending"]
    assert Store(state / "checkpoints").restore().values["c"] == "text"
    clock.now += 5.0
    run(shell, "x = 1; del x")  # nothing changed: skipped, no new snapshot
    assert len(snapshots(state)) == 4
    assert [e["action"] for e in events] == ["committed"] * 4 + ["skipped"]
    status = events[-1]["status"]
    assert status["tracked"] == ["a", "b", "c", "seen"]
    assert status["skipped"]["np"].startswith("module")
    assert status["size_bytes"] > 0 and status["last_time"] is not None
    audit = m.session.audit.read("checkpoint.commit")
    assert [r["reason"] for r in audit] == ["cell", "before cell", "before cell", "idle"]
    assert audit[0]["skipped"]["np"].startswith("module")  # reasons, not just names


def test_idle_save_never_runs_while_a_cell_does(shell: InteractiveShell, state: Path) -> None:
    """An async cell awaits on the kernel's loop: a due idle save must wait for it to end."""
    m = manager()
    m.clock = clock = FakeClock()
    m.loop = loop = ManualLoop()
    run(shell, "a = 1")
    run(shell, "a = 2")
    clock.now += 10
    m.triggers.pre_run_cell()  # a cell starts (its pre_run_cell makes up `a = 2` first)
    assert Store(state / "checkpoints").restore().values["a"] == 2
    shell.user_ns["a"] = 3
    m.triggers.dirty = True
    loop.fire()
    assert Store(state / "checkpoints").restore().values["a"] == 2  # not while it runs
    m.triggers.post_run_cell()  # the cell ended: the idle save waits for the interval's end
    clock.now += 5
    loop.fire()
    assert Store(state / "checkpoints").restore().values["a"] == 3


def test_default_tracking_skips_code_models_and_ipython_names(shell: InteractiveShell) -> None:
    run(shell, textwrap.dedent("""
        import torch, functools
        class K: pass
        def f(): pass
        lin = torch.nn.Linear(2, 2)
        part = functools.partial(f)
        _private = 1
        obj = K()
        tup = (1, 2)
        ok = [1, 2]
        t = torch.ones(2)
    """))
    m = manager()
    encoded, skipped = m.scan()
    assert sorted(encoded) == ["ok", "t"]
    assert skipped["lin"].startswith("model object")
    assert skipped["K"].startswith("class") and skipped["f"].startswith("function")
    assert skipped["part"].startswith("function") and skipped["torch"].startswith("module")
    assert "tuple" in skipped["tup"] and "--pickle" in skipped["obj"]
    for name in ("In", "Out", "exit", "quit", "get_ipython", "_private", "_ih", "_oh", "_dh"):
        assert name not in encoded and name not in skipped


def test_every_subcommand(shell: InteractiveShell, state: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    m = manager()
    m.clock = FakeClock()
    run(shell, "x = [1, 2]\ny = b'raw'\ntmp_a = 1\ntmp_b = 2")
    capsys.readouterr()
    run(shell, "%checkpoint status")
    out = capsys.readouterr().out
    assert "checkpoints: on" in out and "tracked (4): tmp_a, tmp_b, x, y" in out
    run(shell, "%checkpoint ignore tmp_*")
    run(shell, "%checkpoint untrack y")
    run(shell, "%checkpoint now")
    out = capsys.readouterr().out
    assert "2 variable(s)" in out or "1 variable(s)" in out
    latest = Store(state / "checkpoints").restore()
    assert set(latest.values) == {"x"}
    assert "ignored by pattern 'tmp_*'" in latest.manifest["skipped"]["tmp_a"]
    assert latest.manifest["skipped"]["y"].startswith("untracked")
    run(shell, "get_ipython().run_line_magic('checkpoint', 'track y tmp_a')\nx.append(3)\n"
               "get_ipython().run_line_magic('checkpoint', 'diff')")  # before any make-up save
    out = capsys.readouterr().out
    assert "added (2): tmp_a, y" in out and "changed (1): x" in out
    run(shell, "%checkpoint now")
    run(shell, "%checkpoint list")
    out = capsys.readouterr().out
    kept = len(snapshots(state))
    assert kept >= 3 and out.count(" vars ") == kept and "-1  " in out and f"-{kept}  " in out
    first = snapshots(state)[-1]
    run(shell, f"%checkpoint diff {first[:20]}")
    assert "compared with snapshot " + first in capsys.readouterr().out
    run(shell, "%checkpoint off")
    m.clock.now += 100
    head = snapshots(state)[0]
    run(shell, "z = 1")
    assert snapshots(state)[0] == head and "checkpoints: off" in _status(shell, capsys)
    run(shell, "%checkpoint on")
    m.clock.now += 100
    run(shell, "z = 2")
    assert snapshots(state)[0] != head
    assert Store(state / "checkpoints").restore().values["z"] == 2


def _status(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    run(shell, "%checkpoint status")
    return capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ("%checkpoint bogus", "unknown subcommand 'bogus'"),
    ("%checkpoint track", "required: names"),
    ("%checkpoint untrack", "name at least one variable"),
    ("%checkpoint track 1abc", "not a variable name"),
    ("%checkpoint ignore", "one glob pattern"),
    ("%checkpoint diff", "no checkpoint yet"),
    ("%checkpoint diff nosuch", "no checkpoint yet"),
    ("%resume --bogus", "unrecognized arguments"),
])
def test_bad_input_is_a_short_usage_error(shell: InteractiveShell, line: str,
                                          message: str) -> None:
    from IPython.core.error import UsageError

    manager().enabled = False
    with pytest.raises(UsageError, match=message):
        run(shell, line)


def test_failures_warn_once_and_stay_visible(shell: InteractiveShell, state: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    m = manager()
    clock = FakeClock()
    m.clock = clock
    run(shell, "a = [1]")
    events: list[dict] = []
    m.session.events.subscribe("checkpoint", events.append)

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    m.store.backend._os = types.SimpleNamespace(fsync=disk_full, replace=os.replace)
    capsys.readouterr()
    for i in range(3):
        clock.now += 10
        result = shell.run_cell(f"a.append({i})")
        assert result.success  # the user's cell is never broken by the hook
    err = capsys.readouterr().err
    assert err.count("checkpoint failed") == 1 and "No space left" in err
    assert [e["action"] for e in events] == ["failed"] * 3
    assert "No space left" in m.status["last_failure"] and m.status["failures"] == 3
    assert len(m.session.audit.read("checkpoint.failure")) == 3
    assert "last failure (3 in all)" in _status(shell, capsys)
    assert Store(state / "checkpoints").restore().values["a"] == [1]
    m.store.backend._os = types.SimpleNamespace(fsync=os.fsync, replace=os.replace)
    clock.now += 10
    run(shell, "a.append(9)")  # the pending change is made up first, then this one waits
    assert m.status["last_failure"] is None
    assert Store(state / "checkpoints").restore().values["a"] == [1, 0, 1, 2]
    run(shell, "pass")
    assert Store(state / "checkpoints").restore().values["a"] == [1, 0, 1, 2, 9]


def test_fresh_kernel_announces_checkpoint_pauses_and_resumes(state: Path,
                                                              capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    sh = make_shell(state)
    run(sh, "import numpy as np\nw = np.ones((3, 3))\nmeta = {'epoch': 7}")
    run(sh, "%checkpoint ignore scratch*")
    run(sh, "%checkpoint now")
    close_shell(sh)
    capsys.readouterr()
    sh = make_shell(state)
    try:
        out = capsys.readouterr().out
        assert "a checkpoint exists for this notebook" in out and "2 variables" in out
        assert "%resume" in out
        n = len(snapshots(state))
        run(sh, "w = None")  # paused: the old snapshot is not pushed out
        assert len(snapshots(state)) == n and manager().paused
        run(sh, "%resume --vars meta")
        assert sh.user_ns["meta"] == {"epoch": 7} and sh.user_ns["w"] is None
        run(sh, "%resume")
        out = capsys.readouterr().out
        assert "restored 2 variable(s)" in out
        assert (sh.user_ns["w"] == 1).all() and manager().paused is None
        assert manager().ignored == ["scratch*"]  # settings come back with the snapshot
        assert manager().session.audit.read("checkpoint.restore")
    finally:
        close_shell(sh)


def test_resume_calls_session_restore_state(state: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    sh = make_shell(state)
    session = manager().session
    session.state = lambda: {"models": [{"name": "m", "sha256": "ab"}]}
    run(sh, "v = 1")
    run(sh, "%checkpoint now")
    close_shell(sh)
    sh = make_shell(state)
    try:
        seen: list[dict] = []
        session = manager().session

        def restore_state(state_: dict) -> list[str]:
            seen.append(state_)
            return ["reloaded model m (sha256 ok)"]

        session.restore_state = restore_state
        capsys.readouterr()
        run(sh, "%resume")
        assert seen == [{"models": [{"name": "m", "sha256": "ab"}]}]
        assert "reloaded model m" in capsys.readouterr().out
    finally:
        close_shell(sh)


def test_pickle_opt_in_is_needed_to_run_code_on_resume(state: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    marker = tmp_path / "code-ran"
    sh = make_shell(state)
    run(sh, textwrap.dedent(f"""
        from pathlib import Path
        class RunsCode:
            def __reduce__(self):
                return (Path.touch, (Path({str(marker)!r}),))
        evil = RunsCode()
        plain = 1
    """))
    run(sh, "%checkpoint now")
    assert Store(state / "checkpoints").restore().manifest["skipped"]["evil"]
    run(sh, "%checkpoint track evil --pickle")
    assert "restoring a pickle runs code" in capsys.readouterr().out
    run(sh, "%checkpoint now")
    close_shell(sh)
    sh = make_shell(state)
    try:
        run(sh, "%resume")
        out = capsys.readouterr().out
        assert "not restored: evil" in out and "--pickle evil" in out
        assert not marker.exists() and "evil" not in sh.user_ns
        run(sh, "x = 1")  # the hook saves again: the refused pickle is carried over, not lost
        run(sh, "%checkpoint now")
        assert Store(state / "checkpoints").manifest(snapshots(state)[0])["variables"]["evil"]
        run(sh, "%resume --pickle evil")
        assert marker.exists()
    finally:
        close_shell(sh)


def test_sigterm_saves_then_chains_to_the_previous_handler(state: Path) -> None:
    calls: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        sh = make_shell(state)
        m = manager()
        m.enabled = True
        m.clock = FakeClock()
        run(sh, "data = [1, 2, 3]")
        run(sh, "data.append(4)")  # within the interval: not saved by the hook
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
        restored = Store(state / "checkpoints").restore()
        assert restored.values["data"] == [1, 2, 3, 4]
        assert restored.manifest["reason"] == "sigterm"
        close_shell(sh)
        assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) not in (m.triggers.on_sigterm, None)
    finally:
        signal.signal(signal.SIGTERM, original)


def test_exit_saves_the_last_changes(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config
        c = Config(); c.HistoryManager.enabled = False
        c.KernelExt.state_dir = {str(tmp_path / 'st')!r}
        c.KernelExt.checkpoint_interval = 3600.0
        sh = InteractiveShell.instance(config=c)
        sh.extension_manager.load_extension("kernel_ext")
        sh.run_cell("import numpy as np; v = [1]; a = np.zeros(100_000)")
        sh.run_cell("v.append(2); a[0] = 5.0")  # not due: saved at exit (Zarr + fsync threads)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, timeout=120,
                          capture_output=True, text=True, check=True)
    assert "checkpoint failed" not in done.stderr
    restored = Store(tmp_path / "st" / "checkpoints").restore()
    assert restored.values["v"] == [1, 2] and restored.manifest["reason"] == "exit"
    assert restored.values["a"][0] == 5.0


def test_checkpoint_url_memory(state: Path) -> None:
    import uuid

    url = f"memory://kext-shell-{uuid.uuid4().hex}"
    sh = make_shell(state, checkpoint_url=url)
    try:
        run(sh, "q = {'a': 1}")
        assert Store(url).restore().values["q"] == {"a": 1}
        assert not (state / "checkpoints").exists()
    finally:
        close_shell(sh)


def test_one_bad_variable_is_skipped_and_the_rest_saved(shell: InteractiveShell, state: Path
                                                        ) -> None:
    run(shell, "import torch\nbad = torch.empty(3, device='meta')\ngood = [1]")
    run(shell, "%checkpoint now")
    latest = Store(state / "checkpoints").restore()
    assert set(latest.values) == {"good"}
    assert "NotImplementedError" in latest.manifest["skipped"]["bad"]
    assert manager().status["last_failure"] is None


def test_restore_never_replaces_ipython_names(shell: InteractiveShell, state: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from kernel_ext.checkpoint._codec import encode

    forged = {"x": 1, "get_ipython": "pwned", "In": [], "exit": 0, "__builtins__": {}}
    Store(state / "checkpoints").commit({n: encode(v) for n, v in forged.items()})
    capsys.readouterr()
    run(shell, "%resume")
    out = capsys.readouterr().out
    ns = shell.user_ns
    assert ns["x"] == 1 and callable(ns["get_ipython"]) and ns["In"] != []
    assert ns["exit"] != 0 and not isinstance(ns["__builtins__"], dict)
    assert "not restored: get_ipython: not a user variable name" in out


def test_checkpoint_enabled_setting_works_at_any_time(shell: InteractiveShell, state: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    m = manager()
    m.clock = clock = FakeClock()
    run(shell, "a = 1")
    assert len(snapshots(state)) == 1
    run(shell, "%config KernelExt.checkpoint_enabled = False")
    clock.now += 100
    run(shell, "a = 2")
    assert len(snapshots(state)) == 1 and "checkpoints: off" in _status(shell, capsys)
    run(shell, "%config KernelExt.checkpoint_enabled = True")
    clock.now += 100
    run(shell, "a = 3")
    assert Store(state / "checkpoints").restore().values["a"] == 3


def test_status_is_truthful_without_encoding_bulk_data(shell: InteractiveShell,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """%checkpoint status names what a save would skip, with the save's own reasons (issue 9
    item 5: categorical columns, tuple column labels), but copies and hashes no array data."""
    import kernel_ext.checkpoint._codec as codec

    manager().enabled = False
    run(shell, "import numpy as np, pandas as pd, torch\nw = np.ones(4)\nt = torch.ones(2)\n"
               "b = b'x'\nn = [1]\nobj = object()\n"
               "df = pd.DataFrame({'x': np.arange(3.0), 's': ['a', None, 'c']})\n"
               "cat = pd.DataFrame({'c': pd.Categorical(['a', 'b'])})\n"
               "tup = pd.DataFrame({('a', 'b'): [1, 2]})\n"
               "objcol = pd.DataFrame({'o': [object(), 1]})")
    touched: list[str] = []
    for name in ("_array_part", "_blob_part", "_encode_frame"):
        real = getattr(codec, name)
        monkeypatch.setattr(codec, name, lambda *a, _n=name, _r=real, **k: (touched.append(_n),
                                                                           _r(*a, **k))[1])
    out = _status(shell, capsys)
    assert "tracked (5): b, df, n, t, w" in out and "obj: object is not a storable kind" in out
    assert "cat: DataFrame column 'c' has extension dtype category" in out
    assert "tup: DataFrame with non-unique or non-string/int column labels" in out
    assert "objcol: DataFrame column 'o' of dtype object holds values that are not" in out
    assert "_array_part" not in touched and "_encode_frame" not in touched
    monkeypatch.undo()
    run(shell, "%checkpoint now")
    saved = Store(manager().location).restore()
    assert sorted(saved.values) == ["b", "df", "n", "t", "w"]
    assert set(saved.manifest["skipped"]) >= {"cat", "tup", "objcol", "obj"}
    assert manager().status["skipped"]["cat"] == saved.manifest["skipped"]["cat"]


def test_bad_store_url_leaves_the_extension_loaded_with_checkpoints_off(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sh = make_shell(state, checkpoint_url="bogus-proto://x")
    try:
        err = capsys.readouterr().err
        assert err.count("checkpoints are off") == 1 and "Protocol not known" in err
        run(sh, "a = 1")  # the hook stays quiet
        out = _status(sh, capsys)
        assert "checkpoints: off" in out and "last failure" in out and "Protocol not known" in out
        assert "checkpoint failed" not in capsys.readouterr().err
    finally:
        close_shell(sh)


def test_malformed_manifest_does_not_break_a_fresh_kernel(state: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    sh = make_shell(state)
    run(sh, "a = 1")
    close_shell(sh)
    sid = snapshots(state)[0]
    (state / "checkpoints" / "snapshots" / f"{sid}.json").write_text('{"variables": {}}')
    capsys.readouterr()
    sh = make_shell(state)
    try:
        assert f"a checkpoint exists for this notebook ({sid})" in capsys.readouterr().out
    finally:
        close_shell(sh)
