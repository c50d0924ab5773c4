"""Tiny GGUF files of every decoder architecture stock Transformers loads, written as llama.cpp
writes them.

``write_tiny(path, arch, quant=..., vocab=...)`` writes a valid GGUF file (tens to hundreds of
KB, milliseconds) with random weights, the metadata keys llama.cpp's converter writes for that
architecture, its tensor names and layouts (llama's permuted q/k rows, phi3's fused qkv and
gate/up, gpt2's (out, in) matrices, bloom's fused qkv, norms stored as ``1 + w`` for
gemma/nemotron, stacked MoE experts), and a complete vocabulary:

* ``vocab="llama"``: a sentencepiece vocabulary (``tokenizer.ggml.model = "llama"``; scores,
  byte tokens) - the one of :mod:`tinymodels`;
* ``vocab="gpt2"``: a byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``) with
  merges, ``<|endoftext|>`` and ``<|im_start|>``/``<|im_end|>`` control tokens, pre-tokenizer
  ``pre`` (``"qwen2"`` by default, as Qwen files say).

``quant`` is the type of the matrices (``F32``, ``F16``, ``Q8_0``, ``Q4_0``, ``Q5_0``, ... or a
K-quant ``Q2_K``..``Q6_K``, whose blocks are random but valid since gguf-py cannot quantise
those). A matrix whose row length (``ne0``) is not a multiple of the type's block falls back to
``Q8_0`` (or F32), as llama.cpp does. Norms, biases and other 1-D tensors stay F32.

Some architectures' size keys are ignored by stock Transformers 5.24 (it uses its config
defaults instead); :func:`stock_overrides` gives the config keyword arguments that make stock
build the model the file describes, so the comparison is on the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFWriter,
    TokenType,
    quants,
)
from tinymodels import BOS_ID, EOS_ID, PAD_ID, UNK_ID, _random_k_blocks, tiny_vocab

__all__ = [
    "FALLBACK_ARCHS",
    "FAST_ARCHS",
    "K_QUANT_DIMS",
    "Dims",
    "gpt2_vocab",
    "stock_overrides",
    "write_tiny",
]

_K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass(frozen=True)
class Dims:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None  # default hidden // heads
    ffn: int = 128
    context: int = 256
    experts: int = 4
    experts_used: int = 2
    expert_ffn: int = 64
    shared_ffn: int = 128

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads


# Dimensions that every matrix row of every architecture fits into a 256-element K-quant block.
K_QUANT_DIMS = Dims(hidden=256, heads=2, kv_heads=1, head_dim=128, ffn=256, expert_ffn=256,
                    shared_ffn=256)


# --- vocabularies --------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


_BPE_WORDS = ("the", "capital", "of", "France", "is", "Paris", "hello", "world", "model", "test",
              "kernel", "notebook", "and", "in", "to", "it", "user", "assistant", "system", "What")
_GPT2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def gpt2_vocab() -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token_types, merges)`` of a tiny byte-level BPE vocabulary.

    The 256 byte symbols, then each word of a small list (with and without the ``Ġ`` space
    marker) built by merging left to right, then three control tokens."""
    alphabet = _bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)]
    seen = set(tokens)
    merges: list[str] = []
    for word in _BPE_WORDS:
        for spelled in (word, "\u0120" + word):
            piece = spelled[0]
            for ch in spelled[1:]:
                merged = piece + ch
                if merged not in seen:
                    merges.append(f"{piece} {ch}")
                    tokens.append(merged)
                    seen.add(merged)
                piece = merged
    types = [int(TokenType.NORMAL)] * len(tokens)
    tokens += list(_GPT2_SPECIALS)
    types += [int(TokenType.CONTROL)] * len(_GPT2_SPECIALS)
    return tokens, types, merges


