"""``phi3``: Phi-3, Phi-3.5, Phi-4 (mini). q/k/v and gate/up are fused in the file as in
Transformers (``qkv_proj``, ``gate_up_proj``): every tensor is an identity of rows."""

from __future__ import annotations

from typing import Any

from .base import Adapter

__all__ = ["Phi3"]


class Phi3(Adapter):
    architecture = "phi3"

    def adjust_config(self, config: dict[str, Any]) -> None:
        # Phi3Config defaults pad_token_id to 32000 (Phi-3's own); a file that names no padding
        # token and has fewer tokens would make the embedding's padding index invalid.
        if "pad_token_id" not in config and config.get("vocab_size", 0) <= 32000:
            config["pad_token_id"] = None
