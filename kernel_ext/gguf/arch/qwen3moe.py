"""``qwen3moe``: Qwen3 MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder). Experts as in
:mod:`._moe`; q/k norms and head size as in :mod:`.qwen3` (``attention.key_length`` is in
Transformers' own table for this architecture); ``norm_topk_prob`` is on, as llama.cpp runs it
(Transformers' ``GGUF_CONFIG_DEFAULTS_MAPPING``)."""

from __future__ import annotations

from ._moe import StackedExperts

__all__ = ["Qwen3Moe"]


class Qwen3Moe(StackedExperts):
    architecture = "qwen3moe"
    config_arch = "qwen3_moe"
