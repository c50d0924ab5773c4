"""Load a GGUF file into a Transformers model + tokenizer, fast and lean.

:func:`load_transformers` runs a load as a sequence of named **stages**, each a function of one
:class:`LoadJob` (the caller's :class:`LoadOptions` plus what earlier stages produced). The
stage's ``doing`` names it in errors ("loading x.gguf failed while hashing the file: ..."),
its ``key`` in :attr:`LoadedArtifacts.timings`.

Which stages run depends on the file's :class:`~kernel_ext.gguf.arch.Route`, decided first from
the metadata alone (:data:`CHECK`):

* the **fast path** (:data:`FAST_STAGES`: an architecture adapter of :mod:`kernel_ext.gguf.arch`)::

      check -> hash -> config -> tokenizer -> model_init -> plan -> weights -> finish
            -> tokenizer_wait -> cache

  One parse of the file (our bounded reader; a caller may hand in the file it already opened),
  the model built on the ``meta`` device, then filled parameter by parameter: the GGUF rows its
  :class:`~kernel_ext.gguf.sources.WeightSource` names are read, dequantised on the target
  device in the target dtype, transformed (row permutation, offset, ...) and written into the
  parameter, so peak memory stays near the final model size. The tokenizer is converted on a
  worker thread (mostly Python) while the weights decode (mostly GIL-free torch).
* the **Transformers path** (:data:`TRANSFORMERS_STAGES`: an architecture stock Transformers
  loads and we have no adapter for): ``check -> transformers`` (:mod:`kernel_ext.gguf.fallback`).

Conversion cache (:mod:`kernel_ext.gguf.cache`, keyed by the file's SHA-256; fast path only):
config.json and the converted tokenizer always, the dequantised weights within a size cap. With
a cache on the CPU, decoded tensors are streamed into the cache's safetensors file and the model
then maps that file copy-on-write: the weights are never held twice. Warm load: tokenizer.json
and the mapped weights, no decoding at all.

Where later work plugs in: verifying a cache entry before use belongs in ``_fill_weights`` (the
``_fill_from_cache`` branch) and ``_start_tokenizer``; per-tensor dequantisation on a GPU in
:func:`_pieces` (it already decodes on ``options.device``).

``device_map`` / ``quantization`` are the memory-plan ladder's GPU rungs (an offload plan, a
bitsandbytes plan): :func:`kernel_ext.gguf.gpu_plans.load_placed` fills the meta model tensor
by tensor on the target device, never building a state dict on the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import GGUFFormatError, GGUFUnsupportedError, KernelExtError, ModelLoadError
from . import cache as _cache
from . import convert
from .arch import Adapter, Route, WeightPlan, route
from .arch.base import Fill, n_rows
from .dequant import dequantize
from .reader import GGUFFile, TensorInfo, read_gguf
from .sources import WeightSource

__all__ = [
    "FAST_STAGES",
    "TRANSFORMERS_STAGES",
    "LoadError",
    "LoadJob",
    "LoadOptions",
    "LoadedArtifacts",
    "Stage",
    "estimate_bytes",
    "load_transformers",
    "to_torch_dtype",
    "trim_heap",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Tensors stored in a float format, this small, or transformed by value (an offset) are decoded
# in fp32 and cast afterwards, so fix-ups such as gemma's ``norm - 1`` round once, as in
# Transformers' own loader.
_FP32_WORK_MAX = 1 << 20
_FLOAT_TYPES = frozenset({0, 1, 30})  # F32, F16, BF16
# Row ranges larger than this are decoded a few rows at a time (into the parameter or the cache
# file), bounding the decoder's temporaries.
_CHUNK_ELEMENTS = 1 << 24
# Vocabularies from this size on leave enough conversion garbage to be worth a full collection
# and a heap trim (~0.3-0.7 s with torch and Transformers loaded, holding the GIL: most of a
# tiny file's load time otherwise).
_TRIM_VOCAB = 32768
# GIL hand-over interval while the tokenizer thread runs beside the decoding one (default 5 ms)
_SWITCH_INTERVAL = 5e-4


LoadError = ModelLoadError  # a later stage of a load failed; the message names the stage


@dataclass
class LoadedArtifacts:
    """What :func:`load_transformers` returns.

    ``loader`` is ``"fast"`` or ``"transformers"`` and ``loader_reason`` says why (see
    :func:`kernel_ext.gguf.arch.route`). ``weight_sources`` maps every parameter of the model
    to the GGUF rows that filled it (:class:`~kernel_ext.gguf.sources.WeightSource`; fast path
    only, empty on the Transformers path), also after a load from the weights cache.
    """

    model: Any  # a Transformers causal LM in eval mode
    tokenizer: Any  # a PreTrainedTokenizerFast subclass
    config: Any
    summary: dict[str, Any]  # GGUFFile.summary()
    chat_template: str | None
    sha256: str | None
    dtype: torch.dtype
    device: str
    load_s: float
    timings: dict[str, float] = field(default_factory=dict)
    cache_hits: dict[str, bool] = field(default_factory=dict)  # config/tokenizer/weights
    peak_rss: int | None = None  # bytes, the process's peak so far (ru_maxrss)
    loader: str = "fast"
    loader_reason: str = ""
    weight_sources: dict[str, WeightSource] = field(default_factory=dict)
    # conversion-cache writes a load with ``defer_cache_writes`` left: see finish_cache_writes
    _writes: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def finish_cache_writes(self) -> None:
        """Do the conversion-cache writes a load with ``defer_cache_writes`` left for later
        (storing the converted tokenizer: atomic and sealed, a failure is logged); at once when
        there are none. Call it once, from any thread, while nothing else changes the tokenizer."""
        while self._writes:
            self._writes.pop(0)()


def to_torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"bfloat16"``, ``"bf16"``, ``torch.bfloat16``... as a torch dtype (float types only)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return _DTYPES[key]


def estimate_bytes(gf: GGUFFile, dtype: torch.dtype | str = torch.float32) -> int:
    """Dequantised footprint: parameters x dtype size, plus 2 % (at least 16 MiB) for buffers
    and allocator slack. Reads only the tensor table."""
    size = torch.tensor([], dtype=to_torch_dtype(dtype)).element_size()
    n = sum(t.n_elements for t in gf.tensors.values())
    raw = n * size
    return raw + max(16 << 20, raw // 50)


# --- the job and its stages ----------------------------------------------------------------------
@dataclass(frozen=True)
class LoadOptions:
    """What a load was asked to do (the arguments of :func:`load_transformers`, checked)."""

    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    sha256: str | None = None  # trusted, not re-checked: pin checks are the caller's
    cache_dir: Path | None = None  # conversion cache root; None: no cache
    progress: Progress | None = None  # progress(done, total, stage), once per parameter
    device_map: Any = None  # a gpu_plans.Offload or an accelerate device map
    quantization: str | None = None  # None, "8bit" or "4bit" (bitsandbytes, CUDA only)
    cache_weights: bool = True
    cache_max_bytes: int = 4 << 30
    decode_threads: int | None = 1  # torch intra-op threads while decoding (None: leave it)
    defer_cache_writes: bool = False  # the tokenizer is stored by finish_cache_writes()
    trim_heap: bool = True  # collect a large vocabulary's conversion garbage before returning

    @property
    def via_transformers(self) -> bool:
        """Whether the plan ladder's GPU rungs place/quantise the weights (gpu_plans)."""
        return self.quantization is not None or self.device_map is not None


