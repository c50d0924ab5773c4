"""The Transformers path: architectures with no adapter, loaded by stock Transformers itself.

``from_pretrained(<dir>, gguf_file=<name>)`` for the model, the config and the tokenizer, with:

* nothing fetched from a model hub: ``local_files_only=True`` on every call, and
  ``huggingface_hub``'s offline switch held on for the duration (:func:`hub_offline`), so code
  that would fetch anyway (Transformers' ``kernels`` integration) fails fast instead;
* Transformers' newer GGUF path (``GgufConfig``: qwen35, qwen35moe, lfm2) asked to dequantise
  at load (``GgufConfig(dequantize=True)``). Its other mode keeps the weights in GGUF blocks and
  computes with kernels that the ``kernels`` package downloads from the Hugging Face hub at run
  time; offline that cannot work, so these models take the memory of dequantised weights (the
  dtype of the load plan), like every other path here.

The gate around it is the caller's (:mod:`kernel_ext.models`): our reader validated the file,
the pin was checked, the memory guard planned (with this path's larger peak), progress and the
audit log are written. Transformers then reads the file again by its path (gguf-py's
``GGUFReader`` for the legacy loader); a file replaced between our check and that read is not
detected here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import GGUFUnsupportedError, KernelExtError, ModelLoadError
from .reader import GGUFFile

__all__ = ["PEAK_FACTOR", "hub_offline", "load_with_transformers"]

Progress = Callable[[int, int, str], None]

# Peak memory of a Transformers load, in multiples of the loaded model's size: the legacy loader
# dequantises every tensor to float32 with numpy, holds the whole state dict and then the model
# (stock load of the demo model: 2.5 GB peak for a 1.07 GB fp32 model).
PEAK_FACTOR = 2.5


_OFFLINE_LOCK = threading.Lock()
_offline_holders = 0
_offline_before: bool | None = None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hold ``huggingface_hub``'s offline switch on (``constants.HF_HUB_OFFLINE``, which its HTTP
    layer checks on every request); the last of overlapping holders restores it. Process-wide
    while held: any other thread's hub request fails meanwhile, which is the point."""
    global _offline_holders, _offline_before
    from huggingface_hub import constants

    with _OFFLINE_LOCK:
        if _offline_holders == 0:
            _offline_before = constants.HF_HUB_OFFLINE
            constants.HF_HUB_OFFLINE = True
        _offline_holders += 1
    try:
        yield
    finally:
        with _OFFLINE_LOCK:
            _offline_holders -= 1
            if _offline_holders == 0:
                constants.HF_HUB_OFFLINE = bool(_offline_before)


def load_with_transformers(
    gf: GGUFFile,
    loader: str,
    *,
    dtype: Any,
    device: str,
    device_map: Any = None,
    quantization: str | None = None,
    progress: Progress | None = None,
) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, config)`` for the GGUF file ``gf`` (already validated), loaded by stock
    Transformers. ``loader`` is the route's (``"legacy"`` or ``"gguf"``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if quantization is not None:
        raise GGUFUnsupportedError(
            f"{gf.architecture} loads through Transformers, which cannot quantise a model it "
            f"reads from GGUF ({quantization} bitsandbytes was planned); load it in bfloat16 "
            "or with CPU offload, or free memory first"
        )
    folder, name = str(gf.path.parent), gf.path.name
    common: dict[str, Any] = {"gguf_file": name, "local_files_only": True}
    total = len(gf.tensors)
    if progress is not None:
        progress(0, total, "weights (Transformers)")
    try:
        with hub_offline():
            config = AutoConfig.from_pretrained(folder, **common)
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=dtype,
                device_map=device_map,
                quantization_config=GgufConfig(dequantize=True),
                **common,
            )
            if progress is not None:
                progress(total, total, "weights (Transformers)")
            tokenizer = AutoTokenizer.from_pretrained(folder, **common)
    except KernelExtError:
        raise  # e.g. the caller's load timeout, raised from the progress callback
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        raise ModelLoadError(
            f"Transformers could not load {name} ({gf.architecture}, its {loader} GGUF "
            f"loader): {type(e).__name__}: {e}"
        ) from e
    if device_map is None:
        model.to(device)
    return model.eval(), tokenizer, config
