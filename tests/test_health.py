"""%model health / warm / list in a real IPython shell: a real tiny GGUF model and a real HTTP
server (the scripted OpenAI-compatible stub); probe results feed the breakers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from openai_stub import OpenAIStub
from tinymodels import write_tiny_llama

import kernel_ext


@pytest.fixture
def shell(ip: InteractiveShell) -> InteractiveShell:
    """conftest's fresh shell with kernel_ext (working in tmp_path), configured for these tests."""
    for setting in (
        "breaker_consecutive_failures = 2",
        "breaker_open_seconds = 3600.0",
        "checkpoint_enabled = False",
    ):
        ip.run_line_magic("config", f"KernelExt.{setting}")
    return ip


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as s:
        yield s


def magic(shell: InteractiveShell, line: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    shell.run_line_magic("model", line)
    return capsys.readouterr().out


def session() -> Any:
    return kernel_ext.current_session()


def test_health_probes_every_provider_and_feeds_the_breakers(
    shell: InteractiveShell, stub: OpenAIStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    magic(shell, f"load {model} --name tiny --no-progress", capsys)
    magic(shell, f"remote srv --url {stub.url}", capsys)
    gets, posts = len(stub.gets), len(stub.requests)
    out = magic(shell, "health", capsys)
    assert "tiny" in out and "srv" in out and out.count(" ok ") == 2
    assert len(stub.gets) == gets + 1 and stub.gets[-1]["path"] == "/v1/models"
    assert len(stub.requests) == posts + 1 and stub.requests[-1]["body"]["max_tokens"] == 1
    hub = session().resilience
    assert hub.breakers["tiny"].snapshot().calls_in_window == 1
    assert {r["name"]: r["ok"] for r in session().audit.read("health")} == {"tiny": True,
                                                                            "srv": True}
    # a failing server: each probe is a failed call, two trip its breaker
    stub.script(500, 500)
    for _ in range(2):
        out = magic(shell, "health srv", capsys)
        assert "FAILING" in out and "HTTP 500" in out
    assert hub.breakers["srv"].state.value == "open"
    listing = magic(shell, "list", capsys)
    [local] = [ln for ln in listing.splitlines() if " tiny " in ln]
    [remote] = [ln for ln in listing.splitlines() if " srv " in ln]
    assert "local" in local and "ok" in local and "closed" in local
    assert "remote" in remote and "FAILING" in remote and "open" in remote and stub.url in remote
    # the server is back: a probe after the open period is the half-open trial and closes it
    hub.breakers["srv"]._opened_at -= 3600
    assert " ok " in magic(shell, "health srv", capsys)
    assert hub.breakers["srv"].state.value == "closed"


def test_unknown_provider_is_a_usage_error(shell: InteractiveShell) -> None:
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="no model or provider called 'nope'"):
        shell.run_line_magic("model", "health nope")


def test_warm_loads_fills_the_cache_and_runs_a_first_forward(
    shell: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kernel_ext.gguf import cache, sha256_file

    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    out = magic(shell, f"warm {model}", capsys)
    assert "is warm" in out and "first forward pass" in out and "conversion cache" in out
    assert "tiny" in session().models.names()
    entry = cache.entry_dir(session().cache_dir / "conversions", sha256_file(model))
    assert (entry / "weights-float32.safetensors").is_file()
    assert session().health["tiny"].ok
    again = magic(shell, "warm tiny", capsys)  # already loaded: no second load
    assert "loaded" not in again and "first forward pass" in again
