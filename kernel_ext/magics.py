"""The magics. Bodies stay short: each routes to ``kernel_ext.cmd.<module>.run``.

Settings are the traits of :class:`kernel_ext.config.KernelExtConfig`, configurable as
``%config KernelExt.<name> = value``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .config import KernelExtConfig
from .errors import KernelExtError
from .session import Session

__all__ = ["KernelExt"]

F = TypeVar("F", bound=Callable[..., Any])

# magic name -> module under kernel_ext.cmd that implements it
_COMMANDS: dict[str, str] = {
    "infer": "infer",
    "model": "model",
    "checkpoint": "checkpoint",
    "resume": "checkpoint",
    "breaker": "resilience",
    "audit": "resilience",
    "dashboard": "dashboard",
}


def _user_errors(fn: F) -> F:
    """Library errors reach the user as one short ``UsageError`` line, never a traceback wall."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError:
            raise
        except KernelExtError as e:
            raise UsageError(f"{type(e).__name__}: {e}") from e

    return wrapper  # type: ignore[return-value]


def _run(ext: KernelExt, magic: str, line: str, cell: str | None = None) -> Any:
    module = importlib.import_module(f"kernel_ext.cmd.{_COMMANDS[magic]}")
    return module.run(ext, magic, line, cell)


@magics_class
class KernelExt(Magics, KernelExtConfig):
    """kernel_ext's magics and settings (``%config KernelExt``)."""

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.session = Session(self, shell)

    @cell_magic
    @_user_errors
    def infer(self, line: str, cell: str) -> Any:
        """Run the cell as a prompt: ``%%infer [--model M] [-o VAR] ...``; ``%%infer --help``."""
        return _run(self, "infer", line, cell)

    @line_magic
    @_user_errors
    def model(self, line: str) -> Any:
        """``%model load|list|info|unload|fallback|cache ...``"""
        return _run(self, "model", line)

    @line_magic
    @_user_errors
    def checkpoint(self, line: str) -> Any:
        """``%checkpoint now|status|list|diff|track|untrack|ignore|off|on``"""
        return _run(self, "checkpoint", line)

    @line_magic
    @_user_errors
    def resume(self, line: str) -> Any:
        """``%resume [SNAP] [--vars a b ...]``: restore variables, models and tasks."""
        return _run(self, "resume", line)

    @line_magic
    @_user_errors
    def breaker(self, line: str) -> Any:
        """``%breaker [list|reset NAME|open NAME]``"""
        return _run(self, "breaker", line)

    @line_magic
    @_user_errors
    def audit(self, line: str) -> Any:
        """``%audit [--tail N] [--kind K]``"""
        return _run(self, "audit", line)

    @line_magic
    @_user_errors
    def dashboard(self, line: str) -> Any:
        """``%dashboard``: live breaker, memory and checkpoint panels."""
        return _run(self, "dashboard", line)
