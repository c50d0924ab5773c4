"""Load a GGUF file into a Transformers model + tokenizer, fast and lean.

One parse of the file (our bounded reader), the model built on the ``meta`` device and filled
tensor by tensor (read the quantised bytes -> dequantise on the target device in the target
dtype -> per-architecture fix-up -> assign), so peak memory stays near the final model size.
The converted tokenizer and config (and optionally the dequantised weights) go to a conversion
cache keyed by the file's SHA-256 (:mod:`kernel_ext.gguf.cache`).

Cold load (empty cache): the tokenizer is converted on a worker thread (mostly Python) while
the main thread decodes (mostly GIL-free torch), so the load takes about as long as the
tokenizer conversion. With a cache on the CPU, decoded tensors are streamed into the cache's
safetensors file and the model then maps that file copy-on-write: the weights are never held
twice, and peak RSS stays a few hundred MB above the interpreter's. Warm load (cache filled):
tokenizer.json and the mapped weights, no decoding at all.

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
from .dequant import dequantize
from .reader import GGUFFile, TensorInfo, read_gguf

__all__ = ["LoadError", "LoadedArtifacts", "estimate_bytes", "load_transformers", "resolve_dtype"]

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
# Tensors stored in a float format, or this small, are decoded in fp32 and cast afterwards, so
# fix-ups such as gemma's ``norm - 1`` round once, as in Transformers' own loader.
_FP32_WORK_MAX = 1 << 20
_FLOAT_TYPES = frozenset({0, 1, 30})  # F32, F16, BF16
# GIL hand-over interval while the tokenizer thread runs beside the decoding one (default 5 ms)
_SWITCH_INTERVAL = 5e-4


LoadError = ModelLoadError  # a later stage of a load failed; the message names the stage


@dataclass
class LoadedArtifacts:
    """What :func:`load_transformers` returns."""

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


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
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
    size = torch.tensor([], dtype=resolve_dtype(dtype)).element_size()
    n = sum(t.n_elements for t in gf.tensors.values())
    raw = n * size
    return raw + max(16 << 20, raw // 50)


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
    """Build (and cache) the tokenizer on a worker thread; :meth:`result` joins it."""

    def __init__(self, metadata: Any, model_type: str, entry: Path | None) -> None:
        self._args = (metadata, model_type, entry)
        self._value: Any = None
        self._error: Exception | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="kernel_ext-tokenizer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        metadata, model_type, entry = self._args
        try:
            self._value = convert.build_tokenizer(metadata, model_type)
            _trim_heap()
            if entry is not None:
                _store_tokenizer(entry, self._value)
        except Exception as e:  # noqa: BLE001 - handed to the caller by result()
            self._error = e
        self.seconds = time.perf_counter() - t0

    def result(self) -> Any:
        self._thread.join()
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


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so conversion garbage does not stay in RSS."""
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


