"""The model registry: load GGUF files safely into Transformers, list, describe, unload.

A load is: resolve the file -> validate it with our bounded reader -> route it (which path can
load its architecture: kernel_ext's fast path, stock Transformers, or a refusal that lists what
is supported, all before the file is hashed; :func:`kernel_ext.gguf.arch.route`) -> check its
SHA-256 against the pin (given, or known for the file) -> estimate the footprint and choose a
plan that fits the memory budget (:mod:`kernel_ext.memory`; the Transformers path peaks higher)
-> load into Transformers (:mod:`kernel_ext.gguf.loader`) with a progress bar -> register a
provider. Every step that can fail raises a typed error; every load is written to the audit log,
with the path that loaded it.

Two pieces of work are finished on a worker thread once the model is registered, so the cell
returns as soon as the model is usable (:class:`_AfterLoad`): writing a freshly converted
tokenizer to the conversion cache (atomically and sealed, as before) and building the copies
decoding keeps beside the weights (the LM head's screen, the int4 repacks of ``quantized`` mode;
:mod:`kernel_ext.providers.decode`). Everything that needs them waits for that thread instead
of doing the work again: the model's first use (``%%infer``, ``%model warm``), its memory
figures, unloading or evicting it, and the next load (one load or build at a time).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .budget import RequestGuard, RequestLimits
from .default_model import DEFAULT_MODEL_NAME, KNOWN_PINS, default_model_path
from .errors import (
    KernelExtError,
    LoadTimeoutError,
    MemoryBudgetError,
    ModelLoadError,
    ModelNotFoundError,
)
from .memory import LoadPlan, choose_plan, format_bytes, half_dtype, process_anonymous_bytes
from .providers.transformers_gguf import LocalModel, TransformersGGUFProvider
from .residency import Residency, Resident, file_backed_bytes, tensor_bytes, weights_in_memory

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

log = logging.getLogger(__name__)

__all__ = ["ModelEntry", "ModelRegistry", "resolve_device", "resolve_dtype"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelNotFoundError(f"device {device!r} was asked for but no CUDA GPU is visible; "
                                     "use --device cpu (or auto)")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelNotFoundError(f"device {device!r} does not exist: "
                                     f"{torch.cuda.device_count()} GPU(s) visible")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: float32 on the CPU; on ``cuda:N``, what that GPU computes natively
    (:func:`kernel_ext.memory.half_dtype`: bfloat16 from compute capability 8.0, else float16)."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return half_dtype(device)
    return "float32"


@dataclass
class ModelEntry:
    """A loaded model."""

    name: str
    path: Path
    sha256: str
    plan: LoadPlan
    provider: TransformersGGUFProvider
    summary: dict[str, Any]
    load_s: float
    footprint: int
    loaded_at: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the load did besides loading (evictions)
    parked: LocalModel | None = None  # while evicted: what reloading needs, without the weights
    freed: int = 0  # set by unload: measured bytes given back
    loader: str = "fast"  # "fast" (kernel_ext's adapter) or "transformers" (stock)
    loader_reason: str = ""  # why that path, in words

    def info(self) -> dict[str, Any]:
        s = self.summary
        return {
            "name": self.name,
            "architecture": s.get("architecture"),
            "parameters": s.get("n_params"),
            "quant_types": s.get("quant_types") or s.get("type_counts"),
            "file": str(self.path),
            "file_size": s.get("file_size"),
            "sha256": self.sha256,
            "estimated_memory": self.plan.estimate_bytes,
            "footprint": self.footprint,
            "device": self.plan.device,
            "dtype": self.plan.dtype,
            "plan": self.plan.describe(),
            "load_s": round(self.load_s, 3),
            "chat_template": bool(self.provider.local and self.provider.local.chat_template),
            "loader": self.loader,
            "loader_reason": self.loader_reason,
        }


class ModelRegistry:
    """Loaded models by name; the most recently loaded one is the default for ``%%infer``."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._entries: dict[str, ModelEntry] = {}
        self.active: str | None = None
        self.residency = Residency()
        self._after_load: _AfterLoad | None = None  # the work finishing after the last load

    # --- queries ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str | None = None) -> ModelEntry:
        if name is None:
            if self.active is None:
                raise ModelNotFoundError("no model is loaded; run %model load (the default model) "
                                         "or %model load PATH.gguf")
            name = self.active
        try:
            return self._entries[name]
        except KeyError:
            loaded = ", ".join(self._entries) or "none"
            raise ModelNotFoundError(f"no model named {name!r} is loaded (loaded: {loaded}); "
                                     f"load it with %model load PATH --name {name}") from None

    def footprints(self) -> dict[str, int]:
        """Measured memory per resident model (names sharing weights together, counted once)."""
        return {", ".join(r.users): r.total() for r in self.residency.residents()}

    def memory(self, name: str) -> dict[str, Any]:
        """Measured memory of ``name``: weights, runtime copies, load overhead, total (0 while
        evicted), and the names it shares its weights with."""
        self.wait_idle()  # copies still being built count once built, not half
        resident = self.residency.of(name)
        if resident is None:
            return {"resident": False, "weights": 0, "copies": 0, "overhead": 0, "total": 0,
                    "shared_with": []}
        copies = resident.copies()
        model = resident.model  # read once: the dashboard's thread may ask while it is evicted
        weights = weights_in_memory(model) if model is not None else resident.weights
        return {"resident": True, "weights": weights, "weights_total": resident.weights,
                "copies": copies, "overhead": resident.overhead,
                "total": weights + copies + resident.overhead,
                "shared_with": [n for n in resident.users if n != name]}

    # --- loading ---------------------------------------------------------------------------------
    def resolve(self, target: str | None) -> tuple[Path, str, str | None]:
        """(path, default name, known pin) for a path, a known name or nothing (the default)."""
        cfg = self.session.config
        if target in (None, "", "default", DEFAULT_MODEL_NAME):
            if cfg.default_model:
                path = Path(cfg.default_model).expanduser()
                return path, _name_from_path(path), KNOWN_PINS.get(path.name)
            path = default_model_path(self.session.cache_dir)
            return path, DEFAULT_MODEL_NAME, KNOWN_PINS[path.name]
        path = Path(str(target)).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"{target!r} is neither a file nor a known model name (known: {DEFAULT_MODEL_NAME}); "
                "give the path of a .gguf file"
            )
        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise ModelNotFoundError(f"{path} is a directory with {len(ggufs)} .gguf files; "
                                         "give the file's path")
            path = ggufs[0]
        return path, _name_from_path(path), KNOWN_PINS.get(path.name)

    def load(
        self,
        target: str | None = None,
        *,
        name: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        sha256: str | None = None,
        progress: bool = True,
        signature: str | None = None,
    ) -> ModelEntry:
        """Load a GGUF model (see the module docstring); returns its registry entry."""
        from .gguf import cache as conversion_cache
        from .gguf.arch import route
        from .gguf.fallback import PEAK_FACTOR
        from .gguf.integrity import check_pin
        from .gguf.reader import read_gguf

        session = self.session
        cfg = session.config
        path, default_name, known_pin = self.resolve(target)
        name = name or default_name
        if not _NAME_RE.match(name):
            raise ModelNotFoundError(f"model name {name!r} is not valid: use letters, digits, . _ -")
        if name in self._entries:
            raise ModelNotFoundError(f"a model named {name!r} is already loaded; "
                                     f"%model unload {name} first or pass --name")
        dev = resolve_device(device or cfg.device)
        dt = resolve_dtype(dtype or cfg.dtype, dev)
        self.wait_idle()  # one load or build at a time: never two beside each other
        session.events.emit("model", action="loading", name=name, info={"path": str(path)})
        t0 = time.perf_counter()
        deadline = _Deadline(cfg.load_timeout, name)
        notes: list[str] = []
        shared: Resident | None = None
        discards: list[dict[str, Any]] = []
        try:
            with read_gguf(path) as gf, conversion_cache.collect_discards() as discards:
                summary = gf.summary()
                chat_template = gf.metadata.get("tokenizer.chat_template")
                hidden = gf.metadata.get(f"{summary['architecture']}.embedding_length")
                # refuses what no path can load, before the whole file is hashed
                path_to = route(gf.metadata, gf.tensors)
                # the bytes parsed, through the same open file: a swapped path cannot pass
                digest = gf.sha256(progress=lambda done, total: session.events.emit(
                    "load_progress", name=name, done=done, total=total, stage="sha256"))
                check_pin(path, digest, sha256 or known_pin)
                self._check_signature(name, path, digest, signature)
                deadline.check("checking the file")
                shared = self.residency.find(digest, dt, dev)
                if shared is not None:  # the same file, dtype and device: share its weights
                    first = self._entries[shared.users[0]]
                    plan = first.plan
                    loader, loader_reason = first.loader, first.loader_reason
                    artifacts = shared
                    notes.append(f"shares the weights of {', '.join(shared.users)} (same file, "
                                 f"dtype and device): no extra memory")
                else:
                    # the Transformers path peaks at several times the model while loading
                    extra: dict[str, Any] = (
                        {"overhead": PEAK_FACTOR} if path_to.path == "transformers" else {})
                    screen, repacks = _decode_copies(cfg.decode_mode, dev, summary, hidden)
                    plan = choose_plan(int(summary["n_params"]), device=dev, dtype=dt,
                                       fraction=cfg.memory_fraction, float32_copies=screen,
                                       int4_copies=repacks,
                                       footprints=_gpu_footprints(gf, dev, path_to.path),
                                       **extra)
                    notes += self._make_room(plan.estimate_bytes, name)
                    session.audit.write("model.plan", name=name, path=path, sha256=digest,
                                        plan=plan.describe(), loader=path_to.path)
                    anon0 = process_anonymous_bytes()
                    # the tokenizer is stored after the cell returns; _add_resident collects
                    artifacts = self._load_weights(gf, digest, plan, name, progress, deadline,
                                                   defer_cache_writes=True, trim_heap=False)
                    loader, loader_reason = artifacts.loader, artifacts.loader_reason
        except KeyboardInterrupt:
            self._load_failed(name, path, "interrupted by the user")
            raise
        except KernelExtError as e:
            self._load_failed(name, path, e)
            raise
        except Exception as e:  # torch, tokenizers, the file system: say so in one line
            self._load_failed(name, path, e)
            if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
                raise MemoryBudgetError(
                    f"ran out of memory while loading {path.name}: {e}. Try --dtype bfloat16, "
                    "another --device, or %model unload another model first"
                ) from e
            raise ModelLoadError(f"loading {path.name} failed: {type(e).__name__}: {e}") from e
        finally:
            self._audit_discards(name, path, discards)
        load_s = time.perf_counter() - t0
        local = LocalModel(
            model=artifacts.model, tokenizer=artifacts.tokenizer, path=path, sha256=digest,
            device=plan.device, dtype=plan.dtype,
            chat_template=chat_template if isinstance(chat_template, str) else None,
            info=summary,
            cache_dir=(session.cache_dir / "conversions") if cfg.conversion_cache else None,
        )
        caps = {"max_template_chars": cfg.template_max_chars,
                "max_output_chars": cfg.template_max_output}
        entry = ModelEntry(
            name=name, path=path, sha256=digest, plan=plan,
            provider=TransformersGGUFProvider(
                name, local, template_caps=caps, decode_mode=lambda: cfg.decode_mode,
                guard=RequestGuard(lambda: RequestLimits.from_config(cfg)), on_use=self._on_use),
            summary=summary, load_s=load_s, footprint=tensor_bytes(artifacts.model),
            timings=dict(getattr(artifacts, "timings", {}) or {}), notes=notes,
            loader=loader, loader_reason=loader_reason,
        )
        if shared is not None:
            self.residency.share(name, shared)
        else:
            self._add_resident(name, entry, artifacts, anon0)
        self._entries[name] = entry
        self.active = name
        session.audit.write("model.load", name=name, path=path, sha256=digest, plan=plan.describe(),
                            duration_s=round(load_s, 3), footprint=entry.footprint,
                            loader=loader, loader_reason=loader_reason)
        session.events.emit("model", action="loaded", name=name, info=entry.info())
        # after the model is usable, beside the notebook
        self._after_load = _AfterLoad(entry.provider,
                                      getattr(artifacts, "finish_cache_writes", None))
        return entry

    def _check_signature(self, name: str, path: Path, digest: str, signature: str | None) -> None:
        """Signature policy (:mod:`kernel_ext.signing`); refusals are audited and raised."""
        from .errors import SignatureError
        from .signing import describe, verify_model_signature

        cfg = self.session.config
        try:
            check = verify_model_signature(path, digest, signature=signature,
                                           trusted=list(cfg.signature_trusted_keys),
                                           policy=cfg.signature_policy,
                                           identities=dict(cfg.signature_identities),
                                           trust_config=cfg.signature_trust_config or None)
        except SignatureError as e:
            self.session.audit.write("model.signature", name=name, path=path, sha256=digest,
                                     outcome="refused", policy=cfg.signature_policy, error=e)
            raise
        self.session.audit.write("model.signature", name=name, path=path, sha256=digest,
                                 policy=cfg.signature_policy, **describe(check))

    def _audit_discards(self, name: str, path: Path, discards: list[dict[str, Any]]) -> None:
        """Cache pieces that failed verification (rebuilt from the GGUF, never served)."""
        for note in discards:
            self.session.audit.write("cache.rebuilt", name=name, path=path, piece=note["path"],
                                     reason=note["why"], tampered=note["tampered"])
            if note["tampered"]:
                what = ("had no recorded digest (an older kernel_ext wrote it, or something "
                        "else did)" if "no digest recorded" in note["why"]
                        else "did not match its recorded digest")
                print(f"kernel_ext: the conversion cache's {Path(note['path']).name} for {name} "
                      f"{what}; rebuilt it from the GGUF file")

    def wait_idle(self) -> None:
        """Wait until the work the last load left to a worker thread (storing the converted
        tokenizer, building the decoding copies; see the module docstring) is done; at once on
        that thread itself. Every use of a model waits for it already."""
        prep = self._after_load
        if prep is not None and prep.wait():
            self._after_load = None

    def _load_failed(self, name: str, path: Path, error: object) -> None:
        gc.collect()  # whatever the failed load built is garbage now: free it before reporting
        self.session.audit.write("model.load_failed", name=name, path=path, error=error)
        self.session.events.emit("model", action="failed", name=name, info={"error": str(error)})

    # --- residency: sharing, the LRU cap, eviction and reloading ----------------------------------
    def _add_resident(self, name: str, entry: ModelEntry, artifacts: Any, anon0: int) -> None:
        """Books new weights; their memory is measured (tensors, and what the load added to the
        anonymous memory besides anonymous tensors: tokenizer, buffers)."""
        from .gguf.loader import trim_heap

        # the load's one full collection: conversion garbage is not overhead; the heap is
        # trimmed too after a tokenizer conversion (the loader leaves both to us)
        if getattr(artifacts, "cache_hits", {}).get("tokenizer", True):
            gc.collect()
        else:
            trim_heap()
        model = artifacts.model
        weights = tensor_bytes(model)
        anonymous_weights = weights - file_backed_bytes(model)
        overhead = max(0, process_anonymous_bytes() - anon0 - anonymous_weights)
        key = (entry.sha256, entry.plan.dtype, entry.plan.device, entry.plan.quantization,
               entry.plan.offload)
        self.residency.add(name, key, model, artifacts.tokenizer, weights=weights,
                           overhead=overhead)

    def _make_room(self, need: int, name: str, protect: tuple[Any, ...] = ()) -> list[str]:
        """Evict least recently used models until ``need`` more bytes fit under
        ``resident_max_gb``; refuse (MemoryBudgetError) when even evicting all is not enough."""
        cap_gb = self.session.config.resident_max_gb
        if cap_gb <= 0:
            return []
        cap = int(cap_gb * 1024**3)
        if need > cap:
            raise MemoryBudgetError(
                f"{name} needs about {format_bytes(need)}, more than the {format_bytes(cap)} "
                "that resident models may take (%config KernelExt.resident_max_gb); raise the "
                "cap or load a smaller dtype or model"
            )
        notes = []
        for victim in self.residency.victims(need, cap, protect=protect):
            freed = victim.total()
            names = self._evict(victim)
            notes.append(f"evicted {', '.join(names)} (least recently used; frees "
                         f"{format_bytes(freed)} under resident_max_gb = {cap_gb:g}); "
                         "it reloads on next use")
        return notes

    def _evict(self, resident: Resident) -> list[str]:
        self.wait_idle()
        freed = resident.total()
        names = self.residency.evict(resident)
        for n in names:
            entry = self._entries[n]
            local = entry.provider.local
            if local is not None:
                entry.parked = dataclasses.replace(local, model=None, tokenizer=None)
            entry.provider.local = None
        resident.model = resident.tokenizer = None
        gc.collect()
        for n in names:
            self.session.audit.write("model.evict", name=n, freed=freed, reason="resident_max_gb")
            self.session.events.emit("model", action="evicted", name=n, info={"freed": freed})
        return names

    def _on_use(self, provider: TransformersGGUFProvider) -> None:
        """Each use of a model: mark it recently used; reload it when it was evicted."""
        name = provider.name
        self.wait_idle()  # the first use waits for the copies, never builds them twice
        if self.residency.evicted(name) and provider.local is None:
            self._reload(name)
        self.residency.touch(name)

    def _reload(self, name: str) -> None:
        from .gguf.integrity import check_pin
        from .gguf.reader import read_gguf

        self.wait_idle()
        entry = self._entries[name]
        plan = entry.plan
        key = self.residency.key_of(name)
        t0 = time.perf_counter()
        notes = self._make_room(plan.estimate_bytes, name, protect=(key,))
        anon0 = process_anonymous_bytes()
        try:
            with read_gguf(entry.path) as gf:
                # the file may have changed since it was first loaded: the same bytes or nothing
                check_pin(entry.path, gf.sha256(), entry.sha256)
                artifacts = self._load_weights(gf, entry.sha256, plan, name, False,
                                               _Deadline(self.session.config.load_timeout, name))
        except Exception as e:
            self._load_failed(name, entry.path, e)
            raise
        self._add_resident(name, entry, artifacts, anon0)
        took = time.perf_counter() - t0
        resident = self.residency.of(name)
        for n in resident.users if resident is not None else [name]:
            user = self._entries[n]
            parked = user.parked or entry.parked
            if parked is not None:
                user.provider.local = dataclasses.replace(parked, model=artifacts.model,
                                                          tokenizer=artifacts.tokenizer)
                user.parked = None
        reloaded = (f"{name} had been evicted (resident_max_gb); reloaded from the conversion "
                    f"cache in {took:.1f} s")
        entry.provider.notes += [*notes, reloaded]
        self.session.audit.write("model.reload", name=name, duration_s=round(took, 3))
        self.session.events.emit("model", action="loaded", name=name, info=entry.info())

    def _load_weights(self, gf: Any, digest: str, plan: LoadPlan, name: str, progress: bool,
                      deadline: _Deadline | None = None, defer_cache_writes: bool = False,
                      trim_heap: bool = True) -> Any:
        import torch

        from .gguf.loader import load_transformers

        bar = None
        events = self.session.events

        def on_progress(done: int, total: int, stage: str) -> None:
            nonlocal bar
            if deadline is not None:
                deadline.check(stage)  # cancels the load between tensors
            events.emit("load_progress", name=name, done=done, total=total, stage=stage)
            if not progress:
                return
            if bar is None:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, desc=f"loading {name}", unit="tensor", leave=False)
            bar.update(done - bar.n)

        cache = self.session.cache_dir / "conversions" if self.session.config.conversion_cache else None
        try:
            return load_transformers(
                gf, dtype=getattr(torch, plan.dtype), device=plan.device, sha256=digest,
                cache_dir=cache, progress=on_progress,
                cache_max_bytes=int(self.session.config.conversion_cache_max_gb * 1024**3),
                quantization=plan.quantization, device_map=self._offload(plan, digest),
                defer_cache_writes=defer_cache_writes, trim_heap=trim_heap,
            )
        finally:
            if bar is not None:
                bar.close()

    def _offload(self, plan: LoadPlan, sha256: str) -> Any:
        """An offload plan's limits for the loader: the plan's GPU and host budgets, and a
        folder for what fits neither (accelerate's disk offload)."""
        if not plan.offload:
            return None
        from .gguf.gpu_plans import Offload

        return Offload(plan.device_budget_bytes, plan.host_budget_bytes, self._offload_dir(sha256))

    def _offload_dir(self, sha256: str) -> Path:
        """This kernel's folder for the disk-offloaded layers of a file's weights (shared by
        the names that share them; two kernels are kept apart by the process id)."""
        return self.session.cache_dir / "offload" / f"{sha256[:16]}-{os.getpid()}"

    # --- unloading -------------------------------------------------------------------------------
    def unload(self, name: str) -> ModelEntry:
        """Unload ``name``; ``entry.freed`` says the bytes freed (0 while other names share its
        weights or it was evicted)."""
        entry = self.get(name)
        self.wait_idle()  # its copies are dropped with it, not built after it is gone
        del self._entries[name]
        dropped = self.residency.remove(name)
        freed = dropped.total() if dropped is not None else 0
        if dropped is not None:
            dropped.model = dropped.tokenizer = None
        entry.provider.close()
        if self.active == name:
            self.active = next(reversed(self._entries), None)
        gc.collect()
        if dropped is not None and entry.plan.offload:  # the layers it spilled to disk
            shutil.rmtree(self._offload_dir(entry.sha256), ignore_errors=True)
        self.session.audit.write("model.unload", name=name, freed=freed)
        self.session.events.emit("model", action="unloaded", name=name, info={"freed": freed})
        entry.freed = freed
        return entry

    def unload_all(self) -> None:
        for name in list(self._entries):
            self.unload(name)

    # --- checkpoint state ------------------------------------------------------------------------
    def state(self) -> list[dict[str, Any]]:
        """What is needed to load the same models again (same file, hash-checked)."""
        return [
            {"name": e.name, "path": str(e.path), "sha256": e.sha256, "dtype": e.plan.dtype,
             "device": e.plan.device, "active": e.name == self.active}
            for e in self._entries.values()
        ]

    def restore_state(self, state: list[dict[str, Any]]) -> list[str]:
        lines: list[str] = []
        active = None
        for spec in state:
            name = spec.get("name", "")
            if name in self._entries:
                lines.append(f"model {name}: already loaded")
                continue
            try:
                device = spec.get("device", "auto")
                if device.startswith("cuda"):
                    import torch

                    if not torch.cuda.is_available():
                        device = "auto"
                self.load(spec["path"], name=name, dtype=spec.get("dtype"), device=device,
                          sha256=spec.get("sha256"))
                lines.append(f"model {name}: reloaded from {spec['path']} (SHA-256 verified)")
            except (KernelExtError, OSError) as e:
                lines.append(f"model {name}: NOT reloaded: {e}")
            if spec.get("active"):
                active = name
        if active in self._entries:
            self.active = active
        return lines

    def memory_text(self, name: str) -> str:
        """One line: measured memory and what it is made of, sharing and eviction."""
        m = self.memory(name)
        if not m["resident"]:
            return "evicted (resident_max_gb); reloads on next use"
        weights = format_bytes(m["weights"])
        if m["weights"] < m["weights_total"]:  # memory-mapped pages not read yet stay on disk
            weights += f" in memory of {format_bytes(m['weights_total'])}"
        text = (f"{format_bytes(m['total'])} measured: weights {weights} + "
                f"runtime copies {format_bytes(m['copies'])} + tokenizer and buffers "
                f"{format_bytes(m['overhead'])}")
        if m["shared_with"]:
            text += f"; shared with {', '.join(m['shared_with'])}"
        return text

    def describe(self, entry: ModelEntry) -> str:
        i = entry.info()
        quant = ", ".join(f"{k}×{v}" for k, v in (i["quant_types"] or {}).items())
        return (
            f"{i['name']}: {i['architecture']}, {i['parameters']:,} parameters ({quant})\n"
            f"  file      {i['file']} ({format_bytes(i['file_size'] or 0)}), sha256 {i['sha256'][:16]}…\n"
            f"  memory    {self.memory_text(entry.name)} "
            f"(estimated {format_bytes(i['estimated_memory'])})\n"
            f"  placement {i['plan']}\n"
            f"  loader    {_LOADER_NAMES.get(i['loader'], i['loader'])}: {i['loader_reason']}\n"
            f"  loaded in {i['load_s']:.2f} s; chat template: {'yes' if i['chat_template'] else 'no'}"
        )


