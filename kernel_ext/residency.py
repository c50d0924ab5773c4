"""Resident models: which weights are in memory, which names share them, and which to evict.

One :class:`Resident` per (file SHA-256, dtype, device, quantization, offload): a second name
for the same file, dtype and device shares the first one's weights instead of loading them
again. Its memory is *measured*: the model's own tensors (unique storages, so tied embeddings
count once), the runtime copies decoding keeps (:func:`kernel_ext.providers.decode.copy_bytes`:
the LM head's int4 screen, the int4 repacks of ``quantized`` mode) and what the load added to
the process's anonymous memory besides anonymous tensors (the tokenizer, buffers), measured
around the load.

Under a cap (``KernelExt.resident_max_gb``) the least recently used residents are evicted
first; their names stay registered and reload on next use (the model registry does that).
This class only keeps the books; it loads and frees nothing itself.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Residency", "Resident", "ResidentKey", "file_backed_bytes", "tensor_bytes",
           "weights_in_memory"]

ResidentKey = tuple[str, str, str, str | None, bool]
"""(sha256, dtype, device, quantization, offload)"""


@dataclass
class Resident:
    """Weights in memory and the names that use them."""

    key: ResidentKey
    model: Any
    tokenizer: Any
    weights: int  # bytes of the model's own tensors
    overhead: int  # measured at load: other memory the load added (tokenizer, buffers)
    users: list[str] = field(default_factory=list)
    last_used: float = 0.0

    def copies(self) -> int:
        """Bytes of the runtime copies decoding keeps for this model (measured now)."""
        from .providers.decode import copy_bytes

        model = self.model  # read once: the dashboard's thread may ask while it is evicted
        return copy_bytes(model) if model is not None else 0

    def total(self) -> int:
        return self.weights + self.copies() + self.overhead


class Residency:
    """The books of resident models: sharing by key, least-recently-used order, eviction."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._residents: dict[ResidentKey, Resident] = {}
        self._keys: dict[str, ResidentKey] = {}  # every registered name, resident or evicted

    # --- queries -------------------------------------------------------------------------------
    def find(self, sha256: str, dtype: str, device: str) -> Resident | None:
        """The resident with this file, dtype and device (any plan), if one is in memory."""
        for key, resident in self._residents.items():
            if key[:3] == (sha256, dtype, device):
                return resident
        return None

    def of(self, name: str) -> Resident | None:
        """The resident ``name`` uses, or None when it is evicted (or unknown)."""
        key = self._keys.get(name)
        return self._residents.get(key) if key is not None else None

    def key_of(self, name: str) -> ResidentKey | None:
        return self._keys.get(name)

    def evicted(self, name: str) -> bool:
        return name in self._keys and self.of(name) is None

    def residents(self) -> list[Resident]:
        return list(self._residents.values())

    def total(self) -> int:
        return sum(r.total() for r in self._residents.values())

    # --- changes -------------------------------------------------------------------------------
    def add(self, name: str, key: ResidentKey, model: Any, tokenizer: Any, *, weights: int,
            overhead: int) -> Resident:
        """New weights in memory, used by ``name`` (and by any evicted name with that key)."""
        resident = Resident(key, model, tokenizer, weights, overhead, last_used=self.clock())
        resident.users = [n for n, k in self._keys.items() if k == key and n != name] + [name]
        self._residents[key] = resident
        self._keys[name] = key
        return resident

    def share(self, name: str, resident: Resident) -> None:
        resident.users.append(name)
        resident.last_used = self.clock()
        self._keys[name] = resident.key

    def touch(self, name: str) -> None:
        resident = self.of(name)
        if resident is not None:
            resident.last_used = self.clock()

    def remove(self, name: str) -> Resident | None:
        """Forget ``name``; returns its resident when ``name`` was its last user (now dropped)."""
        key = self._keys.pop(name, None)
        resident = self._residents.get(key) if key is not None else None
        if resident is None:
            return None
        resident.users = [n for n in resident.users if n != name]
        if resident.users:
            return None
        del self._residents[resident.key]
        return resident

    def evict(self, resident: Resident) -> list[str]:
        """Drop ``resident`` from memory's books; its names stay known (evicted)."""
        self._residents.pop(resident.key, None)
        return list(resident.users)

    def victims(self, need: int, cap: int, *, protect: Iterable[ResidentKey] = ()) -> list[Resident]:
        """Least recently used residents to evict so that ``need`` more bytes fit under ``cap``
        (all of them, unprotected, when even that is not enough: the caller then refuses)."""
        keep = set(protect)
        order = sorted((r for r in self._residents.values() if r.key not in keep),
                       key=lambda r: r.last_used)
        used = self.total()
        out: list[Resident] = []
        for resident in order:
            if used + need <= cap:
                break
            out.append(resident)
            used -= resident.total()
        return out


