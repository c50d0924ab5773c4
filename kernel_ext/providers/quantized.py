"""Decoding copies of a loaded model, built once and kept in the conversion cache.

* :func:`block_model` (``decode_mode='quantized'`` where the block kernels run): every
  ``nn.Linear`` whose weight came from a GGUF tensor of a type :mod:`kernel_ext.gguf.blockdot`
  takes is computed on the file's blocks as they are (read through its map: nothing to build
  or cache).
* :func:`repack_model` (``decode_mode='quantized'`` without the block kernels): every
  ``nn.Linear`` whose weight came from a GGUF tensor with a faithful int4 form
  (:mod:`kernel_ext.gguf.qlinear`) is repacked from the file's own blocks, the LM head
  included.

  Either way each weight is checked against the model's dense weight (:func:`_mismatch`), so
  a wrong tensor mapping stays dense instead of giving wrong answers.
* :func:`head_screen`: the int4/int8 screen of the LM head that the exact default certifies
  (:mod:`kernel_ext.providers.head`).

Both are stored as ``decode-*.safetensors`` in the model's conversion-cache entry (keyed by the
file's SHA-256, like the rest of the cache, whose recorded digests check them on every load),
with the packing layout of this machine's torch (the int4 layout depends on the CPU's vector
width): a file from another layout, torch or mapping is rebuilt, a damaged one discarded.

Which GGUF tensor (and which row order) filled each parameter is :func:`weight_sources`: the
loader's own mapping (:mod:`kernel_ext.gguf.sources`), narrowed to parameters that are one
tensor's rows.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from ..gguf import cache as _cache
from ..gguf import qlinear
from ..gguf.reader import GGUFFile, read_gguf
from .head import Screen, build_screen, screen_from_tensors

__all__ = [
    "QuantizedLinears",
    "RowSource",
    "block_model",
    "head_screen",
    "repack_model",
    "weight_sources",
]

log = logging.getLogger(__name__)

_FORMAT = "3"  # 2: two-part types with small zeros; 3: parts side by side


@dataclass(frozen=True)
class RowSource:
    """The GGUF tensor whose rows *are* a parameter's rows: row ``i`` of the parameter is row
    ``row_order[i]`` of the tensor (``None``: the same order)."""

    tensor: str
    row_order: torch.Tensor | None = None


def weight_sources(model: Any, gf: GGUFFile) -> dict[str, RowSource]:
    """Parameter name -> its :class:`RowSource`, for the parameters filled row for row from one
    2-D GGUF tensor (values unchanged, maybe reordered, e.g. llama's q/k un-permutation).

    The loader's own mapping (:mod:`kernel_ext.gguf.sources`: the architecture adapter's plan,
    what ``LoadedArtifacts.weight_sources`` holds), recomputed from the file's metadata for
    ``model``; empty for files the Transformers fallback loads (it does not say).
    """
    from ..gguf.arch import route

    adapter = route(gf.metadata, gf.tensors, gf.tensor_bytes).adapter
    if adapter is None:
        return {}
    out: dict[str, RowSource] = {}
    for name, src in adapter.plan(model).sources.items():
        if not src.row_op or len(src.rows) != 1 or len(src.shape) != 2:
            continue
        part = src.rows[0]
        info = gf.tensors.get(part.tensor)
        if info is None or len(info.shape) != 2:
            continue
        k, n = (int(d) for d in info.shape)
        if (part.start, part.stop, part.at) != (0, n, 0) or tuple(src.shape) != (n, k):
            continue  # a slice of a tensor, or rows of another length: not this tensor whole
        order = None if part.permutation is None else torch.tensor(part.permutation)
        out[name] = RowSource(part.tensor, order)
    return out


# --- the quantised linears -----------------------------------------------------------------------
@dataclass
class QuantizedLinears:
    """What :func:`repack_model` produced: parameter name -> int4 weight, and what stays dense."""

    weights: dict[str, qlinear.Int4Weight]
    dense: dict[str, str]  # parameter name -> why it stays dense
    seconds: float = 0.0
    from_cache: bool = False
    sources: dict[str, RowSource] = field(default_factory=dict)  # of the repacked weights

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    def summary(self) -> str:
        by_type = Counter(w.source for w in self.weights.values())
        why = Counter(self.dense.values())
        kind = "int4 from" if any(isinstance(w, qlinear.Int4Weight)
                                  for w in self.weights.values()) else "computed on"
        text = (f"{len(self.weights)} weights {kind} the file's blocks ("
                + ", ".join(f"{t} {c}" for t, c in sorted(by_type.items())) + ")")
        if self.dense:
            text += f"; {len(self.dense)} dense (" + "; ".join(
                f"{c} x {w}" for w, c in why.most_common()) + ")"
        return text


def _linear_params(model: Any) -> dict[str, tuple[torch.nn.Linear, tuple[str, ...]]]:
    """``"<module>.weight"`` of each linear layer (the LM head included; a weight shared by two
    linears counted once) -> the module and every parameter name of its weight (a tied head is
    also ``model.embed_tokens.weight``)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out: dict[str, tuple[torch.nn.Linear, tuple[str, ...]]] = {}
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if type(module) is not torch.nn.Linear or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        key = f"{mname}.weight"
        out[key] = (module, tuple(names.get(id(module.weight), [key])))
    return out


