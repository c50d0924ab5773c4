"""Alerts (raised once, in the cell, the dashboard and the audit log) and traces (a correlation id
per cell on every record it causes, sent to a real HTTP server as X-Request-ID), in a real
IPython shell with kernel_ext loaded."""

from __future__ import annotations

import errno
import json
import os
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from openai_stub import OpenAIStub
from tinymodels import write_tiny_llama

import kernel_ext
from kernel_ext.audit import AuditLog, metrics


@pytest.fixture
def shell(ip: InteractiveShell) -> InteractiveShell:
    """conftest's fresh shell with kernel_ext (working in tmp_path), configured for these tests."""
    for setting in (
        "retry_attempts = 1",
        "breaker_consecutive_failures = 2",
        "breaker_open_seconds = 3600.0",
        "checkpoint_interval = 0.0",
    ):
        ip.run_line_magic("config", f"KernelExt.{setting}")
    return ip


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub(answer="Paris is the capital of France.") as s:
        yield s


def run(shell: InteractiveShell, code: str) -> Any:
    result = shell.run_cell(code)
    if result.error_in_exec is not None:
        raise result.error_in_exec
    if result.error_before_exec is not None:
        raise result.error_before_exec
    return result.result


def session() -> Any:
    return kernel_ext.current_session()


def banner_of(dash: Any) -> str:
    return str(dash.banner.get_state()["value"])


@pytest.fixture
def dash(shell: InteractiveShell) -> Iterator[Any]:
    """A live %dashboard of the shell's session (updated by events, no timer)."""
    from widgets.dashboard import Dashboard

    board = Dashboard(session(), interval=0)
    board.start()
    try:
        yield board
    finally:
        board.close()


# --- traces --------------------------------------------------------------------------------------
def test_correlation_id_reaches_the_server_and_every_record_of_the_cell(
    shell: InteractiveShell, stub: OpenAIStub
) -> None:
    run(shell, f"%model remote stub --url {stub.url}")
    run(shell, "%%infer --model stub --max-new-tokens 3\nWhat is the capital of France?")
    cid = session().trace.cell_id
    assert cid and str(uuid.UUID(cid)) == cid  # a UUID: servers validate X-Request-ID
    assert stub.requests[-1]["request_id"] == cid  # the real HTTP request carried it
    [rec] = session().audit.read("infer")
    assert rec["correlation_id"] == cid and rec["v"] == 1
    # a failing cell: its breaker transition carries that cell's (new) id
    stub.script(500, 500)  # two failing cells (one attempt each) trip the breaker
    ids = []
    for _ in range(2):
        assert not shell.run_cell("%%infer --model stub --max-new-tokens 3\nAgain?").success
        ids.append(session().trace.cell_id)
    assert len({cid, *ids}) == 3
    assert [r["request_id"] for r in stub.requests[-2:]] == ids
    [trip] = [r for r in session().audit.read("breaker") if r["new"] == "open"]
    assert trip["correlation_id"] == ids[1]
    assert [r["correlation_id"] for r in session().audit.read("infer")] == [cid, *ids]
    run(shell, "%breaker reset stub")
    assert all(r.get("correlation_id") for r in session().audit.read())


