"""The remote (OpenAI-compatible) provider over real HTTP on loopback.

Fast tests use the stdlib stub server in ``tests/openai_stub.py`` (scripted faults); the slow
ones serve the real demo model with llama.cpp's server (``llama-cpp-python[server]``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from openai_stub import OpenAIStub
from provider_contract import ProviderTests

from kernel_ext.errors import ProviderError, TransientProviderError
from kernel_ext.providers.base import GenerationParams
from kernel_ext.providers.remote import RemoteProvider


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as s:
        yield s


@pytest.fixture
def remote(stub: OpenAIStub) -> Iterator[RemoteProvider]:
    p = RemoteProvider("stub", stub.url, model="stub-model")
    yield p
    p.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestRemoteProviderContract(ProviderTests):
    @pytest.fixture
    def provider(self, stub: OpenAIStub) -> Iterator[RemoteProvider]:
        p = RemoteProvider("stub", stub.url)
        yield p
        p.close()


class TestRemoteChatContract(ProviderTests):
    @pytest.fixture
    def provider(self, stub: OpenAIStub) -> Iterator[RemoteProvider]:
        p = RemoteProvider("stub-chat", stub.url, chat=True)
        yield p
        p.close()


def test_completion_request_and_streamed_answer(stub: OpenAIStub, remote: RemoteProvider) -> None:
    pieces: list[str] = []
    r = remote.generate(
        "Q:", GenerationParams(max_new_tokens=3, stop=("\n",), seed=7), on_token=pieces.append
    )
    assert pieces == ["Paris", " is", " the"]
    assert r.text == "Paris is the" and r.finish_reason == "length"
    assert (r.prompt_tokens, r.completion_tokens) == (5, 3)
    assert r.provider == "stub" and r.model == "stub-model"
    body = stub.requests[-1]["body"]
    assert stub.requests[-1]["path"] == "/v1/completions"
    assert body["prompt"] == "Q:" and body["stream"] is True and body["max_tokens"] == 3
    assert body["stop"] == ["\n"] and body["seed"] == 7 and body["model"] == "stub-model"


def test_chat_request_carries_messages(stub: OpenAIStub) -> None:
    p = RemoteProvider("c", stub.url, chat=True)
    r = p.generate("Hi", GenerationParams(system="Be brief."))
    assert r.text == stub.answer and r.finish_reason == "stop"
    req = stub.requests[-1]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    p.close()


def test_params_chat_overrides_the_default(stub: OpenAIStub, remote: RemoteProvider) -> None:
    remote.generate("Hi", GenerationParams(chat=True))
    assert stub.requests[-1]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_5xx_and_429_are_transient(stub: OpenAIStub, remote: RemoteProvider, status: int) -> None:
    stub.script(status)
    with pytest.raises(TransientProviderError, match=f"HTTP {status}"):
        remote.generate("x", GenerationParams())


@pytest.mark.parametrize("status", [400, 404, 422])
def test_4xx_is_a_permanent_provider_error(
    stub: OpenAIStub, remote: RemoteProvider, status: int
) -> None:
    stub.script(status)
    with pytest.raises(ProviderError) as info:
        remote.generate("x", GenerationParams())
    assert not isinstance(info.value, TransientProviderError)
    assert f"HTTP {status}" in str(info.value) and "scripted" in str(info.value)


def test_connection_refused_is_transient() -> None:
    p = RemoteProvider("nobody", f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(TransientProviderError, match="cannot reach"):
        p.generate("x", GenerationParams())
    assert not p.health().ok
    p.close()


def test_dropped_stream_is_transient_and_streamed_part_was_seen(
    stub: OpenAIStub, remote: RemoteProvider
) -> None:
    stub.script("drop")
    pieces: list[str] = []
    with pytest.raises(TransientProviderError, match="ended without"):
        remote.generate("x", GenerationParams(), on_token=pieces.append)
    assert pieces == ["Paris", " is"]


@pytest.mark.parametrize("behaviour,match", [("bad_json", "malformed"), ("error_event", "crashed")])
def test_broken_streams_are_transient(
    stub: OpenAIStub, remote: RemoteProvider, behaviour: str, match: str
) -> None:
    stub.script(behaviour)
    with pytest.raises(TransientProviderError, match=match):
        remote.generate("x", GenerationParams())


def test_read_timeout_is_transient(stub: OpenAIStub) -> None:
    stub.script("hang")
    p = RemoteProvider("slow", stub.url, read_timeout=0.05)
    with pytest.raises(TransientProviderError, match="timed out"):
        p.generate("x", GenerationParams())
    p.close()


def test_the_calls_own_timeout_is_a_partial_answer_not_an_error(stub: OpenAIStub) -> None:
    stub.script("hang")
    p = RemoteProvider("slow", stub.url, read_timeout=30.0)
    r = p.generate("x", GenerationParams(timeout=0.2))  # the user's --timeout 0.2
    assert r.timed_out and r.text == "" and r.total_s >= 0.2
    stub.script("trickle")
    r = p.generate("x", GenerationParams(max_new_tokens=1000, timeout=0.3))
    assert r.timed_out and r.text.startswith("Paris is") and r.completion_tokens < 1000
    p.close()


def test_an_interrupted_stream_drops_its_connection_and_the_next_call_works(
    stub: OpenAIStub, remote: RemoteProvider
) -> None:
    stub.script("trickle")
    seen: list[str] = []

    def stop_after_two(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 2:
            raise KeyboardInterrupt  # what SIGINT raises mid-stream

    r = remote.generate("x", GenerationParams(max_new_tokens=1000), on_token=stop_after_two)
    assert r.interrupted and r.text == "Paris is" == "".join(seen)
    assert remote._client is None  # the cut connection is not reused
    assert remote.generate("x", GenerationParams()).text == stub.answer


def test_recovers_after_faults(stub: OpenAIStub, remote: RemoteProvider) -> None:
    stub.script(500, "drop")
    for _ in range(2):
        with pytest.raises(TransientProviderError):
            remote.generate("x", GenerationParams())
    assert remote.generate("x", GenerationParams()).text == stub.answer


def test_health_and_identity(stub: OpenAIStub, remote: RemoteProvider) -> None:
    h = remote.health()
    assert h.ok and stub.url in h.detail
    assert remote.cache_identity() == f"remote:{stub.url}|stub-model|completion"


def test_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match="http://"):
        RemoteProvider("x", "localhost:8080")


# --- the real engine: llama.cpp's server with the demo model ----------------------------------
@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from llama_server import LlamaServer, server_python

    if server_python() is None:
        why = ("llama.cpp's server is not built: run .ci/build-llama-server.sh "
               "(`make test` does) or set KERNEL_EXT_LLAMA_PYTHON")
        if os.environ.get("KERNEL_EXT_REQUIRE_LLAMA_SERVER") == "1":
            pytest.fail(why)
        pytest.skip(why)

    from kernel_ext.default_model import default_model_path
    from kernel_ext.paths import user_cache_dir

    model = default_model_path(user_cache_dir())
    server = LlamaServer(model, tmp_path_factory.mktemp("llama"))
    server.start()
    try:
        yield {"server": server, "model": model}
    finally:
        server.stop()


@pytest.mark.slow
def test_llama_cpp_server_completion_and_stream(llama_server: dict[str, Any]) -> None:
    server = llama_server["server"]
    p = RemoteProvider("llama", server.url)
    assert p.health().ok
    pieces: list[str] = []
    r = p.generate("def fibonacci(n):", GenerationParams(max_new_tokens=8), on_token=pieces.append)
    assert "".join(pieces) == r.text
    assert r.text.startswith("\n    if n")
    assert r.completion_tokens >= 1 and r.finish_reason in ("stop", "length")
    p.close()


@pytest.mark.slow
def test_llama_cpp_server_stopped_midway_then_restarted(llama_server: dict[str, Any]) -> None:
    server = llama_server["server"]
    p = RemoteProvider("llama", server.url)
    assert p.generate("Hello", GenerationParams(max_new_tokens=2)).text
    server.stop()
    with pytest.raises(TransientProviderError):
        p.generate("Hello", GenerationParams(max_new_tokens=2))
    server.start()
    assert p.generate("Hello", GenerationParams(max_new_tokens=2)).text
    p.close()


@pytest.mark.slow
def test_llama_cpp_server_outage_opens_the_breaker_and_recovers(
    llama_server: dict[str, Any], tmp_path: Any
) -> None:
    """The real engine goes away mid-session and comes back: breaker, cache and half-open."""
    from kernel_ext.config import KernelExtConfig
    from kernel_ext.resilience import attach
    from kernel_ext.session import Session

    server = llama_server["server"]
    now = [0.0]
    session = Session(
        KernelExtConfig(
            breaker_consecutive_failures=2, breaker_open_seconds=30.0, retry_attempts=1
        ),
        None,
        state_dir=tmp_path / "state",
    )
    hub = attach(session, clock=lambda: now[0], sleep=lambda s: None)
    hub.add_provider("llama", RemoteProvider("llama", server.url))
    params = GenerationParams(max_new_tokens=4)
    try:
        first = session.infer("Hello", params, model="llama")
        assert first.provider == "llama" and first.text
        server.stop()
        for _ in range(2):
            r = session.infer("Hello", params, model="llama")
            assert r.cached and r.text == first.text
        assert hub.breakers["llama"].state.value == "open"
        server.start()
        r = session.infer("Hello", params, model="llama")
        assert r.cached and r.attempts[0]["outcome"] == "rejected"  # still open: not even tried
        now[0] += 30
        r = session.infer("Hello", params, model="llama")
        assert r.provider == "llama" and not r.cached
        assert hub.breakers["llama"].state.value == "closed"
        trail = [(x["old"], x["new"]) for x in session.audit.read(kind="breaker")]
        assert trail == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    finally:
        server.start()
        session.close()


def test_api_key_from_the_environment_is_sent(
    stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERNEL_EXT_TEST_KEY", "s3cret")
    p = RemoteProvider("k", stub.url, api_key_env="KERNEL_EXT_TEST_KEY")
    p.generate("x", GenerationParams(max_new_tokens=1))
    assert stub.requests[-1]["auth"] == "Bearer s3cret"
    p.close()
