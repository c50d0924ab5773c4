"""Health probes and warm-up for every provider (the design's ``health_check`` and
``warm_cache``).

:func:`probe` asks a provider for a real answer: a loaded model generates one token; a remote
server is asked ``/v1/models`` and then a one-token completion. The outcome is fed to the
provider's circuit breaker (a success is a successful call, a failure a failed one: a probe
of a half-open breaker is its trial), kept in ``session.health`` for ``%model list`` and
audited (kind ``health``). :func:`warm` makes the first real answer fast: the model is loaded
(which fills the conversion cache), its weights are paged in and its first forward pass runs
(on a remote server: one completion, so the server has the model loaded).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .errors import KernelExtError, ProviderError
from .providers.base import GenerationParams

__all__ = ["ProbeResult", "probe", "probe_all", "warm"]

PROBE_PROMPT = "Hello"


@dataclass(frozen=True)
class ProbeResult:
    name: str
    ok: bool
    detail: str
    latency_s: float
    checked_at: float
    breaker: str | None = None  # the breaker's state after the probe

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _params(timeout: float) -> GenerationParams:
    return GenerationParams(max_new_tokens=1, temperature=0.0, timeout=timeout)


def probe(session: Any, name: str, *, timeout: float = 30.0,
          clock: Callable[[], float] = time.perf_counter) -> ProbeResult:
    """Probe provider ``name`` (a loaded model or a registered server); never raises for a
    provider fault, only for an unknown name (:class:`ModelNotFoundError`)."""
    hub = session.resilience
    provider = hub.resolve(name) if hub is not None else session.models.get(name).provider
    breaker = hub.breaker(name) if hub is not None else None
    start = clock()
    error: BaseException | None = None
    detail = ""
    try:
        provider.load()
        health = provider.health()  # remote: GET /v1/models
        if not health.ok:
            raise ProviderError(f"{name}: {health.detail}")
        result = provider.generate(PROBE_PROMPT, _params(timeout))
        if result.timed_out:
            raise ProviderError(f"{name}: no token within {timeout:g} s")
        detail = f"answered 1 token in {clock() - start:.2f} s"
    except (KernelExtError, OSError) as e:
        error, detail = e, f"{type(e).__name__}: {e}"
    took = clock() - start
    if breaker is not None:
        if error is None:
            breaker.record_success(took)
        else:
            breaker.record_error(error, took)
    state = breaker.state.value if breaker is not None else None
    out = ProbeResult(name, error is None, " ".join(detail.split())[:300], round(took, 4),
                      time.time(), state)
    session.health[name] = out
    session.audit.write("health", name=name, ok=out.ok, detail=out.detail,
                        latency_s=out.latency_s, breaker=state)
    return out


def probe_all(session: Any, *, timeout: float = 30.0) -> list[ProbeResult]:
    """:func:`probe` every provider: loaded models and registered servers."""
    hub = session.resilience
    names = hub.known_names() if hub is not None else session.models.names()
    return [probe(session, n, timeout=timeout) for n in names]


def warm(session: Any, target: str | None, *, timeout: float = 300.0,
         progress: bool = True) -> tuple[str, list[str]]:
    """Make the first answer of ``target`` fast: load it if it is not loaded (a path or the
    default model; this fills the conversion cache), page its weights in and run a first
    forward pass (one token). Returns (provider name, what was done)."""
    done: list[str] = []
    hub = session.resilience
    known = set(session.models.names()) | (set(hub.extra_providers) if hub is not None else set())
    name = target if target is not None else session.models.active
    if name is None or name not in known:
        entry = session.models.load(target, progress=progress)
        name = entry.name
        filled = " (conversion cache filled)" if session.config.conversion_cache else ""
        done.append(f"loaded {name} in {entry.load_s:.1f} s{filled}")
    assert name is not None
    if name in session.models.names():
        model = session.models.get(name).provider.local.model
        t0 = time.perf_counter()
        touched = _page_in(model)
        done.append(f"paged in {touched / 2**20:.0f} MiB of weights in "
                    f"{time.perf_counter() - t0:.2f} s")
    result = probe(session, name, timeout=timeout)
    if not result.ok:
        raise ProviderError(f"warming {name} failed: {result.detail}")
    done.append(f"first forward pass: {result.latency_s:.2f} s")
    return name, done


def _page_in(model: Any) -> int:
    """Read every weight once (memory-mapped cache files fault in now, not mid-answer)."""
    import torch

    total = 0
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.reshape(-1)[:: max(1, 4096 // max(1, t.element_size()))].sum()
                total += t.numel() * t.element_size()
    return total
