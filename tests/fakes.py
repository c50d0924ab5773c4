"""Test doubles for what tests cannot cause for real: the passage of time."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """Monotonic fake time. ``advance`` moves it; ``sleep`` moves it and is recorded, so code
    given ``sleep=clock.sleep`` never sleeps for real."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s
