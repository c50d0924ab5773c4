"""``gemma2``: Gemma 2. Norms are stored as ``1 + w`` (llama.cpp adds the 1 Gemma's RMSNorm adds
at run time); Transformers' ``Gemma2TensorProcessor`` subtracts it again, as here."""

from __future__ import annotations

from ..reader import TensorInfo
from .base import Adapter, Fill

__all__ = ["Gemma2", "GemmaNorms"]


class GemmaNorms(Adapter):
    """Every ``*norm.weight`` minus 1 (the rule of Transformers' ``Gemma2TensorProcessor``)."""

    def fill(self, name: str, shape: tuple[int, ...], infos: list[TensorInfo]) -> Fill:
        info = self.single(name, infos)
        if "norm.weight" in info.name:
            return self.offset(name, shape, info, -1.0)
        return super().fill(name, shape, infos)


class Gemma2(GemmaNorms):
    architecture = "gemma2"
