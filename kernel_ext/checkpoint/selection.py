"""Which of the notebook's variables are saved, and why the others are not.

The user's choices (``%checkpoint track/untrack/ignore``, ``--pickle``) and the rules: no
IPython names, no ``_``-names, no modules, functions, classes or model objects, no resumable
tasks (they save themselves); everything else is encoded by :mod:`._codec` or skipped with the
reason it gives.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection
from typing import Any

from ._codec import Encoded, Unstorable, check, encode, never_reason

__all__ = ["IPYTHON_NAMES", "Selection"]

IPYTHON_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython", "open"})


class Selection:
    """The variables of ``session.shell`` that checkpoints save, by the user's choices."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.tracked: set[str] = set()
        self.pickled: set[str] = set()
        self.untracked: set[str] = set()
        self.ignored: list[str] = []

    def user_variables(self) -> dict[str, Any]:
        """The user's variables: no IPython names, no ``_``-names."""
        shell = self.session.shell
        if shell is None:
            return {}
        hidden = getattr(shell, "user_ns_hidden", {})
        out = {}
        for name, value in list(shell.user_ns.items()):
            if not self.user_name(name):
                continue
            if name in hidden and hidden[name] is value:
                continue
            out[name] = value
        return out

    @staticmethod
    def user_name(name: str) -> bool:
        return not name.startswith("_") and name not in IPYTHON_NAMES

    def hidden(self, name: str) -> bool:
        """Whether restoring ``name`` would replace one of IPython's own names."""
        shell = self.session.shell
        hidden = getattr(shell, "user_ns_hidden", {}) if shell is not None else {}
        return not self.user_name(name) or name in hidden

    def candidates(self, carried: Collection[str] = ()) -> tuple[dict[str, Any], dict[str, str]]:
        """Tracked variables by the rules alone (nothing encoded); ``(values, skipped)``.
        ``carried``: names kept from a restored snapshot (not reported as undefined)."""
        from .tasks import Task

        values: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        names = self.user_variables()
        for name in sorted(self.tracked - names.keys() - set(carried)):
            skipped[name] = "tracked but not defined"
        for name, value in names.items():
            reason = self._excluded(name)
            if reason is None and isinstance(value, Task):
                reason = "resumable task (its progress is saved on its own)"
            if reason is None and name not in self.pickled:
                reason = never_reason(value)
            if reason is not None:
                skipped[name] = reason
            else:
                values[name] = value
        return values, skipped

    def _excluded(self, name: str) -> str | None:
        if name in self.tracked:
            return None
        if name in self.untracked:
            return "untracked (%checkpoint track NAME to save it again)"
        for pattern in self.ignored:
            if fnmatch.fnmatchcase(name, pattern):
                return f"ignored by pattern {pattern!r}"
        return None

    def scan(self, carried: Collection[str] = ()) -> tuple[dict[str, Encoded], dict[str, str]]:
        """Encode every selected variable; returns ``(encoded, skipped-with-reason)``.

        One variable that cannot be encoded (for any reason) is skipped with that reason; it
        never stops the others from being saved.
        """
        values, skipped = self.candidates(carried)
        encoded: dict[str, Encoded] = {}
        for name, value in values.items():
            try:
                encoded[name] = encode(value, allow_pickle=name in self.pickled)
            except Unstorable as e:
                skipped[name] = str(e)
            except Exception as e:  # noqa: BLE001 - one bad variable must not stop the snapshot
                skipped[name] = f"cannot be saved: {type(e).__name__}: {e}"
        return encoded, skipped

    def judge(self, carried: Collection[str] = ()) -> tuple[list[str], dict[str, str]]:
        """``(saved, skipped-with-reason)`` by the rules a save applies, without saving:
        bulk data is judged by its structure, not copied or hashed (:func:`._codec.check`)."""
        values, skipped = self.candidates(carried)
        saved = []
        for name, value in values.items():
            why = check(value, allow_pickle=name in self.pickled)
            if why is None:
                saved.append(name)
            else:
                skipped[name] = why
        return sorted(saved), skipped

    # --- with snapshots -------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The choices, saved in each manifest (and restored by ``%resume``)."""
        return {"tracked": sorted(self.tracked), "pickled": sorted(self.pickled),
                "untracked": sorted(self.untracked), "ignored": list(self.ignored)}

    def apply(self, settings: dict[str, Any]) -> None:
        """Add the choices of a restored snapshot to the current ones."""
        self.tracked |= set(settings.get("tracked", []))
        self.pickled |= set(settings.get("pickled", []))
        self.untracked |= set(settings.get("untracked", [])) - self.tracked
        self.ignored += [p for p in settings.get("ignored", []) if p not in self.ignored]

    def replace(self, settings: dict[str, Any]) -> None:
        """Take the choices over as they are (the same kernel after ``%reload_ext``)."""
        self.tracked = set(settings.get("tracked", []))
        self.pickled = set(settings.get("pickled", []))
        self.untracked = set(settings.get("untracked", []))
        self.ignored = list(settings.get("ignored", []))