def test_load_and_checkpoint_records_carry_the_cell_id(shell: InteractiveShell,
                                                       tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    run(shell, f"%model load {model} --name tiny --no-progress\nx = 1")
    cid = session().trace.cell_id
    load = session().audit.read("model.load")[-1]
    commit = session().audit.read("checkpoint.commit")[-1]  # written in post_run_cell
    assert load["correlation_id"] == commit["correlation_id"] == cid


def test_audit_records_follow_the_documented_schema(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", correlation=lambda: "c0ffee")
    log.write("model.load", name="m", duration_s=1.5)
    log.write("infer", correlation_id="explicit", latency_s=0.2, outcome="ok")
    a, b = (json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines())
    assert list(a)[:4] == ["v", "ts", "kind", "correlation_id"]
    assert a["correlation_id"] == "c0ffee" and b["correlation_id"] == "explicit"


def test_audit_log_rotates_by_size_and_reads_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2000, backups=2)
    for i in range(100):
        log.write("infer", i=i, latency_s=float(i), outcome="ok", pad="x" * 40)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    seen = [r["i"] for r in log.read()]
    assert seen == sorted(seen) and seen[-1] == 99 and len(seen) < 100  # oldest dropped
    assert metrics(log.read())["inferences"] == len(seen)


def test_audit_metrics_show_percentiles_trip_rate_and_checkpoints(
    shell: InteractiveShell, stub: OpenAIStub, capsys: pytest.CaptureFixture[str]
) -> None:
    run(shell, f"%model remote stub --url {stub.url}")
    for _ in range(3):
        run(shell, "%%infer --model stub --max-new-tokens 2\nHi")
    run(shell, "y = 2")  # a checkpoint
    capsys.readouterr()
    run(shell, "%audit --metrics")
    out = capsys.readouterr().out
    for key in ("latency_s_p50", "latency_s_p95", "breaker_trip_rate", "checkpoint_s_p50",
                "checkpoint_s_p95", "load_s_p50"):
        assert key in out
    m = session().audit.metrics()
    assert m["inferences"] == 3 and m["breaker_trip_rate"] == 0.0 and m["checkpoints"] >= 1


# --- alerts --------------------------------------------------------------------------------------
def test_trip_rate_alert_fires_once_then_clears(
    shell: InteractiveShell, stub: OpenAIStub, capsys: pytest.CaptureFixture[str], dash: Any
) -> None:
    run(shell, f"%model remote stub --url {stub.url}")
    run(shell, "%model fallback --clear")
    capsys.readouterr()
    stub.script(500, 500)  # two failures in a row trip the breaker
    for _ in range(2):
        shell.run_cell("%%infer --model stub --max-new-tokens 2\nHi")
    out = capsys.readouterr().out
    assert out.count("kernel_ext alert (breaker_trip_rate)") == 1
    alerts = session().audit.read("alert")
    assert [(a["alert"], a["subject"], a["state"]) for a in alerts] == [
        ("breaker_trip_rate", "stub", "raised")]
    assert alerts[0]["correlation_id"] == session().trace.cell_id
    assert "breaker_trip_rate" in banner_of(dash) and "stub" in banner_of(dash)
    assert dash.banner.layout.display != "none"
    # more cells with the breaker open: no new alert, no new notice
    for _ in range(3):
        shell.run_cell("%%infer --model stub --max-new-tokens 2\nHi")
    assert "kernel_ext alert" not in capsys.readouterr().out
    assert len(session().audit.read("alert")) == 1
    # back to health: reset, then enough good calls bring the rate under 5 %
    run(shell, "%breaker reset stub")
    for _ in range(40):
        session().infer("Hi", _params(), model="stub")
    states = [a["state"] for a in session().audit.read("alert")]
    assert states == ["raised", "cleared"]
    assert "breaker_trip_rate" not in banner_of(dash)


def _params() -> Any:
    from kernel_ext.providers.base import GenerationParams

    return GenerationParams(max_new_tokens=1)


def test_memory_alerts_for_a_refused_load_and_high_rss(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture[str], dash: Any
) -> None:
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    capsys.readouterr()
    run(shell, "%config KernelExt.memory_fraction = 1e-9")  # RSS is over it after this cell
    for i in range(2):
        r = shell.run_cell(f"%model load {model} --name t{i} --no-progress")
        assert r.error_in_exec is not None or r.error_before_exec is not None
    out = capsys.readouterr().out
    # one notice for the refused loads, one for RSS over the (tiny) limit; not one per cell
    assert out.count("kernel_ext alert (memory_pressure)") == 2
    raised = [(a["subject"], a["state"]) for a in session().audit.read("alert")]
    assert sorted(raised) == [("load", "raised"), ("ram", "raised")]
    active = {a["subject"]: a for a in session().alerts.snapshot()}
    assert active["load"]["occurrences"] == 2
    assert "refused for memory" in active["load"]["message"]
    assert "RSS" in active["ram"]["message"]
    assert "memory_pressure" in banner_of(dash) and "×2" in banner_of(dash)
    run(shell, "%config KernelExt.memory_fraction = 0.9")
    run(shell, f"%model load {model} --name ok --no-progress")
    states = [(a["subject"], a["state"]) for a in session().audit.read("alert")]
    assert ("load", "cleared") in states and ("ram", "cleared") in states
    assert "memory_pressure" not in banner_of(dash)


def test_checkpoint_failure_alert_fires_once_and_clears(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    from widgets.dashboard import Dashboard

    m = session().checkpoints
    run(shell, "a = [1]")
    dash = Dashboard(session(), interval=0)
    dash.start()
    try:
        def disk_full(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        m.store.backend._os = types.SimpleNamespace(fsync=disk_full, replace=os.replace)
        capsys.readouterr()
        for i in range(3):
            assert shell.run_cell(f"a.append({i})").success
        out = capsys.readouterr().out
        assert out.count("kernel_ext alert (checkpoint_failure)") == 1
        [alert] = session().audit.read("alert")
        assert alert["alert"] == "checkpoint_failure" and "No space left" in alert["message"]
        assert "checkpoint_failure" in banner_of(dash)
        # every failed attempt is audited (the after-cell save, and the make-up save before the
        # next cell retries it), while the alert above was raised once
        assert len(session().audit.read("checkpoint.failure")) >= 3
        m.store.backend._os = types.SimpleNamespace(fsync=os.fsync, replace=os.replace)
        run(shell, "a.append(9)")
        assert [a["state"] for a in session().audit.read("alert")] == ["raised", "cleared"]
        assert "checkpoint_failure" not in banner_of(dash)
    finally:
        dash.close()


def test_memory_alert_for_an_inference_refused_for_memory(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture[str], dash: Any
) -> None:
    """A real refusal: the request budget guard finds the KV cache over request_memory_gb."""
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    run(shell, f"%model load {model} --name tiny --no-progress")
    run(shell, "%config KernelExt.request_memory_gb = 1e-9")  # ~1 byte per request
    capsys.readouterr()
    ids = []
    for _ in range(3):
        r = shell.run_cell("%%infer --model tiny --max-new-tokens 4\nHello there")
        assert not r.success and "RequestMemoryError" in str(r.error_in_exec)
        ids.append(session().trace.cell_id)
    out = capsys.readouterr().out
    assert out.count("kernel_ext alert (memory_pressure)") == 1  # one notice, not one per cell
    [alert] = session().audit.read("alert")
    assert (alert["alert"], alert["subject"], alert["state"]) == (
        "memory_pressure", "inference", "raised")
    assert alert["correlation_id"] == ids[0] and alert["provider"] == "tiny"
    assert "refused for memory" in alert["message"] and "KV cache" in alert["message"]
    assert alert["estimate"] > alert["limit"] == 1  # the guard's numbers, in bytes
    assert session().alerts.snapshot()[0]["occurrences"] == 3
    assert "memory_pressure" in banner_of(dash) and "×3" in banner_of(dash)
    # a prompt too long for the context is the user's own request, not memory pressure
    run(shell, "%config KernelExt.request_memory_gb = 0.0")
    r = shell.run_cell("%%infer --model tiny --max-new-tokens 4\n" + "word " * 5000)
    assert "ContextOverflowError" in str(r.error_in_exec)
    assert len(session().audit.read("alert")) == 1
    # the next inference that runs clears it
    run(shell, "%%infer --model tiny --max-new-tokens 2\nHello there")
    states = [(a["subject"], a["state"]) for a in session().audit.read("alert")]
    assert states == [("inference", "raised"), ("inference", "cleared")]
    assert "memory_pressure" not in banner_of(dash)


def test_memory_alert_for_gpu_memory_over_the_limit(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], dash: Any,
) -> None:
    """No GPU here: the GPU memory reading is injected at the one function that reads it
    (kernel_ext.memory._gpus); the sample around it, the alert, the audit log and the dashboard
    are the real ones, checked after each cell."""
    from kernel_ext import memory

    gib = 1024**3
    reading = {"used": 78 * gib}
    monkeypatch.setattr(memory, "_gpus", lambda: [memory.GpuSample(
        0, "NVIDIA H100 80GB HBM3", 80 * gib, reading["used"], 80 * gib - reading["used"])])
    capsys.readouterr()
    for i in range(3):
        run(shell, f"x{i} = {i}")
    out = capsys.readouterr().out
    assert out.count("kernel_ext alert (memory_pressure)") == 1
    [alert] = session().audit.read("alert")
    assert (alert["alert"], alert["subject"], alert["state"]) == (
        "memory_pressure", "cuda:0", "raised")
    limit = int(80 * gib * session().config.memory_fraction)  # 0.8 by default
    assert alert["used"] == 78 * gib and alert["limit"] == limit
    assert "GPU 0 (NVIDIA H100 80GB HBM3)" in alert["message"]
    assert "%model unload" in alert["message"]
    [active] = session().alerts.snapshot()
    assert active["subject"] == "cuda:0" and active["occurrences"] >= 3
    assert "memory_pressure" in banner_of(dash) and "cuda:0" in banner_of(dash)
    reading["used"] = 10 * gib  # memory freed: the next cell clears it
    run(shell, "y = 1")
    states = [(a["subject"], a["state"]) for a in session().audit.read("alert")]
    assert states == [("cuda:0", "raised"), ("cuda:0", "cleared")]
    assert "memory_pressure" not in banner_of(dash)
    assert "kernel_ext alert" not in capsys.readouterr().out  # clearing prints nothing
