"""Incremental detokenisation: UTF-8 safety and stop strings that span tokens."""

from __future__ import annotations

from kernel_ext.providers.streaming import IncrementalDecoder


class ByteTokenizer:
    """A real (if tiny) byte-level tokenizer: one token per UTF-8 byte."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def feed(text: str, stop: tuple[str, ...] = ()) -> tuple[IncrementalDecoder, list[str]]:
    tok = ByteTokenizer()
    pieces: list[str] = []
    dec = IncrementalDecoder(tok, stop, pieces.append)
    for t in tok.encode(text):
        dec.add([t])
        if dec.stopped:
            break
    dec.finish()
    return dec, pieces


def test_streams_everything_without_stops() -> None:
    dec, pieces = feed("Paris is nice")
    assert "".join(pieces) == dec.text == "Paris is nice"
    assert len(pieces) == len("Paris is nice")


def test_never_emits_half_a_character() -> None:
    dec, pieces = feed("café ☕")
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "café ☕"


def test_stop_string_spanning_tokens_is_cut_and_never_streamed() -> None:
    dec, pieces = feed("answer: 42\n\nQuestion: next", stop=("\n\nQuestion",))
    assert dec.stopped
    assert dec.text == "answer: 42"
    assert "".join(pieces) == "answer: 42"


def test_prefix_of_stop_that_does_not_complete_is_released() -> None:
    dec, pieces = feed("a\nb", stop=("\n\n",))
    assert not dec.stopped
    assert "".join(pieces) == "a\nb" == dec.text


def test_earliest_of_several_stops_wins() -> None:
    dec, _ = feed("one. two! three", stop=("!", "."))
    assert dec.text == "one"


class CountingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_each_token_decodes_a_few_tokens_not_the_whole_answer() -> None:
    tok = CountingTokenizer()
    dec = IncrementalDecoder(tok)
    text = "streaming " * 100
    for t in tok.encode(text):
        dec.add([t])
    assert dec.finish() == text
    per_token = (tok.decoded - len(text)) / len(text)  # minus the one final full decode
    assert per_token < 4  # re-decoding everything each time would be ~len(text)/2 = 500


def test_sentencepiece_leading_spaces_survive_incremental_decoding() -> None:
    from tinymodels import write_tiny_llama  # a real SentencePiece-style GGUF tokenizer

    import tempfile
    from pathlib import Path

    from kernel_ext.gguf.loader import load_transformers

    with tempfile.TemporaryDirectory() as d:
        art = load_transformers(write_tiny_llama(Path(d) / "t.gguf"), cache_dir=None)
    tok = art.tokenizer
    text = "the cat sat on the mat, 42 times!"
    ids = tok(text, add_special_tokens=False).input_ids
    pieces: list[str] = []
    dec = IncrementalDecoder(tok, (), pieces.append)
    for t in ids:
        dec.add([t])
    assert dec.finish() == tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == dec.text
