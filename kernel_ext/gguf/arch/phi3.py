"""``phi3``: Phi-3, Phi-3.5, Phi-4 (mini). q/k/v and gate/up are fused in the file as in
Transformers (``qkv_proj``, ``gate_up_proj``): every tensor is an identity of rows.

The 128k-context models (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini) use LongRoPE: the file holds
its per-frequency factors as tensors ``rope_factors_long`` / ``rope_factors_short`` and the
pre-training context as ``phi3.rope.scaling.original_context_length``. Stock Transformers ignores
them (so it runs those models without their short factors, even on short prompts); here they
become Transformers' ``longrope`` parameters."""

from __future__ import annotations

from typing import Any

from .base import Adapter

__all__ = ["Phi3"]


class Phi3(Adapter):
    architecture = "phi3"

    def adjust_config(self, config: dict[str, Any]) -> None:
        long_f = self.f32_vector("rope_factors_long.weight")
        short_f = self.f32_vector("rope_factors_short.weight")
        original = self.key("rope.scaling.original_context_length")
        context = config.get("max_position_embeddings")
        if (long_f is not None and short_f is not None and isinstance(original, int)
                and original > 0 and isinstance(context, int)):
            self.apply_rope_scaling(config, {
                "rope_type": "longrope",
                "long_factor": [float(x) for x in long_f],
                "short_factor": [float(x) for x in short_f],
                "factor": context / original,
            })
            config["original_max_position_embeddings"] = original
        # Phi3Config defaults pad_token_id to 32000 (Phi-3's own); a file that names no padding
        # token and has fewer tokens would make the embedding's padding index invalid.
        if "pad_token_id" not in config and config.get("vocab_size", 0) <= 32000:
            config["pad_token_id"] = None
