"""``llama``: Llama 1-3, Mistral (llama.cpp writes Mistral files as ``llama``), SmolLM, TinyLlama,
the DeepSeek-R1 Llama distills, and every other llama-architecture fine-tune.

llama.cpp permutes the rows of ``attn_q``/``attn_k`` per head (for its rotary layout); they are
un-permuted here, in the order Transformers' ``LlamaTensorProcessor`` computes.

Mistral naming follows stock Transformers: the config becomes ``mistral`` only when
``general.name`` is exactly ``"mistral"``; a name that merely contains it ("Mistral 7B Instruct
v0.3", any llama fine-tune called "...mistral...") loads as Llama, which computes the same.
gguf-py has no "mistral" tensor table, so the tensor names are llama's either way (stock fails
on a file named exactly "mistral" for that reason; this adapter loads it).
"""

from __future__ import annotations

import numpy as np

from ..reader import TensorInfo
from .base import Adapter, Fill, n_rows

__all__ = ["Llama", "unpermute_order"]


def unpermute_order(rows: int, n_head: int, n_kv_head: int | None = None) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: parameter row ``i`` is GGUF row
    ``order[i]`` - Transformers' ``LlamaTensorProcessor._reverse_permute_weights`` applied to the
    row indices."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(np.arange(rows), n_head, n_kv_head)


class Llama(Adapter):
    architecture = "llama"
    verified = ("tiny files (F32, Q8_0, Q4_K; sentencepiece and byte-level vocabularies) and a "
                "Mistral-named file against stock Transformers")

    def transformers_arch(self) -> str:
        return "mistral" if self.metadata.get("general.name") == "mistral" else "llama"

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
