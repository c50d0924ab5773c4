"""Products on the GGUF file's own quantised blocks, with 8-bit activations (``blockdot.c``).

torch's int4 CPU kernel (:mod:`kernel_ext.gguf.qlinear`) dequantises every weight to float
inside its loop and takes no type with a fifth bit or 16-value scales: a Q5_0 weight costs two
int4 parts, a Q6_K weight stays float32. llama.cpp instead quantises the activations to 8 bits
per block of 32 and multiplies them with the blocks as they are, in integers. ``blockdot.c``
does the same for ``Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K``:

* the weights are the file's blocks, read through the memory map (no copy, nothing to cache;
  a row permutation, e.g. llama's q/k, makes one permuted copy);
* activations are rounded to int8 with a float32 scale per block of 32 (llama.cpp's Q8_0
  keeps an fp16 scale), and the remainder again with a 256x finer scale: ~16 bits, at the cost
  of a second integer product per block (next-token logits of the demo model within 0.003 of
  the float32 model's, llama.cpp's single level: 0.99); each product is exact in int32 and
  scaled in float32;
* :func:`layer_spec` describes a whole decoder layer for one ``bd_layer_step`` call (the
  fused step of :mod:`kernel_ext.providers.fused`);
* rows are split across the threads torch uses, through the OpenMP runtime torch loaded.

The C file is compiled on first use on the machine that runs it (``$CC``, else ``cc``, with
``-O3 -march=native -fopenmp``) into ``native/`` of the user cache (``$KERNEL_EXT_CACHE``, else
``~/.cache/kernel_ext``; the ``cache_dir`` setting does not move it), named by a digest of the source,
the compiler's version and the CPU's model and flags: a copied home directory on another CPU
builds its own, and nothing built for one CPU runs on another. Without a compiler, or with
``KERNEL_EXT_BLOCKDOT=0``, :func:`unavailable` says why and the callers keep torch's int4 path.

``tests/test_blockdot.py`` checks every type against gguf-py's dequantisation.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..paths import user_cache_dir
from .dequant import type_name

__all__ = [
    "ACTIVATIONS", "SUPPORTED", "BlockGroup", "BlockWeight", "LayerSpec", "layer_spec", "library",
    "q8_roundtrip", "row_bytes", "unavailable",
]

_T = GGMLQuantizationType
SUPPORTED: frozenset[int] = frozenset(int(t) for t in (
    _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0, _T.Q4_K, _T.Q5_K, _T.Q6_K))
"""GGUF types the products compute from their blocks."""

_SOURCE = Path(__file__).with_name("blockdot.c")
_VERSION = 9  # bd_version() of the source
_lock = threading.Lock()
_state: dict[str, Any] = {}  # "lib" or "why"


def _cpu() -> str:
    """The CPU's model name and feature flags (what -march=native compiles for)."""
    text = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if not line.strip() and text:
                    break  # the first processor is enough
    except OSError:
        pass
    return text or platform.processor() or platform.machine()


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC") or "cc"
    path = shutil.which(cc.split()[0]) if cc else None
    return [path, *cc.split()[1:]] if path else None


def _build(cc: list[str], target: Path, arch: tuple[str, ...] = ("-march=native",)) -> None:
    """Compile ``blockdot.c`` into ``target`` (``arch``: the target CPU's flags; the tests also
    build the portable version, for a CPU without AVX2)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [*cc, "-O3", *arch, "-fopenmp", "-fPIC", "-shared", "-std=c11",
               "-o", str(out), str(_SOURCE), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise OSError(f"{' '.join(cmd[:1])} failed: " + " / ".join(tail))
        os.replace(out, target)  # atomic: a concurrent build of the same name is identical


def library() -> ctypes.CDLL:
    """The compiled kernels (built on first use); raises OSError with the reason if they
    cannot be built or loaded (see :func:`unavailable`)."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[no-any-return]
        if "why" in _state:
            raise OSError(_state["why"])
        try:
            lib = _load()
        except (OSError, subprocess.SubprocessError) as e:
            _state["why"] = str(e) or type(e).__name__
            raise OSError(_state["why"]) from e
        _state["lib"] = lib
        return lib


def _load() -> ctypes.CDLL:
    if platform.system() != "Linux":
        raise OSError(f"the block kernels are built on Linux only, not {platform.system()}")
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler (set CC, or install gcc)")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60,
                             check=False).stdout
    key = hashlib.sha256(_SOURCE.read_bytes() + version.encode() + _cpu().encode()).hexdigest()[:16]
    target = user_cache_dir() / "native" / f"blockdot-{key}.so"
    if not target.exists():
        _build(cc, target)
    return _declare(ctypes.CDLL(str(target)), target)