def _write_vocab(w: GGUFWriter, vocab: str, pre: str, gemma: bool,
                 chat_template: str | None, pad: bool) -> int:
    if vocab == "llama":
        tokens, scores, types = tiny_vocab(gemma=gemma)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(BOS_ID)
        w.add_eos_token_id(EOS_ID)
        w.add_unk_token_id(UNK_ID)
        if pad:
            w.add_pad_token_id(PAD_ID)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
    elif vocab == "gpt2":
        tokens, types, merges = gpt2_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        end = tokens.index("<|endoftext|>")
        w.add_bos_token_id(end)
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        if pad:
            w.add_pad_token_id(end)
        w.add_add_bos_token(False)
    else:
        raise ValueError(f"vocab must be 'llama' or 'gpt2', got {vocab!r}")
    if chat_template is not None:
        w.add_chat_template(chat_template)
    return len(tokens)


# --- tensors -------------------------------------------------------------------------------------
@dataclass
class _Builder:
    w: GGUFWriter
    quant: str
    rng: np.random.Generator
    d: Dims
    n_vocab: int
    drop: frozenset[str] = field(default_factory=frozenset)
    output_copy: bool = False
    written: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = field(default_factory=dict)

    def _type_for(self, ne0: int) -> GGMLQuantizationType:
        for name in (self.quant, "Q8_0", "F32"):
            qtype = GGMLQuantizationType[name]
            if ne0 % GGML_QUANT_SIZES[qtype][0] == 0:
                return qtype
        return GGMLQuantizationType.F32

    def vector(self, name: str, n: int, *, center: float = 0.0, scale: float = 0.1) -> None:
        if name in self.drop:
            return
        self.w.add_tensor(name, (center + scale * self.rng.standard_normal(n)).astype(np.float32))

    def norm(self, name: str, n: int, *, bias: bool = False, center: float = 1.0) -> None:
        self.vector(f"{name}.weight", n, center=center)
        if bias:
            self.vector(f"{name}.bias", n)

    def matrix(self, name: str, rows: int, cols: int, *, bias: bool = False,
               lead: Sequence[int] = ()) -> None:
        """A weight of PyTorch shape ``(*lead, rows, cols)`` (GGUF ne0 = cols)."""
        full = f"{name}.weight"
        if full not in self.drop:
            shape = (*lead, rows, cols)
            w = (self.rng.standard_normal(shape) / np.sqrt(cols)).astype(np.float32)
            qtype = self._type_for(cols)
            n = int(np.prod(shape))
            if qtype == GGMLQuantizationType.F32:
                data = w
            elif qtype == GGMLQuantizationType.F16:
                data = w.astype(np.float16)
            elif qtype.name in _K_QUANTS:
                data = _random_k_blocks(self.rng, qtype, n).reshape(*lead, rows, -1)
            else:
                data = quants.quantize(w, qtype)
            self.add(full, data, qtype)
        if bias:
            self.vector(f"{name}.bias", rows)

    def add(self, name: str, data: np.ndarray, qtype: GGMLQuantizationType) -> None:
        raw = None if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else qtype
        self.w.add_tensor(name, data, raw_dtype=raw)
        self.written[name] = (data, qtype)

    def embeddings(self, *, output: bool, position: int = 0) -> None:
        self.matrix("token_embd", self.n_vocab, self.d.hidden)
        if position:
            self.matrix("position_embd", position, self.d.hidden)
        if output and self.output_copy and "token_embd.weight" in self.written:
            self.add("output.weight", *self.written["token_embd.weight"])
        elif output:
            self.matrix("output", self.n_vocab, self.d.hidden)


def _common_keys(w: GGUFWriter, d: Dims, *, eps: str = "rms", rope: bool = True) -> None:
    w.add_context_length(d.context)
    w.add_embedding_length(d.hidden)
    w.add_block_count(d.layers)
    w.add_feed_forward_length(d.ffn)
    w.add_head_count(d.heads)
    w.add_head_count_kv(d.kv_heads)
    if eps == "rms":
        w.add_layer_norm_rms_eps(1e-5)
    else:
        w.add_layer_norm_eps(1e-5)
    if rope:
        w.add_rope_freq_base(10000.0)


