"""``gpt2``: GPT-2 (and DistilGPT2). Transformers' GPT-2 keeps its projections as ``Conv1D``
(``in x out``); llama.cpp stores them transposed, so they are transposed back (the rule of
Transformers' ``GPT2TensorProcessor``). The position table has ``context_length`` rows."""

from __future__ import annotations

from typing import Any

from ..reader import TensorInfo
from .base import Adapter, Fill

__all__ = ["Gpt2"]

_TRANSPOSED = ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")


class Gpt2(Adapter):
    architecture = "gpt2"

    def adjust_config(self, config: dict[str, Any]) -> None:
        # Transformers maps context_length to n_ctx only; the position table is n_positions
        # (its default, 1024, is GPT-2's own). The MLP width is n_inner (None: 4 x n_embd).
        if isinstance(config.get("n_ctx"), int):
            config["n_positions"] = config["n_ctx"]
        ffn = self.key("feed_forward_length")
        if isinstance(ffn, int) and ffn > 0:
            config["n_inner"] = ffn

    def fill(self, name: str, shape: tuple[int, ...], infos: list[TensorInfo]) -> Fill:
        info = self.single(name, infos)
        if any(t in info.name for t in _TRANSPOSED):
            return self.transposed(name, shape, info)
        return super().fill(name, shape, infos)
