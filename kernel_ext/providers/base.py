"""The provider protocol and the values that cross it.

A provider turns a prompt into text. It knows nothing about breakers, retries or notebooks:
those wrap it (``kernel_ext.resilience``). Every provider passes ``tests/provider_contract.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "GenerationParams",
    "GenerationResult",
    "Health",
    "Provider",
    "TokenCallback",
    "StopCheck",
]

TokenCallback = Callable[[str], None]
"""Receives each new piece of text as it is generated."""

StopCheck = Callable[[], bool]
"""Polled between tokens; returning True stops generation cooperatively."""


@dataclass(frozen=True)
class GenerationParams:
    """How to generate. Frozen and hashable: part of the offline-cache key."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    system: str | None = None
    chat: bool | None = None  # None: use the chat template when the model has one
    timeout: float | None = None  # seconds; None or 0: no timeout

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def cache_key(self) -> dict[str, Any]:
        """The fields that change the answer (timeout does not)."""
        d = dataclasses.asdict(self)
        d.pop("timeout")
        d["stop"] = list(self.stop)
        return d

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)


@dataclass
class GenerationResult:
    """The outcome of one inference. ``str(result)`` is the generated text."""

    text: str
    prompt: str = ""
    model: str = ""
    provider: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | timeout | cached
    time_to_first_token_s: float | None = None
    total_s: float = 0.0
    cached: bool = False
    cache_age_s: float | None = None
    correlation_id: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)  # filled by the fallback chain
    notes: list[str] = field(default_factory=list)  # degradations, skips: shown in the footer

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: completion tokens over the time after the first token."""
        if self.completion_tokens <= 0 or self.total_s <= 0:
            return 0.0
        ttft = self.time_to_first_token_s or 0.0
        decode = self.total_s - ttft
        if self.completion_tokens > 1 and decode > 0:
            return (self.completion_tokens - 1) / decode
        return self.completion_tokens / self.total_s

    @property
    def timed_out(self) -> bool:
        return self.finish_reason == "timeout"

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        preview = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        extra = ""
        if self.cached:
            age = f", age {self.cache_age_s:.0f}s" if self.cache_age_s is not None else ""
            extra = f", cached{age}"
        return (
            f"InferenceResult(model={self.model!r}, provider={self.provider!r}, "
            f"tokens={self.prompt_tokens}+{self.completion_tokens}, "
            f"{self.tokens_per_s:.1f} tok/s, finish={self.finish_reason!r}{extra}, "
            f"text={preview!r})"
        )

    def footer(self) -> str:
        """The one-line summary printed under a streamed answer."""
        parts = [
            self.model or self.provider,
            f"{self.prompt_tokens}+{self.completion_tokens} tokens",
            f"{self.tokens_per_s:.1f} tok/s",
            f"{self.total_s:.2f} s",
            f"provider {self.provider}",
        ]
        if self.cached:
            age = f" ({self.cache_age_s:.0f} s old)" if self.cache_age_s is not None else ""
            parts.append(f"cached{age}")
        if self.timed_out:
            parts.append("TIMED OUT (partial)")
        elif self.finish_reason == "length":
            parts.append("hit max-new-tokens")
        parts.extend(self.notes)
        return " · ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str = ""


@runtime_checkable
class Provider(Protocol):
    """What every provider offers."""

    name: str

    def load(self) -> None:
        """Make the provider ready (load weights, open a connection). Idempotent."""

    def generate(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        on_token: TokenCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> GenerationResult:
        """Generate a completion; stream pieces to ``on_token``; stop when ``should_stop()``."""

    def health(self) -> Health:
        """A cheap check of whether a call could succeed now."""

    def cache_identity(self) -> str:
        """What makes this provider's answers interchangeable (the offline-cache key part)."""

    def close(self) -> None:
        """Free what ``load`` took. Idempotent."""