def _attention(b: _Builder, i: int, *, bias: bool = False, out_bias: bool = False) -> None:
    d = b.d
    b.matrix(f"blk.{i}.attn_q", d.heads * d.hd, d.hidden, bias=bias)
    b.matrix(f"blk.{i}.attn_k", d.kv_heads * d.hd, d.hidden, bias=bias)
    b.matrix(f"blk.{i}.attn_v", d.kv_heads * d.hd, d.hidden, bias=bias)
    b.matrix(f"blk.{i}.attn_output", d.hidden, d.heads * d.hd, bias=out_bias)


def _gated_ffn(b: _Builder, i: int) -> None:
    d = b.d
    b.matrix(f"blk.{i}.ffn_gate", d.ffn, d.hidden)
    b.matrix(f"blk.{i}.ffn_up", d.ffn, d.hidden)
    b.matrix(f"blk.{i}.ffn_down", d.hidden, d.ffn)


# --- architectures -------------------------------------------------------------------------------
def _llama(b: _Builder) -> None:
    d = b.d
    _common_keys(b.w, d)
    b.w.add_rope_dimension_count(d.hd)
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden)
        _attention(b, i)
        b.norm(f"blk.{i}.ffn_norm", d.hidden)
        _gated_ffn(b, i)
    b.norm("output_norm", d.hidden)


def _qwen2(b: _Builder) -> None:
    d = b.d
    _common_keys(b.w, d)
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden)
        _attention(b, i, bias=True)
        b.norm(f"blk.{i}.ffn_norm", d.hidden)
        _gated_ffn(b, i)
    b.norm("output_norm", d.hidden)


def _qwen3(b: _Builder, *, moe: bool = False) -> None:
    """Qwen3 (dense), or with ``moe`` Qwen3 MoE (experts in place of the dense FFN)."""
    d = b.d
    _common_keys(b.w, d)
    if moe:
        _moe_keys(b.w, d, shared=False)
    b.w.add_key_length(d.hd)
    b.w.add_value_length(d.hd)
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden)
        _attention(b, i)
        b.norm(f"blk.{i}.attn_q_norm", d.hd)
        b.norm(f"blk.{i}.attn_k_norm", d.hd)
        b.norm(f"blk.{i}.ffn_norm", d.hidden)
        if moe:
            _experts(b, i)
        else:
            _gated_ffn(b, i)
    b.norm("output_norm", d.hidden)


def _gemma(b: _Builder, *, qk_norm: bool) -> None:
    d = b.d
    _common_keys(b.w, d)
    b.w.add_key_length(d.hd)
    b.w.add_value_length(d.hd)
    b.w.add_sliding_window(64)
    b.embeddings(output=False)  # tied, as every Gemma file
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden)
        _attention(b, i)
        if qk_norm:
            b.norm(f"blk.{i}.attn_q_norm", d.hd)
            b.norm(f"blk.{i}.attn_k_norm", d.hd)
        b.norm(f"blk.{i}.post_attention_norm", d.hidden)
        b.norm(f"blk.{i}.ffn_norm", d.hidden)
        _gated_ffn(b, i)
        b.norm(f"blk.{i}.post_ffw_norm", d.hidden)
    b.norm("output_norm", d.hidden)


def _phi3(b: _Builder) -> None:
    d = b.d
    _common_keys(b.w, d)
    b.w.add_rope_dimension_count(d.hd)
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden)
        b.matrix(f"blk.{i}.attn_qkv", (d.heads + 2 * d.kv_heads) * d.hd, d.hidden)
        b.matrix(f"blk.{i}.attn_output", d.hidden, d.heads * d.hd)
        b.norm(f"blk.{i}.ffn_norm", d.hidden)
        b.matrix(f"blk.{i}.ffn_up", 2 * d.ffn, d.hidden)  # gate and up, fused
        b.matrix(f"blk.{i}.ffn_down", d.hidden, d.ffn)
    b.norm("output_norm", d.hidden)


def _starcoder2(b: _Builder) -> None:
    d = b.d
    _common_keys(b.w, d, eps="ln")
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden, bias=True)
        _attention(b, i, bias=True, out_bias=True)
        b.norm(f"blk.{i}.ffn_norm", d.hidden, bias=True)
        b.matrix(f"blk.{i}.ffn_up", d.ffn, d.hidden, bias=True)
        b.matrix(f"blk.{i}.ffn_down", d.hidden, d.ffn, bias=True)
    b.norm("output_norm", d.hidden, bias=True)


