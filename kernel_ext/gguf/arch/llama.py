"""``llama``: Llama 1-3, Mistral (llama.cpp writes Mistral files as ``llama``), SmolLM, TinyLlama,
the DeepSeek-R1 Llama distills, and every other llama-architecture fine-tune.

llama.cpp permutes the rows of ``attn_q``/``attn_k`` per head (for its rotary layout); they are
un-permuted here, in the order Transformers' ``LlamaTensorProcessor`` computes.

Mistral naming follows stock Transformers: the config becomes ``mistral`` only when
``general.name`` is exactly ``"mistral"``; a name that merely contains it ("Mistral 7B Instruct
v0.3", any llama fine-tune called "...mistral...") loads as Llama, which computes the same.
gguf-py has no "mistral" tensor table, so the tensor names are llama's either way (stock fails
on a file named exactly "mistral" for that reason; this adapter loads it).

Llama 3.1 / 3.2 / 3.3 files carry their RoPE scaling only as a ``rope_freqs`` tensor (one factor
per frequency, computed by llama.cpp's converter from the model's ``rope_scaling``). Stock
Transformers ignores that tensor and runs these models with unscaled frequencies; here the
parameters that reproduce the tensor exactly are recovered and set as Transformers' ``llama3``
rope (see :func:`llama3_rope_scaling`); a tensor no known parameter set reproduces is ignored,
with a warning.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..reader import TensorInfo
from .base import Adapter, Fill, n_rows

__all__ = ["Llama", "llama3_rope_factors", "llama3_rope_scaling", "unpermute_order"]

log = logging.getLogger(__name__)

# (low_freq_factor, high_freq_factor, original context) of the released Llama 3.x models; the
# converter reads the original context from a key those configs do not have, so it is 8192.
_LLAMA3_SHAPES = ((1.0, 4.0, 8192),)


def unpermute_order(rows: int, n_head: int, n_kv_head: int | None = None) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: parameter row ``i`` is GGUF row
    ``order[i]`` - Transformers' ``LlamaTensorProcessor._reverse_permute_weights`` applied to the
    row indices."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(np.arange(rows), n_head, n_kv_head)


def llama3_rope_factors(
    base: float, dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for Llama 3 rope scaling (its
    ``LlamaModel.generate_extra_tensors``): one divisor per rotary frequency."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def llama3_rope_scaling(factors: np.ndarray, base: float, dim: int) -> dict[str, Any] | None:
    """Transformers' ``llama3`` rope parameters that reproduce ``factors`` (a file's
    ``rope_freqs``), or None when no known parameter set does."""
    factor = float(np.max(factors))
    if len(factors) != dim // 2 or factor <= 1:
        return None
    for low, high, original in _LLAMA3_SHAPES:
        expected = llama3_rope_factors(base, dim, factor, low, high, original)
        if np.allclose(expected, factors, rtol=1e-5, atol=1e-6):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original}
    return None


class Llama(Adapter):
    architecture = "llama"
    verified = ("tiny files (F32, Q8_0, Q4_K; sentencepiece and byte-level vocabularies) and a "
                "Mistral-named file against stock Transformers")

    def transformers_arch(self) -> str:
        return "mistral" if self.metadata.get("general.name") == "mistral" else "llama"

    def adjust_config(self, config: dict[str, Any]) -> None:
        factors = self.f32_vector("rope_freqs.weight")
        if factors is None or "rope_parameters" in config:
            return
        heads = config.get("num_attention_heads") or 1
        dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
        scaling = llama3_rope_scaling(factors, float(config.get("rope_theta", 10000.0)), dim)
        if scaling is None:
            log.warning(
                "kernel_ext: this llama file's rope_freqs tensor matches no known Llama 3 rope "
                "scaling; it is ignored (as stock Transformers does), so long contexts may "
                "degrade"
            )
            return
        self.apply_rope_scaling(config, scaling)

    def fill(self, name: str, shape: tuple[int, ...], infos: list[TensorInfo]) -> Fill:
        info = self.single(name, infos)
        is_q, is_k = ".attn_q." in info.name, ".attn_k." in info.name
        cfg = self.config_dict()
        heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
        if (is_q or is_k) and heads is not None and kv_heads is not None:
            rows = n_rows(info) if len(info.shape) > 1 else info.n_elements
            order = unpermute_order(rows, heads, heads if is_q else kv_heads)
            return self.permuted(name, shape, info, order)
        return super().fill(name, shape, infos)
