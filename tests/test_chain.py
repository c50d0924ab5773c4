"""The fallback chain: primary -> fallbacks -> offline cache, with breakers, retries, timeouts,
rate limits, OOM degradation and an audit line per inference.

Fault injection uses :class:`ScriptedProvider` (a provider that fails on command); the remote
fallback is real HTTP (the stdlib stub); the local provider is a tiny real GGUF model; the slow
test uses the real demo model.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeClock as Clock
from fakes import InterruptingProvider
from openai_stub import OpenAIStub
from provider_contract import ProviderTests

from kernel_ext.config import KernelExtConfig
from kernel_ext.errors import (
    AllProvidersFailedError,
    GGUFFormatError,
    PromptError,
    ProviderError,
    ProviderOutOfMemoryError,
    TransientProviderError,
)
from kernel_ext.providers.base import GenerationParams, GenerationResult, Health
from kernel_ext.providers.remote import RemoteProvider
from kernel_ext.resilience import Resilience, attach
from kernel_ext.session import Session


class Wall:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class ScriptedProvider:
    """Fails on command. Script items: "ok", an exception, or ("slow", seconds_per_token)."""

    def __init__(self, name: str, answer: str = "forty two", clock: Clock | None = None) -> None:
        self.name = name
        self.answer = answer
        self.clock = clock
        self.script: deque[Any] = deque()
        self.calls: list[GenerationParams] = []
        self.loaded = 0
        self.closed = 0

    def fail_with(self, *items: Any) -> ScriptedProvider:
        self.script.extend(items)
        return self

    def cache_identity(self) -> str:
        return f"scripted:{self.name}"

    def load(self) -> None:
        self.loaded += 1

    def generate(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        on_token: Any = None,
        should_stop: Any = None,
    ) -> GenerationResult:
        self.calls.append(params)
        item = self.script.popleft() if self.script else "ok"
        per_token = 0.0
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, tuple) and item[0] == "slow":
            per_token = float(item[1])
        words = self.answer.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)][: params.max_new_tokens]
        out: list[str] = []
        finish = "stop"
        for piece in pieces:
            if self.clock is not None:
                self.clock.t += per_token
            out.append(piece)
            try:
                if on_token is not None:
                    on_token(piece)
            except KeyboardInterrupt:
                finish = "interrupted"  # the stop button: the partial answer comes back
                break
            if should_stop is not None and should_stop():
                finish = "timeout"
                break
        return GenerationResult(
            text="".join(out),
            prompt=prompt,
            model=self.name,
            provider=self.name,
            prompt_tokens=3,
            completion_tokens=len(out),
            finish_reason=finish,
        )

    def health(self) -> Health:
        return Health(True)

    def close(self) -> None:
        self.closed += 1


class TestScriptedProviderContract(ProviderTests):
    """The test double itself honours the provider contract."""

    @pytest.fixture
    def provider(self) -> ScriptedProvider:
        return ScriptedProvider("double", answer="one two three four five six seven")


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def clock() -> Clock:
    return Clock(100.0)


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def session(tmp_path: Path, clock: Clock, wall: Wall) -> Iterator[Session]:
    cfg = KernelExtConfig(
        breaker_consecutive_failures=2,
        breaker_open_seconds=10.0,
        breaker_min_calls=5,
        retry_attempts=1,
    )
    s = Session(cfg, None, state_dir=tmp_path / "state")
    attach(s, clock=clock, sleep=clock.sleep, wall_clock=wall)
    yield s
    s.close()


@pytest.fixture
def hub(session: Session) -> Resilience:
    return session.resilience  # type: ignore[attr-defined, no-any-return]


def add(hub: Resilience, *providers: ScriptedProvider) -> None:
    for p in providers:
        hub.add_provider(p.name, p)  # type: ignore[arg-type]


def infer_lines(session: Session) -> list[dict[str, Any]]:
    return session.audit.read(kind="infer")


P = GenerationParams(max_new_tokens=8)


# --- tests -------------------------------------------------------------------------------------
def test_attach_replaces_the_direct_chain(session: Session, hub: Resilience) -> None:
    from kernel_ext.resilience import FallbackChain

    assert isinstance(session.chain, FallbackChain)  # type: ignore[attr-defined]
    assert session.breakers is hub.breakers  # type: ignore[attr-defined]
    assert session.extra_providers is hub.extra_providers  # type: ignore[attr-defined]
    assert attach(session) is hub  # idempotent


def test_primary_answers_and_is_audited(session: Session, hub: Resilience, clock: Clock) -> None:
    a = ScriptedProvider("a", clock=clock)
    add(hub, a)
    pieces: list[str] = []
    r = session.infer("Q", P, model="a", on_token=pieces.append)
    assert r.text == "forty two" and "".join(pieces) == r.text and r.provider == "a"
    assert r.attempts == [
        {"provider": "a", "outcome": "ok", "error": None, "breaker_state": "closed"}
    ]
    assert str(uuid.UUID(r.correlation_id)) == r.correlation_id and not r.cached
    (line,) = infer_lines(session)
    assert line["correlation_id"] == r.correlation_id and line["outcome"] == "ok"
    assert line["providers_tried"] == ["a"] and line["breakers"] == {"a": "closed"}
    assert line["completion_tokens"] == 2 and line["cached"] is False and "latency_s" in line


def test_primary_fails_fallback_answers(session: Session, hub: Resilience) -> None:
    a = ScriptedProvider("a").fail_with(GGUFFormatError("bad header", path="a.gguf"))
    b = ScriptedProvider("b", answer="from b")
    add(hub, a, b)
    hub.fallbacks = ["b"]
    r = session.infer("Q", P, model="a")
    assert r.text == "from b" and r.provider == "b"
    assert [(x["provider"], x["outcome"]) for x in r.attempts] == [("a", "failed"), ("b", "ok")]
    assert "GGUFFormatError: a.gguf: bad header" in r.attempts[0]["error"]
    (line,) = infer_lines(session)
    assert line["provider"] == "b" and line["providers_tried"] == ["a", "b"]
    assert line["attempts"][0]["error"].startswith("GGUFFormatError")


def test_transient_errors_are_retried_before_falling_back(
    session: Session, hub: Resilience, clock: Clock
) -> None:
    session.config.retry_attempts = 3
    session.config.breaker_consecutive_failures = 3
    a = ScriptedProvider("a").fail_with(
        TransientProviderError("503"), TransientProviderError("503")
    )
    add(hub, a)
    r = session.infer("Q", P, model="a")
    assert r.provider == "a" and len(a.calls) == 3
    assert len(clock.sleeps) == 2
    assert [x["outcome"] for x in r.attempts] == ["retry", "retry", "ok"]
    assert any("retry 1" in n for n in r.notes)
    # each attempt went through the breaker: two failures, then a success
    assert hub.breakers["a"].snapshot().total_calls == 3


def test_retries_stop_when_the_breaker_opens(
    session: Session, hub: Resilience, clock: Clock
) -> None:
    session.config.retry_attempts = 5
    a = ScriptedProvider("a").fail_with(*[TransientProviderError("503")] * 5)
    b = ScriptedProvider("b")
    add(hub, a, b)
    hub.fallbacks = ["b"]
    r = session.infer("Q", P, model="a")
    assert len(a.calls) == 2  # the breaker opened after 2 failures; the 3rd try was rejected
    assert r.provider == "b"
    assert [x["outcome"] for x in r.attempts] == ["retry", "retry", "rejected", "ok"]


def test_permanent_errors_are_not_retried(session: Session, hub: Resilience, clock: Clock) -> None:
    session.config.retry_attempts = 3
    a = ScriptedProvider("a").fail_with(ProviderError("HTTP 400"))
    b = ScriptedProvider("b")
    add(hub, a, b)
    hub.fallbacks = ["b"]
    r = session.infer("Q", P, model="a")
    assert len(a.calls) == 1 and clock.sleeps == [] and r.provider == "b"


def test_all_fail_cache_answers_marked(session: Session, hub: Resilience, wall: Wall) -> None:
    a = ScriptedProvider("a", answer="cached words")
    b = ScriptedProvider("b")
    add(hub, a, b)
    hub.fallbacks = ["b"]
    first = session.infer("Q", P, model="a")
    wall.t += 90
    a.fail_with(ProviderError("down"))
    b.fail_with(ProviderError("down too"))
    pieces: list[str] = []
    r = session.infer("Q", P, model="a", on_token=pieces.append)
    assert r.cached and r.finish_reason == "cached" and r.provider == "offline_cache"
    assert r.text == first.text == "".join(pieces)
    assert r.cache_age_s == pytest.approx(90.0)
    assert [(x["provider"], x["outcome"]) for x in r.attempts] == [
        ("a", "failed"),
        ("b", "failed"),
        ("offline_cache", "cached"),
    ]
    assert "cached (90 s old)" in r.footer()
    lines = infer_lines(session)
    assert lines[-1]["outcome"] == "cached" and lines[-1]["cached"] is True
    assert lines[-1]["cache_age_s"] == pytest.approx(90.0)
    assert lines[-1]["providers_tried"] == ["a", "b", "offline_cache"]


def test_cache_is_keyed_by_prompt_and_params(session: Session, hub: Resilience) -> None:
    a = ScriptedProvider("a")
    add(hub, a)
    session.infer("Q", P, model="a")
    a.fail_with(ProviderError("down"), ProviderError("down"))
    with pytest.raises(AllProvidersFailedError):
        session.infer("other prompt", P, model="a")
    with pytest.raises(AllProvidersFailedError):
        session.infer("Q", P.replace(temperature=0.7), model="a")
    # the timeout does not change the answer, so it is not part of the key
    a.fail_with(ProviderError("down"))
    assert session.infer("Q", P.replace(timeout=5.0), model="a").cached


def test_nothing_cached_one_clear_error_with_every_cause(session: Session, hub: Resilience) -> None:
    a = ScriptedProvider("a").fail_with(ProviderError("model file is corrupt"))
    b = ScriptedProvider("b").fail_with(TransientProviderError("connection refused"))
    add(hub, a, b)
    hub.fallbacks = ["b", "ghost"]
    with pytest.raises(AllProvidersFailedError) as info:
        session.infer("Q", P, model="a")
    msg = str(info.value)
    for fragment in (
        "a: ProviderError: model file is corrupt",
        "b: TransientProviderError: connection refused",
        "ghost: ModelNotFoundError",
        "offline_cache:",
        "no answer kept",
    ):
        assert fragment in msg
    assert set(info.value.causes) == {"a", "b", "ghost", "offline_cache"}
    (line,) = infer_lines(session)
    assert line["outcome"] == "failed" and "AllProvidersFailedError" in line["error"]
    assert [x["outcome"] for x in line["attempts"]] == ["failed", "failed", "unavailable", "miss"]


def test_a_model_that_is_not_loaded_counts_against_its_breaker(
    session: Session, hub: Resilience
) -> None:
    b = ScriptedProvider("b")
    add(hub, b)
    hub.fallbacks = ["b"]
    for _ in range(2):
        r = session.infer("Q", P, model="primary")
        assert r.provider == "b" and r.attempts[0]["outcome"] == "unavailable"
        assert "ModelNotFoundError" in r.attempts[0]["error"]
    assert hub.breakers["primary"].state.value == "open"
    r = session.infer("Q", P, model="primary")
    assert r.attempts[0]["outcome"] == "rejected"


def test_cache_identity_is_remembered_after_a_provider_goes_away(
    session: Session, hub: Resilience
) -> None:
    a = ScriptedProvider("a")
    add(hub, a)
    first = session.infer("Q", P, model="a")
    hub.remove_provider("a")
    assert a.closed == 1
    r = session.infer("Q", P, model="a")
    assert r.cached and r.text == first.text
    assert session.state()["resilience"]["identities"] == {"a": "scripted:a"}


def test_no_model_at_all(session: Session) -> None:
    with pytest.raises(AllProvidersFailedError, match="no model to run"):
        session.infer("Q", P)


def test_breaker_opens_skips_then_recovers_through_half_open(
    session: Session, hub: Resilience, clock: Clock
) -> None:
    a = ScriptedProvider("a").fail_with(ProviderError("x"), ProviderError("x"))
    b = ScriptedProvider("b", answer="fallback")
    add(hub, a, b)
    hub.fallbacks = ["b"]
    transitions: list[tuple[str, str]] = []
    session.events.subscribe("breaker", lambda e: transitions.append((e["old"], e["new"])))
    calls: list[str] = []
    session.events.subscribe("breaker_call", lambda e: calls.append(f"{e['name']}:{e['outcome']}"))
    session.infer("Q", P, model="a")
    session.infer("Q", P, model="a")
    assert hub.breakers["a"].state.value == "open"
    r = session.infer("Q", P, model="a")  # rejected at once, fallback answers
    assert len(a.calls) == 2 and r.provider == "b"
    assert r.attempts[0]["outcome"] == "rejected" and r.attempts[0]["breaker_state"] == "open"
    assert "next trial call allowed in 10.0 s" in r.attempts[0]["error"]
    clock.t += 10
    r = session.infer("Q", P, model="a")  # half-open trial succeeds
    assert r.provider == "a" and hub.breakers["a"].state.value == "closed"
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert calls[:3] == ["a:failure", "b:success", "a:failure"] and "a:rejected" in calls
    audit = session.audit.read(kind="breaker")
    assert [(x["name"], x["old"], x["new"]) for x in audit] == [
        ("a", "closed", "open"),
        ("a", "open", "half_open"),
        ("a", "half_open", "closed"),
    ]
    assert audit[0]["trip_count"] == 1 and "ProviderError: x" in audit[0]["last_error"]
    assert [line["breakers"]["a"] for line in infer_lines(session)] == [
        "closed",
        "open",
        "open",
        "closed",
    ]


def test_oom_degrades_max_new_tokens_then_falls_back(session: Session, hub: Resilience) -> None:
    a = ScriptedProvider("a", answer="w " * 20).fail_with(ProviderOutOfMemoryError("CUDA OOM"))
    add(hub, a)
    r = session.infer("Q", GenerationParams(max_new_tokens=16), model="a")
    assert [p.max_new_tokens for p in a.calls] == [16, 8]
    assert r.provider == "a" and r.completion_tokens == 8
    assert any("out of memory" in n and "max_new_tokens=8" in n for n in r.notes)
    assert [x["outcome"] for x in r.attempts] == ["out_of_memory", "ok"]
    assert "max_new_tokens=8" in r.footer()

    a.fail_with(ProviderOutOfMemoryError("OOM"), ProviderOutOfMemoryError("OOM"))
    b = ScriptedProvider("b")
    add(hub, b)
    hub.fallbacks = ["b"]
    r = session.infer("Q2", GenerationParams(max_new_tokens=16), model="a")
    assert r.provider == "b" and any("falling back" in n for n in r.notes)


def test_an_out_of_memory_the_provider_reports_raises_one_memory_alert(
    session: Session, hub: Resilience, capsys: pytest.CaptureFixture[str]
) -> None:
    """The provider's own OOM (on command: there is no GPU to fill here) is memory pressure:
    one alert for repeated OOMs, even when the degraded retry answers; the next answer that
    needed no degrading clears it."""
    a = ScriptedProvider("a", answer="w " * 20)
    add(hub, a)
    capsys.readouterr()
    for _ in range(2):
        a.fail_with(ProviderOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        r = session.infer("Q", GenerationParams(max_new_tokens=16), model="a")
        assert [x["outcome"] for x in r.attempts] == ["out_of_memory", "ok"]
    assert capsys.readouterr().out.count("kernel_ext alert (memory_pressure)") == 1
    [alert] = session.audit.read("alert")
    assert (alert["alert"], alert["subject"], alert["provider"]) == (
        "memory_pressure", "inference", "a")
    assert "CUDA out of memory" in alert["message"]
    assert session.alerts.snapshot()[0]["occurrences"] == 2
    session.infer("Q", GenerationParams(max_new_tokens=16), model="a")
    assert [x["state"] for x in session.audit.read("alert")] == ["raised", "cleared"]
    assert session.alerts.snapshot() == []


def test_timeout_returns_partial_text_not_counted_unless_slow_calls_count(
    session: Session, hub: Resilience, clock: Clock
) -> None:
    a = ScriptedProvider("a", answer="one two three four five six", clock=clock)
    add(hub, a)
    timed = GenerationParams(max_new_tokens=6, timeout=2.5)
    for _ in range(3):  # three timeouts the user asked for: the breaker stays closed
        a.fail_with(("slow", 1.0))
        r = session.infer("Q", timed, model="a")
        assert r.timed_out and r.text == "one two three" and "TIMED OUT" in r.footer()
    snap = hub.breakers["a"].snapshot()
    assert snap.state == "closed" and snap.failures_in_window == 0 and snap.total_calls == 0
    assert infer_lines(session)[-1]["outcome"] == "timeout"
    # with slow-call counting on, a call cut after at least that long counts as slow
    session.config.breaker_slow_call_seconds = 2.0
    a.fail_with(("slow", 1.0))
    session.infer("Q", timed, model="a")
    snap = hub.breakers["a"].snapshot()
    assert snap.failures_in_window == 1 and "timed out" in (snap.last_error or "")
    # a partial answer is never kept for the offline cache
    a.fail_with(ProviderError("down"))
    with pytest.raises(AllProvidersFailedError):
        session.infer("Q", timed, model="a")


@pytest.mark.parametrize(
    "mistake", [PromptError("no value for {name}"), ValueError("top_p must be in (0, 1]")]
)
def test_user_mistakes_are_raised_not_fallen_back(
    session: Session, hub: Resilience, mistake: Exception
) -> None:
    a = ScriptedProvider("a").fail_with(mistake)
    b = ScriptedProvider("b")
    add(hub, a, b)
    hub.fallbacks = ["b"]
    with pytest.raises(type(mistake)):
        session.infer("Q", P, model="a")
    assert b.calls == [] and hub.breakers["a"].snapshot().total_calls == 0
    assert infer_lines(session)[-1]["outcome"] == "failed"


def limited_with_fallback(
    session: Session, hub: Resilience, rate: float
) -> tuple[ScriptedProvider, ScriptedProvider]:
    """Providers a (limited to ``rate`` calls/s, burst 1) and its fallback b."""
    session.config.rate_limit_per_second = rate
    session.config.rate_limit_burst = 1
    a, b = ScriptedProvider("a"), ScriptedProvider("b")
    add(hub, a, b)
    hub.fallbacks = ["b"]
    return a, b


def test_a_rate_limit_waits_within_the_timeout_and_says_so(
    session: Session, hub: Resilience, clock: Clock
) -> None:
    limited_with_fallback(session, hub, 0.5)
    assert session.infer("Q", P.replace(timeout=5.0), model="a").provider == "a"
    r = session.infer("Q", P.replace(timeout=5.0), model="a")  # waits 2 s: inside 5 s
    assert r.provider == "a" and clock.sleeps == [pytest.approx(2.0)]
    assert any("waited 2.00 s for a's rate limit (0.5 calls/s, burst 1)" in n for n in r.notes)
    assert "waited 2.00 s" in r.footer()
    assert [x["outcome"] for x in r.attempts] == ["rate_limit_wait", "ok"]
    assert r.attempts[0]["wait_s"] == pytest.approx(2.0)
    assert infer_lines(session)[-1]["providers_tried"] == ["a"]
    # no timeout at all: it waits as long as the limit says
    r = session.infer("Q", P, model="a")
    assert r.provider == "a" and clock.sleeps[-1] == pytest.approx(2.0)
    assert hub.breakers["a"].snapshot().total_calls == 3  # waits are not calls


def test_a_rate_limit_wait_past_the_timeout_falls_back_at_once(
    session: Session, hub: Resilience, clock: Clock
) -> None:
    limited_with_fallback(session, hub, 0.1)
    assert session.infer("Q", P, model="a").provider == "a"
    r = session.infer("Q", P.replace(timeout=3.0), model="a")  # would wait 10 s > 3 s
    assert r.provider == "b" and r.attempts[0]["outcome"] == "rate_limited"
    assert "after this call's 3.00 s budget" in r.attempts[0]["error"]
    assert clock.sleeps == [] and hub.breakers["a"].snapshot().total_calls == 1
    clock.t += 10.0
    assert session.infer("Q", P.replace(timeout=3.0), model="a").provider == "a"


def test_remote_fallback_over_real_http(session: Session, hub: Resilience) -> None:
    a = ScriptedProvider("a").fail_with(ProviderError("down"))
    add(hub, a)
    with OpenAIStub(answer="remote says hi") as stub:
        hub.add_provider("remote", RemoteProvider("remote", stub.url))
        hub.fallbacks = ["remote"]
        r = session.infer("Q", P, model="a")
        assert r.text == "remote says hi" and r.provider == "remote"
        stub.script(503)
        a.fail_with(ProviderError("down"))
        r = session.infer("Q", P, model="a")
        assert r.cached  # remote failed with 503 (retry_attempts=1), the cache answered
    assert infer_lines(session)[-1]["attempts"][1]["error"].startswith("TransientProviderError")


def test_default_model_is_the_first_candidate(session: Session, hub: Resilience) -> None:
    add(hub, ScriptedProvider("only"))
    assert session.chain.candidates(None) == ["only"]  # type: ignore[attr-defined]
    assert session.infer("Q", P).provider == "only"


def test_state_round_trips_through_the_session(
    tmp_path: Path, session: Session, hub: Resilience, clock: Clock
) -> None:
    with OpenAIStub() as stub:
        hub.add_provider(
            "remote",
            RemoteProvider(
                "remote", stub.url, model="m", chat=True, api_key_env="MY_KEY", read_timeout=7.5
            ),
        )
        a = ScriptedProvider("a").fail_with(ProviderError("x"), ProviderError("x"))
        add(hub, a)
        hub.fallbacks = ["remote"]
        hub.breaker("a").force_open()
        hub.breaker("a").reset()
        session.infer("Q", P, model="a")
        session.infer("Q", P, model="a")
        clock.t += 4
        state = session.state()
    import json

    state = json.loads(json.dumps(state))  # what a checkpoint stores
    assert state["resilience"]["breakers"]["a"]["state"] == "open"

    clock2 = Clock(100.0)
    clock2.t = 7.0  # a new kernel: a different monotonic origin
    s2 = Session(session.config, None, state_dir=tmp_path / "state2")
    attach(s2, clock=clock2, sleep=clock2.sleep)
    lines = s2.restore_state(state)
    hub2: Resilience = s2.resilience  # type: ignore[attr-defined]
    assert "breaker a: open" in lines and "fallbacks: remote" in lines
    b = hub2.breakers["a"]
    assert b.state.value == "open" and b.snapshot().retry_in == pytest.approx(6.0)
    assert b.snapshot().trip_count == 2
    assert hub2.fallbacks == ["remote"]
    # A checkpoint never re-creates a remote provider (it could name any URL and any env var
    # as the "key"); %resume prints the command that registers it again instead.
    assert "remote" not in hub2.extra_providers
    (line,) = [x for x in lines if x.startswith("remote provider remote")]
    assert "not restored" in line
    assert line.endswith(
        f"%model remote remote --url {stub.url} --model m --chat --timeout 7.5 "
        "--api-key-env MY_KEY"
    )
    clock2.t += 6
    assert b.state.value == "half_open"
    s2.close()


# --- the local provider (tiny real GGUF) -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    from tinymodels import write_tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    path = write_tiny_llama(root / "tiny-llama.gguf", seed=1)
    s = Session(KernelExtConfig(), None, state_dir=root / "state")
    s.models.load(str(path), name="tiny", progress=False)
    attach(s)
    yield s
    s.close()


class TestLocalProviderContract(ProviderTests):
    prompt = "hello world"

    @pytest.fixture
    def provider(self, tiny_session: Session) -> Any:
        return tiny_session.models.get("tiny").provider


def test_tiny_local_model_behind_a_failing_primary(tmp_path: Path) -> None:
    from tinymodels import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny-llama.gguf", seed=1)
    s = Session(KernelExtConfig(), None, state_dir=tmp_path / "state")
    hub = attach(s)
    try:
        entry = s.models.load(str(path), name="tiny", progress=False)
        broken = ScriptedProvider("broken").fail_with(
            GGUFFormatError("truncated", path="broken.gguf")
        )
        hub.add_provider("broken", broken)  # type: ignore[arg-type]
        hub.fallbacks = ["tiny"]
        r = s.infer("hello world", GenerationParams(max_new_tokens=3), model="broken")
        assert r.provider == "tiny" and r.completion_tokens >= 1
        assert [a["outcome"] for a in r.attempts] == ["failed", "ok"]
        assert hub.identity("tiny", entry.provider) == f"sha256:{entry.sha256}"
        s.models.unload("tiny")
        broken.fail_with(GGUFFormatError("truncated", path="broken.gguf"))
        again = s.infer("hello world", GenerationParams(max_new_tokens=3), model="broken")
        assert again.cached and again.text == r.text
    finally:
        s.close()


# --- the real demo model (slow) ----------------------------------------------------------------
@pytest.mark.slow
def test_demo_model_answers_when_the_primary_file_is_corrupt(
    tmp_path: Path, demo_model_path: Path
) -> None:
    from kernel_ext.errors import KernelExtError

    s = Session(KernelExtConfig(breaker_consecutive_failures=1), None, state_dir=tmp_path / "st")
    hub = attach(s)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(KernelExtError):
        s.models.load(str(corrupt), name="corrupt", progress=False)
    s.models.load(str(demo_model_path), name="gemma", progress=False)
    hub.fallbacks = ["gemma"]
    r = s.infer("def fibonacci(n):", GenerationParams(max_new_tokens=8), model="corrupt")
    assert r.provider == "gemma" and r.text.startswith("\n    if n")
    assert r.attempts[0]["outcome"] == "unavailable"
    s.models.unload("gemma")
    r2 = s.infer("def fibonacci(n):", GenerationParams(max_new_tokens=8), model="corrupt")
    assert r2.cached and r2.text == r.text
    lines = s.audit.read(kind="infer")
    assert [x["outcome"] for x in lines] == ["ok", "cached"]
    s.close()


def test_an_interrupt_escaping_a_provider_frees_the_half_open_permit(
    session: Session, hub: Resilience, clock: Clock
) -> None:
    a = ScriptedProvider("a").fail_with(ProviderError("x"), ProviderError("x"), KeyboardInterrupt())
    add(hub, a)
    for _ in range(2):
        with pytest.raises(AllProvidersFailedError):
            session.infer("fresh", P, model="a")
    clock.t += 10
    r = session.infer("fresh", P, model="a")
    assert r.interrupted and r.text == ""
    assert hub.breakers["a"].state.value == "half_open"
    assert session.infer("fresh", P, model="a").provider == "a"  # the trial is admitted
    assert hub.breakers["a"].state.value == "closed"


@pytest.mark.parametrize("mode", ["returns", "raises"])
def test_an_interrupted_answer_is_kept_audited_and_never_retried_or_fallen_back(
    session: Session, hub: Resilience, mode: str
) -> None:
    session.config.retry_attempts = 3
    a = InterruptingProvider("a", mode)
    b = ScriptedProvider("b")
    add(hub, a, b)
    hub.fallbacks = ["b"]
    before = hub.breaker("a").snapshot()
    shown: list[str] = []
    r = session.infer("Q", P, model="a", on_token=shown.append)
    assert r.interrupted and r.finish_reason == "interrupted" and r.partial
    assert r.text == "alpha beta" == "".join(shown) and r.provider == "a"
    assert "INTERRUPTED (partial)" in r.footer()
    assert len(a.calls) == 1 and b.calls == []  # no retry, no fallback
    assert [x["outcome"] for x in r.attempts] == ["interrupted"]
    after = hub.breakers["a"].snapshot()
    assert after.total_calls == before.total_calls == 0 and after.state == "closed"
    (line,) = infer_lines(session)
    assert line["outcome"] == "interrupted" and line["finish_reason"] == "interrupted"
    assert line["correlation_id"] == r.correlation_id and line["providers_tried"] == ["a"]
    # a partial answer is never served later as if it were whole
    assert hub.offline_cache.get([hub.identity("a", a)], "Q", P) is None  # type: ignore[arg-type]


def test_an_interrupt_during_a_rate_limit_wait_is_an_interrupted_result(
    session: Session, hub: Resilience, clock: Clock
) -> None:
    session.config.rate_limit_per_second = 1.0
    session.config.rate_limit_burst = 1
    a = ScriptedProvider("a")
    add(hub, a)
    session.infer("Q", P, model="a")

    def stop_button(seconds: float) -> None:
        raise KeyboardInterrupt

    hub.sleep = stop_button
    r = session.infer("Q", P, model="a")
    assert r.interrupted and r.text == "" and len(a.calls) == 1
    assert infer_lines(session)[-1]["outcome"] == "interrupted"


def test_an_invalid_request_cannot_be_built() -> None:
    from kernel_ext.errors import OptionError

    for bad in ({"temperature": float("nan")}, {"timeout": float("inf")},
                {"top_p": 0.0}, {"max_new_tokens": 0}, {"seed": -1}, {"top_k": True},
                {"stop": ("x",) * 17}):
        with pytest.raises(OptionError):
            GenerationParams(**bad)  # type: ignore[arg-type]


def test_retries_do_not_outlive_the_timeout(
    session: Session, hub: Resilience, clock: Clock
) -> None:
    session.config.retry_attempts = 10
    session.config.breaker_consecutive_failures = 0
    a = ScriptedProvider("a").fail_with(*[TransientProviderError("503")] * 10)
    add(hub, a)
    with pytest.raises(AllProvidersFailedError):
        session.infer("Q", GenerationParams(max_new_tokens=4, timeout=1.0), model="a")
    assert sum(clock.sleeps) <= 1.0 + 1e-9 and len(a.calls) < 10


def test_a_tampered_checkpoint_cannot_send_a_secret_to_its_server(
    session: Session, hub: Resilience, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERNEL_EXT_TEST_SECRET", "s3cret")
    with OpenAIStub() as stub:
        state = {
            "resilience": {
                "remotes": {
                    "evil": {"url": stub.url, "chat": False,
                             "api_key_env": "KERNEL_EXT_TEST_SECRET"}
                },
                "fallbacks": ["evil"],
            }
        }
        lines = session.restore_state(state)
        assert "evil" not in hub.extra_providers
        assert any(x.startswith("remote provider evil not restored") for x in lines)
        with pytest.raises(AllProvidersFailedError):
            session.infer("Q", P, model="evil")
        assert stub.requests == []


def test_text_streamed_by_a_failed_provider_is_set_apart_from_the_fallback_answer(
    session: Session, hub: Resilience
) -> None:
    with OpenAIStub() as stub:
        stub.script("drop")  # streams "Paris", " is", then the connection ends
        hub.add_provider("r", RemoteProvider("r", stub.url))
        add(hub, ScriptedProvider("b", answer="from b"))
        hub.fallbacks = ["b"]
        pieces: list[str] = []
        result = session.infer("Q", P, model="r", on_token=pieces.append)
    assert result.text == "from b"
    shown = "".join(pieces)
    head, sep, tail = shown.partition("\n[r failed: TransientProviderError: ")
    assert head == "Paris is" and sep and tail.endswith("; answer from b follows]\nfrom b")
    assert any("r failed after streaming part of an answer" in n for n in result.notes)


def test_text_streamed_before_a_retry_is_set_apart_from_the_retried_answer(
    session: Session, hub: Resilience
) -> None:
    session.config.retry_attempts = 2
    with OpenAIStub() as stub:
        stub.script("drop")
        hub.add_provider("r", RemoteProvider("r", stub.url))
        pieces: list[str] = []
        result = session.infer("Q", P, model="r", on_token=pieces.append)
    shown = "".join(pieces)
    assert shown.startswith("Paris is\n[r failed: TransientProviderError: ")
    assert shown.endswith("; answer from r follows]\n" + result.text)
    assert shown.count("\n[") == 1


def test_a_clean_failover_streams_no_separator(session: Session, hub: Resilience) -> None:
    add(hub, ScriptedProvider("a").fail_with(ProviderError("x")), ScriptedProvider("b"))
    hub.fallbacks = ["b"]
    pieces: list[str] = []
    result = session.infer("Q", P, model="a", on_token=pieces.append)
    assert "".join(pieces) == result.text == "forty two"


def test_make_should_stop_turns_true_at_the_deadline(clock: Clock) -> None:
    from kernel_ext.resilience.chain import make_should_stop

    stop = make_should_stop(clock.t + 2.0, clock)
    assert not stop()
    clock.t += 2.0
    assert stop()
    assert not make_should_stop(None, clock)()


def test_the_direct_chain_stops_at_the_timeout(tmp_path: Path) -> None:
    """Before resilience is attached, session.infer still honours params.timeout."""
    from tinymodels import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny-llama.gguf", seed=1)
    s = Session(KernelExtConfig(), None, state_dir=tmp_path / "state")
    try:
        s.models.load(str(path), name="tiny", progress=False)
        r = s.infer("hello world", GenerationParams(max_new_tokens=8, timeout=1e-9))
        assert r.timed_out and r.completion_tokens < 8
    finally:
        s.close()
