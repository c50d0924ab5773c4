"""The GPU plans of the memory guard, worked out on the ``meta`` device and loaded per tensor.

Everything here starts from the model built on the ``meta`` device (no memory): which linear
layers bitsandbytes would quantise (:func:`quantised_linears`; Transformers' own rule: every
``nn.Linear`` but the output head and tied weights, so embeddings stay 16-bit), what each plan
then weighs (:func:`plan_footprints`), and, for an offload plan, where each layer goes
(:func:`offload_device_map`: accelerate's ``infer_auto_device_map`` bounded by the plan's own
device and the guard's budgets, the rest on disk in an offload folder).

:func:`load_placed` then fills that model one GGUF tensor at a time: read the quantised bytes,
dequantise them on the device the tensor will live on, quantise them there (bitsandbytes
plans) or assign them, and let go. No state dict of the whole model is ever built, so host RAM
holds at most one tensor beyond what the plan puts on the CPU (the guard's host budget).

No GPU was available where this was written: the same code runs on the CPU in the tests
(bitsandbytes 0.50 quantises on the CPU too; accelerate offloads to disk there), and the
``cuda`` tests run it on a GPU (``make gpu-check``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import GGUFFormatError, GGUFUnsupportedError, ModelLoadError
from . import convert
from .arch import Adapter
from .reader import GGUFFile

__all__ = [
    "Offload",
    "load_placed",
    "meta_model",
    "offload_device_map",
    "plan_footprints",
    "quantised_linears",
]

Progress = Callable[[int, int, str], None]

# bitsandbytes' storage beyond the quantised weights: 8-bit keeps one float32 scale per output
# row (SCB); 4-bit (nf4, blocks of 64, no double quantisation, as the loader asks) one float32
# absmax per block.
_NF4_BLOCK = 64


@dataclass(frozen=True)
class Offload:
    """An offload plan's limits: bytes on its device and in host RAM; the rest goes to
    ``folder`` (a temporary directory when None)."""

    device_bytes: int
    host_bytes: int
    folder: Path | None = None


def meta_model(gf: GGUFFile, dtype: torch.dtype) -> Any:
    """The Transformers model of ``gf`` on the ``meta`` device (weights tied), in ``dtype``.

    Fast-path architectures only (their adapter builds the config); raises
    ``GGUFUnsupportedError`` for the others."""
    from .arch import route
    from .loader import _new_model

    adapter = route(gf.metadata, gf.tensors, gf.tensor_bytes).adapter
    if adapter is None:
        raise GGUFUnsupportedError(
            f"{gf.architecture} loads through Transformers: no meta model is built for it here"
        )
    config = convert.build_config(adapter.config_dict(), dtype=dtype)
    model = _new_model(config, dtype)
    model.tie_weights()
    return model


def _linear_classes() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def quantised_linears(model: Any) -> list[str]:
    """Names of the modules bitsandbytes replaces (Transformers' ``replace_with_bnb_linear``
    with ``get_keys_to_not_convert``): plain linear layers, not the output head nor tied ones."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model)
    classes = _linear_classes()
    return [
        name for name, m in model.named_modules()
        if type(m) in classes and should_convert_module(name, skip)
    ]


