"""Memory probes (RAM, GPUs) and the load guard with its plan ladder.

The guard compares a load's estimated footprint with ``memory_fraction`` of what the target
device has available, and picks the first plan that fits:

    GPU:  bf16/fp16  ->  8-bit (bitsandbytes)  ->  4-bit (bitsandbytes)  ->  CPU offload (accelerate)
    CPU:  requested dtype  ->  bfloat16
    then: refuse, with the numbers and the options.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from .errors import MemoryBudgetError

__all__ = [
    "DTYPE_BYTES",
    "CudaDevice",
    "GpuSample",
    "LoadPlan",
    "MemorySample",
    "available_bytes",
    "choose_plan",
    "cuda_devices",
    "format_bytes",
    "guard_budget",
    "half_dtype",
    "process_anonymous_bytes",
    "sample_memory",
]

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "nf4": 0.5}
_GB = 1024**3


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    total: int
    used: int
    free: int


@dataclass(frozen=True)
class MemorySample:
    ts: float
    ram_total: int
    ram_available: int
    ram_used: int
    process_rss: int
    gpus: list[GpuSample] = field(default_factory=list)


@dataclass(frozen=True)
class CudaDevice:
    """A CUDA device as torch numbers it (``CUDA_VISIBLE_DEVICES`` applied), read from the
    device properties: no CUDA context is created to know it."""

    index: int
    name: str
    uuid: str  # as NVML writes it: "GPU-…" (or "MIG-…")
    total: int
    capability: tuple[int, int]


def _torch() -> Any:
    try:
        import torch
    except ImportError:  # torch is a dependency, but probes must never fail
        return None
    return torch


def cuda_devices() -> list[CudaDevice]:
    """The CUDA devices this process can see, in torch's numbering; [] without CUDA."""
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid and not uuid.startswith(("GPU-", "MIG-")):
            uuid = f"GPU-{uuid}"
        out.append(CudaDevice(i, str(props.name), uuid, int(props.total_memory),
                              (int(props.major), int(props.minor))))
    return out


def _cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def half_dtype(device: str) -> str:
    """The 16-bit dtype ``device`` computes natively: bfloat16 on the CPU and on CUDA devices of
    compute capability 8.0 or more (Ampere on), float16 on older GPUs, whose bfloat16 is
    emulated (``torch.cuda.is_bf16_supported()`` counts emulation, and asks the current
    device, not ``device``)."""
    if not device.startswith("cuda"):
        return "bfloat16"
    index = _cuda_index(device)
    for d in cuda_devices():
        if d.index == index:
            return "bfloat16" if d.capability >= (8, 0) else "float16"
    return "float16"  # not visible: float16 runs everywhere


class _Nvml:
    """nvidia-ml-py (the ``gpu`` extra), imported and initialised on first use; ``None`` from
    :meth:`memory` when it is missing or finds no driver. NVML reads a GPU's memory without a
    CUDA context, so probing never claims memory on GPUs this kernel does not use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module: Any = None
        self._tried = False

    def _get(self) -> Any:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._module = pynvml
                except Exception as e:  # noqa: BLE001 - ImportError, NVMLError: no NVML here
                    log.debug("kernel_ext: NVML unavailable (%s); GPU memory via torch", e)
            return self._module

    def memory(self, uuid: str) -> tuple[int, int] | None:
        """(total, free) bytes of the GPU with this UUID, or None."""
        nvml = self._get()
        if nvml is None or not uuid:
            return None
        for candidate in (uuid, "MIG-" + uuid.removeprefix("GPU-")):
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByUUID(candidate))
            except Exception as e:  # noqa: BLE001 - NVMLError_NotFound and friends
                log.debug("kernel_ext: NVML has no device %s: %s", candidate, e)
                continue
            return int(info.total), int(info.free)
        return None

    def reset(self) -> None:
        """Forget the module (tests install a fake one)."""
        with self._lock:
            self._module, self._tried = None, False


_NVML = _Nvml()


def _has_context(torch: Any, index: int) -> bool:
    """Whether this process already holds a CUDA context on ``index`` (asking creates none)."""
    probe = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if probe is None or not torch.cuda.is_initialized():
        return False
    try:
        return bool(probe(index))
    except Exception:  # noqa: BLE001 - a probe must never fail
        return False


def _gpu_memory(device: CudaDevice, *, may_create_context: bool) -> tuple[int, int] | None:
    """(total, free) of one device: NVML by UUID; else torch's ``mem_get_info``, but only on a
    device this process already uses (or, for the guard, is about to use)."""
    got = _NVML.memory(device.uuid)
    if got is not None:
        return got
    torch = _torch()
    if torch is None or not (may_create_context or _has_context(torch, device.index)):
        return None
    free, total = torch.cuda.mem_get_info(device.index)
    return int(total), int(free)


def _gpus() -> list[GpuSample]:
    """Each visible GPU whose memory can be read without creating a CUDA context on it."""
    out = []
    for d in cuda_devices():
        got = _gpu_memory(d, may_create_context=False)
        if got is not None:
            total, free = got
            out.append(GpuSample(d.index, d.name, total, total - free, free))
    return out


def sample_memory() -> MemorySample:
    """RAM of the machine, this process's RSS and each visible CUDA GPU (all of them with NVML;
    without it, those this process already uses)."""
    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    return MemorySample(time.time(), vm.total, vm.available, vm.total - vm.available, rss, _gpus())


def available_bytes(device: str) -> int:
    """Memory a new load may take on ``device`` ("cpu", "cuda", "cuda:N")."""
    if device.startswith("cuda"):
        index = _cuda_index(device)
        for d in cuda_devices():
            if d.index == index:
                got = _gpu_memory(d, may_create_context=True)  # the load will use it anyway
                return got[1] if got is not None else 0
        return 0
    return psutil.virtual_memory().available


def process_anonymous_bytes() -> int:
    """This process's anonymous resident memory (heap, anonymous tensors), without file
    mappings such as memory-mapped weights; Linux ``/proc/self/smaps_rollup``, else the RSS."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(psutil.Process().memory_info().rss)


