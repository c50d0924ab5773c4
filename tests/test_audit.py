"""The audit log, its metrics, and %audit / %breaker / %model fallback / %model remote in a
real IPython shell, with real HTTP providers (the stub server and a port where nothing listens)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from openai_stub import OpenAIStub

from kernel_ext.audit import AuditLog, metrics
from kernel_ext.events import EventBus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the log and its metrics -------------------------------------------------------------------
def test_write_read_filter_tail(tmp_path: Path) -> None:
    t = iter(range(100, 200))
    bus = EventBus()
    seen: list[dict[str, Any]] = []
    bus.subscribe("audit", lambda e: seen.append(e["record"]))
    log = AuditLog(tmp_path / "a" / "audit.jsonl", events=bus, clock=lambda: float(next(t)))
    log.write("model.load", name="m", duration_s=1.5, path=tmp_path)
    log.write("infer", outcome="ok", error=ValueError("x"), tried=("a", "b"))
    log.write("infer", outcome="failed")
    assert [r["kind"] for r in log.read()] == ["model.load", "infer", "infer"]
    assert [r["outcome"] for r in log.read(kind="infer", tail=1)] == ["failed"]
    assert log.read(kind="model")[0]["path"] == str(tmp_path)
    assert log.read(kind="infer")[0]["error"] == "ValueError: x"
    assert log.read(kind="infer")[0]["tried"] == ["a", "b"]
    assert [r["ts"] for r in seen] == [100.0, 101.0, 102.0]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.write("infer", outcome="ok")
    with open(log.path, "a") as f:
        f.write('{"ts": 1, "kind": "inf')
    assert len(log.read()) == 1


def test_write_failure_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    log = AuditLog(blocker / "audit.jsonl")  # its parent is a file: cannot be created
    rec = log.write("infer", outcome="ok")
    assert rec["kind"] == "infer" and log.failures == 1


def test_metrics() -> None:
    recs: list[dict[str, Any]] = [
        {"ts": 0.0, "kind": "model.load", "duration_s": 2.0},
        {"ts": 1.0, "kind": "model.load", "duration_s": 4.0},
    ]
    for i in range(1, 101):
        recs.append(
            {
                "ts": 1.0 + i,
                "kind": "infer",
                "outcome": "ok" if i % 10 else "cached",
                "latency_s": float(i),
                "completion_tokens": 2,
                "cached": i % 10 == 0,
            }
        )
    recs.append({"ts": 3600.0, "kind": "breaker", "name": "a", "old": "closed", "new": "open"})
    recs.append({"ts": 3600.0, "kind": "breaker", "name": "a", "old": "open", "new": "half_open"})
    recs.append(
        {"ts": 3600.0, "kind": "breaker", "name": "b", "old": "closed", "new": "forced_open"}
    )
    recs.append(  # brought back from a checkpoint: not a new trip
        {
            "ts": 3600.0,
            "kind": "breaker",
            "name": "c",
            "old": "closed",
            "new": "open",
            "restored": True,
        }
    )
    m = metrics(recs)
    assert m["model_loads"] == 2 and m["load_s_mean"] == 3.0 and m["load_s_max"] == 4.0
    assert m["inferences"] == 100 and m["outcomes"] == {"ok": 90, "cached": 10}
    assert m["latency_s_p50"] == pytest.approx(50.5)
    assert m["latency_s_p90"] == pytest.approx(90.1)
    assert m["latency_s_p99"] == pytest.approx(99.01)
    assert m["latency_s_max"] == 100.0
    assert m["cache_hits"] == 10 and m["completion_tokens"] == 200
    assert m["breaker_trips"] == 2 and m["breaker_trips_by_name"] == {"a": 1, "b": 1}
    assert m["breaker_trips_per_100_inferences"] == pytest.approx(2.0)
    assert m["breaker_trips_per_hour"] == pytest.approx(2.0)


def test_metrics_of_an_empty_log() -> None:
    m = metrics([])
    assert m["inferences"] == 0 and m["latency_s_p50"] is None and m["breaker_trips"] == 0


# --- the magics in a real shell ----------------------------------------------------------------
@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub(answer="fallback answer") as s:
        yield s


def out(capsys: pytest.CaptureFixture[str], ip: Any, magic: str, line: str = "") -> str:
    capsys.readouterr()
    ip.run_line_magic(magic, line)
    return capsys.readouterr().out


def test_breaker_and_audit_magics_tell_the_story(
    ip: Any, stub: OpenAIStub, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_line_magic("config", "KernelExt.breaker_consecutive_failures = 2")
    ip.run_line_magic("config", "KernelExt.retry_attempts = 1")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    text = out(capsys, ip, "model", f"remote dead --url {dead}")
    assert "registered remote provider dead" in text and "NOT reachable" in text
    assert "reachable" in out(capsys, ip, "model", f"remote good --url {stub.url}")
    assert "dead -> good" not in out(capsys, ip, "model", "fallback good")
    assert out(capsys, ip, "model", "fallback").strip() == "fallbacks: good -> offline cache"

    for _ in range(3):
        ip.run_cell_magic("infer", "--model dead -o r --no-stream -q", "Q")
        assert ip.user_ns["r"].provider == "good"
    r = ip.user_ns["r"]
    assert r.attempts[0]["outcome"] == "rejected"

    table = out(capsys, ip, "breaker")
    dead_row = next(line for line in table.splitlines() if line.startswith("dead "))
    assert " open " in dead_row and "cannot reach" in dead_row
    good_row = next(line for line in table.splitlines() if line.startswith("good "))
    assert "closed" in good_row

    assert "forced open" in out(capsys, ip, "breaker", "open good")
    with pytest.raises(UsageError, match="every provider failed"):
        ip.run_cell_magic("infer", "--model dead --no-stream", "a new prompt")
    assert "closed" in out(capsys, ip, "breaker", "reset dead")
    out(capsys, ip, "breaker", "reset good")

    audit = out(capsys, ip, "audit", "--kind breaker")
    assert "dead: closed -> open" in audit and "good: closed -> forced_open" in audit
    infers = out(capsys, ip, "audit", "--kind infer --tail 2").splitlines()
    assert len(infers) == 2 and "failed" in infers[-1] and "AllProvidersFailedError" in infers[-1]
    raw = out(capsys, ip, "audit", "--kind infer --json --tail 1")
    assert json.loads(raw)["outcome"] == "failed"
    m = out(capsys, ip, "audit", "--metrics")
    assert (
        "breaker_trips                      2" in m and "inferences                         4" in m
    )


def test_cached_answer_after_every_provider_fails(
    ip: Any, stub: OpenAIStub, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_line_magic("config", "KernelExt.retry_attempts = 1")
    ip.run_line_magic("model", f"remote good --url {stub.url}")
    ip.run_cell_magic("infer", "--model good -o first -q", "Q")
    stub.script(500)
    ip.run_cell_magic("infer", "--model good -o again -q", "Q")
    again = ip.user_ns["again"]
    assert again.cached and again.text == ip.user_ns["first"].text
    line = out(capsys, ip, "audit", "--kind infer --tail 1")
    assert " cached via offline_cache [good>offline_cache]" in line


@pytest.mark.parametrize(
    "magic,line,fragment",
    [
        ("breaker", "frob", "unknown subcommand 'frob'"),
        ("breaker", "reset", "usage: %breaker reset NAME"),
        ("breaker", "reset ghost", "no provider 'ghost'"),
        ("breaker", "open ghost", "no provider 'ghost'"),
        ("audit", "--tail x", "invalid int value"),
        ("audit", "--tail -1", "--tail must be >= 0"),
        ("audit", "--bogus", "unrecognized arguments"),
        ("model", "fallback ghost", "unknown fallback ghost"),
        ("model", "fallback --frob", "usage: %model fallback"),
        ("model", "remote r", "usage: %model remote NAME --url"),
        ("model", "remote r --url localhost:80", "must start with http"),
        ("model", "remote r --url http://x/v1 --api-key-env KERNEL_EXT_NO_SUCH_VAR", "is not set"),
        ("model", "remote ghost --remove", "no remote provider 'ghost'"),
    ],
)
def test_mistakes_are_short_usage_errors(ip: Any, magic: str, line: str, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        ip.run_line_magic(magic, line)
    assert fragment in str(info.value)


def test_remote_remove_drops_it_from_the_fallbacks(
    ip: Any, stub: OpenAIStub, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_line_magic("model", f"remote good --url {stub.url}")
    ip.run_line_magic("model", "fallback good")
    assert "removed remote provider good" in out(capsys, ip, "model", "remote good --remove")
    assert out(capsys, ip, "model", "fallback").strip() == "fallbacks: (none) -> offline cache"
    assert "cleared" in out(capsys, ip, "model", "fallback --clear")
