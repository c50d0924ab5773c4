"""Retries with exponential backoff and jitter, for transient errors only (tenacity).

Bad input (``ValueError``-like errors, 4xx answers), open breakers, rate limits, timeouts and
out-of-memory errors are never retried here: OOM is handled by the chain, which degrades.
``sleep`` and ``clock`` are injectable, so tests never wait.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

from ..errors import ProviderOutOfMemoryError, TransientProviderError

__all__ = ["RetryPolicy", "is_transient"]

T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    """Worth another try: a :class:`TransientProviderError` or a dropped connection."""
    if isinstance(error, ProviderOutOfMemoryError):
        return False
    return isinstance(error, (TransientProviderError, ConnectionError))


@dataclass
class RetryPolicy:
    """``attempts`` tries at most, never past ``max_seconds`` since the first one.

    Waits grow as ``initial * 2**n`` up to ``max_wait`` plus up to ``jitter`` seconds of random
    jitter, and are cut so the total stays inside ``max_seconds``.
    """

    attempts: int = 3
    max_seconds: float = 30.0
    initial: float = 0.5
    max_wait: float = 8.0
    jitter: float = 0.5
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: Callable[[], float] = random.random

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> RetryPolicy:
        return cls(
            attempts=int(config.retry_attempts),
            max_seconds=float(config.retry_max_seconds),
            **kwargs,
        )

    def wait_for(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), before the cut."""
        base = min(self.max_wait, self.initial * (2 ** (attempt - 1)))
        return base + self.jitter * self.rng()

    def call(
        self,
        fn: Callable[[], T],
        *,
        on_retry: Callable[[int, BaseException, float], None] | None = None,
        deadline: float | None = None,
    ) -> T:
        """Run ``fn()``, retrying transient failures; the last error propagates unchanged.

        ``deadline`` (on ``clock``'s scale, e.g. the call's timeout) also ends the retries, and
        no wait runs past it.
        """
        start = self.clock()

        def left() -> float:
            budget = self.max_seconds - (self.clock() - start)
            if deadline is not None:
                budget = min(budget, deadline - self.clock())
            return budget

        def wait(state: tenacity.RetryCallState) -> float:
            return max(0.0, min(self.wait_for(state.attempt_number), left()))

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= self.attempts:
                return True
            # Stop when the budget is spent, or when the next wait would reach it anyway.
            return left() <= 0

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None and state.next_action is not None:
                err = state.outcome.exception()
                if err is not None:
                    on_retry(state.attempt_number, err, state.next_action.sleep)

        retrying = tenacity.Retrying(
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception(is_transient),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(fn)