def _declare(lib: ctypes.CDLL, target: Path) -> ctypes.CDLL:
    """``lib``'s functions with their C signatures (ctypes checks nothing otherwise)."""
    if lib.bd_version() != _VERSION:
        raise OSError(f"{target} is version {lib.bd_version()}, expected {_VERSION}")
    lib.bd_row_bytes.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.bd_row_bytes.restype = ctypes.c_long
    lib.bd_matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_int,
                              ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_long, ctypes.c_int]
    lib.bd_matmul.restype = ctypes.c_int
    p, i, f, lng = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
    lib.bd_matmul_n.argtypes = [i, p, p, p, p, i, p, i, p, p, i, p, f]
    lib.bd_matmul_n.restype = i
    lib.bd_add_norm.argtypes = [p, p, p, i, f]
    lib.bd_add_norm.restype = None
    lib.bd_norm_rope.argtypes = [p, i, i, p, f, p, p]
    lib.bd_norm_rope.restype = None
    lib.bd_attend.argtypes = [p, i, i, i, p, p, lng, p, p, i, i, i, i, f, p]
    lib.bd_attend.restype = None
    lib.bd_scan.argtypes = [p, lng, p, p]
    lib.bd_scan.restype = lng
    lib.bd_select_ge.argtypes = [p, lng, f, p, lng]
    lib.bd_select_ge.restype = lng
    d = ctypes.c_double
    lib.bd_cert_rows.argtypes = [p, lng, f, p, p, d, d, d, d, p, lng, p, p]
    lib.bd_cert_rows.restype = lng
    lib.bd_gated.argtypes = [p, p, i, i, p]
    lib.bd_gated.restype = None
    lib.bd_layer_step.argtypes = [p, p, p, p, p, p, lng, i, i, i, i, i]
    lib.bd_layer_step.restype = i
    lib.bd_layer_size.restype = lng
    if lib.bd_layer_size() != ctypes.sizeof(LayerSpec):
        raise OSError(f"{target}: its layer record has {lib.bd_layer_size()} bytes, "
                      f"ours {ctypes.sizeof(LayerSpec)}")
    lib.bd_rows_dequant.argtypes = [i, p, lng, i, p, lng, p]
    lib.bd_rows_dequant.restype = None
    lib.bd_rows_dot.argtypes = [i, p, lng, i, p, lng, p, p]
    lib.bd_rows_dot.restype = None
    lib.bd_q8_roundtrip.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.bd_q8_roundtrip.restype = None
    return lib


def unavailable() -> str | None:
    """None when the block kernels run here, else why not (``KERNEL_EXT_BLOCKDOT=0`` is read
    at every call, so it also switches them off for models prepared later)."""
    if os.environ.get("KERNEL_EXT_BLOCKDOT", "1") == "0":
        return "switched off by KERNEL_EXT_BLOCKDOT=0"
    try:
        library()
    except OSError as e:
        return str(e)
    return None


def row_bytes(ggml_type: int, in_features: int) -> int:
    """Bytes of one row of ``in_features`` values (0: a type or length the kernels do not take)."""
    if int(ggml_type) not in SUPPORTED:
        return 0
    return int(library().bd_row_bytes(int(ggml_type), int(in_features)))


