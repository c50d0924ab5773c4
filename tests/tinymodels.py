"""Tiny but real GGUF language models for fast tests.

``write_tiny_llama(path)`` and ``write_tiny_gemma3(path)`` write valid GGUF files (tens of KB,
a few milliseconds) with random weights and a complete sentencepiece-style tokenizer in the
metadata (``tokenizer.ggml.*``: tokens, scores, token types, bos/eos/unk/pad ids), so that both
Transformers (``from_pretrained(dir, gguf_file=...)``) and ``kernel_ext.gguf.loader`` turn them
into a working model + tokenizer and ``model.generate`` runs. The text they generate is
gibberish, but it is deterministic for a given ``seed``.

Knobs shared by both writers:

* ``quant``: the type of the 2-D weight matrices: ``"F32"`` (default), ``"F16"``, ``"BF16"``,
  ``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"``, ``"Q5_0"``, ``"Q5_1"`` (quantised with ``gguf.quants``), or
  a K-quant ``"Q2_K"``..``"Q6_K"`` (random *valid* blocks, since gguf-py cannot quantise those;
  needs ``hidden`` and ``ffn`` to be multiples of 256). Norms stay F32, as llama.cpp does.
* ``chat_template``: a Jinja string stored as ``tokenizer.chat_template`` (omitted when None).
* ``vocab``: the vocabulary size (at least :data:`MIN_VOCAB`; padded with ``<unused{i}>``).
* ``hidden``, ``layers``, ``heads``, ``kv_heads``, ``ffn``, ``seed``.
* ``drop``: GGUF tensor names to leave out (for tests of incomplete files).

Special and byte tokens have zero rows in the embedding/output matrices (except with K-quants,
whose blocks are random), so greedy text is made of readable pieces, never stops at EOS by
itself, and is deterministic for a given ``seed``.

Token ids: ``PAD_ID`` 0, ``EOS_ID`` 1, ``BOS_ID`` 2, ``UNK_ID`` 3, then 256 byte tokens
``<0x00>``..``<0xFF>``, then pieces (``▁`` plus letters, digits, punctuation, a few words).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType, quants

__all__ = [
    "write_tiny_llama",
    "write_tiny_gemma3",
    "tiny_vocab",
    "MIN_VOCAB",
    "PAD_ID",
    "EOS_ID",
    "BOS_ID",
    "UNK_ID",
    "QUANTS",
]

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIALS = ("<pad>", "</s>", "<s>", "<unk>")
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
_WORDS = (
    "the",
    "capital",
    "of",
    "France",
    "is",
    "Paris",
    "hello",
    "world",
    "model",
    "test",
    "kernel",
    "notebook",
    "and",
    "a",
    "in",
    "to",
    "it",
    "he",
    "th",
    "in",
    "er",
    "an",
    "on",
)
_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,:;!?'\"()[]{}<>-_=+*/\\#@$%&^~|`"
)
_GGUF_QUANTISABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
_K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
QUANTS: tuple[str, ...] = _GGUF_QUANTISABLE + _K_QUANTS
_SILENT = len(_SPECIALS) + 256  # rows of special and byte tokens, zero in embedding/output


def _pieces() -> list[str]:
    pieces = ["\u2581"] + list(_CHARS) + ["\u2581" + c for c in _CHARS if c.isalnum()]
    pieces += ["\u2581" + w for w in _WORDS] + list(_WORDS)
    out: list[str] = []
    seen: set[str] = set()
    for p in pieces:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


MIN_VOCAB = len(_SPECIALS) + 256 + len(_pieces())


def tiny_vocab(
    size: int | None = None, *, gemma: bool = False
) -> tuple[list[str], list[float], list[int]]:
    """``(tokens, scores, token_types)`` of the tiny sentencepiece vocabulary."""
    size = MIN_VOCAB if size is None else int(size)
    if size < MIN_VOCAB:
        raise ValueError(f"vocab must be at least {MIN_VOCAB}, got {size}")
    specials = _GEMMA_SPECIALS if gemma else _SPECIALS
    tokens = list(specials) + [f"<0x{b:02X}>" for b in range(256)] + _pieces()
    types = [int(TokenType.CONTROL)] * 3 + [int(TokenType.UNKNOWN)] + [int(TokenType.BYTE)] * 256
    types += [int(TokenType.NORMAL)] * len(_pieces())
    scores = [0.0] * (len(specials) + 256)
    # longer pieces later in the list get lower scores, as sentencepiece does
    scores += [-float(i) for i in range(len(_pieces()))]
    extra = size - len(tokens)
    tokens += [f"<unused{i}>" for i in range(extra)]
    types += [int(TokenType.UNUSED)] * extra
    scores += [-1e4] * extra
    return tokens, scores, types


def _check_quant(quant: str, hidden: int, ffn: int, head_dim: int) -> GGMLQuantizationType:
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    qtype = GGMLQuantizationType[quant]
    block = GGML_QUANT_SIZES[qtype][0]
    for name, dim in (("hidden", hidden), ("ffn", ffn), ("heads * head_dim", head_dim)):
        if dim % block:
            raise ValueError(f"{quant} needs {name} to be a multiple of {block}, got {dim}")
    return qtype


def _random_k_blocks(
    rng: np.random.Generator, qtype: GGMLQuantizationType, n_elements: int
) -> np.ndarray:
    """Random but valid K-quant blocks: random quants, small finite fp16 super-block scales."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    n_blocks = n_elements // block_elems
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    # offsets of the fp16 d (and dmin) of each layout
    halves = {
        GGMLQuantizationType.Q2_K: (80, 82),
        GGMLQuantizationType.Q3_K: (108,),
        GGMLQuantizationType.Q4_K: (0, 2),
        GGMLQuantizationType.Q5_K: (0, 2),
        GGMLQuantizationType.Q6_K: (208,),
    }[qtype]
    scale = 0.004 if qtype == GGMLQuantizationType.Q6_K else 0.0015
    for at in halves:
        values = (rng.uniform(0.5, 1.0, size=n_blocks) * scale).astype(np.float16)
        raw[:, at : at + 2] = values.view(np.uint8).reshape(n_blocks, 2)
    return raw


