"""A circuit breaker per provider, with resilience4j's state machine.

States: ``closed`` -> ``open`` when, over a sliding window of the last ``window`` recorded
calls (and at least ``min_calls`` of them), the failure rate reaches ``failure_rate``, or after
``consecutive_failures`` failures in a row. While ``open`` every call is rejected at once with
:class:`~kernel_ext.errors.BreakerOpenError`. After ``open_seconds`` the breaker is
``half_open`` and admits exactly ``half_open_calls`` trial calls (even under concurrency);
once all trials have reported, their failure rate closes or re-opens it (with one trial: any
failure re-opens). ``forced_open`` (``force_open()``) rejects until ``reset()``.

Outcomes: ``success``; ``failure``; ``slow`` (a call slower than ``slow_call_seconds`` when that
is set, including one cut by its timeout after at least that long: counted as a failure);
``ignored`` (an excluded error, the user's own mistake, or a call cut by the timeout the user
asked for while slow-call counting is off: not counted, and a half-open permit is given back);
``rejected``. A call the user interrupted (an exception that is not an ``Exception``, or a
result the caller reports as interrupted) records nothing and gives its permit back.

Time comes from an injectable ``clock`` (monotonic seconds), so tests never sleep. Listeners
receive every outcome and transition, in order: they run under the breaker's lock.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from ..errors import BreakerOpenError, KernelExtError, OptionError, PromptError, TemplateError

__all__ = [
    "DEFAULT_EXCLUDED",
    "BreakerEvent",
    "BreakerSettings",
    "BreakerSnapshot",
    "CircuitBreaker",
    "Outcome",
    "State",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_EXCLUDED: tuple[type[BaseException], ...] = (PromptError, TemplateError, OptionError)
"""The user's own mistakes: they say nothing about the provider's health."""


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    SLOW = "slow"
    IGNORED = "ignored"
    REJECTED = "rejected"


_COUNTED_AS_FAILURE = (Outcome.FAILURE, Outcome.SLOW)


@dataclass(frozen=True)
class BreakerSettings:
    """The knobs; :meth:`from_config` reads ``config.breaker_*``."""

    window: int = 10
    min_calls: int = 5
    failure_rate: float = 0.5
    consecutive_failures: int = 3  # 0: disabled
    open_seconds: float = 30.0
    half_open_calls: int = 1
    slow_call_seconds: float = 0.0  # 0: disabled
    excluded: tuple[type[BaseException], ...] = DEFAULT_EXCLUDED
    # A bare ``ValueError`` (not one of ours, such as GGUFFormatError for a corrupt file) is a
    # bad argument handed to a library: the user's mistake, not the provider's health.
    exclude_plain_value_errors: bool = True

    def is_excluded(self, error: BaseException) -> bool:
        if isinstance(error, self.excluded):
            return True
        return (
            self.exclude_plain_value_errors
            and isinstance(error, ValueError)
            and not isinstance(error, KernelExtError)
        )

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_calls < 1 or self.half_open_calls < 1:
            raise ValueError("window, min_calls and half_open_calls must be at least 1")
        if not 0.0 < self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in (0, 1], got {self.failure_rate}")
        if self.open_seconds < 0 or self.slow_call_seconds < 0 or self.consecutive_failures < 0:
            raise ValueError(
                "open_seconds, slow_call_seconds and consecutive_failures must be >= 0"
            )

    @classmethod
    def from_config(cls, config: Any) -> BreakerSettings:
        return cls(
            window=int(config.breaker_window),
            min_calls=int(config.breaker_min_calls),
            failure_rate=float(config.breaker_failure_rate),
            consecutive_failures=int(config.breaker_consecutive_failures),
            open_seconds=float(config.breaker_open_seconds),
            half_open_calls=int(config.breaker_half_open_calls),
            slow_call_seconds=float(config.breaker_slow_call_seconds),
        )


@dataclass(frozen=True)
class BreakerSnapshot:
    """What a widget shows; JSON-able through :meth:`to_dict`."""

    name: str
    state: str
    calls_in_window: int
    failures_in_window: int
    failure_rate: float
    consecutive_failures: int
    retry_in: float | None
    last_error: str | None
    trip_count: int
    total_calls: int
    rejected_calls: int
    half_open_permits_left: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BreakerEvent:
    """``kind`` is ``"call"`` (``outcome`` set) or ``"transition"`` (``old``/``new`` set)."""

    kind: str
    name: str
    snapshot: BreakerSnapshot
    outcome: str | None = None
    old: str | None = None
    new: str | None = None
    error: str | None = None
    duration: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


BreakerListener = Callable[[BreakerEvent], None]


def _describe(error: BaseException | str | None) -> str | None:
    if error is None or isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}"


class CircuitBreaker:
    """Thread-safe circuit breaker. Use :meth:`call`, or :meth:`acquire` + ``record_*``."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._settings = settings or BreakerSettings()
        self._clock = clock
        self._lock = threading.RLock()
        self._listeners: list[BreakerListener] = []
        self._state = State.CLOSED
        self._window: deque[bool] = deque(maxlen=self._settings.window)  # True = failure
        self._consecutive = 0
        self._opened_at: float | None = None
        self._permits_left = 0
        self._trials: list[bool] = []
        self._last_error: str | None = None
        self._trip_count = 0
        self._total_calls = 0
        self._rejected = 0

    # --- configuration and observation ------------------------------------------------------
    @property
    def settings(self) -> BreakerSettings:
        return self._settings

    def configure(self, settings: BreakerSettings) -> None:
        """Apply new settings, keeping the state and the most recent outcomes."""
        with self._lock:
            if settings == self._settings:
                return
            self._settings = settings
            self._window = deque(self._window, maxlen=settings.window)

    def add_listener(self, listener: BreakerListener) -> Callable[[], None]:
        """``listener(event)`` for every outcome and transition; returns a remover."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove

    @property
    def state(self) -> State:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def snapshot(self) -> BreakerSnapshot:
        with self._lock:
            self._maybe_half_open()
            return self._snapshot()

    # --- calls --------------------------------------------------------------------------------
    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` under the breaker: rejected while open, its outcome recorded."""
        return self.guard(lambda: fn(*args, **kwargs))

    def guard(
        self,
        fn: Callable[[], T],
        *,
        timed_out: Callable[[T, float], str | None] | None = None,
        interrupted: Callable[[T], bool] | None = None,
    ) -> T:
        """:meth:`call` for ``fn()``; a result for which ``timed_out(result, seconds)`` gives a
        message (a partial answer cut off by its timeout) is recorded by :meth:`record_timeout`;
        one for which ``interrupted(result)`` is true (the user stopped it) records nothing."""
        self.acquire()
        start = self._clock()
        finished = False
        try:
            result = fn()
            finished = True
        except Exception as e:
            finished = True
            self.record_error(e, self._clock() - start)
            raise
        finally:
            if not finished:
                # interrupted (KeyboardInterrupt, SystemExit): no outcome, give the permit back
                self.release()
        took = self._clock() - start
        if interrupted is not None and interrupted(result):
            self.release()  # the user stopped it: says nothing about the provider's health
            return result
        detail = timed_out(result, took) if timed_out is not None else None
        if detail is not None:
            self.record_timeout(took, detail)
        else:
            self.record_success(took)
        return result

    def acquire(self) -> None:
        """Take permission for one call or raise :class:`BreakerOpenError`."""
        with self._lock:
            self._maybe_half_open()
            if self._state is State.CLOSED:
                return
            if self._state is State.HALF_OPEN and self._permits_left > 0:
                self._permits_left -= 1
                return
            self._rejected += 1
            retry_in = self._retry_in()
            if self._state is State.FORCED_OPEN:
                msg = (
                    f"circuit breaker {self.name!r} was forced open; "
                    f"run `%breaker reset {self.name}` to allow calls again"
                )
            elif self._state is State.HALF_OPEN:
                msg = (
                    f"circuit breaker {self.name!r} is half-open and its "
                    f"{self._settings.half_open_calls} trial call(s) are in flight; "
                    "try again shortly"
                )
            else:
                msg = (
                    f"circuit breaker {self.name!r} is open after repeated failures "
                    f"(last: {self._last_error}); next trial call allowed in "
                    f"{retry_in:.1f} s, or run `%breaker reset {self.name}`"
                )
            err = BreakerOpenError(
                msg,
                name=self.name,
                retry_in=retry_in,
                retry_at=None if retry_in is None else self._clock() + retry_in,
            )
            self._emit_call(Outcome.REJECTED, str(err), None)
            raise err

    def record_success(self, duration: float = 0.0) -> Outcome:
        slow_limit = self._settings.slow_call_seconds
        if slow_limit > 0 and duration > slow_limit:
            return self._record(
                Outcome.SLOW, f"slow call: {duration:.2f} s > {slow_limit:.2f} s", duration
            )
        return self._record(Outcome.SUCCESS, None, duration)

    def record_timeout(self, duration: float = 0.0, detail: str = "") -> Outcome:
        """A call cut off by the timeout the caller asked for. It is a slow call (a failure)
        when slow-call counting is on and it ran at least ``slow_call_seconds``; otherwise it
        says nothing about the provider's health and is not counted."""
        detail = detail or f"timed out after {duration:.2f} s"
        slow_limit = self._settings.slow_call_seconds
        if slow_limit > 0 and duration >= slow_limit:
            return self._record(Outcome.SLOW, f"{detail} (slow: >= {slow_limit:g} s)", duration)
        return self._record(Outcome.IGNORED, detail, duration)

    def record_error(self, error: BaseException, duration: float = 0.0) -> Outcome:
        if self._settings.is_excluded(error):
            return self._record(Outcome.IGNORED, _describe(error), duration)
        return self._record(Outcome.FAILURE, _describe(error), duration)

    def release(self) -> None:
        """Give back a permission taken by :meth:`acquire` without recording an outcome."""
        with self._lock:
            if self._state is State.HALF_OPEN:
                self._permits_left = min(
                    self._permits_left + 1, self._settings.half_open_calls - len(self._trials)
                )

    # --- manual control -----------------------------------------------------------------------
    def force_open(self) -> None:
        with self._lock:
            self._transition(State.FORCED_OPEN)

    def reset(self) -> None:
        """Back to closed with an empty window (the trip count is kept)."""
        with self._lock:
            self._transition(State.CLOSED)

    # --- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; the open wait is saved as time left, so it survives a restart."""
        with self._lock:
            self._maybe_half_open()
            return {
                "state": self._state.value,
                "window": [bool(x) for x in self._window],
                "consecutive_failures": self._consecutive,
                "retry_in": self._retry_in(),
                "last_error": self._last_error,
                "trip_count": self._trip_count,
                "total_calls": self._total_calls,
                "rejected_calls": self._rejected,
            }

    def load_state_dict(self, data: dict[str, Any]) -> None:
        with self._lock:
            state = State(data.get("state", "closed"))
            self._window = deque(
                (bool(x) for x in data.get("window", [])), maxlen=self._settings.window
            )
            self._consecutive = int(data.get("consecutive_failures", 0))
            self._last_error = data.get("last_error")
            self._trip_count = int(data.get("trip_count", 0))
            self._total_calls = int(data.get("total_calls", 0))
            self._rejected = int(data.get("rejected_calls", 0))
            self._trials = []
            if state is State.HALF_OPEN:
                state = State.OPEN  # trials in flight did not survive; wait no longer
                retry_in = 0.0
            else:
                retry_in = float(data.get("retry_in") or 0.0)
            old = self._state
            self._state = state
            self._permits_left = 0
            self._opened_at = (
                self._clock() - max(0.0, self._settings.open_seconds - retry_in)
                if state is State.OPEN
                else None
            )
            if old is not state:
                self._emit(
                    BreakerEvent(
                        "transition",
                        self.name,
                        self._snapshot(),
                        old=old.value,
                        new=state.value,
                        extra={"restored": True},
                    )
                )

    # --- internals (call with the lock held) --------------------------------------------------
    def _emit_call(self, outcome: Outcome, error: str | None, duration: float | None) -> None:
        self._emit(BreakerEvent("call", self.name, self._snapshot(), outcome=outcome.value,
                                error=error, duration=duration))

    def _record(self, outcome: Outcome, error: str | None, duration: float) -> Outcome:
        with self._lock:
            self._maybe_half_open()
            if outcome is Outcome.IGNORED:
                self.release()
                self._emit_call(outcome, error, duration)
                return outcome
            failed = outcome in _COUNTED_AS_FAILURE
            self._total_calls += 1
            if failed:
                self._last_error = error
            if self._state is State.HALF_OPEN:
                self._trials.append(failed)
                self._emit_call(outcome, error, duration)
                if len(self._trials) >= self._settings.half_open_calls:
                    rate = sum(self._trials) / len(self._trials)
                    self._transition(
                        State.OPEN if rate >= self._settings.failure_rate else State.CLOSED
                    )
                return outcome
            if self._state is not State.CLOSED:
                # A call admitted before the breaker opened finished late: count it, no trip.
                self._emit_call(outcome, error, duration)
                return outcome
            self._window.append(failed)
            self._consecutive = self._consecutive + 1 if failed else 0
            self._emit_call(outcome, error, duration)
            if failed and self._should_trip():
                self._transition(State.OPEN)
            return outcome

    def _should_trip(self) -> bool:
        s = self._settings
        if s.consecutive_failures and self._consecutive >= s.consecutive_failures:
            return True
        n = len(self._window)
        return n >= min(s.min_calls, s.window) and sum(self._window) / n >= s.failure_rate

    def _maybe_half_open(self) -> None:
        if (
            self._state is State.OPEN
            and self._opened_at is not None
            and self._clock() - self._opened_at >= self._settings.open_seconds
        ):
            self._transition(State.HALF_OPEN)

    def _retry_in(self) -> float | None:
        if self._state is not State.OPEN or self._opened_at is None:
            return None
        return max(0.0, self._opened_at + self._settings.open_seconds - self._clock())

    def _transition(self, new: State) -> None:
        old = self._state
        self._state = new
        self._trials = []
        if new is State.OPEN:
            self._opened_at = self._clock()
            self._permits_left = 0
            self._trip_count += 1
        elif new is State.HALF_OPEN:
            self._permits_left = self._settings.half_open_calls
        else:
            self._opened_at = None
            self._permits_left = 0
            if new is State.CLOSED:
                self._window.clear()
                self._consecutive = 0
        if new is State.FORCED_OPEN and old is not State.FORCED_OPEN:
            self._trip_count += 1
        self._emit(
            BreakerEvent("transition", self.name, self._snapshot(), old=old.value, new=new.value)
        )

    def _snapshot(self) -> BreakerSnapshot:
        n = len(self._window)
        failures = sum(self._window)
        return BreakerSnapshot(
            name=self.name,
            state=self._state.value,
            calls_in_window=n,
            failures_in_window=failures,
            failure_rate=(failures / n) if n else 0.0,
            consecutive_failures=self._consecutive,
            retry_in=self._retry_in(),
            last_error=self._last_error,
            trip_count=self._trip_count,
            total_calls=self._total_calls,
            rejected_calls=self._rejected,
            half_open_permits_left=self._permits_left if self._state is State.HALF_OPEN else 0,
        )

    def _emit(self, event: BreakerEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break the call it observes
                log.exception("breaker listener %r failed", listener)
