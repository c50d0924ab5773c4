"""``starcoder2``: StarCoder2 (LayerNorms and linear layers with biases)."""

from __future__ import annotations

from .base import Adapter

__all__ = ["Starcoder2"]


class Starcoder2(Adapter):
    architecture = "starcoder2"
