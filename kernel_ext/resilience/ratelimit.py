"""A token bucket per provider: ``rate`` calls per second on average, bursts up to ``burst``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import RateLimitedError

__all__ = ["TokenBucket"]


class TokenBucket:
    """Thread-safe token bucket with an injectable clock. ``rate <= 0`` means unlimited."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        self.name = name
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._stamp = clock()

    @classmethod
    def from_config(
        cls, config: Any, *, name: str = "", clock: Callable[[], float] = time.monotonic
    ) -> TokenBucket:
        return cls(
            float(config.rate_limit_per_second),
            int(config.rate_limit_burst),
            name=name,
            clock=clock,
        )

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def configure(self, rate: float, burst: int) -> None:
        with self._lock:
            self._refill()
            self.rate, self.burst = float(rate), int(burst)
            self._tokens = min(self._tokens, float(burst))

    def _refill(self) -> None:
        now = self._clock()
        if self.rate > 0:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    @property
    def tokens(self) -> float:
        with self._lock:
            self._refill()
            return self._tokens

    def try_acquire(self, n: float = 1.0) -> bool:
        if self.unlimited:
            return True
        with self._lock:
            self._refill()
            if self._tokens >= n:
                self._tokens -= n
                return True
            return False

    def retry_after(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available (0 when they are now)."""
        if self.unlimited:
            return 0.0
        with self._lock:
            self._refill()
            return max(0.0, (n - self._tokens) / self.rate)

    def acquire(
        self,
        n: float = 1.0,
        *,
        max_wait: float | None = 0.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> float:
        """Take ``n`` tokens, waiting for them up to ``max_wait`` seconds (``None``: as long as
        it takes); returns the seconds waited. Raises :class:`RateLimitedError`, saying when the
        next call is allowed, when the wait would be longer than ``max_wait``.

        ``sleep`` is injectable (with a fake clock, tests never wait).
        """
        if self.try_acquire(n):
            return 0.0
        start = self._clock()
        while not self.try_acquire(n):
            wait = self.retry_after(n)
            waited = self._clock() - start
            if max_wait is not None and waited + wait > max_wait:
                bound = "" if max_wait <= 0 else f", after this call's {max_wait:.2f} s budget"
                raise RateLimitedError(
                    f"rate limit of {self.rate:g} calls/s (burst {self.burst}) reached for "
                    f"{self.name or 'this provider'}; next call allowed in {wait:.2f} s{bound} "
                    "(raise `%config KernelExt.rate_limit_per_second` to allow more, or give "
                    "the call a longer --timeout)"
                )
            sleep(max(wait, 1e-3))
        return self._clock() - start
