"""``falcon``: Falcon-7B-style files (multi-query attention, one norm per block, fused qkv).

The output head: stock Transformers configures Falcon as tied but loads ``output.weight`` into
the head whenever it differs from the embeddings; here the head is tied exactly when the file has
no ``output.weight``, which gives the same weights.

Not supported: Falcon-40B/180B (``new_decoder_architecture``: several k/v heads and a second
norm), whose fused qkv llama.cpp de-interleaves; stock Transformers builds the wrong shapes for
them and refuses them too."""

from __future__ import annotations

from ...errors import GGUFUnsupportedError
from .base import Adapter

__all__ = ["Falcon"]


class Falcon(Adapter):
    architecture = "falcon"

    def check(self) -> None:
        kv = self.key("attention.head_count_kv", 1)
        if any(".attn_norm_2." in t for t in self.tensors) or (isinstance(kv, int) and kv > 1):
            raise GGUFUnsupportedError(
                "this falcon file has the Falcon-40B/180B layout (several key/value heads, two "
                "norms per block); only the Falcon-7B layout loads from GGUF (in kernel_ext and "
                "in Transformers)"
            )
