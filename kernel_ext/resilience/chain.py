"""The fallback chain: primary -> configured fallbacks in order -> offline response cache.

Each provider is called through its rate limiter, its circuit breaker and the retry policy
(transient errors only). The rate limiter waits for its next token as long as the call's
timeout allows (and the answer says it waited); past that the provider is skipped. Out of
memory is retried once, after :mod:`kernel_ext.oom` dropped what the error kept alive, with
half the prefill chunk and half the ``max_new_tokens``; then the chain moves on. A timeout
(``params.timeout``) stops generation cooperatively through ``should_stop`` and returns the
partial text marked ``finish_reason="timeout"``; the breaker counts it as a slow call only when
slow-call counting is on (``breaker_slow_call_seconds``).

The stop button (``KeyboardInterrupt``) ends the run at once with the partial text marked
``finish_reason="interrupted"``: whether the provider returned such a result itself or the
interrupt escaped it, there is no retry and no fallback, the breaker records nothing, and the
run is audited like any other.

The result records every attempt (``result.attempts``) and every degradation
(``result.notes``); each run writes one ``infer`` line to the audit log (:meth:`_audit`, the
only writer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .. import oom
from ..errors import (
    AllProvidersFailedError,
    BreakerOpenError,
    ModelNotFoundError,
    ProviderOutOfMemoryError,
    RateLimitedError,
)
from ..providers.base import GenerationParams, GenerationResult, Provider, TokenCallback
from ..trace import new_id, request_scope
from .hub import Resilience

__all__ = ["FallbackChain"]

log = logging.getLogger(__name__)


_NOT_A_TRY = ("retry", "rate_limit_wait")  # attempt records that are part of another try


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class _Run:
    """The bookkeeping of one ``FallbackChain.run`` call."""

    def __init__(
        self, hub: Resilience, prompt: str, params: GenerationParams, on_token: TokenCallback | None
    ) -> None:
        self.hub = hub
        self.prompt = prompt
        self.params = params
        self.user_on_token = on_token
        self.attempts: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.causes: dict[str, BaseException] = {}
        self.streamed = 0  # characters the current provider has streamed so far
        self.pieces: list[str] = []  # what the current provider has streamed (for an interrupt)
        self.current = ""  # the provider (or "the offline cache") being tried
        self.abandoned: str | None = None  # why streamed text was left behind, until set apart
        clock = hub.clock
        self.start = clock()
        timeout = params.timeout or 0.0
        self.deadline = self.start + timeout if timeout > 0 else None

    def on_token(self, piece: str) -> None:
        self.set_apart()
        self.streamed += len(piece)
        self.pieces.append(piece)
        if self.user_on_token is not None:
            self.user_on_token(piece)

    def abandon(self, name: str, error: BaseException) -> bool:
        """``name`` failed after streaming some text, which stays in the cell: the next answer
        is set apart from it by a separator line. Returns whether any text was streamed."""
        self.pieces = []
        if not self.streamed:
            return False
        self.streamed = 0
        reason = _err(error).splitlines()[0] if str(error) else type(error).__name__
        self.abandoned = f"{name} failed: {reason[:200]}"
        return True

    def set_apart(self) -> None:
        """Emit the separator owed to abandoned streamed text, before the next answer streams."""
        if self.abandoned is None:
            return
        line = f"\n[{self.abandoned}; answer from {self.current} follows]\n"
        self.abandoned = None
        if self.user_on_token is not None:
            self.user_on_token(line)

    def should_stop(self) -> bool:
        return self.deadline is not None and self.hub.clock() >= self.deadline

    def time_left(self) -> float | None:
        """Seconds until the deadline (never negative); ``None`` without a timeout."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self.hub.clock())

    def interrupted(self) -> GenerationResult:
        """The result of a run the user interrupted where no provider could return one: the
        text the current provider had streamed, marked ``interrupted``."""
        name = self.current or ""
        self.attempt(name or "-", "interrupted", None, None)
        return GenerationResult(
            text="".join(self.pieces),
            prompt=self.prompt,
            model=name,
            provider=name,
            completion_tokens=len(self.pieces),
            finish_reason="interrupted",
            total_s=self.hub.clock() - self.start,
            notes=["interrupted by the user"],
        )

    def attempt(
        self,
        provider: str,
        outcome: str,
        error: BaseException | str | None,
        breaker_state: str | None,
        **extra: Any,
    ) -> None:
        err = error if error is None or isinstance(error, str) else _err(error)
        self.attempts.append(
            {
                "provider": provider,
                "outcome": outcome,
                "error": err,
                "breaker_state": breaker_state,
                **extra,
            }
        )


