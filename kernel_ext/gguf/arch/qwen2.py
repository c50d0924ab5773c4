"""``qwen2``: Qwen2, Qwen2.5 (and Coder/Math), the DeepSeek-R1 Qwen distills. Biases on q/k/v;
no row permutation (llama.cpp writes Qwen's q/k as they are)."""

from __future__ import annotations

from .base import Adapter

__all__ = ["Qwen2"]


class Qwen2(Adapter):
    architecture = "qwen2"