def _rows_of(gf: GGUFFile, name: str, row_bytes: int) -> Callable[[int, int], torch.Tensor]:
    """``read(first, n)``: a copy of ``n`` rows of tensor ``name``'s raw bytes (from the map)."""
    data = gf.tensor_bytes(name)

    def read(first: int, rows: int) -> torch.Tensor:
        return torch.from_numpy(np.array(data[first * row_bytes:(first + rows) * row_bytes]))

    return read


def _mismatch(weight: qlinear.Int4Weight | Screen, dense: torch.Tensor) -> str | None:
    """Why the copy does not compute what the dense weight does, or None when it does.

    Probe: up to four of the dense weight's own (non-zero) rows ``v``, multiplied by the copy:
    the product ``copy(v)[i, r_i]`` must be ``|v_i|^2`` within 3 % of ``|v_i| |W_r|``. A
    faithful copy is off by about the bf16 rounding (~0.4 %); another tensor or row order is
    off by about 100 %. Only those rows of the dense weight are read.
    """
    pick = _probe_rows(int(dense.shape[0]), 16)
    norms = dense[pick].float().norm(dim=1)
    rows = pick[norms > 0][:4]
    if rows.numel() == 0:
        rows = pick[:1]
    v = dense[rows].float()
    matmul = weight.matmul if isinstance(weight, Screen) else weight
    got = matmul(v)[torch.arange(rows.numel()), rows].double()
    vb = v.to(torch.bfloat16).double()
    want = (vb * v.double()).sum(dim=1)
    tol = 2.0**-5 * vb.norm(dim=1) * v.double().norm(dim=1) + 1e-30
    bad = ~((got - want).abs() <= tol)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        return (f"row {int(rows[i])} computes {float(got[i]):.6g}, the model's weight "
                f"{float(want[i]):.6g}")
    return None