@dataclass
class LoadJob:
    """One load in progress: the options, the open file, and what the stages produced so far."""

    options: LoadOptions
    gf: GGUFFile
    stack: contextlib.ExitStack  # undone when the load ends, however it ends
    stage: str = "checking the metadata"
    route: Route | None = None
    sha256: str | None = None
    entry: Path | None = None  # conversion-cache entry directory; None: no cache
    config: Any = None
    tokenizer: Any = None
    tokenizer_job: _TokenizerJob | None = None
    model: Any = None
    plan: WeightPlan | None = None
    timings: dict[str, float] = field(default_factory=dict)
    hits: dict[str, bool] = field(default_factory=dict)

    @property
    def adapter(self) -> Adapter:
        """The architecture adapter (fast-path stages only)."""
        if self.route is None or self.route.adapter is None:
            raise RuntimeError("internal: a fast-path stage ran without an adapter")
        return self.route.adapter


@dataclass(frozen=True)
class Stage:
    """A step of a load: ``key`` in the timings, ``doing`` in error messages, ``run`` the work;
    ``when`` (default: always) decides whether it runs for this job."""

    key: str
    doing: str
    run: Callable[[LoadJob], None]
    when: Callable[[LoadJob], bool] = lambda job: True


def _check(job: LoadJob) -> None:
    """Route the file (fast / Transformers / refuse), from the metadata alone."""
    job.route = route(job.gf.metadata, job.gf.tensors, job.gf.tensor_bytes)