def q8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32, ``(K,)``) as the products see it: each block of 32 rounded to int8 with
    its scale, back in float32 (exactly the values multiplied)."""
    x = x.detach().float().contiguous().reshape(-1)
    out = torch.empty_like(x)
    library().bd_q8_roundtrip(x.data_ptr(), int(x.numel()), out.data_ptr())
    return out


@dataclass
class BlockWeight:
    """A linear layer's weight as ``out_features`` rows of GGUF blocks: ``w(x) = x @ W.T``.

    ``blocks``: uint8 ``(out_features, row_bytes)``, the file's rows (a view of the memory map,
    or a permuted copy). ``source``: the GGUF type's name. Keeps the map it reads alive."""

    blocks: torch.Tensor
    ggml_type: int
    out_features: int
    in_features: int
    source: str
    keep: Any = None  # the memory map behind ``blocks``

    def __post_init__(self) -> None:
        self._lib = library()
        rb = self._lib.bd_row_bytes(int(self.ggml_type), int(self.in_features))
        if rb == 0 or tuple(self.blocks.shape) != (self.out_features, rb) or \
                self.blocks.dtype != torch.uint8 or not self.blocks.is_contiguous():
            raise ValueError(f"{self.source} blocks of shape {tuple(self.blocks.shape)} do not "
                             f"hold {self.out_features} rows of {self.in_features} values")

    @property
    def nbytes(self) -> int:
        return int(self.blocks.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape ``(..., in_features)``, in ``x``'s dtype."""
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features)
        if xf.dtype != torch.float32 or not xf.is_contiguous():
            xf = xf.float().contiguous()
        m = int(xf.shape[0])
        y = torch.empty(m, self.out_features)
        if m:
            rc = self._lib.bd_matmul(int(self.ggml_type), self.blocks.data_ptr(),
                                     int(self.blocks.shape[1]), self.out_features,
                                     self.in_features, xf.data_ptr(), m, y.data_ptr(),
                                     self.out_features, torch.get_num_threads())
            if rc != 0:
                raise ValueError(f"the block kernel refused {self.source} x {self.in_features}")
        y = y.reshape(*lead, self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the weight in float32, as the blocks define them."""
        index = index.to(torch.int64).contiguous()
        out = torch.empty(int(index.numel()), self.in_features)
        self._lib.bd_rows_dequant(int(self.ggml_type), self.blocks.data_ptr(),
                                  int(self.blocks.shape[1]), self.in_features, index.data_ptr(),
                                  int(index.numel()), out.data_ptr())
        return out

    def rows_dot(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``h . W[r]`` for each row ``r`` of ``index``, in float32 (``h``: ``in_features``
        float32 values; each row dequantised as :meth:`rows` gives it)."""
        index = index.to(torch.int64).contiguous()
        h = h.float().contiguous().reshape(-1)
        out = torch.empty(int(index.numel()))
        self._lib.bd_rows_dot(int(self.ggml_type), self.blocks.data_ptr(),
                              int(self.blocks.shape[1]), self.in_features, index.data_ptr(),
                              int(index.numel()), h.data_ptr(), out.data_ptr())
        return out

    @classmethod
    def from_file(cls, path: str | Path, info: Any, row_order: torch.Tensor | None = None
                  ) -> BlockWeight:
        """The GGUF tensor ``info`` (a :class:`~kernel_ext.gguf.reader.TensorInfo` of GGUF shape
        ``(K, N)``) of the file at ``path``, its rows reordered by ``row_order`` (row ``i`` is
        the file's row ``row_order[i]``; a copy) or mapped as they are."""
        k, n = (int(d) for d in info.shape)
        rb = row_bytes(info.ggml_type, k)
        if rb == 0:
            raise ValueError(f"{type_name(info.ggml_type)} rows of {k} values have no block kernel")
        if rb * n != int(info.nbytes):
            raise ValueError(f"{info.name}: {info.nbytes} bytes are not {n} rows of {rb}")
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=int(info.offset), shape=(n, rb))
        with warnings.catch_warnings():  # a read-only map: the kernels only read it
            warnings.simplefilter("ignore", UserWarning)
            blocks = torch.from_numpy(mm)
        keep: Any = mm
        if row_order is not None:
            blocks, keep = blocks[row_order].contiguous(), None
        return cls(blocks, int(info.ggml_type), n, k, type_name(info.ggml_type), keep)


_MAXW = 8  # weights per product (MAXW in blockdot.c)
ACTIVATIONS = {"GELUTanh": 1, "PytorchGELUTanh": 1, "NewGELUActivation": 1,
               "SiLUActivation": 2, "SiLU": 2}
"""The MLP activations :func:`layer_spec` computes in C (``bd_gated``), by module class name:
gelu with the tanh approximation, and SiLU (both through a rational tanh, a few ulp)."""