_LOADER_NAMES = {"fast": "fast path", "transformers": "Transformers"}


def _decode_copies(mode: str, device: str, summary: dict[str, Any], hidden: Any) -> tuple[int, int]:
    """Bytes of the copies :mod:`kernel_ext.providers.decode` keeps beside the weights on the
    CPU: ``(for float32 models, for any dtype)``. The LM head's screen (float32 heads only; int8
    at most: 1 byte per head weight, plus two norms per row) in ``exact`` and ``quantized``
    modes; in ``quantized`` mode the int4 repacks (at most 1.25 bytes per weight: two 4-bit
    parts with a bf16 scale and zero per 32 values)."""
    if device != "cpu" or mode == "full":
        return 0, 0
    screen = 0
    if isinstance(hidden, int) and summary.get("vocab_size"):
        screen = int(summary["vocab_size"]) * (hidden + 8)
    repacks = int(summary["n_params"]) * 5 // 4 if mode == "quantized" else 0
    return screen, repacks


class _AfterLoad:
    """Finishes a load on a worker thread once the model is usable (see the module docstring):
    stores the converted tokenizer in the conversion cache (the loader's ``finish_writes``),
    then builds the decoding copies (or reads them from the conversion cache). ``%model load`` returns before this; the first
    ``%%infer`` finds the copies ready, or waits for the rest instead of building them a second
    time. A failed build only means they are built at the first call (it is logged)."""

    def __init__(self, provider: TransformersGGUFProvider,
                 finish_writes: Callable[[], None] | None = None) -> None:
        self.name = provider.name
        self.seconds: float | None = None  # how long it took, once done
        self._thread = threading.Thread(target=self._run, args=(provider, finish_writes),
                                        daemon=True, name=f"kernel_ext-after-load-{provider.name}")
        self._thread.start()

    def _run(self, provider: TransformersGGUFProvider,
             finish_writes: Callable[[], None] | None) -> None:
        t0 = time.perf_counter()
        try:
            if finish_writes is not None:
                finish_writes()  # logs its own failures
            provider.prepare_decode()
        except Exception as e:  # noqa: BLE001 - the model is loaded; decoding retries and reports
            log.warning("kernel_ext: preparing decoding for %s failed (%s: %s); retried at first "
                        "use", provider.name, type(e).__name__, e)
        finally:
            self.seconds = time.perf_counter() - t0

    def wait(self) -> bool:
        """Wait for the build (the stop button interrupts the wait, not the build); whether it
        is done. On the building thread itself (it uses the model too) it returns at once."""
        if threading.current_thread() is self._thread:
            return False
        while self._thread.is_alive():
            self._thread.join(0.2)
        return True


