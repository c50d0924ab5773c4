"""Token-bucket rate limiting on a fake clock."""

from __future__ import annotations

import threading

import pytest

from kernel_ext.errors import RateLimitedError
from kernel_ext.resilience.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_refill_at_rate() -> None:
    clock = Clock()
    b = TokenBucket(2.0, 3, name="remote", clock=clock)
    assert [b.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert b.retry_after() == pytest.approx(0.5)
    clock.t += 0.5
    assert b.try_acquire() and not b.try_acquire()
    clock.t += 100  # never more than the burst
    assert b.tokens == pytest.approx(3.0)


def test_acquire_raises_a_clear_error() -> None:
    clock = Clock()
    b = TokenBucket(1.0, 1, name="remote", clock=clock)
    b.acquire()
    with pytest.raises(RateLimitedError, match=r"remote.*1 s|remote.*next call allowed in 1.00 s"):
        b.acquire()


def test_zero_rate_is_unlimited() -> None:
    b = TokenBucket(0.0, 1, clock=Clock())
    assert all(b.try_acquire() for _ in range(1000))
    assert b.retry_after() == 0.0


def test_concurrent_acquires_never_exceed_the_bucket() -> None:
    b = TokenBucket(1.0, 5, clock=Clock())
    barrier = threading.Barrier(20)
    got: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        r = b.try_acquire()
        with lock:
            got.append(r)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got.count(True) == 5


def test_configure_changes_rate_and_caps_tokens() -> None:
    clock = Clock()
    b = TokenBucket(1.0, 10, clock=clock)
    b.configure(5.0, 2)
    assert b.tokens == pytest.approx(2.0)
    b.try_acquire(), b.try_acquire()
    clock.t += 0.2
    assert b.try_acquire()


@pytest.mark.parametrize("rate,burst", [(-1.0, 1), (1.0, 0)])
def test_bad_settings(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)
