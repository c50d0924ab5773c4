"""The provider protocol and the values that cross it.

A provider turns a prompt into text. It knows nothing about breakers, retries or notebooks:
those wrap it (``kernel_ext.resilience``). Every provider passes ``tests/provider_contract.py``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import OptionError

__all__ = [
    "FINISH_REASONS",
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "PARAM_RANGES",
    "GenerationParams",
    "GenerationResult",
    "Health",
    "ParamRange",
    "Provider",
    "StopCheck",
    "TokenCallback",
    "check_param",
]

TokenCallback = Callable[[str], None]
"""Receives each new piece of text as it is generated."""

StopCheck = Callable[[], bool]
"""Polled between tokens; returning True stops generation cooperatively."""


@dataclass(frozen=True)
class ParamRange:
    """The values a numeric generation option accepts: finite, within ``[lo, hi]`` (``lo``
    excluded when ``lo_open``), whole numbers when ``integer``."""

    lo: float
    hi: float
    integer: bool = False
    lo_open: bool = False
    hint: str = ""

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a finite number"
        lo, hi = (f"{int(v)}" if self.integer else f"{v:g}" for v in (self.lo, self.hi))
        if self.lo_open:
            text = f"{kind} in ({lo}, {hi}]"
        else:
            text = f"{kind} from {lo} to {hi}"
        return f"{text} ({self.hint})" if self.hint else text

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(float(value)):
            return False
        above_lo = value > self.lo if self.lo_open else value >= self.lo
        return bool(above_lo and value <= self.hi)


MAX_NEW_TOKENS = 32768
MAX_STOPS = 16
MAX_STOP_CHARS = 256

PARAM_RANGES: dict[str, ParamRange] = {
    "max_new_tokens": ParamRange(1, MAX_NEW_TOKENS, integer=True),
    "temperature": ParamRange(0.0, 100.0, hint="0 is greedy"),
    "top_p": ParamRange(0.0, 1.0, lo_open=True),
    "top_k": ParamRange(0, 1_000_000, integer=True, hint="0: off"),
    "seed": ParamRange(0, 2**63 - 1, integer=True),
    "timeout": ParamRange(0.0, 86400.0, hint="seconds; 0: no timeout"),
}
"""The one table of what each numeric option accepts: ``%%infer`` and ``%config`` refuse
anything else, and a :class:`GenerationParams` outside it cannot be built, so a provider never
sees an invalid request (and a breaker never counts one)."""


def check_param(name: str, value: Any) -> None:
    """Raise :class:`OptionError` unless ``value`` is acceptable for option ``name``."""
    allowed = PARAM_RANGES[name]
    if not allowed.accepts(value):
        raise OptionError(name, f"must be {allowed.describe()}, got {value!r}")


def _check_stops(stop: Any) -> None:
    if not isinstance(stop, tuple) or not all(isinstance(s, str) for s in stop):
        raise OptionError("stop", f"must be a tuple of strings, got {stop!r}")
    if len(stop) > MAX_STOPS:
        raise OptionError("stop", f"takes at most {MAX_STOPS} stop strings, got {len(stop)}")
    long = [s for s in stop if len(s) > MAX_STOP_CHARS]
    if long:
        raise OptionError(
            "stop", f"strings are at most {MAX_STOP_CHARS} characters, got one of {len(long[0])}"
        )


@dataclass(frozen=True)
class GenerationParams:
    """How to generate. Frozen and hashable: part of the offline-cache key.

    Validated on construction against :data:`PARAM_RANGES` (:class:`OptionError` otherwise).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    system: str | None = None
    chat: bool | None = None  # None: use the chat template when the model has one
    timeout: float | None = None  # seconds; None or 0: no timeout
    prefill_chunk: int | None = None  # prompt tokens per forward (None: all); set after an OOM

    def __post_init__(self) -> None:
        for name in PARAM_RANGES:
            value = getattr(self, name)
            if value is None and name in ("seed", "timeout"):
                continue
            check_param(name, value)
        _check_stops(self.stop)
        if self.system is not None and not isinstance(self.system, str):
            raise OptionError("system", f"must be text, got {type(self.system).__name__}")
        if self.chat not in (None, True, False):
            raise OptionError("chat", f"must be True, False or None, got {self.chat!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def cache_key(self) -> dict[str, Any]:
        """The fields that change the answer (timeout and prefill_chunk do not)."""
        d = dataclasses.asdict(self)
        d.pop("timeout")
        d.pop("prefill_chunk")
        d["stop"] = list(self.stop)
        return d

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)


FINISH_REASONS = ("stop", "length", "timeout", "interrupted", "cached")
"""Why an answer ended: a stop string or end of text; ``max_new_tokens``; the call's timeout
(partial text); the user's interrupt, the stop button (partial text); served from the offline
cache."""


@dataclass
class GenerationResult:
    """The outcome of one inference (what ``%%infer -o VAR`` stores). ``str(result)`` is the
    generated text; ``finish_reason`` is one of :data:`FINISH_REASONS`."""

    text: str
    prompt: str = ""
    model: str = ""
    provider: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # one of FINISH_REASONS
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

    @property
    def interrupted(self) -> bool:
        """Stopped by the user (the stop button): ``text`` is what came before."""
        return self.finish_reason == "interrupted"

    @property
    def partial(self) -> bool:
        """Cut short (timeout or interrupt): never kept in the offline cache."""
        return self.timed_out or self.interrupted

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        preview = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        extra = ""
        if self.cached:
            age = f", age {self.cache_age_s:.0f}s" if self.cache_age_s is not None else ""
            extra = f", cached{age}"
        return (
            f"GenerationResult(model={self.model!r}, provider={self.provider!r}, "
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
        elif self.interrupted:
            parts.append("INTERRUPTED (partial)")
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
