"""The Session: one per kernel, the single source of truth for models, breakers, checkpoints
and the audit log. Magics call it; widgets observe its ``events``.

Event kinds published on ``session.events`` (payload keys in brackets):
- ``model``       [action: "loading"|"loaded"|"unloaded"|"failed", name, info]
- ``load_progress`` [name, done, total, stage]
- ``infer``       [action: "start"|"end"|"error", correlation_id, model, result|error]
- ``breaker``     [name, old, new, snapshot]   (state transitions)
- ``breaker_call`` [name, outcome, snapshot]   (every recorded call)
- ``checkpoint``  [action: "committed"|"failed"|"restored"|"skipped", status]
- ``task``        [name, done, total]
- ``alert``       [action: "raised"|"cleared", alert, active]
- ``audit``       [record]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .alerts import Alerts
from .audit import AuditLog
from .config import KernelExtConfig
from .events import EventBus
from .paths import notebook_state_dir, user_cache_dir
from .providers.base import GenerationParams, GenerationResult, TokenCallback
from .trace import CellTrace

if TYPE_CHECKING:  # pragma: no cover
    from IPython.core.interactiveshell import InteractiveShell

__all__ = ["Session"]

log = logging.getLogger(__name__)


class Session:
    """Everything kernel_ext knows about this kernel."""

    def __init__(
        self,
        config: KernelExtConfig | None = None,
        shell: InteractiveShell | None = None,
        *,
        state_dir: str | Path | None = None,
    ) -> None:
        self.config = config if config is not None else KernelExtConfig()
        self.shell = shell
        self.events = EventBus()
        self.lock = threading.RLock()
        user_ns = shell.user_ns if shell is not None else None
        if state_dir is not None:
            self.state_dir = Path(state_dir)
        elif self.config.state_dir:
            self.state_dir = Path(self.config.state_dir).expanduser()
        else:
            self.state_dir = notebook_state_dir(user_ns)
        cfg = self.config
        # one correlation id per cell (pre_run_cell), stamped on every audit record
        self.trace = CellTrace()
        if shell is not None:
            # what the extension's load writes (the lease, a restored breaker...) belongs to the
            # cell that ran %load_ext: its pre_run_cell came before our hook existed
            self.trace.begin_cell()
        self.audit = AuditLog(
            self.state_dir / "audit.jsonl", events=self.events, correlation=self.trace.current,
            max_bytes=lambda: int(cfg.audit_max_mb * 1024 * 1024),
            backups=lambda: cfg.audit_backups)
        self.alerts = Alerts(self)
        self.health: dict[str, Any] = {}  # provider -> last kernel_ext.health.ProbeResult
        # Parts attached by their subsystems (models, resilience, checkpoint); see each module.
        from .models import ModelRegistry

        self.models = ModelRegistry(self)
        # Set by kernel_ext.resilience.attach and kernel_ext.checkpoint.attach on extension load;
        # a bare Session (tests, scripts) has the direct chain and no breakers or checkpoints.
        self.chain: Any = _DirectChain(self)
        self.resilience: Any = None
        self.breakers: dict[str, Any] = {}
        self.extra_providers: dict[str, Any] = {}
        self.checkpoints: Any = None
        self._closers: list[Callable[[], None]] = []
        self.last_result: GenerationResult | None = None
        self.on_close(self.alerts.close)
        if shell is not None:
            shell.events.register("pre_run_cell", self.trace.begin_cell)
            shell.events.register("post_run_cell", self._after_cell)
            self.on_close(self._unregister_cell_hooks)

    def _after_cell(self, *_: object) -> None:
        self.alerts.check_memory()

    def _unregister_cell_hooks(self) -> None:
        assert self.shell is not None
        for name, fn in (("pre_run_cell", self.trace.begin_cell),
                         ("post_run_cell", self._after_cell)):
            try:
                self.shell.events.unregister(name, fn)
            except ValueError:  # already gone
                pass

    # --- paths ----------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return user_cache_dir(self.config.cache_dir)

    def move_state_dir(self, path: str | Path) -> None:
        """Keep the audit log (and the offline cache, which follows ``state_dir``) in ``path``
        from now on (``%config KernelExt.state_dir`` after load)."""
        self.state_dir = Path(path)
        self.audit.path = self.state_dir / "audit.jsonl"

    # --- lifecycle ------------------------------------------------------------------------------
    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the session closes (extension unload, kernel shutdown)."""
        self._closers.append(fn)

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:  # closing must finish even if one part fails
                log.exception("kernel_ext: error while closing %r", fn)
        self._closers.clear()
        self.models.unload_all()

    # --- %reload_ext: the same kernel goes on ---------------------------------------------------
    def handover(self) -> dict[str, Any]:
        """Detach what the next Session of this same kernel keeps (``%reload_ext``,
        ``%unload_ext`` + ``%load_ext``): the loaded models (not unloaded by :meth:`close`),
        remote providers, breaker and fallback state, the state directory, the settings and
        the checkpoint manager's choices. Call before :meth:`close`."""
        from .models import ModelRegistry

        kept, self.models = self.models, ModelRegistry(self)
        handover: dict[str, Any] = {
            "models": kept, "state_dir": self.state_dir, "config": self.config,
            "checkpoints": self.checkpoints.handover() if self.checkpoints is not None else None,
        }
        if self.resilience is not None:
            handover["resilience"] = self.resilience.state()
            handover["remotes"] = dict(self.extra_providers)
            self.extra_providers.clear()  # the hub's own dict: closing closes none of them
        return handover

    def adopt(self, handover: dict[str, Any]) -> list[str]:
        """Take over what :meth:`handover` left (before the subsystems attach); returns what
        was kept, in words."""
        from traitlets import dlink

        lines = []
        old = handover["config"]
        changed = []
        for name in sorted(type(self.config).class_trait_names(config=True)):
            value = getattr(old, name)
            if value != getattr(self.config, name):
                setattr(self.config, name, value)
                changed.append(name)
            # Models kept below read settings through the old object: keep it in step.
            dlink((self.config, name), (old, name))
        self.move_state_dir(handover["state_dir"])
        registry = handover["models"]
        registry.session = self
        self.models = registry
        if registry.names():
            active = f" ({registry.active} active)" if registry.active else ""
            lines.append(f"kept model(s) {', '.join(registry.names())}{active}")
        if changed:
            lines.append(f"kept your settings ({', '.join(changed)})")
        return lines

    def adopt_resilience(self, handover: dict[str, Any]) -> list[str]:
        """After ``resilience.attach``: the remote providers, breakers and fallbacks come back."""
        if self.resilience is None or "resilience" not in handover:
            return []
        self.extra_providers.update(handover.get("remotes") or {})
        self.resilience.restore_state(handover["resilience"])
        kept = [*handover.get("remotes", {}), *handover["resilience"].get("breakers", {})]
        return ["kept breakers, fallbacks and remote providers"] if kept else []

    # --- inference ------------------------------------------------------------------------------
    def infer(self, prompt: str, params: GenerationParams, *, model: str | None = None,
              on_token: TokenCallback | None = None) -> GenerationResult:
        """Answer ``prompt`` through the fallback chain (primary model, fallbacks, offline cache)."""
        self.events.emit("infer", action="start", model=model)
        try:
            result = self.chain.run(prompt, params, model=model, on_token=on_token)
        except Exception as e:
            self.events.emit("infer", action="error", model=model, error=e)
            raise
        self.last_result = result
        self.events.emit("infer", action="end", model=result.model, result=result,
                         correlation_id=result.correlation_id)
        return result

    # --- state for checkpoints ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-able session state saved with each snapshot (models, breakers, fallbacks)."""
        state: dict[str, Any] = {"models": self.models.state()}
        if self.resilience is not None:
            state["resilience"] = self.resilience.state()  # breaker states, fallbacks, remotes
        return state

    def restore_state(self, state: dict[str, Any]) -> list[str]:
        """Bring back what :meth:`state` saved; returns human-readable lines of what was done."""
        lines = self.models.restore_state(state.get("models", []))
        if self.resilience is not None and state.get("resilience"):
            lines += self.resilience.restore_state(state["resilience"])
        return lines


class _DirectChain:
    """The chain before resilience is attached: the model's own provider, with its timeout."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def run(self, prompt: str, params: GenerationParams, *, model: str | None = None,
            on_token: TokenCallback | None = None) -> GenerationResult:
        import time

        from .resilience.chain import make_should_stop

        provider = self.session.models.get(model).provider
        deadline = time.monotonic() + params.timeout if params.timeout else None
        return provider.generate(
            prompt, params, on_token=on_token,
            should_stop=make_should_stop(deadline, time.monotonic) if deadline else None,
        )
