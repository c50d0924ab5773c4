"""Incremental detokenisation with stop strings, shared by local providers.

Text is emitted as soon as it is final: never half a UTF-8 character (the tokenizer's
replacement character is held back) and never the beginning of a stop string that may still
complete. Each token costs one decode of the last few tokens (prefix/read offsets, as vLLM
does), not of the whole answer.
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
        # ids[prefix:read] decode to text already in ``_full``; decoding from ``prefix`` keeps
        # the context tokenizers need (SentencePiece drops a leading space at the start).
        self._prefix = 0
        self._read = 0
        self._full = ""
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: Sequence[int]) -> None:
        if self.stopped:
            return
        self._ids.extend(int(t) for t in token_ids)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # nothing new yet, or an incomplete multi-byte character
        self._full += after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        cut = self._first_stop(self._full)
        if cut is not None:
            self.stopped = True
            self._emit(self._full[:cut], final=True)
            return
        self._emit(self._full, final=False)

    def finish(self) -> str:
        if not self.stopped:
            full = self._decode(self._ids) if self._ids else ""
            if not full.startswith(self._full):
                full = self._full  # what was streamed stays the answer
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
