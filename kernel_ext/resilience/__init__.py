"""Circuit breakers, retries, timeouts, rate limits and the fallback chain.

``attach(session)`` (called on extension load) gives the session:

- ``session.resilience``: the :class:`Resilience` hub (breakers, limiters, retry policy,
  ``extra_providers``, ``fallbacks``, the offline cache, saved state);
- ``session.chain``: the :class:`FallbackChain` that ``Session.infer`` runs;
- ``session.breakers``, ``session.extra_providers``: shortcuts to the hub's dicts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .breaker import BreakerEvent, BreakerSettings, BreakerSnapshot, CircuitBreaker, Outcome, State
from .chain import FallbackChain
from .hub import Resilience
from .ratelimit import TokenBucket
from .retry import RetryPolicy, is_transient

__all__ = [
    "BreakerEvent",
    "BreakerSettings",
    "BreakerSnapshot",
    "CircuitBreaker",
    "FallbackChain",
    "Outcome",
    "Resilience",
    "RetryPolicy",
    "State",
    "TokenBucket",
    "attach",
    "is_transient",
]


def attach(
    session: Any,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall_clock: Callable[[], float] = time.time,
) -> Resilience:
    """Give ``session`` its breakers and fallback chain (idempotent); returns the hub."""
    hub = getattr(session, "resilience", None)
    if isinstance(hub, Resilience):
        return hub
    hub = Resilience(session, clock=clock, sleep=sleep, wall_clock=wall_clock)
    session.resilience = hub
    session.breakers = hub.breakers
    session.extra_providers = hub.extra_providers
    session.chain = FallbackChain(hub)
    session.on_close(hub.close)
    return hub
