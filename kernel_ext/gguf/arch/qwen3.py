"""``qwen3``: Qwen3 dense models (q/k RMS norms per head).

The head size comes from ``qwen3.attention.key_length`` (stock Transformers 5.24 ignores that key
and uses its default, 128, which is what every released Qwen3 has; for any other head size
stock builds the wrong shapes and refuses the file)."""

from __future__ import annotations

from typing import Any

from .base import Adapter

__all__ = ["Qwen3"]


class Qwen3(Adapter):
    architecture = "qwen3"

    def adjust_config(self, config: dict[str, Any]) -> None:
        head_dim = self.key("attention.key_length")
        if isinstance(head_dim, int) and head_dim > 0:
            config["head_dim"] = head_dim
