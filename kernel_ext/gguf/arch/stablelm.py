"""``stablelm``: StableLM 2 (and StableLM-3B-4E1T, Stable Code). Whether q/k/v have biases and
whether the residual is parallel are not in the metadata; like stock Transformers they are read
from the tensor table (q/k/v biases present; no ``ffn_norm`` means a parallel residual).

Not supported: StableLM 2 12B's per-head q/k LayerNorms (``attn_q_norm``), which stock cannot
load either."""

from __future__ import annotations

from typing import Any

from ...errors import GGUFUnsupportedError
from .base import Adapter

__all__ = ["StableLm"]


class StableLm(Adapter):
    architecture = "stablelm"

    def check(self) -> None:
        if any(".attn_q_norm." in t for t in self.tensors):
            raise GGUFUnsupportedError(
                "this stablelm file has per-head q/k norms (StableLM 2 12B); neither kernel_ext "
                "nor Transformers loads that variant from GGUF"
            )

    def adjust_config(self, config: dict[str, Any]) -> None:
        names = list(self.tensors)
        config["use_qkv_bias"] = any(
            b in t for t in names for b in ("attn_q.bias", "attn_k.bias", "attn_v.bias")
        )
        config["use_parallel_residual"] = not any("ffn_norm" in t for t in names)