def _name_from_path(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "model"
    return stem[:64]


class _Deadline:
    """``KernelExt.load_timeout`` for one load: checked between stages and tensors, so a load
    that takes too long is cancelled there and leaves nothing loaded."""

    def __init__(self, seconds: float, name: str, clock: Any = time.monotonic) -> None:
        self.seconds = float(seconds)
        self.name = name
        self.clock = clock
        self.at = clock() + self.seconds if self.seconds > 0 else None

    def check(self, stage: str) -> None:
        if self.at is not None and self.clock() >= self.at:
            raise LoadTimeoutError(
                f"loading {self.name} took longer than load_timeout = {self.seconds:g} s (while "
                f"{stage}); it was cancelled and nothing of it stays loaded. Raise "
                "%config KernelExt.load_timeout (0: no limit) or load a smaller model"
            )


def _gpu_footprints(gf: Any, device: str, path: str = "fast") -> dict[str, int] | None:
    """The weights' bytes per GPU plan kind, from the model built on the meta device (so the
    8/4-bit estimates keep embeddings and the output head 16-bit); None off the GPU, where
    every parameter has the plan's dtype, and for the Transformers path (no adapter builds its
    meta model; the plan counts every parameter in the plan's dtype)."""
    if not device.startswith("cuda") or path != "fast":
        return None
    import torch

    from .gguf.gpu_plans import meta_model, plan_footprints

    half = getattr(torch, half_dtype(device))
    return plan_footprints(meta_model(gf, half), half)