def _stablelm(b: _Builder) -> None:
    d = b.d
    _common_keys(b.w, d, eps="ln")
    b.w.add_rope_dimension_count(d.hd // 4)
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden, bias=True)
        _attention(b, i, bias=True)
        b.norm(f"blk.{i}.ffn_norm", d.hidden, bias=True)
        _gated_ffn(b, i)
    b.norm("output_norm", d.hidden, bias=True)


def _nemotron(b: _Builder) -> None:
    d = b.d
    _common_keys(b.w, d, eps="rms")
    b.w.add_rope_dimension_count(d.hd // 2)
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden, bias=True)
        _attention(b, i)
        b.norm(f"blk.{i}.ffn_norm", d.hidden, bias=True)
        b.matrix(f"blk.{i}.ffn_up", d.ffn, d.hidden)
        b.matrix(f"blk.{i}.ffn_down", d.hidden, d.ffn)
    b.norm("output_norm", d.hidden, bias=True)


def _falcon(b: _Builder) -> None:
    # Falcon-7B layout: multi-query (one k/v head), parallel attention, one norm, and the MLP
    # width Transformers assumes (4 x hidden; it does not read feed_forward_length)
    d = replace(b.d, kv_heads=1, ffn=4 * b.d.hidden)
    _common_keys(b.w, d, eps="ln")
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden, bias=True)
        b.matrix(f"blk.{i}.attn_qkv", (d.heads + 2) * d.hd, d.hidden)
        b.matrix(f"blk.{i}.attn_output", d.hidden, d.heads * d.hd)
        b.matrix(f"blk.{i}.ffn_up", d.ffn, d.hidden)
        b.matrix(f"blk.{i}.ffn_down", d.hidden, d.ffn)
    b.norm("output_norm", d.hidden, bias=True)


def _gpt2(b: _Builder) -> None:
    d = b.d
    w = b.w
    w.add_context_length(1024)  # Transformers builds GPT-2's 1024 positions whatever the file says
    w.add_embedding_length(d.hidden)
    w.add_block_count(d.layers)
    w.add_feed_forward_length(4 * d.hidden)
    w.add_head_count(d.heads)
    w.add_layer_norm_eps(1e-5)
    b.embeddings(output=True, position=1024)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden, bias=True)
        b.matrix(f"blk.{i}.attn_qkv", 3 * d.hidden, d.hidden, bias=True)
        b.matrix(f"blk.{i}.attn_output", d.hidden, d.hidden, bias=True)
        b.norm(f"blk.{i}.ffn_norm", d.hidden, bias=True)
        b.matrix(f"blk.{i}.ffn_up", 4 * d.hidden, d.hidden, bias=True)
        b.matrix(f"blk.{i}.ffn_down", d.hidden, 4 * d.hidden, bias=True)
    b.norm("output_norm", d.hidden, bias=True)


def _bloom(b: _Builder) -> None:
    d = b.d
    w = b.w
    w.add_context_length(d.context)
    w.add_embedding_length(d.hidden)
    w.add_block_count(d.layers)
    w.add_feed_forward_length(4 * d.hidden)
    w.add_head_count(d.heads)
    w.add_head_count_kv(d.heads)
    w.add_layer_norm_eps(1e-5)
    b.embeddings(output=True)
    b.norm("token_embd_norm", d.hidden, bias=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden, bias=True)
        b.matrix(f"blk.{i}.attn_qkv", 3 * d.hidden, d.hidden, bias=True)
        b.matrix(f"blk.{i}.attn_output", d.hidden, d.hidden, bias=True)
        b.norm(f"blk.{i}.ffn_norm", d.hidden, bias=True)
        b.matrix(f"blk.{i}.ffn_up", 4 * d.hidden, d.hidden, bias=True)
        b.matrix(f"blk.{i}.ffn_down", d.hidden, 4 * d.hidden, bias=True)
    b.norm("output_norm", d.hidden, bias=True)


