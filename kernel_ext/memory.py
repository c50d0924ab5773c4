"""Memory probes (RAM, GPUs) and the load guard with its plan ladder.

The guard compares a load's estimated footprint with ``memory_fraction`` of what the target
device has available, and picks the first plan that fits:

    GPU:  bf16/fp16  ->  8-bit (bitsandbytes)  ->  4-bit (bitsandbytes)  ->  CPU offload (accelerate)
    CPU:  requested dtype  ->  bfloat16
    then: refuse, with the numbers and the options.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil

from .errors import MemoryBudgetError

__all__ = [
    "GpuSample",
    "MemorySample",
    "LoadPlan",
    "sample_memory",
    "available_bytes",
    "choose_plan",
    "guard_budget",
    "format_bytes",
    "DTYPE_BYTES",
    "process_anonymous_bytes",
]

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


def _gpus() -> list[GpuSample]:
    try:
        import torch
    except ImportError:  # torch is a dependency, but probes must never fail
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuSample(i, torch.cuda.get_device_name(i), total, total - free, free))
    return out


def sample_memory() -> MemorySample:
    """RAM of the machine, this process's RSS and each visible CUDA GPU."""
    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    return MemorySample(time.time(), vm.total, vm.available, vm.total - vm.available, rss, _gpus())


def available_bytes(device: str) -> int:
    """Memory a new load may take on ``device`` ("cpu", "cuda", "cuda:N")."""
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        for gpu in _gpus():
            if gpu.index == index:
                return gpu.free
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
    offload: bool = False  # accelerate device_map="auto" with CPU offload
    estimate_bytes: int = 0
    budget_bytes: int = 0
    reason: str = ""

    def describe(self) -> str:
        parts = [self.device, self.dtype]
        if self.quantization:
            parts.append(f"bitsandbytes {self.quantization}")
        if self.offload:
            parts.append("CPU offload")
        fit = f"{format_bytes(self.estimate_bytes)} of {format_bytes(self.budget_bytes)} allowed"
        return " / ".join(parts) + f" ({fit})" + (f"; {self.reason}" if self.reason else "")


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
) -> LoadPlan:
    """The first plan on the ladder whose estimate fits ``fraction`` of available memory.

    ``overhead`` covers buffers, the KV cache of a short generation and allocator slack.
    ``float32_copies``: bytes of the fp16 copies CPU decoding keeps of float32 weights
    (``KernelExt.decode_mode``), counted for float32 plans only.
    Raises :class:`MemoryBudgetError` with the numbers and the options when nothing fits.
    """
    avail = available if available is not None else available_bytes(device)
    budget = guard_budget(avail, fraction)

    def est(kind: str) -> int:
        copies = float32_copies if kind == "float32" else 0
        return int(n_params * DTYPE_BYTES[kind] * overhead) + copies

    tried: list[str] = []
    ladder: list[tuple[str, str | None, str]] = [(dtype, None, "")]
    if device.startswith("cuda"):
        if dtype == "float32":
            ladder.append(("bfloat16", None, "float32 does not fit; using bfloat16"))
        ladder += [
            ("bfloat16", "8bit", "16-bit does not fit; quantising to 8-bit"),
            ("bfloat16", "4bit", "8-bit does not fit; quantising to 4-bit"),
        ]
    elif dtype == "float32":
        ladder.append(("bfloat16", None, "float32 does not fit in RAM; using bfloat16"))
    for dt, quant, reason in ladder:
        need = est(quant and ("int8" if quant == "8bit" else "nf4") or dt)
        if need <= budget:
            return LoadPlan(device, dt, quant, False, need, budget, reason)
        tried.append(f"{dt}{' ' + quant if quant else ''} needs {format_bytes(need)}")
    if device.startswith("cuda"):
        cpu = cpu_available if cpu_available is not None else available_bytes("cpu")
        need = est("bfloat16")
        if need <= budget + guard_budget(cpu, fraction):
            return LoadPlan(device, "bfloat16", None, True, need, budget + guard_budget(cpu, fraction),
                            "does not fit on the GPU; offloading layers to the CPU (slow)")
        tried.append(f"bfloat16 with CPU offload needs {format_bytes(need)}")
    raise MemoryBudgetError(
        f"the model does not fit: {'; '.join(tried)}, but only {format_bytes(budget)} "
        f"({fraction:.0%} of {format_bytes(avail)} available on {device}) is allowed. "
        "Options: a smaller dtype (--dtype bfloat16), another device (--device cuda / cpu), "
        "a smaller or more quantised model, freeing memory (%model unload NAME), or raising "
        "%config KernelExt.memory_fraction."
    )
