"""``qwen2moe``: Qwen1.5-MoE, Qwen2-MoE (routed experts plus a gated shared expert).

Experts as in :mod:`._moe`; the shared expert's gate ``ffn_gate_inp_shexp`` (``H``) becomes
``shared_expert_gate.weight`` (``1 x H``): the same single row."""

from __future__ import annotations

from typing import Any

from ._moe import StackedExperts

__all__ = ["Qwen2Moe"]


class Qwen2Moe(StackedExperts):
    architecture = "qwen2moe"
    config_arch = "qwen2_moe"

    def adjust_config(self, config: dict[str, Any]) -> None:
        super().adjust_config(config)
        shared = self.expert_width(
            "expert_shared_feed_forward_length", ".ffn_gate_shexp.weight", 1
        )
        if shared:
            config["shared_expert_intermediate_size"] = shared
