"""Incremental detokenisation with stop strings, shared by local providers.

Text is emitted as soon as it is final: never half a UTF-8 character (the tokenizer's
replacement character is held back) and never the beginning of a stop string that may still
complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["IncrementalDecoder"]


class IncrementalDecoder:
    """Feed token ids with :meth:`add`; read ``text``; ``stopped`` when a stop string appeared."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None) -> None:
        self._tok = tokenizer
        self._stop = [s for s in stop if s]
        self._on_text = on_text
        self._ids: list[int] = []
        self._full = ""
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def add(self, token_ids: Sequence[int]) -> None:
        if self.stopped:
            return
        self._ids.extend(int(t) for t in token_ids)
        full = self._tok.decode(self._ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        self._full = full
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            self._emit(full[:cut], final=True)
            return
        self._emit(full, final=False)

    def finish(self) -> str:
        if not self.stopped:
            full = self._tok.decode(self._ids, skip_special_tokens=True) if self._ids else ""
            cut = self._first_stop(full)
            self._emit(full if cut is None else full[:cut], final=True)
        return self.text

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that could start a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if s.startswith(text[-k:]):
                    best = max(best, k)
                    break
        return best

    def _emit(self, text: str, *, final: bool) -> None:
        upto = len(text) if final else len(text) - self._held_back(text)
        if upto > self.emitted:
            piece = text[self.emitted:upto]
            self.emitted = upto
            if self._on_text is not None and piece:
                self._on_text(piece)
        self.text = text[: self.emitted] if not final else text
