"""Retries: transient errors only, exponential backoff with jitter, bounded by attempts and time."""

from __future__ import annotations

import pytest
from fakes import FakeClock as Clock

from kernel_ext.errors import (
    BreakerOpenError,
    OptionError,
    PromptError,
    ProviderError,
    ProviderOutOfMemoryError,
    RateLimitedError,
    TransientProviderError,
)
from kernel_ext.resilience.retry import RetryPolicy, is_transient


def policy(clock: Clock, **kw: object) -> RetryPolicy:
    defaults: dict[str, object] = {
        "attempts": 4,
        "max_seconds": 100.0,
        "initial": 0.5,
        "max_wait": 8.0,
        "jitter": 0.0,
        "sleep": clock.sleep,
        "clock": clock,
    }
    defaults.update(kw)
    return RetryPolicy(**defaults)  # type: ignore[arg-type]


def flaky(fails: int, error: Exception) -> tuple[list[int], object]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= fails:
            raise error
        return "done"

    return calls, fn


def test_transient_errors_are_retried_with_exponential_backoff() -> None:
    clock = Clock(0.0)
    calls, fn = flaky(3, TransientProviderError("503"))
    assert policy(clock).call(fn) == "done"  # type: ignore[arg-type]
    assert len(calls) == 4
    assert clock.sleeps == [0.5, 1.0, 2.0]


def test_connection_errors_count_as_transient() -> None:
    clock = Clock(0.0)
    calls, fn = flaky(1, ConnectionResetError("reset"))
    assert policy(clock).call(fn) == "done"  # type: ignore[arg-type]
    assert len(calls) == 2


def test_gives_up_after_attempts_and_reraises_the_last_error() -> None:
    clock = Clock(0.0)
    calls, fn = flaky(10, TransientProviderError("still down"))
    with pytest.raises(TransientProviderError, match="still down"):
        policy(clock, attempts=3).call(fn)  # type: ignore[arg-type]
    assert len(calls) == 3 and len(clock.sleeps) == 2


def test_total_time_budget_bounds_retries_and_cuts_the_last_wait() -> None:
    clock = Clock(0.0)
    calls, fn = flaky(100, TransientProviderError("down"))
    with pytest.raises(TransientProviderError):
        policy(clock, attempts=100, max_seconds=5.0).call(fn)  # type: ignore[arg-type]
    # waits 0.5, 1, 2, then cut to the 1.5 s left; no attempt starts after the budget
    assert clock.sleeps == [0.5, 1.0, 2.0, 1.5]
    assert clock.t == pytest.approx(5.0)
    assert len(calls) == 5


def test_waits_are_capped_and_jittered() -> None:
    clock = Clock(0.0)
    values = iter([0.0, 1.0, 0.5, 0.25, 0.0, 1.0])
    p = policy(clock, attempts=7, initial=1.0, max_wait=4.0, jitter=0.5, rng=lambda: next(values))
    _, fn = flaky(6, TransientProviderError("x"))
    p.call(fn)  # type: ignore[arg-type]
    assert clock.sleeps == pytest.approx([1.0, 2.5, 4.25, 4.125, 4.0, 4.5])


@pytest.mark.parametrize(
    "error",
    [
        ProviderError("HTTP 400: bad request"),
        PromptError("missing {x}"),
        ValueError("bad option"),
        ProviderOutOfMemoryError("CUDA OOM"),
        OptionError("temperature", "must be a finite number, got nan"),
        BreakerOpenError("open", name="p"),
        RateLimitedError("slow down"),
    ],
)
def test_non_transient_errors_are_never_retried(error: Exception) -> None:
    clock = Clock(0.0)
    calls, fn = flaky(5, error)
    with pytest.raises(type(error)):
        policy(clock).call(fn)  # type: ignore[arg-type]
    assert len(calls) == 1 and clock.sleeps == []
    assert not is_transient(error)


def test_on_retry_reports_each_retry() -> None:
    clock = Clock(0.0)
    seen: list[tuple[int, str, float]] = []
    _, fn = flaky(2, TransientProviderError("503"))
    policy(clock).call(fn, on_retry=lambda n, e, w: seen.append((n, str(e), w)))  # type: ignore[arg-type]
    assert seen == [(1, "503", 0.5), (2, "503", 1.0)]


def test_from_config() -> None:
    from kernel_ext.config import KernelExtConfig

    p = RetryPolicy.from_config(KernelExtConfig(retry_attempts=5, retry_max_seconds=7.0))
    assert (p.attempts, p.max_seconds) == (5, 7.0)


def test_a_deadline_ends_retries_and_caps_the_wait() -> None:
    clock = Clock(0.0)
    calls, fn = flaky(100, TransientProviderError("down"))
    with pytest.raises(TransientProviderError):
        policy(clock, attempts=100, max_seconds=100.0).call(fn, deadline=2.0)  # type: ignore[arg-type]
    assert clock.sleeps == [0.5, 1.0, 0.5]
    assert len(calls) == 4 and clock.t == pytest.approx(2.0)