class LayerSpec(ctypes.Structure):
    """``bd_layer`` of ``blockdot.c``: everything one decoder layer's step reads."""

    _fields_ = [
        ("n", ctypes.c_int * 4),
        ("types", (ctypes.c_int * _MAXW) * 4),
        ("W", (ctypes.c_void_p * _MAXW) * 4),
        ("row_bytes", (ctypes.c_long * _MAXW) * 4),
        ("N", (ctypes.c_int * _MAXW) * 4),
        ("K", ctypes.c_int * 4),
        ("out", ctypes.c_void_p * 4),
        ("qkv_bias", ctypes.c_void_p),
        ("in_norm", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("post_attn_norm", ctypes.c_void_p),
        ("ff_norm", ctypes.c_void_p),
        ("post_ff_norm", ctypes.c_void_p),
        ("attn", ctypes.c_void_p),
        ("gated", ctypes.c_void_p),
        ("heads", ctypes.c_int),
        ("kv_heads", ctypes.c_int),
        ("D", ctypes.c_int),
        ("q_dim", ctypes.c_int),
        ("kv_dim", ctypes.c_int),
        ("ff", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("act", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("scaling", ctypes.c_float),
    ]


def layer_spec(groups: list[BlockGroup], norms: dict[str, torch.Tensor | None],
               qkv_bias: torch.Tensor | None, *, heads: int, kv_heads: int, head_dim: int,
               act: int, eps: float, scaling: float) -> tuple[LayerSpec, tuple[Any, ...]]:
    """The record of one layer (``groups``: q|k|v, o, gate|up, down) and what it points into
    (keep it alive as long as the record)."""
    spec = LayerSpec()
    for g, group in enumerate(groups):
        spec.n[g] = len(group.weights)
        spec.K[g] = group.in_features
        spec.out[g] = group.out.data_ptr()
        for i, w in enumerate(group.weights):
            spec.types[g][i] = int(w.ggml_type)
            spec.W[g][i] = w.blocks.data_ptr()
            spec.row_bytes[g][i] = int(w.blocks.shape[1])
            spec.N[g][i] = w.out_features
    for name in ("in_norm", "q_norm", "k_norm", "post_attn_norm", "ff_norm", "post_ff_norm"):
        t = norms.get(name)
        setattr(spec, name, None if t is None else t.data_ptr())
    spec.qkv_bias = None if qkv_bias is None else qkv_bias.data_ptr()
    q_dim = heads * head_dim
    ff = groups[2].weights[0].out_features
    attn, gated = torch.empty(1, q_dim), torch.empty(1, ff)
    spec.attn, spec.gated = attn.data_ptr(), gated.data_ptr()
    spec.heads, spec.kv_heads, spec.D = heads, kv_heads, head_dim
    spec.q_dim, spec.kv_dim = q_dim, kv_heads * head_dim
    spec.ff, spec.hidden = ff, groups[1].weights[0].out_features
    spec.act, spec.eps, spec.scaling = act, eps, scaling
    return spec, (groups, norms, qkv_bias, attn, gated)


class BlockGroup:
    """Block weights that read one input, computed by one kernel call into one preallocated
    float32 row ``out`` (``(1, sum of out_features)``, the weights side by side): the
    single-token step of :mod:`kernel_ext.providers.fused` in ``decode_mode='quantized'``.
    The output buffer is reused by every call; read it before the next."""

    def __init__(self, weights: list[BlockWeight]) -> None:
        k = weights[0].in_features
        if any(w.in_features != k for w in weights):
            raise ValueError("a group's weights must read inputs of one length")
        self.lib = library()
        self.weights = weights  # keeps the blocks alive
        self.in_features = k
        n = len(weights)
        total = sum(w.out_features for w in weights)
        self.out = torch.empty(1, total)
        at, ptrs = 0, []
        for w in weights:
            ptrs.append(self.out.data_ptr() + 4 * at)
            at += w.out_features
        arrays = (
            (ctypes.c_int * n)(*[int(w.ggml_type) for w in weights]),
            (ctypes.c_void_p * n)(*[w.blocks.data_ptr() for w in weights]),
            (ctypes.c_long * n)(*[int(w.blocks.shape[1]) for w in weights]),
            (ctypes.c_int * n)(*[w.out_features for w in weights]),
            (ctypes.c_void_p * n)(*ptrs),
            (ctypes.c_long * n)(*[total] * n),
        )
        self._arrays = arrays  # alive as long as the group
        self._args = (n, *(ctypes.addressof(a) for a in arrays[:4]))
        self._y = (ctypes.addressof(arrays[4]), ctypes.addressof(arrays[5]))

    def __call__(self, x: torch.Tensor, threads: int, norm: torch.Tensor | None = None,
                 eps: float = 0.0) -> torch.Tensor:
        """``out`` for one float32 contiguous row ``x``, after an RMS norm with weight ``norm``
        (float32, contiguous) when given."""
        rc = self.lib.bd_matmul_n(*self._args, self.in_features, x.data_ptr(), 1, *self._y,
                                  threads, None if norm is None else norm.data_ptr(), eps)
        if rc != 0:
            raise ValueError("the block kernel refused a group")
        return self.out
