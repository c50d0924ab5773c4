"""Argument parsing for magics: IPython's ``magic_arguments``, plus subcommand routing.

A command declares its options with IPython's decorators on a plain function whose docstring
is the description::

    @magic_arguments("%infer")            # prog: shown as %%infer in the usage
    @argument("--model", "-m", help="...")
    def usage(line: str, cell: str) -> None:
        '''Run the cell as a prompt.'''

IPython builds the parser and replaces the docstring with the full help, which the magic method
shows for ``%%infer?`` (:func:`documented`). :func:`parse` parses a line with it: ``-h`` or
``--help`` raises :class:`HelpRequested` (the magics print it), mistakes are one-line
``UsageError`` messages. Subcommands are routed through a dict (:func:`dispatch`), as jupysql does.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
from collections.abc import Callable
from typing import Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic_arguments import ArgMethodWrapper, MagicArgumentParser

__all__ = [
    "HelpRequested",
    "MagicParser",
    "dispatch",
    "documented",
    "exclusive_group",
    "help_text",
    "parse",
    "split",
]

F = TypeVar("F", bound=Callable[..., Any])

_HELP = ("-h", "--help")


class HelpRequested(Exception):
    """``--help`` was asked for: the magics print ``text`` and return."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)


class exclusive_group(ArgMethodWrapper):
    """``magic_arguments`` decorator: the ``@argument`` options after it (in source order) exclude
    each other. Put it last: like ``argument_group``, it holds every argument that follows."""

    def add_to_parser(self, parser: argparse.ArgumentParser, group: Any) -> Any:
        # argparse titles only argument groups; the title is kept for the reader of the source
        return parser.add_mutually_exclusive_group()


def help_text(parser: argparse.ArgumentParser) -> str:
    """The parser's help without IPython's reST literal-block prefix (``::``)."""
    text = parser.format_help()
    return text.removeprefix("::\n\n")


def documented(command: Callable[..., Any]) -> Callable[[F], F]:
    """Give a magic method the help text of ``command`` (a ``@magic_arguments`` function, or
    any function whose docstring is the help): ``%magic?`` prints it."""

    def decorate(fn: F) -> F:
        fn.__doc__ = command.__doc__
        return fn

    return decorate


def split(line: str) -> list[str]:
    try:
        return shlex.split(line, posix=True)
    except ValueError as e:
        raise UsageError(f"cannot parse arguments {line!r}: {e} (check your quotes)") from e


def _prog(parser: argparse.ArgumentParser) -> str:
    """The magic as typed: IPython prefixes one ``%`` (a cell magic's prog starts with one)."""
    return f"%{parser.prog or ''}"


def parse(command: Callable[..., Any] | argparse.ArgumentParser,
          line: str | list[str]) -> argparse.Namespace:
    """Parse a magic line (or its already split words) with ``command``'s parser.

    ``-h``/``--help`` raises :class:`HelpRequested`; a mistake raises a one-line
    ``UsageError`` naming the magic and pointing at its ``--help``.
    """
    parser = command if isinstance(command, argparse.ArgumentParser) else command.parser  # type: ignore[attr-defined]
    words = split(line) if isinstance(line, str) else list(line)
    if any(w in _HELP for w in words):
        raise HelpRequested(help_text(parser))
    prog = _prog(parser)
    try:
        return parser.parse_args(words)
    except (UsageError, argparse.ArgumentError) as e:
        message = " ".join(str(e).split())
        raise UsageError(f"{prog}: {message} (see {prog} --help)") from None


class MagicParser(MagicArgumentParser):
    """IPython's parser for code that builds one by hand (``MagicParser("%resume")`` and
    ``add_argument``); new commands use the ``@magic_arguments`` decorators instead."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        super().__init__(prog=prog.lstrip("%"), **kwargs)

    def parse(self, line: str | list[str]) -> argparse.Namespace:
        return parse(self, line)


def dispatch(prog: str, line: str, table: dict[str, Callable[[list[str]], Any]],
             default: str | None = None, *, usage: str | None = None) -> Any:
    """Route ``line``'s first word to ``table[word](rest)``; lists the choices on a miss.

    ``-h``/``--help`` as the first word raises :class:`HelpRequested` with ``usage`` (or the
    list of subcommands).
    """
    words = split(line)
    if words and words[0] in _HELP:
        raise HelpRequested(inspect.cleandoc(usage) if usage else f"{prog} {' | '.join(table)}")
    if not words:
        if default is None:
            raise UsageError(f"{prog}: say what to do: {' | '.join(table)}")
        words = [default]
    sub, rest = words[0], words[1:]
    handler = table.get(sub)
    if handler is None:
        raise UsageError(f"{prog}: unknown subcommand {sub!r}; choose one of: {', '.join(table)}")
    return handler(rest)