def _hash(job: LoadJob) -> None:
    job.sha256 = job.gf.sha256()


def _build_config(job: LoadJob) -> None:
    """The Transformers config (rebuilt from the metadata every time: milliseconds). The cache
    entry's config.json is there to be inspected and shipped with the tokenizer; it is checked
    and rewritten when it is missing or not for this model type."""
    opts = job.options
    job.config = convert.build_config(job.adapter.config_dict(), dtype=opts.dtype)
    if opts.cache_dir is not None and job.sha256 is not None:
        job.entry = _cache.entry_dir(opts.cache_dir, job.sha256)
    job.hits["config"] = job.entry is not None and _cached_config_ok(
        job.entry, job.config.model_type
    )
    if job.entry is not None and not job.hits["config"]:
        _cache.write_json(job.entry / "config.json", job.config.to_dict())


def _start_tokenizer(job: LoadJob) -> None:
    """The cached tokenizer, or its conversion started on a worker thread."""
    model_type = job.config.model_type
    job.tokenizer = _cached_tokenizer(job.entry, model_type) if job.entry is not None else None
    job.hits["tokenizer"] = job.tokenizer is not None
    if job.tokenizer is None:
        # converting is mostly Python, decoding mostly GIL-free torch: do both at once
        opts = job.options
        job.tokenizer_job = _TokenizerJob(job.gf.metadata, model_type,
                                          None if opts.defer_cache_writes else job.entry,
                                          trim=opts.trim_heap)
        job.stack.enter_context(_switch_interval(True))


def _build_model(job: LoadJob) -> None:
    if not job.options.via_transformers:
        job.model = _new_model(job.config, job.options.dtype)


def _plan_weights(job: LoadJob) -> None:
    """Which GGUF rows fill which parameter (the adapter's plan); refuse an incomplete file."""
    model = job.model if job.model is not None else _new_model(job.config, job.options.dtype)
    job.plan = complete_plan(job.adapter, model)


def complete_plan(adapter: Any, model: Any) -> Any:
    """``adapter``'s plan for ``model``; refused when the file lacks tensors for parameters."""
    plan = adapter.plan(model)
    if plan.missing:
        raise GGUFFormatError(
            f"the file has no tensors for {len(plan.missing)} model parameters "
            f"(e.g. {', '.join(plan.missing[:3])}); it is incomplete or not a "
            f"{adapter.architecture} model",
            field="tensors",
        )
    return plan


def _fill_weights(job: LoadJob) -> None:
    """Every parameter's values: from the weights cache, or decoded from the file (and
    written to the cache); via Transformers' placement when the plan ladder asked for it."""
    opts, plan = job.options, job.plan
    assert plan is not None
    if opts.via_transformers:
        from .gpu_plans import load_placed

        job.model = load_placed(job.gf, adapter=job.adapter, config=job.config, dtype=opts.dtype,
                                device=opts.device, quantization=opts.quantization,
                                offload=opts.device_map, progress=opts.progress)
        job.hits["weights"] = False
        return
    wpath = _cache.weights_path(job.entry, opts.dtype) if job.entry is not None else None
    job.hits["weights"] = wpath is not None and _fill_from_cache(
        job.model, plan, wpath, opts.device, opts.progress
    )
    if job.hits["weights"]:
        return
    writer = None
    if wpath is not None and job.entry is not None and opts.cache_dir and opts.cache_weights:
        writer = _weights_writer(
            job.entry, wpath, job.model, plan, opts.cache_dir, opts.cache_max_bytes
        )
    _decode_all(job, writer)


def _finish_model(job: LoadJob) -> None:
    model = job.model
    if not job.options.via_transformers:
        model.tie_weights()
        leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if leftover:
            raise GGUFFormatError(f"no data for parameters {', '.join(leftover[:5])}")
        model.to(job.options.device)
    model.eval()


def _join_tokenizer(job: LoadJob) -> None:
    tj = job.tokenizer_job
    if tj is None:
        return
    job.tokenizer = tj.result()
    job.timings["tokenizer"] = job.timings.get("tokenizer", 0.0) + tj.seconds