class _Writer:
    def __init__(
        self,
        writer: GGUFWriter,
        quant: str,
        qtype: GGMLQuantizationType,
        rng: np.random.Generator,
        drop: Sequence[str],
    ) -> None:
        self.writer, self.quant, self.qtype, self.rng = writer, quant, qtype, rng
        self.drop = frozenset(drop)

    def norm(self, name: str, n: int, *, center: float = 1.0) -> None:
        if name in self.drop:
            return
        w = (center + 0.1 * self.rng.standard_normal(n)).astype(np.float32)
        self.writer.add_tensor(name, w)

    def matrix(self, name: str, rows: int, cols: int, *, silent_rows: int = 0) -> None:
        """A weight of PyTorch shape ``(rows, cols)`` (GGUF ne0 = cols).

        The first ``silent_rows`` rows are zero, and those past :data:`MIN_VOCAB` (specials,
        byte tokens and padding in the embedding and output matrices: their logits are 0 while
        normal pieces get random ones, so greedy text is made of readable pieces)."""
        if name in self.drop:
            return
        w = (self.rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if silent_rows:
            w[:silent_rows] = 0.0
            w[MIN_VOCAB:] = 0.0  # <unused{i}> padding of a larger vocab
        if self.quant == "F32":
            self.writer.add_tensor(name, w)
        elif self.quant in _K_QUANTS:
            raw = _random_k_blocks(self.rng, self.qtype, rows * cols).reshape(rows, -1)
            self.writer.add_tensor(name, raw, raw_dtype=self.qtype)
        elif self.quant == "F16":
            self.writer.add_tensor(name, w.astype(np.float16))
        else:
            q = quants.quantize(w, self.qtype)
            # ``q`` is (rows, bytes per row); the writer derives the element shape from it
            self.writer.add_tensor(name, q, raw_dtype=self.qtype)


def _tokenizer(
    writer: GGUFWriter, vocab: int | None, gemma: bool, chat_template: str | None
) -> int:
    tokens, scores, types = tiny_vocab(vocab, gemma=gemma)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return len(tokens)


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_llama(
    path: str | Path,
    *,
    vocab: int | None = None,
    quant: str = "F32",
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    context: int = 256,
    chat_template: str | None = None,
    tie_embeddings: bool = False,
    name: str = "tiny-llama",
    drop: Sequence[str] = (),
) -> Path:
    """Write a tiny llama-architecture GGUF to ``path`` and return the path.

    ``drop`` names GGUF tensors to leave out (to test incomplete files)."""
    path = Path(path)
    head_dim = hidden // heads
    qtype = _check_quant(quant, hidden, ffn, head_dim * heads)
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    n_vocab = _tokenizer(writer, vocab, False, chat_template)
    writer.add_vocab_size(n_vocab)
    w = _Writer(writer, quant, qtype, rng, drop)
    w.matrix("token_embd.weight", n_vocab, hidden, silent_rows=_SILENT)
    for i in range(layers):
        w.norm(f"blk.{i}.attn_norm.weight", hidden)
        w.matrix(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        w.matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        w.matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        w.matrix(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        w.norm(f"blk.{i}.ffn_norm.weight", hidden)
        w.matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        w.matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        w.matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.norm("output_norm.weight", hidden)
    if not tie_embeddings:
        w.matrix("output.weight", n_vocab, hidden, silent_rows=_SILENT)
    _finish(writer)
    return path


def write_tiny_gemma3(
    path: str | Path,
    *,
    vocab: int | None = None,
    quant: str = "F32",
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 32,
    ffn: int = 128,
    context: int = 256,
    sliding_window: int = 64,
    chat_template: str | None = None,
    name: str = "tiny-gemma3",
    drop: Sequence[str] = (),
) -> Path:
    """Write a tiny gemma3 (text) GGUF to ``path`` and return the path.

    Like the real Gemma 3 files: tied embeddings (no ``output.weight``), q/k norms, four norms
    per block stored as ``1 + w`` (Transformers subtracts the 1 again), ``<bos>`` = 2,
    ``<eos>`` = 1.
    """
    path = Path(path)
    qtype = _check_quant(quant, hidden, ffn, head_dim * heads)
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_name(name)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(sliding_window)
    n_vocab = _tokenizer(writer, vocab, True, chat_template)
    w = _Writer(writer, quant, qtype, rng, drop)
    w.matrix("token_embd.weight", n_vocab, hidden, silent_rows=_SILENT)
    for i in range(layers):
        w.norm(f"blk.{i}.attn_norm.weight", hidden)
        w.matrix(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        w.matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        w.matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        w.norm(f"blk.{i}.attn_q_norm.weight", head_dim)
        w.norm(f"blk.{i}.attn_k_norm.weight", head_dim)
        w.matrix(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        w.norm(f"blk.{i}.post_attention_norm.weight", hidden)
        w.norm(f"blk.{i}.ffn_norm.weight", hidden)
        w.matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        w.matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        w.matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
        w.norm(f"blk.{i}.post_ffw_norm.weight", hidden)
    w.norm("output_norm.weight", hidden)
    _finish(writer)
    return path


def _main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - manual helper
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    out = Path(args[0] if args else ".")
    print(write_tiny_llama(out / "tiny-llama.gguf"), write_tiny_gemma3(out / "tiny-gemma3.gguf"))


if __name__ == "__main__":  # pragma: no cover
    _main()