def _probe_rows(n: int, count: int) -> torch.Tensor:
    """``count`` rows to check, in two runs of neighbours (at a seeded place, and at the end):
    a memory-mapped weight then maps a few pages, not one page range per row."""
    half = max(1, count // 2)
    start = int(torch.randint(0, max(1, n - half), (1,), generator=torch.Generator().manual_seed(n)))
    rows = torch.cat([torch.arange(start, min(n, start + half)), torch.arange(max(0, n - half), n)])
    return torch.unique(rows)


def _layout() -> str:
    """A fingerprint of torch's int4 packing on this machine (the layout is CPU-dependent)."""
    if qlinear.available() is not None:
        return "none"
    probe = (torch.arange(128 * 64, dtype=torch.int32).reshape(128, 64) * 7 + 3) % 16
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    return f"{torch.__version__}:{xxhash.xxh3_64_hexdigest(packed.numpy().tobytes())}"


def _order_digest(order: torch.Tensor | None) -> str | None:
    if order is None:
        return None
    return xxhash.xxh3_64_hexdigest(order.to(torch.int64).contiguous().numpy().data)


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Store the copies (the cache records the file's digest and checks it on every load)."""
    meta = dict(meta, format=_FORMAT, layout=_layout())
    try:
        _cache.save_weights(path, tensors, {"kernel_ext": json.dumps(meta, sort_keys=True)})
    except OSError as e:
        log.warning("kernel_ext conversion cache: could not store %s: %s", path, e)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Tensors and metadata of a cached decode file, or None (missing, stale or damaged)."""
    try:
        raw = _cache.weights_metadata(path).get("kernel_ext", "")
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise _cache.CorruptEntryError("metadata is not an object")
        if meta.get("format") != _FORMAT or meta.get("layout") != _layout():
            path.unlink(missing_ok=True)  # another torch or CPU layout: rebuilt by the caller
            return None
        return _cache.load_weights(path), meta  # checked against the entry's recorded digest
    except FileNotFoundError:
        return None
    except _cache.CorruptEntryError as e:  # a tampered or damaged file too
        _cache.discard(path, e)
        return None
    except (json.JSONDecodeError, ValueError) as e:
        _cache.discard(path, str(e))
        return None


def repack_model(model: Any, gguf_path: str | Path, *, entry: Path | None = None,
                 part: str = "body") -> QuantizedLinears:
    """Int4 copies of ``model``'s linear weights from the file's own blocks (see the module
    docstring): ``part`` ``"body"`` (every linear but the LM head) or ``"head"`` (the LM head
    only: it is large and only sampling needs it, so it is built on demand). ``entry``: the
    model's conversion-cache entry (None: no cache)."""
    if part not in ("body", "head"):
        raise ValueError(f"part must be 'body' or 'head', got {part!r}")
    t0 = time.perf_counter()
    head = model.get_output_embeddings()
    params = {k: v for k, v in _linear_params(model).items() if (v[0] is head) == (part == "head")}
    path = _cache.decode_path(entry, f"{part}-int4-v{_FORMAT}") if entry is not None else None
    with read_gguf(gguf_path) as gf:
        sources = weight_sources(model, gf)
        cached = _load(path) if path is not None else None
        result = _from_cache(params, sources, cached) if cached is not None else None
        if result is None:
            result = _build(params, sources, gf)
            if path is not None and result.weights:
                tensors: dict[str, torch.Tensor] = {}
                for name, w in result.weights.items():
                    tensors.update(w.tensors(name))
                _save(path, tensors, _describe(result))
    result.seconds = time.perf_counter() - t0
    return result


def head_rows(model: Any, gguf_path: str | Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Rows of the LM head dequantised from the file's own blocks, on demand: ``rows(index)``
    gives float32 rows ``(len(index), K)`` equal to the model's dense rows (the loader
    dequantised the same blocks with the same kernels; checked here on a sample, else None).

    The file is memory-mapped: only the blocks of the rows asked for are read, so certifying
    a greedy token touches a few hundred KB of the quantised file instead of the float32 head.
    Where the block kernels run and decode the same floats, ``rows.dot(h, index)`` computes
    those rows' products with ``h`` in C straight from the blocks (~10x less time).
    """
    from ..gguf.dequant import dequantize

    weight = model.get_output_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    with read_gguf(gguf_path) as gf:
        sources = weight_sources(model, gf)
        src = next((sources[n] for n in names if n in sources), None)
        if src is None:
            return None
        info = gf.tensors[src.tensor]
    k, n = (int(d) for d in info.shape)
    if (n, k) != tuple(weight.shape):
        return None
    blocks = np.memmap(gguf_path, dtype=np.uint8, mode="r", offset=info.offset,
                       shape=(n, info.nbytes // n))
    order = src.row_order

    def rows(index: torch.Tensor) -> torch.Tensor:
        at = index if order is None else order[index]
        raw = torch.from_numpy(np.ascontiguousarray(blocks[at.numpy()]))
        return dequantize(raw, info.ggml_type, (k, int(index.numel())))

    probe = _probe_rows(n, 16)
    dense = weight[probe].float()
    if not torch.equal(rows(probe), dense):
        log.info("kernel_ext: the head's file rows differ from the model's; using the model's")
        return None
    from ..gguf import blockdot

    if order is None and blockdot.unavailable() is None and blockdot.row_bytes(info.ggml_type, k):
        blocked = blockdot.BlockWeight.from_file(gguf_path, info)
        if torch.equal(blocked.rows(probe), dense):  # the C decoding gives the same floats
            rows.dot = blocked.rows_dot  # type: ignore[attr-defined]  # Head._exact uses it
    return rows


def _describe(result: QuantizedLinears) -> dict[str, Any]:
    src = result.sources
    return {
        "weights": {
            name: {"type": w.source, "repeat": w.repeat, "out": w.out_features,
                   "in": w.in_features, "tensor": src[name].tensor,
                   "order": _order_digest(src[name].row_order)}
            for name, w in result.weights.items()
        },
        "dense": result.dense,
    }


def _from_cache(params: dict[str, tuple[torch.nn.Linear, tuple[str, ...]]], sources: dict[str, RowSource],
                cached: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> QuantizedLinears | None:
    tensors, meta = cached
    weights: dict[str, qlinear.Int4Weight] = {}
    used: dict[str, RowSource] = {}
    dense = dict(meta.get("dense", {}))
    try:
        for name, spec in meta["weights"].items():
            module, aliases = params[name]
            src = next((sources[a] for a in aliases if a in sources), None)
            if (src is None or spec["tensor"] != src.tensor
                    or spec["order"] != _order_digest(src.row_order)
                    or (spec["out"], spec["in"]) != tuple(module.weight.shape)):
                return None  # the mapping changed since: rebuild
            w = qlinear.Int4Weight.from_tensors(tensors, name, int(spec["repeat"]), int(spec["out"]),
                                                int(spec["in"]), str(spec["type"]))
            why = _mismatch(w, module.weight.detach())
            if why is not None:
                return None
            weights[name] = w
            used[name] = src
    except (KeyError, TypeError, ValueError):
        return None
    if set(weights) | set(dense) != set(params):
        return None
    return QuantizedLinears(weights, dense, from_cache=True, sources=used)


def _copies(params: dict[str, tuple[torch.nn.Linear, tuple[str, ...]]],
            sources: dict[str, RowSource], gf: GGUFFile,
            make: Callable[[RowSource, Any], Any], kind: str) -> QuantizedLinears:
    """A copy of each weight in ``params`` made by ``make(source, tensor_info)`` (the copy, or
    why there is none), each checked against the model's dense weight; ``kind`` names the copy
    in the reasons of the weights that stay dense."""
    weights: dict[str, Any] = {}
    dense: dict[str, str] = {}
    used: dict[str, RowSource] = {}
    for name, (module, aliases) in params.items():
        src = next((sources[a] for a in aliases if a in sources), None)
        if src is None:
            dense[name] = "no GGUF tensor maps onto it by rows"
            continue
        info = gf.tensors[src.tensor]
        k, n = (int(d) for d in info.shape)
        if (n, k) != tuple(module.weight.shape):
            dense[name] = f"GGUF shape {info.shape} does not fit {tuple(module.weight.shape)}"
            continue
        w = make(src, info)
        if isinstance(w, str):
            dense[name] = w
            continue
        why = _mismatch(w, module.weight.detach())
        if why is not None:
            log.warning("kernel_ext: the %s of %s does not match the model (%s); it stays dense",
                        kind, name, why)
            label = f"repacked {src.tensor}" if kind == "int4 copy" else src.tensor
            dense[name] = f"{label} does not match the model's weight ({why})"
            continue
        weights[name] = w
        used[name] = src
    return QuantizedLinears(weights, dense, sources=used)


def _build(params: dict[str, tuple[torch.nn.Linear, tuple[str, ...]]],
           sources: dict[str, RowSource], gf: GGUFFile) -> QuantizedLinears:
    def repacked(src: RowSource, info: Any) -> qlinear.Int4Weight | str:
        k, n = (int(d) for d in info.shape)
        try:
            return qlinear.repack(_rows_of(gf, src.tensor, info.nbytes // n), info.ggml_type,
                                  (k, n), src.row_order)
        except qlinear.NotRepackable as e:
            return str(e)

    return _copies(params, sources, gf, repacked, "int4 copy")


def block_model(model: Any, gguf_path: str | Path, *, part: str = "body") -> QuantizedLinears:
    """``model``'s linear weights as the file's own blocks (:mod:`kernel_ext.gguf.blockdot`,
    nothing built or cached: the blocks are read through the file's map), ``part`` as in
    :func:`repack_model`. Each is checked against the model's dense weight like a repacked
    one; a type the block kernels do not take, or a mismatch, stays dense with the reason."""
    from ..gguf import blockdot

    if part not in ("body", "head"):
        raise ValueError(f"part must be 'body' or 'head', got {part!r}")
    t0 = time.perf_counter()
    head = model.get_output_embeddings()
    params = {k: v for k, v in _linear_params(model).items() if (v[0] is head) == (part == "head")}

    def blocks(src: RowSource, info: Any) -> blockdot.BlockWeight | str:
        if blockdot.row_bytes(info.ggml_type, int(info.shape[0])) == 0:
            return f"{info.type_name} has no block kernel"
        return blockdot.BlockWeight.from_file(gguf_path, info, src.row_order)

    with read_gguf(gguf_path) as gf:
        result = _copies(params, weight_sources(model, gf), gf, blocks, "blocks")
    result.seconds = time.perf_counter() - t0
    return result


# --- the LM head's screen -----------------------------------------------------------------------------
def head_screen(kind: str, weight: torch.Tensor, *, entry: Path | None = None) -> Screen:
    """The ``kind`` screen of the head ``weight``, from the cache entry when it holds one that
    fits this weight, else built (and stored there)."""
    n, k = (int(d) for d in weight.shape)
    path = _cache.decode_path(entry, f"screen-{kind}-v{_FORMAT}") if entry is not None else None
    cached = _load(path) if path is not None else None
    if cached is not None:
        tensors, meta = cached
        try:
            if (meta.get("rows"), meta.get("cols")) != (n, k):
                raise ValueError("another head")
            screen = screen_from_tensors(kind, tensors, n, k)
            if _norms_fit(screen, weight) and _mismatch(screen, weight) is None:
                return screen
        except (KeyError, ValueError):
            pass
        log.info("kernel_ext: the cached %s screen does not fit this head; rebuilding", kind)
    screen = build_screen(kind, weight)
    if path is not None:
        tensors = dict(screen.tensors)
        tensors["screen.w_norm"], tensors["screen.err_norm"] = screen.w_norm, screen.err_norm
        _save(path, tensors, {"rows": n, "cols": k, "kind": kind})
    return screen


def _norms_fit(screen: Screen, weight: torch.Tensor) -> bool:
    """The stored row norms bound this weight's rows (a sample of 64 rows, recomputed)."""
    rows = _probe_rows(int(weight.shape[0]), 64)
    norms = weight[rows].double().norm(dim=1)
    stored = screen.w_norm[rows].double()
    return bool(((norms <= stored) & (stored <= norms * (1 + 1e-5) + 1e-20)).all())
