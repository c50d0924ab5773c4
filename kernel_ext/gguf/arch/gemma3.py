"""``gemma3``: Gemma 3 text models (the default demo model is one). The file holds the text
backbone only, so the config is ``gemma3_text``; norms as in :mod:`.gemma2`.

Gemma 3 4B and larger scale the rotary frequencies of their global (full-attention) layers
linearly (``gemma3.rope.scaling.type = linear``, factor 8); the sliding-window layers keep theirs
(base ``rope.freq_base_swa``, else Gemma's 10000). Stock Transformers ignores the scaling."""

from __future__ import annotations

from typing import Any

from .gemma2 import GemmaNorms

__all__ = ["Gemma3"]


class Gemma3(GemmaNorms):
    architecture = "gemma3"
    verified = ("the demo model (Gemma 3 270M Q4_K_M: logits equal to stock) and tiny files "
                "(F32, F16, Q5_0, Q8_0, K-quants) against stock Transformers")

    def adjust_config(self, config: dict[str, Any]) -> None:
        config["model_type"] = "gemma3_text"

    def apply_rope_scaling(self, config: dict[str, Any], scaling: dict[str, Any]) -> None:
        theta = config.pop("rope_theta", None)
        local = self.key("rope.freq_base_swa")
        config["rope_parameters"] = {
            "full_attention": {**scaling, "rope_theta": float(theta or 1000000.0)},
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": float(local) if isinstance(local, (int, float)) else 10000.0,
            },
        }