class FallbackChain:
    """``run(prompt, params, model=..., on_token=...)`` -> :class:`GenerationResult`."""

    def __init__(self, hub: Resilience) -> None:
        self.hub = hub

    @property
    def session(self) -> Any:
        return self.hub.session

    def candidates(self, model: str | None) -> list[str]:
        """Provider names in the order they are tried."""
        primary = model or self.hub.default_model()
        names = [primary] if primary else []
        for n in self.hub.fallbacks:
            if n not in names:
                names.append(n)
        return names

    def run(
        self,
        prompt: str,
        params: GenerationParams | None = None,
        *,
        model: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> GenerationResult:
        params = params or GenerationParams()
        trace = getattr(self.session, "trace", None)
        cid = (trace.current() if trace is not None else None) or new_id()
        with request_scope(cid):  # the cell's id: on every record, and remote X-Request-ID
            return self._run(prompt, params, model, on_token, cid)

    def _run(
        self,
        prompt: str,
        params: GenerationParams,
        model: str | None,
        on_token: TokenCallback | None,
        cid: str,
    ) -> GenerationResult:
        names = self.candidates(model)
        run = _Run(self.hub, prompt, params, on_token)
        identities: list[str] = []
        result: GenerationResult | None = None
        try:
            for name in names:
                result = self._try(run, name, identities)
                if result is not None:
                    break
            if result is None:
                result = self._from_cache(run, identities)
        except KeyboardInterrupt:
            # The stop button, escaping a provider (or arriving between providers, during a
            # retry or rate-limit wait): keep what was streamed; no retry, no fallback.
            result = run.interrupted()
        except Exception as e:  # an unexpected bug: audit it, then let it surface
            self._audit(run, cid, model, names, None, e)
            raise
        if result is None:
            error = self._all_failed(run, names, model)
            self._audit(run, cid, model, names, None, error)
            raise error
        result.correlation_id = cid
        result.attempts = run.attempts
        result.notes = [*run.notes, *result.notes]
        if not result.prompt:
            result.prompt = prompt
        self._audit(run, cid, model, names, result, None)
        return result

    # --- one provider ---------------------------------------------------------------------------
    def _try(self, run: _Run, name: str, identities: list[str]) -> GenerationResult | None:
        hub = self.hub
        breaker = hub.breaker(name)
        try:
            provider = hub.resolve(name)
        except ModelNotFoundError as e:
            # A model that is not loaded (its file missing or corrupt, so the load failed) is a
            # failure of that provider: it counts, and an open breaker skips it at once.
            identities.append(hub.identity(name, None))
            try:
                breaker.acquire()
            except BreakerOpenError as rejected:
                run.causes[name] = rejected
                run.attempt(name, "rejected", rejected, breaker.state.value)
                return None
            breaker.record_error(e)
            run.causes[name] = e
            run.attempt(name, "unavailable", e, breaker.state.value)
            return None
        identities.append(hub.identity(name, provider))
        if run.deadline is not None and run.should_stop():
            err = f"skipped: the {run.params.timeout:g} s timeout had passed"
            run.causes[name] = TimeoutError(err)
            run.attempt(name, "skipped", err, breaker.state.value)
            return None
        params = run.params
        run.current = name
        for degraded in (False, True):
            try:
                result = self._call(run, name, provider, params)
            except ProviderOutOfMemoryError as e:
                run.causes[name] = e
                run.abandon(name, e)
                run.attempt(
                    name,
                    "out_of_memory",
                    e,
                    breaker.state.value,
                    max_new_tokens=params.max_new_tokens,
                )
                oom.release(e)  # the frames' KV cache and activations, then empty_cache()
                retry = None if degraded else oom.retry_params(params, e.prompt_tokens)
                if retry is not None:
                    params, what = retry
                    run.notes.append(f"{name} ran out of memory; retried with {what}")
                    continue
                run.notes.append(f"{name} ran out of memory again; falling back")
                return None
            except BreakerOpenError as e:
                run.causes[name] = e
                run.attempt(name, "rejected", e, breaker.state.value)
                run.notes.append(f"skipped {name}: breaker {breaker.state.value}")
                return None
            except RateLimitedError as e:
                run.causes[name] = e
                run.attempt(name, "rate_limited", e, breaker.state.value)
                run.notes.append(
                    f"skipped {name}: its rate limit allows the next call only after this "
                    "call's timeout"
                )
                return None
            except Exception as e:  # provider failures, and a provider's own bugs: next one
                if breaker.settings.is_excluded(e):
                    raise  # the user's own mistake (a bad option): no fallback can fix it
                self._failed(run, name, breaker.state.value, e)
                return None
            outcome = result.finish_reason if result.partial else "ok"
            run.attempt(name, outcome, None, breaker.state.value)
            if not result.provider:
                result.provider = name
            if not result.partial and self.session.config.offline_cache:
                try:
                    hub.offline_cache.put(identities[-1], run.prompt, params, result)
                except OSError as e:
                    log.warning("kernel_ext: cannot keep the answer in the offline cache: %s", e)
            return result
        return None  # pragma: no cover - the loop always returns

    def _failed(self, run: _Run, name: str, state: str, e: BaseException) -> None:
        run.causes[name] = e
        run.attempt(name, "failed", e, state)
        if run.abandon(name, e):
            run.notes.append(
                f"{name} failed after streaming part of an answer; that part is not in the answer"
            )

    def _call(
        self, run: _Run, name: str, provider: Provider, params: GenerationParams
    ) -> GenerationResult:
        hub = self.hub
        breaker = hub.breaker(name)
        limiter = hub.limiter(name)
        retries = hub.retry_policy()

        def generate() -> GenerationResult:
            provider.load()
            return provider.generate(
                run.prompt, params, on_token=run.on_token, should_stop=run.should_stop
            )

        def timed_out(result: GenerationResult, took: float) -> str | None:
            if not result.timed_out:
                return None
            return f"timed out after {took:.2f} s (timeout {params.timeout:g} s)"

        def interrupted(result: GenerationResult) -> bool:
            return result.interrupted

        def once() -> GenerationResult:
            waited = limiter.acquire(max_wait=run.time_left(), sleep=hub.sleep)
            if waited > 0:
                run.attempt(name, "rate_limit_wait", None, breaker.state.value,
                            wait_s=round(waited, 3))
                run.notes.append(
                    f"waited {waited:.2f} s for {name}'s rate limit "
                    f"({limiter.rate:g} calls/s, burst {limiter.burst})"
                )
            return breaker.guard(generate, timed_out=timed_out, interrupted=interrupted)

        def on_retry(attempt: int, error: BaseException, wait: float) -> None:
            run.attempt(
                name, "retry", error, breaker.state.value, attempt=attempt, wait_s=round(wait, 3)
            )
            run.notes.append(f"{name}: transient error, retry {attempt} after {wait:.2f} s")
            run.abandon(name, error)

        return retries.call(once, on_retry=on_retry, deadline=run.deadline)

    # --- the last resort ------------------------------------------------------------------------
    def _from_cache(self, run: _Run, identities: list[str]) -> GenerationResult | None:
        if not self.session.config.offline_cache:
            run.causes["offline_cache"] = RuntimeError(
                "the offline cache is off (KernelExt.offline_cache = False)"
            )
            return None
        try:
            hit = self.hub.offline_cache.get(identities, run.prompt, run.params)
        except OSError as e:
            run.causes["offline_cache"] = e
            run.attempt("offline_cache", "failed", e, None)
            return None
        if hit is None:
            msg = "no answer kept for this prompt and these settings"
            run.causes["offline_cache"] = LookupError(msg)
            run.attempt("offline_cache", "miss", msg, None)
            return None
        run.attempt("offline_cache", "cached", None, None, age_s=round(hit.cache_age_s or 0, 3))
        if run.user_on_token is not None and hit.text:
            run.current = "the offline cache"
            run.set_apart()
            run.user_on_token(hit.text)
        return hit

    def _all_failed(
        self, run: _Run, names: list[str], model: str | None
    ) -> AllProvidersFailedError:
        if not names:
            return AllProvidersFailedError(
                "no model to run: load one with `%model load`, or register a server with "
                "`%model remote NAME --url ...`",
                {},
            )
        lines = [f"  - {name}: {_err(e)}" for name, e in run.causes.items()]
        msg = (
            "every provider failed"
            + (f" for {model!r}" if model else "")
            + ":\n"
            + "\n".join(lines)
            + "\nFix the first cause, add a fallback (`%model fallback NAME`), or "
            "`%breaker reset NAME` once the provider is back."
        )
        return AllProvidersFailedError(msg, run.causes)

    def _audit(
        self,
        run: _Run,
        cid: str,
        model: str | None,
        names: list[str],
        result: GenerationResult | None,
        error: BaseException | None,
    ) -> None:
        hub = self.hub
        breakers = {n: b.state.value for n, b in hub.breakers.items() if n in names}
        latency = hub.clock() - run.start
        fields: dict[str, Any] = {
            "correlation_id": cid,
            "model": model or (names[0] if names else None),
            "providers_tried": list(dict.fromkeys(
                a["provider"] for a in run.attempts if a["outcome"] not in _NOT_A_TRY)),
            "attempts": run.attempts,
            "breakers": breakers,
            "latency_s": round(latency, 6),
        }
        if result is not None:
            fields.update(
                outcome="cached" if result.cached else (
                    result.finish_reason if result.partial else "ok"),
                provider=result.provider,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                finish_reason=result.finish_reason,
                cached=result.cached,
                cache_age_s=result.cache_age_s,
                notes=result.notes,
            )
        else:
            fields.update(
                outcome="failed",
                provider=None,
                cached=False,
                error=_err(error) if error is not None else None,
            )
        self.session.audit.write("infer", **fields)


def make_should_stop(deadline: float | None, clock: Callable[[], float]) -> Callable[[], bool]:
    """A ``should_stop`` for providers: True once ``clock()`` reaches ``deadline``."""
    return lambda: deadline is not None and clock() >= deadline