def _experts(b: _Builder, i: int) -> None:
    d = b.d
    b.matrix(f"blk.{i}.ffn_gate_inp", d.experts, d.hidden)
    b.matrix(f"blk.{i}.ffn_gate_exps", d.expert_ffn, d.hidden, lead=(d.experts,))
    b.matrix(f"blk.{i}.ffn_up_exps", d.expert_ffn, d.hidden, lead=(d.experts,))
    b.matrix(f"blk.{i}.ffn_down_exps", d.hidden, d.expert_ffn, lead=(d.experts,))


def _moe_keys(w: GGUFWriter, d: Dims, shared: bool) -> None:
    w.add_expert_count(d.experts)
    w.add_expert_used_count(d.experts_used)
    w.add_expert_feed_forward_length(d.expert_ffn)
    if shared:
        w.add_expert_shared_feed_forward_length(d.shared_ffn)


def _qwen2moe(b: _Builder) -> None:
    d = b.d
    _common_keys(b.w, d)
    _moe_keys(b.w, d, shared=True)
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden)
        _attention(b, i, bias=True)
        b.norm(f"blk.{i}.ffn_norm", d.hidden)
        _experts(b, i)
        b.vector(f"blk.{i}.ffn_gate_inp_shexp.weight", d.hidden)
        b.matrix(f"blk.{i}.ffn_gate_shexp", d.shared_ffn, d.hidden)
        b.matrix(f"blk.{i}.ffn_up_shexp", d.shared_ffn, d.hidden)
        b.matrix(f"blk.{i}.ffn_down_shexp", d.hidden, d.shared_ffn)
    b.norm("output_norm", d.hidden)


def _mamba(b: _Builder) -> None:
    d = b.d
    w = b.w
    inner, state, rank, conv = 2 * d.hidden, 16, max(1, d.hidden // 16), 4
    w.add_context_length(d.context)
    w.add_embedding_length(d.hidden)
    w.add_block_count(d.layers)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_ssm_conv_kernel(conv)
    w.add_ssm_inner_size(inner)
    w.add_ssm_state_size(state)
    w.add_ssm_time_step_rank(rank)
    w.add_layer_norm_rms_eps(1e-5)
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden)
        b.matrix(f"blk.{i}.ssm_in", 2 * inner, d.hidden)
        b.matrix(f"blk.{i}.ssm_conv1d", inner, conv, bias=True)
        b.matrix(f"blk.{i}.ssm_x", rank + 2 * state, inner)
        b.matrix(f"blk.{i}.ssm_dt", inner, rank, bias=True)
        a = -np.exp(0.1 * b.rng.standard_normal((inner, state))).astype(np.float32)
        b.w.add_tensor(f"blk.{i}.ssm_a", a)
        b.vector(f"blk.{i}.ssm_d", inner, center=1.0)
        b.matrix(f"blk.{i}.ssm_out", d.hidden, inner)
    b.norm("output_norm", d.hidden)


def _minimax_m2(b: _Builder) -> None:
    d = b.d
    # no dense FFN: llama.cpp writes the experts' width as feed_forward_length too
    _common_keys(b.w, replace(d, ffn=d.expert_ffn))
    _moe_keys(b.w, d, shared=False)
    b.w.add_key_length(d.hd)
    b.w.add_value_length(d.hd)
    b.w.add_rope_dimension_count(d.hd // 2)
    b.w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    b.embeddings(output=True)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden)
        _attention(b, i)
        b.norm(f"blk.{i}.attn_q_norm", d.heads * d.hd)
        b.norm(f"blk.{i}.attn_k_norm", d.kv_heads * d.hd)
        b.norm(f"blk.{i}.ffn_norm", d.hidden)
        _experts(b, i)
        b.vector(f"blk.{i}.exp_probs_b.bias", d.experts)
    b.norm("output_norm", d.hidden)