def _read_bytes(fh: Any, info: TensorInfo) -> torch.Tensor:
    """The tensor's raw bytes, read into a fresh buffer.

    Reading (instead of viewing the file's memory map) keeps the file's pages out of this
    process's RSS once a tensor is decoded; the buffer is freed right after."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = buf.numpy().data
    fh.seek(info.offset)
    got = 0
    while got < info.nbytes:
        n = fh.readinto(view[got:])
        if not n:
            raise GGUFFormatError(
                f"the file ended while reading tensor {info.name!r}; it was "
                "truncated after it was opened",
                field=info.name,
                offset=info.offset + got,
            )
        got += n
    return buf


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise GGUFFormatError(f"the model has no parameter {name!r}")


def _decode(
    fh: Any,
    info: TensorInfo,
    processor: Any,
    dtype: torch.dtype,
    device: str,
    target_shape: tuple[int, ...],
) -> torch.Tensor:
    raw = _read_bytes(fh, info)
    small = info.ggml_type in _FLOAT_TYPES or info.n_elements <= _FP32_WORK_MAX
    work = torch.float32 if small else dtype
    t = dequantize(raw, info.ggml_type, info.shape, dtype=work, device=device)
    del raw
    t = processor.process(weights=t, name=info.name).weights
    if tuple(t.shape) != target_shape:
        if t.numel() != int(torch.Size(target_shape).numel()):
            raise GGUFFormatError(
                f"tensor {info.name!r} has shape {tuple(t.shape)}, the model "
                f"expects {target_shape}",
                field=info.name,
            )
        t = t.reshape(target_shape)
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


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
    ``progress(done, total, stage)`` is called once per tensor. ``device_map`` (a
    :class:`kernel_ext.gguf.gpu_plans.Offload`, or an explicit accelerate device map) and
    ``quantization`` ("8bit" / "4bit", bitsandbytes, CUDA only) load through
    :mod:`kernel_ext.gguf.gpu_plans`. ``decode_threads``: torch
    intra-op threads while decoding (None: leave torch's setting).
    """
    dt = resolve_dtype(dtype)
    device = str(device)
    if quantization not in (None, "8bit", "4bit"):
        raise ValueError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")
    if quantization and not device.startswith("cuda"):
        raise GGUFUnsupportedError(
            f"{quantization} quantization (bitsandbytes) needs a CUDA device; load in "
            "float32/bfloat16 on the CPU instead"
        )
    stage = ["opening the file"]
    try:
        return _load(
            path, dt, device, sha256, cache_dir, progress, device_map, quantization,
            cache_weights, cache_max_bytes, decode_threads, stage,
        )
    except (KernelExtError, torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as e:
        name = path.path.name if isinstance(path, GGUFFile) else Path(path).name
        raise LoadError(f"loading {name} failed while {stage[0]}: {type(e).__name__}: {e}") from e


def _load(
    path: str | os.PathLike[str] | GGUFFile,
    dt: torch.dtype,
    device: str,
    sha256: str | None,
    cache_dir: Path | str | None,
    progress: Progress | None,
    device_map: Any,
    quantization: str | None,
    cache_weights: bool,
    cache_max_bytes: int,
    decode_threads: int | None,
    stage: list[str],
) -> LoadedArtifacts:
    """:func:`load_transformers` after its argument checks; ``stage[0]`` says what it is doing."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    hits: dict[str, bool] = {}

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - since
        return now

    t = time.perf_counter()
    opened = path if isinstance(path, GGUFFile) else None
    with contextlib.nullcontext(opened) if opened is not None else read_gguf(path) as gf:
        path = gf.path
        t = mark("parse", t)
        stage[0] = "checking the metadata"
        summary = gf.summary()
        arch = convert.check_architecture(gf.metadata)
        convert.check_tokenizer(gf.metadata)
        entry: Path | None = None
        if cache_dir is not None:
            if sha256 is None:
                stage[0] = "hashing the file"
                sha256 = gf.sha256()
                t = mark("hash", t)
            entry = _cache.entry_dir(cache_dir, sha256)

        # config --------------------------------------------------------------------------------
        stage[0] = "building the model config"
        cfg_dict = convert.config_dict(gf.metadata, frozenset(gf.tensors))
        config = convert.build_config(gf.metadata, frozenset(gf.tensors), dtype=dt)
        hits["config"] = entry is not None and _cached_config_ok(entry, config.model_type)
        if entry is not None and not hits["config"]:
            _cache.write_json(entry / "config.json", config.to_dict())
        t = mark("config", t)

        # tokenizer -----------------------------------------------------------------------------
        stage[0] = "reading the cached tokenizer"
        tokenizer = _cached_tokenizer(entry, config.model_type) if entry is not None else None
        hits["tokenizer"] = tokenizer is not None
        job = None
        if tokenizer is None:
            # converting is mostly Python, decoding mostly GIL-free torch: do both at once
            job = _TokenizerJob(gf.metadata, config.model_type, entry)
        t = mark("tokenizer", t)

        # model ---------------------------------------------------------------------------------
        stage[0] = "building the model and loading its weights"
        with _switch_interval(job is not None):
            if quantization or device_map is not None:
                from .gpu_plans import load_placed

                model = load_placed(gf, arch=arch, cfg_dict=cfg_dict, config=config, dtype=dt,
                                    device=device, quantization=quantization, offload=device_map,
                                    progress=progress)
                hits["weights"] = False
                t = mark("weights", t)
            else:
                model = _new_model(config, dt)
                t = mark("model_init", t)
                processor = convert.tensor_processor(arch, cfg_dict)
                plan = convert.tensor_plan(model, arch, processor, list(gf.tensors))
                if plan.missing:
                    raise GGUFFormatError(
                        f"the file has no tensors for {len(plan.missing)} model parameters "
                        f"(e.g. {', '.join(plan.missing[:3])}); it is incomplete or not a "
                        f"{arch} model",
                        field="tensors",
                    )
                wpath = _cache.weights_path(entry, dt) if entry is not None else None
                hits["weights"] = wpath is not None and _fill_from_cache(
                    model, plan, wpath, device, progress
                )
                if not hits["weights"]:
                    writer = None
                    if wpath is not None and entry is not None and cache_dir and cache_weights:
                        writer = _weights_writer(
                            entry, wpath, model, plan, cache_dir, cache_max_bytes
                        )
                    _fill_weights(
                        model, gf, plan, processor, dt, device, progress, decode_threads, writer
                    )
                t = mark("weights", t)
                model.tie_weights()
                leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
                if leftover:
                    raise GGUFFormatError(f"no data for parameters {', '.join(leftover[:5])}")
                model.to(device)
        model.eval()
        if job is not None:
            stage[0] = "converting the tokenizer"
            tokenizer = job.result()
            timings["tokenizer"] += job.seconds
            t = mark("tokenizer_wait", t)
        stage[0] = "finishing the load"
        if entry is not None:
            _cache.touch(entry, source=Path(path).name)
        template = convert.chat_template(gf.metadata)
    load_s = time.perf_counter() - t_start
    timings["total"] = load_s
    return LoadedArtifacts(
        model=model,
        tokenizer=tokenizer,
        config=config,
        summary=summary,
        chat_template=template,
        sha256=sha256,
        dtype=dt,
        device=device,
        load_s=load_s,
        timings=timings,
        cache_hits=hits,
        peak_rss=_peak_rss(),
    )


# Tensors decoded in row chunks when they go straight to the cache file: the big ones that no
# tensor processor of a supported architecture touches (the embedding and output matrices).
_CHUNKABLE = frozenset({"token_embd.weight", "output.weight"})
_CHUNK_ELEMENTS = 1 << 24


def _fill_weights(
    model: Any,
    gf: GGUFFile,
    plan: convert.TensorPlan,
    processor: Any,
    dtype: torch.dtype,
    device: str,
    progress: Progress | None,
    decode_threads: int | None,
    writer: _cache.WeightsWriter | None,
) -> None:
    """Decode every tensor into ``model``; with a ``writer``, also into the cache file.

    On the CPU with a writer the decoded tensors go to the file only, and the model then maps
    the finished file; if the file cannot be written or read back, decode into memory instead.
    """
    via_file = writer is not None and device == "cpu"
    committed = False
    try:
        with _intra_op_threads(decode_threads if device == "cpu" else None):
            _fill_from_gguf(
                model, gf, plan, processor, dtype, device, progress, writer, assign=not via_file
            )
            if writer is None:
                return
            stored = writer.commit() is not None  # None: it logged why the cache was skipped
            committed = True
            if via_file and not (
                stored and _fill_from_cache(model, plan, writer.path, device, None)
            ):
                log.warning("kernel_ext: decoding the weights again, into memory")
                _fill_from_gguf(
                    model, gf, plan, processor, dtype, device, progress, None, assign=True
                )
    finally:
        # on any exit before the commit (an error, KeyboardInterrupt): stop the thread, close
        # and delete the temporary file
        if writer is not None and not committed:
            writer.abort()


def _fill_from_gguf(
    model: Any,
    gf: GGUFFile,
    plan: convert.TensorPlan,
    processor: Any,
    dtype: torch.dtype,
    device: str,
    progress: Progress | None,
    writer: _cache.WeightsWriter | None,
    *,
    assign: bool,
) -> None:
    expected = _expected(model, list(plan.gguf_to_hf.values()))
    names = list(plan.gguf_to_hf)
    total = len(names)
    with gf.open_data() as fh:
        for done, name in enumerate(names, 1):
            hf_name = plan.gguf_to_hf[name]
            shape, _ = expected[hf_name]
            info = gf.tensors[name]
            if (
                not assign
                and writer is not None
                and name in _CHUNKABLE
                and info.n_elements > _CHUNK_ELEMENTS
                and len(info.shape) == 2
            ):
                for part in _decode_rows(fh, info, processor, dtype, device, shape):
                    writer.put(hf_name, part)
            else:
                value = _decode(fh, info, processor, dtype, device, shape)
                if assign:
                    _set_tensor(model, hf_name, value)
                if writer is not None:
                    writer.put(hf_name, value)
                del value
            if progress is not None:
                progress(done, total, "weights")
            if not assign and writer is not None and writer.error is not None:
                return  # the file will not be published: the caller decodes into memory


def _decode_rows(
    fh: Any,
    info: TensorInfo,
    processor: Any,
    dtype: torch.dtype,
    device: str,
    target_shape: tuple[int, ...],
) -> Iterator[torch.Tensor]:
    """A 2-D tensor decoded a few rows at a time (GGUF rows are whole blocks)."""
    ne0, rows = info.shape
    row_bytes = info.nbytes // rows
    step = max(1, _CHUNK_ELEMENTS // ne0)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        part = TensorInfo(
            name=info.name,
            shape=(ne0, n),
            ggml_type=info.ggml_type,
            offset=info.offset + r0 * row_bytes,
            nbytes=n * row_bytes,
            n_elements=ne0 * n,
        )
        yield _decode(fh, part, processor, dtype, device, (n, *target_shape[1:]))


def _fill_from_cache(
    model: Any, plan: convert.TensorPlan, wpath: Path, device: str, progress: Progress | None
) -> bool:
    hf_names = list(dict.fromkeys(plan.gguf_to_hf.values()))
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
    """Whether the entry's config.json is readable and for this model type.

    The config itself is rebuilt from the metadata every time (milliseconds); the cached copy is
    there to be inspected and shipped with the tokenizer, so it is only checked here."""
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


def _cached_tokenizer(entry: Path, model_type: str) -> Any:
    tdir = entry / "tokenizer"
    if not (tdir / "tokenizer.json").is_file():
        return None
    try:
        _cache.verify_tree(tdir)
        config = _cache.read_json(tdir / "tokenizer_config.json")
        if not isinstance(config, dict):
            raise _cache.CorruptEntryError("tokenizer_config.json is not an object")
        kwargs = {
            k: v
            for k, v in config.items()
            if k
            not in (
                "backend",
                "tokenizer_class",
                "is_local",
                "local_files_only",
                "name_or_path",
                "auto_map",
            )
        }
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
    try:
        _cache.write_tree(entry / "tokenizer", lambda d: tokenizer.save_pretrained(str(d)))
    except OSError as e:
        log.warning(
            "kernel_ext conversion cache: could not store the tokenizer in %s: %s", entry, e
        )


def _weights_writer(
    entry: Path, wpath: Path, model: Any, plan: convert.TensorPlan, cache_dir: Path | str, cap: int
) -> _cache.WeightsWriter | None:
    """A writer for the weights entry (None when it would not fit the cap or cannot start)."""
    names = list(plan.gguf_to_hf.values())
    expected = _expected(model, names)
    specs = [(n, expected[n][0], expected[n][1]) for n in names]
    need = sum(
        int(torch.Size(shape).numel()) * torch.tensor([], dtype=dt).element_size()
        for _, shape, dt in specs
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