def _record_use(job: LoadJob) -> None:
    if job.entry is not None:
        _cache.touch(job.entry, source=Path(job.gf.path).name)


def _with_transformers(job: LoadJob) -> None:
    from .fallback import load_with_transformers

    opts = job.options
    assert job.route is not None and job.route.loader is not None
    job.model, job.tokenizer, job.config = load_with_transformers(
        job.gf,
        job.route.loader,
        dtype=opts.dtype,
        device=opts.device,
        device_map=opts.device_map,
        quantization=opts.quantization,
        progress=opts.progress,
    )
    job.hits.update(config=False, tokenizer=False, weights=False)


# Each stage reads what the ones before it left on the job and adds its own part:
#   check          -> route (adapter, or the Transformers loader to use)
#   hash           -> sha256 (only with a cache and no digest given)
#   config         -> config, entry (the cache entry dir); config.json checked/written
#   tokenizer      -> tokenizer (cached), or tokenizer_job (converting on a thread)
#   model_init     -> model, on the meta device (not for the plan ladder's rungs)
#   plan           -> plan: WeightPlan, every parameter's Fill / WeightSource
#   weights        -> model's parameters: from the cache's safetensors file, or decoded from
#                     the GGUF (and streamed into the cache), or placed by Transformers
#   finish         -> model tied, on its device, in eval mode
#   tokenizer_wait -> tokenizer (the thread joined)
#   cache          -> the cache entry's use recorded (LRU)
# A new step (verifying a cache entry, a GPU-specific decode) is a function of the job and
# one Stage here, with its own `doing` for error messages and `key` for the timings.
CHECK = Stage("check", "checking the metadata", _check)
FAST_STAGES: tuple[Stage, ...] = (
    Stage(
        "hash",
        "hashing the file",
        _hash,
        when=lambda job: job.options.cache_dir is not None and job.sha256 is None,
    ),
    Stage("config", "building the model config", _build_config),
    Stage("tokenizer", "reading the cached tokenizer", _start_tokenizer),
    Stage("model_init", "building the model", _build_model),
    Stage("plan", "mapping the tensors", _plan_weights),
    Stage("weights", "loading the weights", _fill_weights),
    Stage("finish", "finishing the model", _finish_model),
    Stage("tokenizer_wait", "converting the tokenizer", _join_tokenizer),
    Stage("cache", "finishing the load", _record_use),
)
TRANSFORMERS_STAGES: tuple[Stage, ...] = (
    Stage("transformers", "loading it with Transformers", _with_transformers),
)


def _run(job: LoadJob, stages: tuple[Stage, ...]) -> None:
    for stage in stages:
        if not stage.when(job):
            continue
        job.stage = stage.doing
        t0 = time.perf_counter()
        stage.run(job)
        job.timings[stage.key] = job.timings.get(stage.key, 0.0) + time.perf_counter() - t0


