"""Test doubles for what tests cannot cause for real: the passage of time, and a user who
presses the stop button at an exact moment."""

from __future__ import annotations

from typing import Any

from kernel_ext.providers.base import GenerationParams, GenerationResult, Health

__all__ = ["FakeClock", "InterruptingProvider"]


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


class InterruptingProvider:
    """A provider whose user presses the stop button after ``stream_before`` pieces.

    ``mode="returns"``: it gives back the partial result marked ``interrupted`` (what every
    provider does); ``mode="raises"``: the ``KeyboardInterrupt`` escapes (a provider that does
    not catch it). ``interrupt_on_call`` (1-based) picks the call that is interrupted; the
    others answer in full.
    """

    def __init__(self, name: str, mode: str = "returns", stream_before: int = 2,
                 interrupt_on_call: int = 1) -> None:
        self.name = name
        self.mode = mode
        self.stream_before = stream_before
        self.interrupt_on_call = interrupt_on_call
        self.calls: list[GenerationParams] = []

    def cache_identity(self) -> str:
        return f"interrupting:{self.name}"

    def load(self) -> None:
        return None

    def health(self) -> Health:
        return Health(True)

    def close(self) -> None:
        return None

    def generate(self, prompt: str, params: GenerationParams, *, on_token: Any = None,
                 should_stop: Any = None) -> GenerationResult:
        self.calls.append(params)
        stop = len(self.calls) == self.interrupt_on_call
        pieces = ["alpha", " beta", " gamma"][: self.stream_before] if stop else ["whole"]
        for piece in pieces:
            if on_token is not None:
                on_token(piece)
        if stop and self.mode == "raises":
            raise KeyboardInterrupt
        return GenerationResult(text="".join(pieces), prompt=prompt, model=self.name,
                                provider=self.name, prompt_tokens=3,
                                completion_tokens=len(pieces),
                                finish_reason="interrupted" if stop else "stop")
