"""Argument parsing for magics: argparse that raises ``UsageError`` instead of exiting."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import Any, NoReturn

from IPython.core.error import UsageError

__all__ = ["MagicParser", "split", "dispatch"]


class MagicParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors become short ``UsageError`` messages."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("add_help", False)
        kwargs.setdefault("exit_on_error", False)
        super().__init__(prog=prog, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or self.format_usage().strip())

    def parse(self, line: str | list[str]) -> argparse.Namespace:
        """Parse a magic line (or its already split words); mistakes raise ``UsageError``."""
        words = split(line) if isinstance(line, str) else list(line)
        if "--help" in words or "-h" in words:
            raise UsageError(self.format_help())
        try:
            return self.parse_args(words)
        except argparse.ArgumentError as e:
            self.error(str(e))


def split(line: str) -> list[str]:
    try:
        return shlex.split(line, posix=True)
    except ValueError as e:
        raise UsageError(f"cannot parse arguments {line!r}: {e} (check your quotes)") from e


def dispatch(prog: str, line: str, table: dict[str, Callable[[list[str]], Any]],
             default: str | None = None) -> Any:
    """Route ``line``'s first word to ``table[word](rest)``; lists the choices on a miss."""
    words = split(line)
    if not words:
        if default is None:
            raise UsageError(f"{prog}: say what to do: {' | '.join(table)}")
        words = [default]
    sub, rest = words[0], words[1:]
    handler = table.get(sub)
    if handler is None:
        raise UsageError(f"{prog}: unknown subcommand {sub!r}; choose one of: {', '.join(table)}")
    return handler(rest)
