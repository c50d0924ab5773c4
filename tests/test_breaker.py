"""Circuit breaker conformance (resilience4j state-machine style) on a fake clock."""

from __future__ import annotations

import threading

import pytest
from fakes import FakeClock

from kernel_ext.errors import BreakerOpenError, PromptError, TemplateError, TransientProviderError
from kernel_ext.resilience.breaker import BreakerEvent, BreakerSettings, CircuitBreaker, State


def make(**kw: object) -> tuple[CircuitBreaker, FakeClock, list[BreakerEvent]]:
    defaults: dict[str, object] = {
        "window": 10,
        "min_calls": 5,
        "failure_rate": 0.5,
        "consecutive_failures": 0,
        "open_seconds": 30.0,
    }
    defaults.update(kw)
    clock = FakeClock()
    b = CircuitBreaker("p", BreakerSettings(**defaults), clock=clock)  # type: ignore[arg-type]
    events: list[BreakerEvent] = []
    b.add_listener(events.append)
    return b, clock, events


def ok() -> str:
    return "ok"


def boom() -> str:
    raise TransientProviderError("boom")


def fail(b: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        with pytest.raises(TransientProviderError):
            b.call(boom)


def succeed(b: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        assert b.call(ok) == "ok"


def transitions(events: list[BreakerEvent]) -> list[tuple[str | None, str | None]]:
    return [(e.old, e.new) for e in events if e.kind == "transition"]


def test_stays_closed_below_min_calls_even_at_full_failure_rate() -> None:
    b, _, _ = make()
    fail(b, 4)
    assert b.state is State.CLOSED
    assert b.snapshot().failure_rate == 1.0


def test_trips_when_failure_rate_reaches_threshold_at_min_calls() -> None:
    b, _, events = make()
    succeed(b, 3)
    fail(b, 2)
    assert b.state is State.CLOSED  # 2/5 = 40 % < 50 %
    fail(b)
    assert b.state is State.OPEN  # 3/6 = 50 %
    assert transitions(events) == [("closed", "open")]
    snap = b.snapshot()
    assert snap.trip_count == 1 and snap.failures_in_window == 3 and snap.calls_in_window == 6


def test_sliding_window_forgets_old_failures() -> None:
    b, _, _ = make(window=4, min_calls=4, failure_rate=0.75)
    fail(b, 2)
    succeed(b, 2)  # window: F F S S -> 50 %
    succeed(b, 2)  # window: S S S S
    fail(b, 2)  # window: S S F F -> 50 % < 75 %
    assert b.state is State.CLOSED
    fail(b)  # S F F F -> 75 %
    assert b.state is State.OPEN


def test_trips_after_consecutive_failures() -> None:
    b, _, _ = make(consecutive_failures=3, min_calls=10)
    fail(b, 2)
    succeed(b)
    fail(b, 2)
    assert b.state is State.CLOSED
    fail(b)
    assert b.state is State.OPEN


def test_open_rejects_at_once_and_says_when_to_retry() -> None:
    b, clock, events = make(consecutive_failures=1)
    fail(b)
    clock.advance(10)
    called = []
    with pytest.raises(BreakerOpenError) as info:
        b.call(lambda: called.append(1))
    assert called == []
    err = info.value
    assert err.name == "p" and err.retry_in == pytest.approx(20.0)
    assert err.retry_at == pytest.approx(clock.t + 20.0)
    assert "20.0 s" in str(err) and "%breaker reset p" in str(err)
    assert b.snapshot().rejected_calls == 1
    assert events[-1].kind == "call" and events[-1].outcome == "rejected"


def test_half_open_after_wait_and_success_closes() -> None:
    b, clock, events = make(consecutive_failures=1)
    fail(b)
    clock.advance(29.9)
    assert b.state is State.OPEN
    clock.advance(0.1)
    assert b.state is State.HALF_OPEN
    succeed(b)
    assert b.state is State.CLOSED
    assert transitions(events) == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert b.snapshot().calls_in_window == 0  # metrics start afresh


def test_half_open_failure_reopens_and_restarts_the_wait() -> None:
    b, clock, events = make(consecutive_failures=1)
    fail(b)
    clock.advance(30)
    fail(b)
    assert b.state is State.OPEN
    assert b.snapshot().retry_in == pytest.approx(30.0)
    assert b.snapshot().trip_count == 2
    assert transitions(events)[-2:] == [("open", "half_open"), ("half_open", "open")]


def test_half_open_admits_exactly_p_trials_under_concurrency() -> None:
    permits = 3
    b, clock, _ = make(consecutive_failures=1, half_open_calls=permits)
    fail(b)
    clock.advance(30)
    n = 16
    barrier = threading.Barrier(n)
    admitted: list[int] = []
    rejected: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        barrier.wait()
        try:
            b.acquire()
        except BreakerOpenError:
            with lock:
                rejected.append(i)
            return
        with lock:
            admitted.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == permits and len(rejected) == n - permits
    assert b.state is State.HALF_OPEN  # permits held, nothing reported yet
    for _ in admitted[:-1]:
        b.record_success(0.1)
    assert b.state is State.HALF_OPEN  # still waiting for the last trial
    b.record_success(0.1)
    assert b.state is State.CLOSED


def test_half_open_decides_only_after_all_trials() -> None:
    b, clock, _ = make(consecutive_failures=1, half_open_calls=2, failure_rate=0.5)
    fail(b)
    clock.advance(30)
    b.acquire()
    b.acquire()
    with pytest.raises(BreakerOpenError):
        b.acquire()
    b.record_success(0.1)
    assert b.state is State.HALF_OPEN
    b.record_error(TransientProviderError("x"), 0.1)
    assert b.state is State.OPEN  # 1 of 2 failed = 50 % >= threshold


def test_concurrent_calls_while_half_open_all_complete_in_order() -> None:
    b, clock, events = make(consecutive_failures=1, half_open_calls=2)
    fail(b)
    clock.advance(30)
    barrier = threading.Barrier(8)
    results: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            b.call(ok)
            outcome = "ok"
        except BreakerOpenError:
            outcome = "rejected"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Either both trials ran before the others asked (6 rejected), or the breaker closed after
    # them and later callers went through: never more than 2 calls while half-open.
    assert results.count("ok") >= 2
    assert b.state is State.CLOSED
    closing = [i for i, e in enumerate(events) if e.kind == "transition" and e.new == "closed"]
    assert len(closing) == 1
    trials_before_close = [
        e for e in events[: closing[0]] if e.kind == "call" and e.outcome == "success"
    ]
    assert len(trials_before_close) == 2
    assert results.count("ok") + results.count("rejected") == 8


@pytest.mark.parametrize("error", [PromptError("bad {x}"), TemplateError("unsafe")])
def test_excluded_errors_do_not_count(error: Exception) -> None:
    b, _, events = make(consecutive_failures=1, min_calls=1)

    def user_mistake() -> None:
        raise error

    for _ in range(5):
        with pytest.raises(type(error)):
            b.call(user_mistake)
    assert b.state is State.CLOSED
    snap = b.snapshot()
    assert snap.calls_in_window == 0 and snap.total_calls == 0
    assert [e.outcome for e in events] == ["ignored"] * 5


def test_excluded_error_in_half_open_gives_the_permit_back() -> None:
    b, clock, _ = make(consecutive_failures=1)
    fail(b)
    clock.advance(30)
    with pytest.raises(PromptError):
        b.call(lambda: (_ for _ in ()).throw(PromptError("bad")))
    assert b.state is State.HALF_OPEN
    succeed(b)  # the permit is available again
    assert b.state is State.CLOSED


def test_custom_excluded_types() -> None:
    b, _, _ = make(consecutive_failures=1, excluded=(KeyError,))
    with pytest.raises(KeyError):
        b.call(lambda: {}["x"])
    assert b.state is State.CLOSED


def test_slow_calls_count_as_failures_when_enabled() -> None:
    b, clock, events = make(consecutive_failures=2, slow_call_seconds=1.0)

    def slow() -> str:
        clock.advance(1.5)
        return "late"

    assert b.call(slow) == "late"  # the result still comes back
    assert b.state is State.CLOSED
    assert events[-1].outcome == "slow" and "slow call" in (events[-1].error or "")
    b.call(slow)
    assert b.state is State.OPEN


def test_slow_calls_are_successes_when_disabled() -> None:
    b, clock, _ = make(consecutive_failures=1, slow_call_seconds=0.0)

    def slow() -> str:
        clock.advance(100)
        return "late"

    b.call(slow)
    assert b.state is State.CLOSED


def test_timeouts_the_user_asked_for_are_not_counted_while_slow_calls_are_off() -> None:
    b, _, events = make(consecutive_failures=1, half_open_calls=1)
    for _ in range(3):
        b.acquire()
        b.record_timeout(5.0)
        assert events[-1].outcome == "ignored" and "timed out" in (events[-1].error or "")
    assert b.state is State.CLOSED and b.snapshot().total_calls == 0


def test_timeouts_count_as_slow_calls_when_slow_counting_is_on() -> None:
    b, _, events = make(consecutive_failures=2, slow_call_seconds=4.0)
    b.acquire()
    b.record_timeout(1.0)  # cut by a 1 s timeout: not known to be slower than 4 s
    assert events[-1].outcome == "ignored"
    for _ in range(2):
        b.acquire()
        b.record_timeout(5.0)
        assert [e.outcome for e in events if e.kind == "call"][-1] == "slow"
    assert b.state is State.OPEN
    assert "timed out" in (b.snapshot().last_error or "")


def test_an_interrupted_result_records_nothing_and_frees_the_trial() -> None:
    b, clock, events = make(consecutive_failures=1, half_open_calls=1)
    fail(b)
    clock.advance(30)
    assert b.state is State.HALF_OPEN
    seen = len(events)
    assert b.guard(lambda: "partial", interrupted=lambda r: r == "partial") == "partial"
    assert len(events) == seen and b.state is State.HALF_OPEN
    assert b.snapshot().half_open_permits_left == 1  # the trial can still be made
    succeed(b)
    assert b.state is State.CLOSED


def test_listener_sees_outcomes_and_transitions_in_order() -> None:
    b, clock, events = make(consecutive_failures=2)
    succeed(b)
    fail(b, 2)
    with pytest.raises(BreakerOpenError):
        b.call(ok)
    clock.advance(30)
    succeed(b)
    seq = [(e.kind, e.outcome or f"{e.old}->{e.new}") for e in events]
    assert seq == [
        ("call", "success"),
        ("call", "failure"),
        ("call", "failure"),
        ("transition", "closed->open"),
        ("call", "rejected"),
        ("transition", "open->half_open"),
        ("call", "success"),
        ("transition", "half_open->closed"),
    ]
    # each event carries the snapshot as of that moment
    assert events[3].snapshot.state == "open" and events[2].snapshot.state == "closed"


def test_a_broken_listener_does_not_break_calls() -> None:
    b, _, events = make()

    def broken(_: BreakerEvent) -> None:
        raise RuntimeError("listener bug")

    b.add_listener(broken)
    succeed(b)
    assert events[-1].outcome == "success"


def test_listener_removal() -> None:
    b, _, events = make()
    seen: list[BreakerEvent] = []
    remove = b.add_listener(seen.append)
    succeed(b)
    remove()
    succeed(b)
    assert len(seen) == 1 and len(events) == 2


def test_force_open_rejects_until_reset() -> None:
    b, clock, events = make()
    b.force_open()
    clock.advance(10_000)
    assert b.state is State.FORCED_OPEN
    with pytest.raises(BreakerOpenError, match="forced open"):
        b.call(ok)
    b.reset()
    assert b.state is State.CLOSED
    succeed(b)
    assert transitions(events) == [("closed", "forced_open"), ("forced_open", "closed")]


def test_reset_closes_an_open_breaker_and_clears_the_window() -> None:
    b, _, _ = make(consecutive_failures=1)
    fail(b)
    b.reset()
    snap = b.snapshot()
    assert snap.state == "closed" and snap.calls_in_window == 0 and snap.consecutive_failures == 0
    assert snap.trip_count == 1  # history kept


def test_state_round_trip_keeps_open_wait() -> None:
    b, clock, _ = make(consecutive_failures=1)
    fail(b)
    clock.advance(10)
    saved = b.state_dict()
    assert saved["state"] == "open" and saved["retry_in"] == pytest.approx(20.0)
    # a "restarted kernel": a new breaker on a clock with a different origin
    clock2 = FakeClock(5.0)
    b2 = CircuitBreaker("p", b.settings, clock=clock2)
    b2.load_state_dict(saved)
    assert b2.state is State.OPEN
    assert b2.snapshot().retry_in == pytest.approx(20.0)
    assert b2.snapshot().trip_count == 1 and b2.snapshot().last_error == saved["last_error"]
    clock2.advance(20)
    assert b2.state is State.HALF_OPEN


def test_configure_keeps_state() -> None:
    b, clock, _ = make(consecutive_failures=1, open_seconds=30)
    fail(b)
    b.configure(BreakerSettings(consecutive_failures=1, open_seconds=2))
    clock.advance(2)
    assert b.state is State.HALF_OPEN


@pytest.mark.parametrize(
    "kw",
    [
        {"window": 0},
        {"failure_rate": 0.0},
        {"failure_rate": 1.5},
        {"half_open_calls": 0},
        {"open_seconds": -1},
    ],
)
def test_bad_settings_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BreakerSettings(**kw)  # type: ignore[arg-type]


def test_settings_from_config() -> None:
    from kernel_ext.config import KernelExtConfig

    cfg = KernelExtConfig(
        breaker_window=7,
        breaker_min_calls=3,
        breaker_failure_rate=0.25,
        breaker_consecutive_failures=0,
        breaker_open_seconds=2.0,
        breaker_half_open_calls=2,
        breaker_slow_call_seconds=4.0,
    )
    s = BreakerSettings.from_config(cfg)
    assert (
        s.window,
        s.min_calls,
        s.failure_rate,
        s.consecutive_failures,
        s.open_seconds,
        s.half_open_calls,
        s.slow_call_seconds,
    ) == (7, 3, 0.25, 0, 2.0, 2, 4.0)


def test_an_interrupted_half_open_trial_gives_its_permit_back() -> None:
    b, clock, _ = make(consecutive_failures=1)
    fail(b)
    clock.advance(30)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        b.call(interrupted)
    assert b.state is State.HALF_OPEN
    succeed(b)  # the permit was not lost with the interrupted call
    assert b.state is State.CLOSED


def test_plain_value_errors_are_excluded_but_our_value_errors_count() -> None:
    from kernel_ext.errors import GGUFFormatError

    b, _, events = make(consecutive_failures=1)

    def bad_argument() -> None:
        raise ValueError("temperature must be >= 0")

    with pytest.raises(ValueError):
        b.call(bad_argument)
    assert b.state is State.CLOSED and events[-1].outcome == "ignored"

    def corrupt_file() -> None:
        raise GGUFFormatError("truncated", path="m.gguf")  # a ValueError too, but a real fault

    with pytest.raises(GGUFFormatError):
        b.call(corrupt_file)
    assert b.state is State.OPEN


def test_guard_records_a_result_its_check_calls_timed_out_as_a_timeout() -> None:
    b, clock, events = make(consecutive_failures=2, slow_call_seconds=1.0)

    def partial() -> str:
        clock.advance(2.0)
        return "partial"

    def cut_off(result: str, took: float) -> str | None:
        return f"{result} after {took:.1f} s" if result == "partial" else None

    assert b.guard(ok, timed_out=cut_off) == "ok"
    assert events[-1].outcome == "success"
    assert b.guard(partial, timed_out=cut_off) == "partial"  # the result still comes back
    assert events[-1].outcome == "slow" and events[-1].error.startswith("partial after 2.0 s")
    b.guard(partial, timed_out=cut_off)
    assert b.state is State.OPEN
