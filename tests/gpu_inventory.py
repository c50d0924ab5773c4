"""A fake CUDA inventory for testing our GPU planning logic on machines without a GPU.

The thing under test is kernel_ext's own logic (which device, which dtype, which probe); the
fake stands in for what only a GPU machine has: torch.cuda's device list and properties, the
CUDA contexts this process holds, and NVML (nvidia-ml-py's ``pynvml``). Every call that would
touch a device's memory through CUDA (``torch.cuda.mem_get_info``) is recorded, so a test can
assert on which GPUs a probe created a context.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

GiB = 1024**3


@dataclass
class FakeGpu:
    name: str
    uuid: str  # NVML form, "GPU-…"
    capability: tuple[int, int]
    total: int = 16 * GiB
    used: int = 1 * GiB


@dataclass
class Inventory:
    """The GPUs torch sees (CUDA_VISIBLE_DEVICES applied) and every GPU NVML sees."""

    visible: list[FakeGpu]
    nvml_all: list[FakeGpu] = field(default_factory=list)
    contexts: set[int] = field(default_factory=set)  # torch indices holding a CUDA context
    mem_get_info_calls: list[int] = field(default_factory=list)


def install(monkeypatch: pytest.MonkeyPatch, inv: Inventory, *, nvml: bool = True) -> Inventory:
    """Make torch.cuda (and pynvml when ``nvml``) report ``inv``."""
    from kernel_ext import memory

    gpus = inv.visible

    def props(i: Any) -> Any:
        g = gpus[_index(i)]
        return types.SimpleNamespace(name=g.name, total_memory=g.total, major=g.capability[0],
                                     minor=g.capability[1], uuid=g.uuid.removeprefix("GPU-"))

    def mem_get_info(i: Any = None) -> tuple[int, int]:
        idx = _index(i)
        inv.mem_get_info_calls.append(idx)
        inv.contexts.add(idx)  # cudaMemGetInfo creates the device's primary context
        g = gpus[idx]
        return g.total - g.used, g.total

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: gpus[_index(i)].name)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda i=None: gpus[_index(i)].capability)
    # today's (and torch's) answer counts emulation: True even on a T4 or V100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch._C, "_cuda_hasPrimaryContext", lambda i: i in inv.contexts,
                        raising=False)
    if nvml:
        monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(inv.nvml_all or gpus))
    else:
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    fresh = getattr(memory, "_Nvml", None)  # (absent from code that never used NVML)
    if fresh is not None:
        monkeypatch.setattr(memory, "_NVML", fresh())  # imports the pynvml installed above
    return inv


def _index(i: Any) -> int:
    if i is None:
        return 0
    if isinstance(i, torch.device):
        return i.index or 0
    if isinstance(i, str):
        return torch.device(i).index or 0
    return int(i)


def _fake_pynvml(gpus: list[FakeGpu]) -> types.ModuleType:
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def by_uuid(uuid: str | bytes) -> FakeGpu:
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for g in gpus:
            if g.uuid == uuid:
                return g
        raise NVMLError("Not Found")

    m.NVMLError = NVMLError  # type: ignore[attr-defined]
    m.nvmlInit = lambda: None  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByUUID = by_uuid  # type: ignore[attr-defined]
    m.nvmlDeviceGetUUID = lambda h: h.uuid  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: h.name  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=h.total, used=h.used, free=h.total - h.used)
    return m


def a100_and_t4() -> Inventory:
    """GPU 0 an A100 (sm_80, native bf16), GPU 1 a T4 (sm_75: bf16 only emulated); NVML lists
    a third GPU hidden by CUDA_VISIBLE_DEVICES, and in another order than torch."""
    a100 = FakeGpu("NVIDIA A100-SXM4-40GB", "GPU-aaaaaaaa-0000-0000-0000-000000000000", (8, 0),
                   total=40 * GiB, used=3 * GiB)
    t4 = FakeGpu("Tesla T4", "GPU-bbbbbbbb-0000-0000-0000-000000000000", (7, 5),
                 total=15 * GiB, used=5 * GiB)
    hidden = FakeGpu("NVIDIA H100", "GPU-cccccccc-0000-0000-0000-000000000000", (9, 0),
                     total=80 * GiB, used=70 * GiB)
    return Inventory(visible=[a100, t4], nvml_all=[hidden, t4, a100])
