"""Circuit breakers, retries, timeouts, rate limits and the fallback chain."""

from __future__ import annotations

from typing import Any

__all__ = ["attach"]


def attach(session: Any) -> None:
    """Give ``session`` its breakers and fallback chain."""
    # Filled in by the resilience work: see kernel_ext/resilience/.