def _lfm2(b: _Builder) -> None:
    d = b.d
    w = b.w
    w.add_context_length(d.context)
    w.add_embedding_length(d.hidden)
    w.add_block_count(d.layers)
    w.add_feed_forward_length(d.ffn)
    w.add_head_count(d.heads)
    # llama.cpp marks the attention layers by a non-zero kv head count per layer
    kv = [d.kv_heads if i % 2 else 0 for i in range(d.layers)]
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_shortconv_l_cache(3)
    b.embeddings(output=False)
    for i in range(d.layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden)
        if kv[i]:
            _attention(b, i)
            b.norm(f"blk.{i}.attn_q_norm", d.hd)
            b.norm(f"blk.{i}.attn_k_norm", d.hd)
        else:
            b.matrix(f"blk.{i}.shortconv.conv", d.hidden, 3)
            b.matrix(f"blk.{i}.shortconv.in_proj", 3 * d.hidden, d.hidden)
            b.matrix(f"blk.{i}.shortconv.out_proj", d.hidden, d.hidden)
        b.norm(f"blk.{i}.ffn_norm", d.hidden)
        _gated_ffn(b, i)
    b.norm("token_embd_norm", d.hidden)


def _qwen35(b: _Builder, *, moe: bool = False) -> None:
    """Qwen3.5: three GatedDeltaNet (linear attention) layers, then one full-attention layer;
    with ``moe`` (qwen35moe) routed experts and a shared expert in place of the dense FFN."""
    d = b.d
    w, a = b.w, "qwen35moe" if moe else "qwen35"
    layers = 4
    k_heads, v_heads, k_dim, v_dim, conv = 2, 4, 16, 16, 4
    w.add_context_length(d.context)
    w.add_embedding_length(d.hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(d.ffn)
    w.add_head_count(d.heads)
    w.add_head_count_kv(d.kv_heads)
    w.add_key_length(d.hd)
    w.add_value_length(d.hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_uint32(f"{a}.full_attention_interval", 4)
    w.add_ssm_conv_kernel(conv)
    w.add_ssm_state_size(k_dim)
    w.add_ssm_group_count(k_heads)
    w.add_ssm_time_step_rank(v_heads)
    w.add_ssm_inner_size(v_heads * v_dim)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(d.hd // 2)
    w.add_rope_dimension_sections([2, 3, 3, 0])
    if moe:
        _moe_keys(w, d, shared=True)
    b.embeddings(output=True)
    qkv = 2 * k_heads * k_dim + v_heads * v_dim
    for i in range(layers):
        b.norm(f"blk.{i}.attn_norm", d.hidden, center=0.0)
        if (i + 1) % 4:
            b.matrix(f"blk.{i}.attn_qkv", qkv, d.hidden)
            b.matrix(f"blk.{i}.attn_gate", v_heads * v_dim, d.hidden)
            b.matrix(f"blk.{i}.ssm_alpha", v_heads, d.hidden)
            b.matrix(f"blk.{i}.ssm_beta", v_heads, d.hidden)
            b.w.add_tensor(f"blk.{i}.ssm_conv1d.weight",
                           (0.1 * b.rng.standard_normal((qkv, conv))).astype(np.float32))
            b.vector(f"blk.{i}.ssm_dt.bias", v_heads)
            b.w.add_tensor(f"blk.{i}.ssm_a",
                           -np.exp(0.1 * b.rng.standard_normal(v_heads)).astype(np.float32))
            b.norm(f"blk.{i}.ssm_norm", v_dim)
            b.matrix(f"blk.{i}.ssm_out", d.hidden, v_heads * v_dim)
        else:
            b.matrix(f"blk.{i}.attn_q", 2 * d.heads * d.hd, d.hidden)  # query and its gate
            b.matrix(f"blk.{i}.attn_k", d.kv_heads * d.hd, d.hidden)
            b.matrix(f"blk.{i}.attn_v", d.kv_heads * d.hd, d.hidden)
            b.matrix(f"blk.{i}.attn_output", d.hidden, d.heads * d.hd)
            b.norm(f"blk.{i}.attn_q_norm", d.hd, center=0.0)
            b.norm(f"blk.{i}.attn_k_norm", d.hd, center=0.0)
        b.norm(f"blk.{i}.post_attention_norm", d.hidden, center=0.0)
        if moe:
            _experts(b, i)
            b.vector(f"blk.{i}.ffn_gate_inp_shexp.weight", d.hidden)
            b.matrix(f"blk.{i}.ffn_gate_shexp", d.shared_ffn, d.hidden)
            b.matrix(f"blk.{i}.ffn_up_shexp", d.shared_ffn, d.hidden)
            b.matrix(f"blk.{i}.ffn_down_shexp", d.hidden, d.shared_ffn)
        else:
            _gated_ffn(b, i)
    b.norm("output_norm", d.hidden, center=0.0)


_ARCHS: dict[str, Callable[[_Builder], None]] = {
    "qwen35": _qwen35,
    "qwen35moe": lambda b: _qwen35(b, moe=True),
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": lambda b: _gemma(b, qk_norm=False),
    "gemma3": lambda b: _gemma(b, qk_norm=True),
    "phi3": _phi3,
    "starcoder2": _starcoder2,
    "stablelm": _stablelm,
    "nemotron": _nemotron,
    "falcon": _falcon,
    "gpt2": _gpt2,
    "bloom": _bloom,
    "qwen2moe": _qwen2moe,
    "qwen3moe": lambda b: _qwen3(b, moe=True),
    "mamba": _mamba,
    "minimax-m2": _minimax_m2,
    "lfm2": _lfm2,
}
FAST_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
                               "starcoder2", "stablelm", "nemotron", "falcon", "gpt2", "bloom",
                               "qwen2moe", "qwen3moe")
FALLBACK_ARCHS: tuple[str, ...] = ("mamba", "minimax-m2", "lfm2", "qwen35", "qwen35moe")


def write_tiny(
    path: str | Path,
    arch: str,
    *,
    quant: str = "F32",
    vocab: str = "llama",
    pre: str = "qwen2",
    dims: Dims | None = None,
    name: str | None = None,
    chat_template: str | None = None,
    seed: int = 0,
    drop: Sequence[str] = (),
    extra_tensors: Mapping[str, np.ndarray] | None = None,
    extra_keys: Mapping[str, str | int | float] | None = None,
    output_copy: bool = False,
) -> Path:
    """Write a tiny ``arch`` GGUF to ``path``; returns the path (see the module docstring).

    ``drop``: tensor names to leave out; ``extra_tensors``: tensors to add (name -> array);
    ``extra_keys``: metadata to add (strings, uint32 or float32 values); ``output_copy``: write
    ``output.weight`` as a byte copy of ``token_embd.weight``, as llama.cpp's converters write
    tied Bloom, Falcon and GPT-2 models."""
    if arch not in _ARCHS:
        raise ValueError(f"no tiny writer for {arch!r}; known: {', '.join(_ARCHS)}")
    d = dims or Dims()
    path = Path(path)
    w = GGUFWriter(str(path), arch)
    w.add_name(name if name is not None else f"tiny-{arch}")
    # phi3's config defaults pad_token_id to 32000: a small vocabulary must name its own
    n_vocab = _write_vocab(w, vocab, pre, arch.startswith("gemma"), chat_template,
                           pad=arch in ("phi3", "llama", "gemma2", "gemma3", "mamba", "lfm2"))
    if arch in ("gpt2", "bloom", "llama"):
        w.add_vocab_size(n_vocab)
    b = _Builder(w, quant, np.random.default_rng(seed), d, n_vocab, frozenset(drop), output_copy)
    _ARCHS[arch](b)
    for tname, data in (extra_tensors or {}).items():
        w.add_tensor(tname, data)
    for key, value in (extra_keys or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def stock_overrides(arch: str, dims: Dims | None = None) -> dict[str, Any]:
    """Config keyword arguments stock ``from_pretrained(gguf_file=...)`` needs to build the model
    a tiny file describes (it ignores these keys of the file and keeps its own defaults)."""
    d = dims or Dims()
    if arch == "qwen3":
        return {"head_dim": d.hd}
    if arch == "qwen2moe":
        return {"moe_intermediate_size": d.expert_ffn,
                "shared_expert_intermediate_size": d.shared_ffn}
    if arch == "qwen3moe":
        return {"moe_intermediate_size": d.expert_ffn}
    return {}
