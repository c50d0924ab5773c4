"""``session.resilience``: the breakers, rate limits, retry policy, extra (remote) providers,
the fallback list and the offline cache of one session, and their saved state.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError
from ..providers.base import Provider
from ..providers.offline_cache import OfflineCache
from ..providers.remote import RemoteProvider
from .breaker import BreakerEvent, BreakerSettings, CircuitBreaker
from .ratelimit import TokenBucket
from .retry import RetryPolicy

__all__ = ["Resilience"]

log = logging.getLogger(__name__)


class Resilience:
    """Owns the per-provider breakers and limiters; publishes their events to the session.

    ``clock`` (monotonic) drives breakers, limiters, retries and deadlines; ``sleep`` is the
    retry wait; ``wall_clock`` dates cache entries. All injectable for tests.
    """

    def __init__(
        self,
        session: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.session = session
        self.clock = clock
        self.sleep = sleep
        self.wall_clock = wall_clock
        self.breakers: dict[str, CircuitBreaker] = {}
        self.limiters: dict[str, TokenBucket] = {}
        self.extra_providers: dict[str, Provider] = {}
        self.fallbacks: list[str] = []
        self.identities: dict[str, str] = {}  # name -> last known cache identity
        self.failed_loads: dict[str, str] = {}  # name -> why its last load failed
        self._lock = threading.RLock()
        self._cache: OfflineCache | None = None
        self._unsubscribe = session.events.subscribe("model", self._on_model_event)

    @property
    def config(self) -> Any:
        return self.session.config

    # --- parts ----------------------------------------------------------------------------------
    @property
    def offline_cache(self) -> OfflineCache:
        root = Path(self.session.state_dir) / "offline_cache"
        if self._cache is None or self._cache.root != root:
            self._cache = OfflineCache(root, clock=self.wall_clock, cipher=self._cipher)
        self._cache.max_bytes = int(float(self.config.offline_cache_max_mb) * 1e6)
        return self._cache

    def _cipher(self) -> Any:
        """The checkpoint key's cipher (it encrypts the offline cache too), or None."""
        from ..checkpoint._crypto import Cipher, key_from_env

        key = key_from_env(self.config.checkpoint_key_env)
        return Cipher(key) if key is not None else None

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy.from_config(self.config, sleep=self.sleep, clock=self.clock)

    def breaker(self, name: str) -> CircuitBreaker:
        """The breaker for provider ``name`` (created on first use, settings kept current)."""
        settings = BreakerSettings.from_config(self.config)
        with self._lock:
            b = self.breakers.get(name)
            if b is None:
                b = CircuitBreaker(name, settings, clock=self.clock)
                b.add_listener(self._on_breaker_event)
                self.breakers[name] = b
            else:
                b.configure(settings)
            return b

    def limiter(self, name: str) -> TokenBucket:
        """The rate limiter for provider ``name`` (created on first use, settings kept current)."""
        wanted = TokenBucket.from_config(self.config, name=name, clock=self.clock)
        with self._lock:
            lim = self.limiters.get(name)
            if lim is None:
                self.limiters[name] = lim = wanted
            elif (lim.rate, lim.burst) != (wanted.rate, wanted.burst):
                lim.configure(wanted.rate, wanted.burst)
            return lim

    def _on_model_event(self, event: Any) -> None:
        """Remember names whose load failed: calls to them are that provider's failures (a
        corrupt or missing file), not a user's typo."""
        name = str(event.get("name") or "")
        if event.get("action") == "failed" and name:
            self.failed_loads[name] = str((event.get("info") or {}).get("error", ""))
        elif event.get("action") == "loaded":
            self.failed_loads.pop(name, None)

    def is_known(self, name: str) -> bool:
        """A name ``%%infer --model`` accepts: a provider now, a model whose load failed (its
        breaker counts that), or one answered for before (the offline cache may answer)."""
        return name in self.known_names() or name in self.failed_loads or name in self.identities

    def _on_breaker_event(self, event: BreakerEvent) -> None:
        snap = event.snapshot.to_dict()
        events = self.session.events
        if event.kind == "transition":
            events.emit("breaker", name=event.name, old=event.old, new=event.new, snapshot=snap)
            self.session.audit.write(
                "breaker",
                name=event.name,
                old=event.old,
                new=event.new,
                trip_count=snap["trip_count"],
                failure_rate=snap["failure_rate"],
                last_error=snap["last_error"],
                **event.extra,
            )
        else:
            events.emit("breaker_call", name=event.name, outcome=event.outcome, snapshot=snap)

    # --- providers ------------------------------------------------------------------------------
    def add_provider(self, name: str, provider: Provider) -> None:
        """Register an extra provider (a remote server) under ``name``; replaces an old one."""
        with self._lock:
            old = self.extra_providers.get(name)
            self.extra_providers[name] = provider
        if old is not None and old is not provider:
            old.close()

    def remove_provider(self, name: str) -> None:
        with self._lock:
            old = self.extra_providers.pop(name, None)
        if old is not None:
            old.close()

    def known_names(self) -> list[str]:
        names = list(self.extra_providers)
        for n in self.session.models.names():
            if n not in names:
                names.append(n)
        return names

    def resolve(self, name: str) -> Provider:
        """The provider called ``name``: an extra provider or a loaded model's provider."""
        provider = self.extra_providers.get(name)
        if provider is not None:
            return provider
        if name not in self.session.models.names():
            raise ModelNotFoundError(self.describe_unknown(name))
        return self.session.models.get(name).provider

    def describe_unknown(self, name: str) -> str:
        """Why ``name`` names no provider, with the known ones and how to add it."""
        known = ", ".join(self.known_names()) or "none yet"
        return (
            f"no model or provider called {name!r} (known: {known}); load it with "
            "`%model load` or register a server with `%model remote NAME --url ...`"
        )

    def identity(self, name: str, provider: Provider | None) -> str:
        """The offline-cache identity: the model file's SHA-256, else the provider's identity.

        Remembered per name, so answers stay reachable after the model is unloaded.
        """
        if provider is None and name in self.session.models.names():
            provider = self.session.models.get(name).provider
        if provider is not None:
            self.identities[name] = provider.cache_identity()
            return self.identities[name]
        return self.identities.get(name, f"name:{name}")

    def default_model(self) -> str | None:
        active = self.session.models.active
        if active:
            return str(active)
        names = self.session.models.names()
        if names:
            return names[-1]
        if self.extra_providers:
            return next(iter(self.extra_providers))
        return None

    # --- state ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        with self._lock:
            breakers = {n: b.state_dict() for n, b in self.breakers.items()}
            return {
                "breakers": breakers,
                "fallbacks": list(self.fallbacks),
                "identities": dict(self.identities),
                "remotes": {
                    n: _remote_spec(p)
                    for n, p in self.extra_providers.items()
                    if isinstance(p, RemoteProvider)
                },
            }

    def restore_state(self, state: dict[str, Any]) -> list[str]:
        lines: list[str] = []
        # Remote providers are listed, never re-created: a checkpoint is a file anyone may have
        # edited, and a provider built from it would send prompts (and the value of whichever
        # environment variable it names as the API key) to whichever URL it names.
        for name, spec in (state.get("remotes") or {}).items():
            if name not in self.extra_providers:
                lines.append(_remote_not_restored(str(name), spec))
        for name, ident in (state.get("identities") or {}).items():
            self.identities.setdefault(str(name), str(ident))
        fallbacks = [str(n) for n in state.get("fallbacks") or []]
        if fallbacks:
            self.fallbacks = fallbacks
            lines.append(f"fallbacks: {' -> '.join(fallbacks)}")
        for name, saved in (state.get("breakers") or {}).items():
            self.breaker(name).load_state_dict(saved)
            lines.append(f"breaker {name}: {saved.get('state', 'closed')}")
        return lines

    def close(self) -> None:
        self._unsubscribe()
        with self._lock:
            providers = list(self.extra_providers.values())
            self.extra_providers.clear()
        for p in providers:
            try:
                p.close()
            except Exception:  # closing must finish for every provider
                log.exception("kernel_ext: closing provider %r failed", p)


def _remote_spec(provider: RemoteProvider) -> dict[str, Any]:
    return {
        "url": provider.base_url,
        "model": provider.model,
        "chat": provider.chat,
        "api_key_env": provider.api_key_env,
        "read_timeout": provider.read_timeout,
    }


def _remote_not_restored(name: str, spec: Any) -> str:
    """The line ``%resume`` prints for a saved remote provider: the command that registers it."""
    if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
        return f"remote provider {name} not restored (its saved settings are unreadable)"
    words = ["%model", "remote", name, "--url", spec["url"]]
    if spec.get("model"):
        words += ["--model", str(spec["model"])]
    if spec.get("chat"):
        words.append("--chat")
    if isinstance(spec.get("read_timeout"), (int, float)):
        words += ["--timeout", f"{float(spec['read_timeout']):g}"]
    if spec.get("api_key_env"):
        words += ["--api-key-env", str(spec["api_key_env"])]
    return (
        f"remote provider {name} not restored: a checkpoint cannot vouch for the server it names "
        f"or for which environment variable holds its key; check the URL, then re-register it "
        f"with: {shlex.join(words)}"
    )
