"""``bloom``: BLOOM and BLOOMZ. llama.cpp reorders the fused qkv rows from per-head
``[q_h, k_h, v_h]`` groups to ``[q; k; v]``; they are put back per head (a row permutation of
the weight, the same reorder of the bias's values), in the order Transformers'
``BloomTensorProcessor`` computes. The head is tied exactly when the file has no
``output.weight`` (stock Transformers ties Bloom unless the two differ: same weights)."""

from __future__ import annotations

import numpy as np

from ..reader import TensorInfo
from .base import Adapter, Fill

__all__ = ["Bloom", "qkv_order"]


def qkv_order(n_head: int, n_embed: int) -> np.ndarray:
    """Parameter row ``i`` of the fused qkv is GGUF row ``order[i]``."""
    from transformers.modeling_gguf_pytorch_utils import BloomTensorProcessor

    return BloomTensorProcessor()._reverse_reshape_bias(np.arange(3 * n_embed), n_head, n_embed)


class Bloom(Adapter):
    architecture = "bloom"

    def fill(self, name: str, shape: tuple[int, ...], infos: list[TensorInfo]) -> Fill:
        info = self.single(name, infos)
        if "attn_qkv" in info.name:
            cfg = self.config_dict()
            return self.permuted(name, shape, info, qkv_order(cfg["n_head"], cfg["hidden_size"]))
        return super().fill(name, shape, infos)
