"""What a kernel's heartbeat records, so the next kernel can say how this one ended.

:func:`sample` is cheap (a few ``/proc`` reads, ~0.1 ms) and safe in a background thread: it
never imports torch or initialises CUDA; GPUs are sampled only when this process already uses
CUDA. :func:`judge_end` turns the last sample of a kernel that died into plain words
("probably killed for memory" when the numbers say so).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import psutil

from ..memory import format_bytes

__all__ = ["judge_end", "memory_line", "oom_kills", "sample"]

_UNLIMITED = 1 << 60
_V2 = Path("/sys/fs/cgroup")
_V1 = Path("/sys/fs/cgroup/memory")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), None when unlimited or unknown."""
    for path in (_V2 / "memory.max", _V1 / "memory.limit_in_bytes"):
        value = _read_int(path)
        if value is not None:
            return value if value < _UNLIMITED else None
    return None


def oom_kills() -> int | None:
    """How many processes the cgroup's out-of-memory killer has killed so far, if known."""
    for path in (_V2 / "memory.events", _V1 / "memory.oom_control"):
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return int(value)
        except OSError:
            continue
    return None


def _peak_rss() -> int | None:
    """VmHWM: the process's peak resident set, from the kernel (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _gpus() -> list[dict[str, Any]]:
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not torch.cuda.is_initialized():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append({"index": i, "used": int(total - free), "total": int(total),
                        "allocated": int(torch.cuda.memory_allocated(i)),
                        "peak_allocated": int(torch.cuda.max_memory_allocated(i))})
        return out
    except Exception:  # noqa: BLE001 - a probe must never fail the heartbeat
        return []


def sample(memory_fraction: float) -> dict[str, Any]:
    """This process's memory now, against the guard's limit (``memory_fraction`` of the RAM,
    or of the cgroup's limit when that is lower)."""
    vm = psutil.virtual_memory()
    cgroup = _cgroup_limit()
    ceiling = min(vm.total, cgroup) if cgroup else vm.total
    return {
        "ts": time.time(),
        "rss": int(psutil.Process().memory_info().rss),
        "peak_rss": _peak_rss(),
        "ram_total": int(vm.total),
        "ram_available": int(vm.available),
        "cgroup_limit": cgroup,
        "oom_kills": oom_kills(),
        "fraction": float(memory_fraction),
        "limit": int(ceiling * float(memory_fraction)),
        "gpus": _gpus(),
    }


def memory_line(m: dict[str, Any]) -> str:
    """``RSS 3.1 GiB (peak 3.4 GiB) of 23.4 GiB RAM, 1.2 GiB available; guard limit ...``"""
    ceiling = m.get("cgroup_limit") or m.get("ram_total")
    where = "the container's limit of" if m.get("cgroup_limit") else "RAM"
    text = f"RSS {format_bytes(m.get('rss'))}"
    if m.get("peak_rss"):
        text += f" (peak {format_bytes(m['peak_rss'])})"
    text += (f" of {format_bytes(ceiling)} {where}, {format_bytes(m.get('ram_available'))} "
             f"available; the guard's limit is {format_bytes(m.get('limit'))} "
             f"({float(m.get('fraction') or 0):.0%})")
    for g in m.get("gpus") or []:
        text += (f"; GPU {g['index']}: {format_bytes(g['used'])} of "
                 f"{format_bytes(g['total'])} used")
    return text


def judge_end(m: dict[str, Any] | None, oom_kills_now: int | None) -> str | None:
    """"probably killed for memory" (with why) when the last sample points that way, else None."""
    if not m:
        return None
    reasons = []
    before = m.get("oom_kills")
    if before is not None and oom_kills_now is not None and oom_kills_now > before:
        reasons.append("the out-of-memory killer has run since")
    ceiling = m.get("cgroup_limit") or m.get("ram_total") or 0
    peak = max(int(m.get("rss") or 0), int(m.get("peak_rss") or 0))
    if ceiling and peak >= 0.9 * ceiling:
        reasons.append("it used over 90 % of the memory")
    total = m.get("ram_total") or 0
    if total and (m.get("ram_available") or 0) < 0.05 * total:
        reasons.append("the machine had under 5 % of its RAM left")
    if m.get("limit") and peak > int(m["limit"]):
        reasons.append("it was above the guard's limit")
    if not reasons:
        return None
    return "probably killed for memory (" + "; ".join(reasons) + ")"
