"""``nemotron``: Nemotron (Minitron, Nemotron-Mini). LayerNorm1P weights are stored as
``1 + w``; the 1 is subtracted, as Transformers' ``NemotronTensorProcessor`` does."""

from __future__ import annotations

from .gemma2 import GemmaNorms

__all__ = ["Nemotron"]


class Nemotron(GemmaNorms):
    architecture = "nemotron"
