"""Random but valid GGUF quantised blocks, for the kernels' tests (qlinear, blockdot)."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["SCALES_AT", "random_blocks"]

SCALES_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
             "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
"""Where each type keeps its fp16 scale (and minimum), so random blocks get sane values there."""


def random_blocks(name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random but valid blocks of every quant value (``(rows, row_bytes)`` uint8)."""
    elems, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * k // elems, nbytes), dtype=np.uint8)
    for at in SCALES_AT[name]:
        half = (rng.uniform(-1, 1, size=raw.shape[0]) * 0.01).astype(np.float16)
        raw[:, at:at + 2] = half.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)