def plan_footprints(model: Any, half: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of the weights under each plan kind, from the (meta) model's own modules.

    Keys: "float32", the 16-bit dtype ``half`` ("bfloat16" or "float16"), "8bit", "4bit".
    Quantised layers count their int8 / packed nf4 weights plus bitsandbytes' scales; every
    other parameter (embeddings, norms, biases, the output head) stays 16-bit."""
    params = dict(model.named_parameters())  # tied weights once
    total = sum(p.numel() for p in params.values())
    q_numel = q_rows = 0
    for name in quantised_linears(model):
        w = model.get_submodule(name).weight
        q_numel += w.numel()
        q_rows += int(w.shape[0])
    rest = total - q_numel
    half_name = str(half).removeprefix("torch.")
    return {
        "float32": total * 4,
        half_name: total * 2,
        "8bit": q_numel + q_rows * 4 + rest * 2,
        "4bit": q_numel // 2 + (q_numel // _NF4_BLOCK) * 4 + rest * 2,
    }


def offload_device_map(
    model: Any, device: str, device_bytes: int, host_bytes: int, dtype: torch.dtype
) -> dict[str, int | str]:
    """accelerate's device map for ``model`` on ``device`` ("cuda:N" or "cpu") within
    ``device_bytes`` there and ``host_bytes`` of host RAM; what does not fit goes to "disk".

    Only the plan's own device is offered (``--device cuda:1`` means GPU 1, never a balance
    over every visible GPU), with the guard's budgets rather than accelerate's defaults."""
    from accelerate import infer_auto_device_map

    max_memory: dict[int | str, int] = {"cpu": int(host_bytes)}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        max_memory = {index: int(device_bytes), **max_memory}
    else:
        max_memory["cpu"] = int(host_bytes + device_bytes)
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    return dict(
        infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                              dtype=dtype)
    )


def _placement(device_map: dict[str, int | str], name: str) -> int | str:
    """Where the parameter ``name`` lives under ``device_map`` (longest module prefix)."""
    best, where = -1, None
    for prefix, dev in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, where = len(prefix), dev
    if where is None:
        raise ModelLoadError(f"the offload device map places no module holding {name!r}")
    return where


def _bnb_config(quantization: str, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_type="nf4")


def _quantise(module: Any, value: torch.Tensor) -> Any:
    """``value`` (on its final device) as the bitsandbytes parameter ``module.weight`` expects,
    quantised where it lies (Transformers' ``Bnb4bitQuantize`` / ``Bnb8bitQuantize`` steps)."""
    import bitsandbytes as bnb

    old = module.weight
    kwargs = dict(old.__dict__)
    if isinstance(old, bnb.nn.Params4bit):
        return bnb.nn.Params4bit(value, requires_grad=False, **kwargs).to(value.device)
    kwargs.pop("SCB", None)
    param = bnb.nn.Int8Params(value, requires_grad=False, **kwargs)
    if value.device.type == "cpu":
        return param.to(value.device)  # bitsandbytes quantises on the way from the CPU
    # on a GPU: quantise there (Int8Params.to only quantises data coming from the CPU, which
    # would cost a host round trip per tensor)
    return param._quantize(value.device)


def load_placed(
    gf: GGUFFile,
    *,
    adapter: Adapter,
    config: Any,
    dtype: torch.dtype,
    device: str,
    quantization: str | None = None,
    offload: Offload | Mapping[str, int | str] | None = None,
    progress: Progress | None = None,
) -> Any:
    """The model of ``gf`` under a bitsandbytes and/or offload plan, filled tensor by tensor.

    Each tensor is dequantised on the device it will live on (``device``, or the CPU for the
    layers an offload plan keeps in host RAM or on disk), quantised there for a bitsandbytes
    plan, and assigned; layers mapped to disk are written to the offload folder, and accelerate
    hooks move the offloaded layers in at forward time. ``adapter``: the file's architecture
    adapter (:func:`kernel_ext.gguf.arch.route`), which says which GGUF rows fill which
    parameter. ``offload``: the plan's budgets (:class:`Offload`), or an explicit accelerate
    device map."""
    from .loader import _materialize, _new_model, _set_tensor, complete_plan

    model = _new_model(config, dtype)
    model.tie_weights()
    plan = complete_plan(adapter, model)
    device_map: dict[str, int | str] | None = None
    folder: Path | None = None
    if isinstance(offload, Offload):
        device_map = offload_device_map(model, device, offload.device_bytes, offload.host_bytes,
                                        dtype)
    elif isinstance(offload, Mapping):
        device_map = dict(offload)
    elif offload is not None:
        raise ValueError(f"device_map must be an Offload or an explicit device map, not {offload!r}")
    if device_map is not None and "disk" in device_map.values():
        given = offload.folder if isinstance(offload, Offload) else None
        folder = given or Path(tempfile.mkdtemp(prefix="kernel_ext-offload-"))
        folder.mkdir(parents=True, exist_ok=True)
    quantised: set[str] = set()
    if quantization is not None:
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear
        from transformers.quantizers.base import get_keys_to_not_convert

        quantised = set(quantised_linears(model))
        replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model),
                                quantization_config=_bnb_config(quantization, dtype))
    disk_index: dict[str, Any] = {}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source
    total = len(plan.fills)
    with gf.open_data() as fh:  # the pinned, parsed file (issue 12), not the path again
        for done, (hf_name, fill) in enumerate(plan.fills.items(), 1):
            where = _placement(device_map, hf_name) if device_map is not None else device
            on = f"cuda:{where}" if isinstance(where, int) else str(where)
            value = _materialize(fh, gf, fill, dtype, "cpu" if on == "disk" else on)
            module_name, _, leaf = hf_name.rpartition(".")
            if on == "disk":
                from accelerate.utils import offload_weight

                assert folder is not None
                # tied names too: accelerate reads each parameter from a file of its own name
                for key in [hf_name, *(t for t, src in tied.items() if src == hf_name)]:
                    offload_weight(value, key, str(folder), index=disk_index)
            elif module_name in quantised and leaf == "weight":
                module = model.get_submodule(module_name)
                module.weight = _quantise(module, value)
            else:
                _set_tensor(model, hf_name, value)
            del value
            if progress is not None:
                progress(done, total, "weights")
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"
                and (device_map is None or _placement(device_map, n) != "disk")]
    if leftover:
        raise GGUFFormatError(f"no data for parameters {', '.join(leftover[:5])}")
    if device_map is None:
        for module in model.modules():  # buffers (rotary tables) were built on the CPU
            for key, buf in list(module._buffers.items()):
                if buf is not None and str(buf.device) != device:
                    module._buffers[key] = buf.to(device)
        return model
    return _dispatch(model, device_map, device, folder, disk_index)


def _dispatch(model: Any, device_map: dict[str, int | str], device: str, folder: Path | None,
              disk_index: dict[str, Any]) -> Any:
    from accelerate import dispatch_model
    from accelerate.utils import save_offload_index

    if folder is not None:
        save_offload_index(disk_index, str(folder))
    try:
        return dispatch_model(model, device_map=device_map, main_device=device,
                              offload_dir=str(folder) if folder is not None else None)
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(f"accelerate could not place the model ({device_map}): {e}") from e
