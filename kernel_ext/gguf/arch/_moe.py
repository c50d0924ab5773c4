"""Stacked experts, shared by the Qwen MoE adapters.

llama.cpp stores each MoE layer's experts as three stacked tensors, ``ffn_gate_exps``,
``ffn_up_exps`` (``E x F x H``) and ``ffn_down_exps`` (``E x H x F``). Transformers 5 keeps them
stacked too, with gate and up fused: ``mlp.experts.gate_up_proj`` (``E x 2F x H``, gate rows
first in each expert - the layout of Transformers' ``Qwen2MoeTensorProcessor``) and
``mlp.experts.down_proj``. So every expert parameter is a row operation of the file's rows: down
is an identity, gate_up takes expert ``e``'s ``F`` gate rows then its ``F`` up rows. The loader
decodes those row ranges straight into the parameter (or into the cache file, expert by expert),
so no second copy of the experts is ever made.

The expert widths come from the metadata (``expert_feed_forward_length``,
``expert_shared_feed_forward_length``) or, failing that, the tensors' shapes. Stock Transformers
5.24 ignores both keys and keeps Qwen1.5-MoE-A2.7B's widths (1408 / 5632), so it refuses every
file of other widths (Qwen2-57B-A14B, Qwen3-30B-A3B's 768 is its default by chance).
"""

from __future__ import annotations

import re
from typing import Any

from ..reader import TensorInfo
from ..sources import RowRange, WeightSource
from .base import Adapter, Fill, n_rows

__all__ = ["StackedExperts"]

_GATE_UP = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)\.mlp\.experts\.gate_up_proj$")


class StackedExperts(Adapter):
    def name_map(self, parameters: list[str], n_layers: int) -> dict[str, list[str]]:
        out = super().name_map(parameters, n_layers)
        for param in parameters:
            m = _GATE_UP.match(param)
            if m is None:
                continue
            names = [f"blk.{m['layer']}.ffn_{w}_exps.weight" for w in ("gate", "up")]
            if all(n in self.tensors for n in names):
                out[param] = names
        return out

    def fill(self, name: str, shape: tuple[int, ...], infos: list[TensorInfo]) -> Fill:
        if not _GATE_UP.match(name):
            return super().fill(name, shape, infos)
        gate, up = infos
        experts = shape[0]
        per = n_rows(gate) // experts  # F rows of H per expert
        ranges: list[RowRange] = []
        for e in range(experts):
            ranges.append(RowRange(gate.name, e * per, (e + 1) * per, 2 * e * per))
            ranges.append(RowRange(up.name, e * per, (e + 1) * per, (2 * e + 1) * per))
        return Fill(WeightSource(name, shape, "expert_stack", tuple(ranges)))

    def expert_width(self, key: str, tensor_suffix: str, axis: int) -> int | None:
        """A width from metadata ``key``, else from the first ``blk.*.<tensor_suffix>`` tensor's
        GGUF dimension ``axis``."""
        value = self.key(key)
        if isinstance(value, int) and value > 0:
            return value
        for name, info in self.tensors.items():
            if name.endswith(tensor_suffix) and len(info.shape) > axis:
                return int(info.shape[axis])
        return None

    def adjust_config(self, config: dict[str, Any]) -> None:
        width = self.expert_width("expert_feed_forward_length", ".ffn_gate_exps.weight", 1)
        if width:
            config["moe_intermediate_size"] = width
