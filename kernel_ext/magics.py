"""The magics. Bodies stay short: each routes to ``kernel_ext.cmd.<module>.run``.

Settings are the traits of :class:`kernel_ext.config.KernelExtConfig`, configurable as
``%config KernelExt.<name> = value``. Each magic's docstring is its command's help, so
``%%infer?`` and ``%%infer --help`` print the same usage.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from typing import Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .cmd import dashboard as _dashboard_cmd
from .cmd import infer as _infer_cmd
from .cmd import model as _model_cmd
from .cmd import resilience as _resilience_cmd
from .cmd._args import HelpRequested, documented
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
        except HelpRequested as h:
            print(h.text)
            return None
        except UsageError:
            raise
        except KernelExtError as e:
            raise UsageError(f"{type(e).__name__}: {e}") from e

    return wrapper  # type: ignore[return-value]


def _run(ext: KernelExt, magic: str, line: str, cell: str | None = None) -> Any:
    module = importlib.import_module(f"kernel_ext.cmd.{_COMMANDS[magic]}")
    return module.run(ext, magic, line, cell)


_CELL_HELP = re.compile(r"^%%infer\b[^\n]*?(?:^|\s)(?:-h|--help)(?:\s|$)")


def _help_without_body(lines: list[str]) -> list[str]:
    """Input transformer: ``%%infer --help`` alone in a cell gets an empty body.

    IPython refuses a cell magic whose body is empty before the magic runs ("the cell body is
    empty"), so without this ``%%infer --help`` could not print the usage.
    """
    if lines and len([x for x in lines if x.strip()]) == 1 and _CELL_HELP.match(lines[0]):
        return [lines[0].rstrip("\n") + "\n", "\n"]
    return lines


@magics_class
class KernelExt(Magics, KernelExtConfig):
    """kernel_ext's magics and settings (``%config KernelExt``)."""

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.session = Session(self, shell)
        transforms = getattr(shell, "input_transformers_cleanup", None)
        if transforms is not None and _help_without_body not in transforms:
            transforms.append(_help_without_body)
            self.session.on_close(lambda: _remove(transforms, _help_without_body))

    @cell_magic
    @documented(_infer_cmd.usage)
    @_user_errors
    def infer(self, line: str, cell: str) -> Any:
        return _run(self, "infer", line, cell)

    @line_magic
    @documented(_model_cmd.usage)
    @_user_errors
    def model(self, line: str) -> Any:
        return _run(self, "model", line)

    @line_magic
    @_user_errors
    def checkpoint(self, line: str) -> Any:
        """``%checkpoint now|status|list|diff|track|untrack|ignore|off|on|verify|takeover``"""
        return _run(self, "checkpoint", line)

    @line_magic
    @_user_errors
    def resume(self, line: str) -> Any:
        """``%resume [SNAP] [--vars a b ...]``: restore variables, models and tasks."""
        return _run(self, "resume", line)

    @line_magic
    @documented(_resilience_cmd.breaker_usage)
    @_user_errors
    def breaker(self, line: str) -> Any:
        return _run(self, "breaker", line)

    @line_magic
    @documented(_resilience_cmd.audit_usage)
    @_user_errors
    def audit(self, line: str) -> Any:
        return _run(self, "audit", line)

    @line_magic
    @documented(_dashboard_cmd.usage)
    @_user_errors
    def dashboard(self, line: str) -> Any:
        return _run(self, "dashboard", line)


def _remove(items: list[Any], item: Any) -> None:
    while item in items:
        items.remove(item)