def _storages(model: Any) -> Iterator[tuple[str, int, int]]:
    """Each storage of ``model``'s parameters and buffers once (tied weights share one):
    ``(device type, data pointer, bytes)``; meta tensors have none."""
    seen: set[tuple[str, int]] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        ident = (str(t.device), storage.data_ptr())
        if ident in seen:
            continue
        seen.add(ident)
        yield t.device.type, storage.data_ptr(), storage.nbytes()


def _mapping_of(maps: list[tuple[int, int, int]], starts: list[int], device: str,
                ptr: int) -> int | None:
    """The index in ``maps`` of the file mapping holding CPU address ``ptr``, or None."""
    i = bisect.bisect_right(starts, ptr) - 1 if device == "cpu" and ptr else -1
    return i if i >= 0 and maps[i][0] <= ptr < maps[i][1] else None


def tensor_bytes(model: Any) -> int:
    """Bytes of ``model``'s parameters and buffers, each storage once (tied weights share)."""
    return sum(n for _, _, n in _storages(model))


def file_backed_bytes(model: Any) -> int:
    """Bytes of ``model``'s CPU tensors that live in file mappings (weights memory-mapped from
    the conversion cache): page cache, not the process's anonymous memory. Linux only (0
    elsewhere)."""
    maps = _file_mappings(with_rss=False)
    starts = [m[0] for m in maps]
    return sum(n for device, ptr, n in _storages(model)
               if _mapping_of(maps, starts, device, ptr) is not None)


def _file_mappings(with_rss: bool) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes or 0) of this process's file-backed mappings, sorted
    (``/proc/self/smaps`` when ``with_rss``, else ``/proc/self/maps``); empty off Linux."""
    out: list[list[int]] = []
    current: list[int] | None = None
    try:
        with open("/proc/self/smaps" if with_rss else "/proc/self/maps", encoding="ascii",
                  errors="replace") as fh:
            for line in fh:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    parts = line.split(None, 5)
                    current = None
                    if len(parts) == 6 and parts[5].strip().startswith("/") and parts[4] != "0":
                        lo, hi = parts[0].split("-")
                        current = [int(lo, 16), int(hi, 16), 0]
                        out.append(current)
                elif current is not None and head == "Rss:":
                    current[2] = int(line.split()[1]) * 1024
    except OSError:
        return []
    return sorted((a, b, c) for a, b, c in out)


def weights_in_memory(model: Any) -> int:
    """Bytes of ``model``'s tensors in this process's memory now: anonymous storages whole,
    and of the file mappings holding the others (weights memory-mapped from the conversion
    cache) only their resident pages - an exact-mode model never reads most of its tied
    embedding / LM head, so those pages stay on disk. Linux; elsewhere :func:`tensor_bytes`."""
    maps = _file_mappings(with_rss=True)
    if not maps:
        return tensor_bytes(model)
    starts = [m[0] for m in maps]
    held: dict[int, int] = {}  # mapping -> bytes of the model's storages in it
    total = 0
    for device, ptr, n in _storages(model):
        i = _mapping_of(maps, starts, device, ptr)
        if i is None:
            total += n
        else:
            held[i] = held.get(i, 0) + n
    # a mapping's resident pages, at most its tensors' bytes (the file's header shares a page)
    return total + sum(min(maps[i][2], n) for i, n in held.items())