def guard_budget(available: int, fraction: float) -> int:
    """What the guard lets one new load take: ``fraction`` of the memory available now."""
    return int(available * fraction)


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"`` (powers of 1024, IEC names); ``None`` -> ``"–"``."""
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@dataclass(frozen=True)
class LoadPlan:
    """How a model will be loaded; shown to the user and written to the audit log."""

    device: str
    dtype: str
    quantization: str | None = None  # None | "8bit" | "4bit"
    offload: bool = False  # accelerate device map over the plan's GPU, the CPU (and disk)
    estimate_bytes: int = 0
    budget_bytes: int = 0
    reason: str = ""
    host_budget_bytes: int = 0  # offload plans: what the CPU part may take of host RAM

    def describe(self) -> str:
        parts = [self.device, self.dtype]
        if self.quantization:
            parts.append(f"bitsandbytes {self.quantization}")
        if self.offload:
            parts.append("CPU offload")
        fit = f"{format_bytes(self.estimate_bytes)} of {format_bytes(self.budget_bytes)} allowed"
        return " / ".join(parts) + f" ({fit})" + (f"; {self.reason}" if self.reason else "")

    @property
    def device_budget_bytes(self) -> int:
        """What the plan may take on its own device (the GPU part of an offload plan)."""
        return self.budget_bytes - self.host_budget_bytes


def choose_plan(
    n_params: int,
    *,
    device: str,
    dtype: str,
    fraction: float,
    available: int | None = None,
    cpu_available: int | None = None,
    overhead: float = 1.15,
    float32_copies: int = 0,
    footprints: Mapping[str, int] | None = None,
    half: str | None = None,
    int4_copies: int = 0,
) -> LoadPlan:
    """The first plan on the ladder whose estimate fits ``fraction`` of available memory.

    ``overhead`` covers buffers, the KV cache of a short generation and allocator slack.
    ``float32_copies``: bytes of the copies CPU decoding keeps of float32 weights (the LM
    head's screen, ``KernelExt.decode_mode``), counted for float32 plans only; ``int4_copies``:
    bytes it keeps whatever the dtype (the int4 repacks of ``decode_mode='quantized'``).
    ``footprints``: the weights' bytes per plan kind ("float32", "bfloat16", "float16",
    "8bit", "4bit"), as :func:`kernel_ext.gguf.gpu_plans.plan_footprints` computes them from
    the model built on the meta device (bitsandbytes keeps embeddings and the output head in
    16-bit); without them every parameter counts at the kind's size.
    ``half``: the 16-bit dtype of the fallback rungs (default: :func:`half_dtype` of
    ``device``, or ``dtype`` itself when that is already 16-bit).
    Raises :class:`MemoryBudgetError` with the numbers and the options when nothing fits.
    """
    avail = available if available is not None else available_bytes(device)
    budget = guard_budget(avail, fraction)
    if dtype in ("bfloat16", "float16"):
        half = dtype
    half = half or half_dtype(device)

    def est(kind: str) -> int:
        copies = int4_copies + (float32_copies if kind == "float32" else 0)
        if footprints is not None and kind in footprints:
            return int(footprints[kind] * overhead) + copies
        size = DTYPE_BYTES[{"8bit": "int8", "4bit": "nf4"}.get(kind, kind)]
        return int(n_params * size * overhead) + copies

    tried: list[str] = []
    ladder: list[tuple[str, str | None, str]] = [(dtype, None, "")]
    if device.startswith("cuda"):
        if dtype == "float32":
            ladder.append((half, None, f"float32 does not fit; using {half}"))
        ladder += [
            (half, "8bit", "16-bit does not fit; quantising to 8-bit"),
            (half, "4bit", "8-bit does not fit; quantising to 4-bit"),
        ]
    elif dtype == "float32":
        ladder.append((half, None, f"float32 does not fit in RAM; using {half}"))
    for dt, quant, reason in ladder:
        need = est(quant or dt)
        if need <= budget:
            return LoadPlan(device, dt, quant, False, need, budget, reason)
        tried.append(f"{dt}{' ' + quant if quant else ''} needs {format_bytes(need)}")
    if device.startswith("cuda"):
        # the layers that do not fit on the GPU live in host RAM: it is checked like a CPU load
        cpu = cpu_available if cpu_available is not None else available_bytes("cpu")
        host = guard_budget(cpu, fraction)
        need = est(half)
        if need <= budget + host:
            return LoadPlan(device, half, None, True, need, budget + host,
                            "does not fit on the GPU; offloading layers to the CPU (slow)",
                            host_budget_bytes=host)
        tried.append(f"{half} with CPU offload needs {format_bytes(need)} "
                     f"(GPU and {format_bytes(host)} of host RAM)")
    raise MemoryBudgetError(
        f"the model does not fit: {'; '.join(tried)}, but only {format_bytes(budget)} "
        f"({fraction:.0%} of {format_bytes(avail)} available on {device}) is allowed. "
        "Options: a smaller dtype (--dtype bfloat16), another device (--device cuda / cpu), "
        "a smaller or more quantised model, freeing memory (%model unload NAME), or raising "
        "%config KernelExt.memory_fraction."
    )