# --- the loader ----------------------------------------------------------------------------------
def load_transformers(
    path: str | os.PathLike[str] | GGUFFile,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    sha256: str | None = None,
    cache_dir: Path | str | None = None,
    progress: Progress | None = None,
    device_map: Any = None,
    quantization: str | None = None,
    cache_weights: bool = True,
    cache_max_bytes: int = 4 << 30,
    decode_threads: int | None = 1,
    defer_cache_writes: bool = False,
    trim_heap: bool = True,
) -> LoadedArtifacts:
    """Load the GGUF at ``path`` as a Transformers model and tokenizer.

    ``path`` may also be a :class:`GGUFFile` the caller already opened (and validated): it is
    used as it is, not parsed again, and the caller closes it.

    ``sha256``: the file's digest if already known (it keys the cache; computed when a cache is
    used and it is not given; it is trusted, not re-checked: pin checks live in
    :mod:`kernel_ext.gguf.integrity`). ``cache_dir``: conversion cache root (None: no cache).
    ``cache_weights``: also keep the dequantised weights there (safetensors, memory-mapped on
    the next load), within ``cache_max_bytes`` (least recently used entries are evicted). They
    are written while decoding; on the CPU the model then maps that file (copy-on-write)
    instead of keeping a second, anonymous copy, so a cold load's peak RSS stays near one
    tensor above the baseline.
    ``progress(done, total, stage)`` is called once per parameter. ``device_map`` (a
    :class:`kernel_ext.gguf.gpu_plans.Offload`, or an explicit accelerate device map) and
    ``quantization`` ("8bit" / "4bit", bitsandbytes, CUDA only) load through
    :mod:`kernel_ext.gguf.gpu_plans`. ``decode_threads``: torch intra-op threads while decoding
    (None: leave torch's setting). ``defer_cache_writes``: return as soon as the model and
    tokenizer are usable and leave storing a freshly converted tokenizer to
    :meth:`LoadedArtifacts.finish_cache_writes` (e.g. on a worker thread once the model is in
    use; atomic as every cache write: the entry has the tokenizer, sealed, or none).
    ``trim_heap``: after converting a large vocabulary, run a full garbage collection and give
    the freed heap back to the OS (False: the caller does that itself).

    Raises ``GGUFUnsupportedError`` (before hashing) for a file no path can load,
    ``GGUFFormatError`` for a malformed or incomplete one, :data:`LoadError` naming the stage
    for any other failure (out-of-memory errors pass through as they are).
    """
    device = str(device)
    if quantization not in (None, "8bit", "4bit"):
        raise ValueError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")
    if quantization and not device.startswith("cuda"):
        raise GGUFUnsupportedError(
            f"{quantization} quantization (bitsandbytes) needs a CUDA device; load in "
            "float32/bfloat16 on the CPU instead"
        )
    options = LoadOptions(
        dtype=to_torch_dtype(dtype),
        device=device,
        sha256=sha256,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        progress=progress,
        device_map=device_map,
        quantization=quantization,
        cache_weights=cache_weights,
        cache_max_bytes=cache_max_bytes,
        decode_threads=decode_threads,
        defer_cache_writes=defer_cache_writes,
        trim_heap=trim_heap,
    )
    name = path.path.name if isinstance(path, GGUFFile) else Path(path).name
    t_start = time.perf_counter()
    job: LoadJob | None = None
    try:
        opened = path if isinstance(path, GGUFFile) else None
        with (
            contextlib.nullcontext(opened) if opened is not None else read_gguf(path) as gf,
            contextlib.ExitStack() as stack,
        ):
            job = LoadJob(options, gf, stack, sha256=sha256)
            job.timings["parse"] = time.perf_counter() - t_start
            _run(job, (CHECK,))
            assert job.route is not None
            _run(job, FAST_STAGES if job.route.path == "fast" else TRANSFORMERS_STAGES)
            summary = gf.summary()
            template = convert.chat_template(gf.metadata)
    except (KernelExtError, torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as e:
        doing = job.stage if job is not None else "opening the file"
        raise LoadError(f"loading {name} failed while {doing}: {type(e).__name__}: {e}") from e
    load_s = time.perf_counter() - t_start
    job.timings["total"] = load_s
    return LoadedArtifacts(
        model=job.model,
        tokenizer=job.tokenizer,
        config=job.config,
        summary=summary,
        chat_template=template,
        sha256=job.sha256,
        dtype=options.dtype,
        device=device,
        load_s=load_s,
        timings=job.timings,
        cache_hits=job.hits,
        peak_rss=_peak_rss(),
        loader=job.route.path,
        loader_reason=job.route.reason,
        weight_sources=job.plan.sources if job.plan is not None else {},
        _writes=_deferred_writes(job),
    )


def _deferred_writes(job: LoadJob) -> list[Callable[[], None]]:
    """What ``defer_cache_writes`` left for :meth:`LoadedArtifacts.finish_cache_writes`."""
    entry, tokenizer = job.entry, job.tokenizer
    if not job.options.defer_cache_writes or job.tokenizer_job is None or entry is None:
        return []
    return [lambda: _store_tokenizer(entry, tokenizer)]


# --- helpers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Decode with ``n`` intra-op threads, then restore torch's setting.

    The kernels are memory-bound element-wise passes; on small, shared machines OpenMP's
    barrier between them costs far more than a second thread gains (measured 5x slower with 2
    threads on a loaded 2-core box), so the loader defaults to one.
    """
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _TokenizerJob:
    """Build (and, given an ``entry``, cache) the tokenizer on a worker thread; :meth:`result`
    joins it."""

    def __init__(self, metadata: Any, model_type: str, entry: Path | None, *,
                 trim: bool = True) -> None:
        self._args = (metadata, model_type, entry, trim)
        self._value: Any = None
        self._error: Exception | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="kernel_ext-tokenizer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        metadata, model_type, entry, trim = self._args
        try:
            self._value = convert.build_tokenizer(metadata, model_type)
            tokens = metadata.get("tokenizer.ggml.tokens")
            if trim and isinstance(tokens, list) and len(tokens) >= _TRIM_VOCAB:
                trim_heap()
            if entry is not None:
                _store_tokenizer(entry, self._value)
        except Exception as e:  # noqa: BLE001 - handed to the caller by result()
            self._error = e
        self.seconds = time.perf_counter() - t0

    def result(self) -> Any:
        while self._thread.is_alive():
            self._thread.join(0.2)  # the stop button interrupts the wait
        if self._error is not None:
            raise self._error
        return self._value


@contextlib.contextmanager
def _switch_interval(active: bool) -> Iterator[None]:
    """While the tokenizer thread runs Python beside the decoding thread, hand the GIL over
    more often, so decoding does not wait up to 5 ms after each torch op (measured on the
    demo model: cold load ~7 % faster with 0.5 ms)."""
    before = sys.getswitchinterval()
    if not active or before <= _SWITCH_INTERVAL:
        yield
        return
    sys.setswitchinterval(_SWITCH_INTERVAL)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def trim_heap() -> None:
    """A full garbage collection, then freed heap pages given back to the OS (glibc), so
    conversion garbage does not stay in RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


def _peak_rss() -> int | None:
    try:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (OSError, ValueError):
        return None


def _new_model(config: Any, dtype: torch.dtype) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        # parameters on `meta` (buffers real), and no random init: every weight is overwritten
        with init_empty_weights(include_buffers=False), no_init_weights():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as e:
        raise GGUFUnsupportedError(
            f"Transformers has no causal LM for model type {config.model_type!r}: {e}"
        ) from e


def _expected(model: Any, hf_names: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    state = dict(model.named_parameters(remove_duplicate=False))
    return {n: (tuple(state[n].shape), state[n].dtype) for n in hf_names}


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise GGUFFormatError(f"the model has no parameter {name!r}")


# --- decoding ------------------------------------------------------------------------------------
def _read_bytes(fh: Any, info: TensorInfo, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The raw bytes of GGUF rows ``[start, stop)`` of ``info``, read into a fresh buffer.

    Reading (instead of viewing the file's memory map) keeps the file's pages out of this
    process's RSS once a tensor is decoded; the buffer is freed right after."""
    rows = n_rows(info)
    stop = rows if stop is None else stop
    row_bytes = info.nbytes // rows
    nbytes = (stop - start) * row_bytes
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = buf.numpy().data
    offset = info.offset + start * row_bytes
    fh.seek(offset)
    got = 0
    while got < nbytes:
        n = fh.readinto(view[got:])
        if not n:
            raise GGUFFormatError(
                f"the file ended while reading tensor {info.name!r}; it was "
                "truncated after it was opened",
                field=info.name,
                offset=offset + got,
            )
        got += n
    return buf


def _decode(
    fh: Any,
    info: TensorInfo,
    start: int,
    stop: int,
    dtype: torch.dtype,
    device: str,
    whole: bool = False,
    order: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """GGUF rows ``[start, stop)`` of ``info`` decoded in ``dtype`` on ``device``: a
    ``(stop - start, ne0)`` tensor, or (``whole``, or all its rows) the tensor in its own
    PyTorch shape.

    With ``order``, output row ``i`` is row ``start + order[i]``: the rows' quantised bytes
    are reordered before decoding (a row is whole blocks), which moves several times less data
    than reordering the decoded values."""
    raw = _read_bytes(fh, info, start, stop)
    if order is not None:
        index = torch.tensor(order, dtype=torch.long)
        raw = raw.view(stop - start, -1).index_select(0, index).reshape(-1)
    ne0 = info.shape[0] if info.shape else 1
    whole = whole or (start == 0 and stop == n_rows(info))
    shape = info.shape if whole else (ne0, stop - start)
    return dequantize(raw, info.ggml_type, shape, dtype=dtype, device=device)


def _work_dtype(info: TensorInfo, elements: int, dtype: torch.dtype) -> torch.dtype:
    small = info.ggml_type in _FLOAT_TYPES or elements <= _FP32_WORK_MAX
    return torch.float32 if small else dtype


def _pieces(
    fh: Any, gf: GGUFFile, fill: Fill, dtype: torch.dtype, device: str
) -> Iterator[torch.Tensor]:
    """The parameter's values in ``dtype`` on ``device``, in parameter-row order, as
    ``(rows, cols)`` chunks whose rows add up to the parameter's (one chunk, in the parameter's
    own shape, for a value transform)."""
    src = fill.source
    if fill.op is not None:
        info = gf.tensors[src.rows[0].tensor]
        t = fill.op(_decode(fh, info, 0, n_rows(info), torch.float32, device, whole=True))
        if t.numel() != _numel(src.shape):
            raise GGUFFormatError(
                f"tensor {info.name!r} has {t.numel()} values, the model expects "
                f"{src.shape} for {src.parameter}",
                field=info.name,
            )
        yield t.reshape(src.shape).to(dtype).contiguous()
        return
    cols = src.shape[-1] if src.shape else 1
    for r in src.rows:
        info = gf.tensors[r.tensor]
        ne0 = info.shape[0] if info.shape else 1
        if ne0 != cols:
            raise GGUFFormatError(
                f"tensor {info.name!r} has rows of {ne0} values, the model expects {cols} "
                f"for {src.parameter} {src.shape}",
                field=info.name,
            )
        work = _work_dtype(info, r.count * ne0, dtype)
        if r.permutation is not None:
            yield _decode(fh, info, r.start, r.stop, work, device, order=r.permutation).to(dtype)
            continue
        step = max(1, _CHUNK_ELEMENTS // max(1, ne0))
        for r0 in range(r.start, r.stop, step):
            yield _decode(fh, info, r0, min(r0 + step, r.stop), work, device).to(dtype)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _materialize(fh: Any, gf: GGUFFile, fill: Fill, dtype: torch.dtype, device: str,
                 sink: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """The whole parameter (its own shape), its pieces also handed to ``sink`` as they come."""
    shape = fill.source.shape
    rows = _numel(shape) // (shape[-1] if shape else 1) if shape else 1
    out: torch.Tensor | None = None
    at = 0
    for piece in _pieces(fh, gf, fill, dtype, device):
        if sink is not None:
            sink(piece)
        n = piece.numel() // (shape[-1] if shape else 1)
        if out is None and n == rows:
            return piece.reshape(shape).contiguous()  # one piece: it is the parameter
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=piece.device)
        out.view(rows, -1)[at : at + n] = piece.reshape(n, -1)
        at += n
    if out is None or at != rows:
        raise GGUFFormatError(f"internal: {fill.source.parameter} was not filled completely")
    return out


def _stream(fh: Any, gf: GGUFFile, fill: Fill, dtype: torch.dtype, device: str,
            writer: _cache.WeightsWriter) -> None:
    """The parameter's pieces straight into the cache file, never whole in memory."""
    name = fill.source.parameter
    for piece in _pieces(fh, gf, fill, dtype, device):
        writer.put(name, piece)


def _decode_all(job: LoadJob, writer: _cache.WeightsWriter | None) -> None:
    """Decode every parameter into the model; with a ``writer``, also into the cache file.

    On the CPU with a writer the decoded values go to the file only, and the model then maps
    the finished file; if the file cannot be written or read back, decode into memory instead.
    """
    opts, plan = job.options, job.plan
    assert plan is not None
    via_file = writer is not None and opts.device == "cpu"
    committed = False
    try:
        with _intra_op_threads(opts.decode_threads if opts.device == "cpu" else None):
            _decode_into(job, writer, assign=not via_file)
            if writer is None:
                return
            stored = writer.commit() is not None  # None: it logged why the cache was skipped
            committed = True
            if via_file and not (
                stored and _fill_from_cache(job.model, plan, writer.path, opts.device, None)
            ):
                log.warning("kernel_ext: decoding the weights again, into memory")
                _decode_into(job, None, assign=True)
    finally:
        # on any exit before the commit (an error, KeyboardInterrupt): stop the thread, close
        # and delete the temporary file
        if writer is not None and not committed:
            writer.abort()


def _decode_into(job: LoadJob, writer: _cache.WeightsWriter | None, *, assign: bool) -> None:
    opts, plan, gf = job.options, job.plan, job.gf
    assert plan is not None
    total = len(plan.fills)
    with gf.open_data() as fh:
        for done, (name, fill) in enumerate(plan.fills.items(), 1):
            if assign:
                sink = (lambda t, n=name: writer.put(n, t)) if writer is not None else None
                _set_tensor(job.model, name, _materialize(fh, gf, fill, opts.dtype, opts.device,
                                                          sink))
            elif writer is not None:
                _stream(fh, gf, fill, opts.dtype, opts.device, writer)
            if opts.progress is not None:
                opts.progress(done, total, "weights")
            if not assign and writer is not None and writer.error is not None:
                return  # the file will not be published: the caller decodes into memory


def _fill_from_cache(
    model: Any, plan: WeightPlan, wpath: Path, device: str, progress: Progress | None
) -> bool:
    hf_names = list(plan.fills)
    try:
        tensors = _cache.load_weights(wpath, _expected(model, hf_names))
    except FileNotFoundError:
        return False
    except _cache.CorruptEntryError as e:
        _cache.discard(wpath, e)
        return False
    total = len(hf_names)
    for done, name in enumerate(hf_names, 1):
        value = tensors[name]
        if device != "cpu":
            value = value.to(device)
        _set_tensor(model, name, value)
        if progress is not None:
            progress(done, total, "weights (cached)")
    return True


def _cached_config_ok(entry: Path, model_type: str) -> bool:
    """Whether the entry's config.json is readable and for this model type."""
    path = entry / "config.json"
    try:
        cached = _cache.read_json(path)
    except FileNotFoundError:
        return False
    except _cache.CorruptEntryError as e:
        _cache.discard(path, e)
        return False
    if not isinstance(cached, dict) or cached.get("model_type") != model_type:
        _cache.discard(path, f"not a {model_type} config")
        return False
    return True


_TOKENIZER_CONFIG_SKIP = frozenset(
    {"backend", "tokenizer_class", "is_local", "local_files_only", "name_or_path", "auto_map"}
)


def _cached_tokenizer(entry: Path, model_type: str) -> Any:
    tdir = entry / "tokenizer"
    if not (tdir / "tokenizer.json").is_file():
        return None
    try:
        _cache.verify_tree(tdir)
        config = _cache.read_json(tdir / "tokenizer_config.json")
        if not isinstance(config, dict):
            raise _cache.CorruptEntryError("tokenizer_config.json is not an object")
        kwargs = {k: v for k, v in config.items() if k not in _TOKENIZER_CONFIG_SKIP}
        template = tdir / "chat_template.jinja"
        if template.is_file():
            kwargs["chat_template"] = template.read_text(encoding="utf-8")
        cls = convert.tokenizer_class(model_type)
        return cls(tokenizer_file=str(tdir / "tokenizer.json"), **kwargs)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - tokenizers reports bad JSON as a bare Exception
        _cache.discard(tdir, e if isinstance(e, _cache.TamperedEntryError)
                       else f"unreadable tokenizer: {e}")
        return None


def _store_tokenizer(entry: Path, tokenizer: Any) -> None:
    """Store the converted tokenizer (atomically, sealed); a failure is logged: the load that
    converted it has its tokenizer, the next one converts it again."""
    try:
        _cache.write_tree(entry / "tokenizer", lambda d: tokenizer.save_pretrained(str(d)))
    except Exception as e:  # noqa: BLE001 - may run after the load returned: nobody to raise to
        log.warning(
            "kernel_ext conversion cache: could not store the tokenizer in %s: %s", entry, e
        )


def _weights_writer(
    entry: Path, wpath: Path, model: Any, plan: WeightPlan, cache_dir: Path, cap: int
) -> _cache.WeightsWriter | None:
    """A writer for the weights entry (None when it would not fit the cap or cannot start)."""
    names = list(plan.fills)
    expected = _expected(model, names)
    specs = [(n, expected[n][0], expected[n][1]) for n in names]
    need = sum(
        _numel(shape) * torch.tensor([], dtype=dt).element_size() for _, shape, dt in specs
    )
    if need > cap:
        log.info("not caching %d bytes of weights: over the %d byte cap", need, cap)
        return None
    try:
        _cache.enforce_cap(cache_dir, max(0, cap - need), keep=entry.name)
        return _cache.WeightsWriter(wpath, specs)
    except OSError as e:
        log.warning("kernel_ext conversion cache: could not store weights in %s: %s", wpath, e)
        return None
