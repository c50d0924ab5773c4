"""``gemma3``: Gemma 3 text models (the default demo model is one). The file holds the text
backbone only, so the config is ``gemma3_text``; norms as in :mod:`.gemma2`."""

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
