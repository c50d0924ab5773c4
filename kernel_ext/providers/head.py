"""The LM head of the decode loop: a cheap int4/int8 *screen* whose greedy choice is certified.

For small-body, large-vocabulary models the head is most of the bytes read per token (Gemma 3
270M: a 262,144 x 640 head, 671 MB in float32, against a 400 MB body). Greedy decoding only
needs the *argmax* of the logits, so :class:`Head` reads a compressed copy of the head (the
screen), then computes exact float32 logits for the few rows that could still win, and
proves that no other row can:

* For hidden state ``h`` (float32) the screen gives ``a_r ~ x_r = h . W_r`` for every row.
  Its error is bounded row by row (Cauchy-Schwarz on each term, norms in float64, rounded up)::

      |a_r - x_r| <= |h - hb| |W_r| + |hb| |W_r - Q_r| + |hb| |Q_r| (u_k + g) + u_o |a_r|

  where ``hb`` is ``h`` rounded to the kernel's activation dtype (bf16), ``Q_r`` the screen's
  row as the kernel sees it, ``u_k = 2^-8`` covers a kernel that rounds the dequantised
  weights or products to bf16, ``u_o = 2^-8`` the bf16 output and ``g = 1.1 K 2^-24`` float32
  accumulation. ``|W_r|`` and ``|W_r - Q_r|`` are measured once per head (two float32
  vectors); ``|Q_r| <= |W_r| + |W_r - Q_r|``. One more ``g |h| |W_r|`` covers the float32
  rounding of the model's own head; a ``margin = 2 g |h| max_r |W_r|`` below covers the
  rounding of our exact rows against the model's (they may sum in another order).
* ``u_r = a_r + bound_r`` is an upper bound on what the model's head can compute for row
  ``r``. Take the screen's favourite row and its exact logit ``b``; every row with
  ``u_r >= b - margin`` is computed exactly (at most :data:`MAX_EXACT_SHARE` of the
  vocabulary, else the full head runs); every other row's logit is below ``b - margin``, so
  the argmax of the exact rows is the argmax of the full head. A near-tie among the exact rows
  (closer than ``2 margin``) or a non-finite value falls back to the full head, so that only
  its own rounding decides. With soft-capping the comparison is made after ``tanh``, with a
  few ulps of slack (saturation can make distinct logits equal).

The token is the one the full float32 head picks: greedy text is unchanged. Measured on the
demo model: the int4 screen's bound is ~11 logits (its real error ~0.4), yet the rows that
had to be computed exactly were at most ~3,700 of 262,144, and every token was certified.

Which screen (``int4`` through ``torch._weight_int4pack_mm_for_cpu``, ``int8`` through
``torch._weight_int8pack_mm``, per-row scale, or none) is chosen by timing them on this
machine at the current thread count (:func:`choose_screen`): on the project's CPU an fp16
screen was *slower* than float32 with two threads, while int4 read the head ~4x faster.
Only float32 CPU heads are screened; other heads run as they are.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..gguf import qlinear

__all__ = [
    "MAX_EXACT_SHARE",
    "SCREEN_KINDS",
    "Head",
    "Screen",
    "build_screen",
    "choose_screen",
]

SCREEN_KINDS: tuple[str, ...] = ("int4", "int8")
MAX_EXACT_SHARE = 1 / 32
"""Beyond this share of the vocabulary in exact rows, the full head is cheaper: fall back."""

log = logging.getLogger(__name__)

_U_BF16 = 2.0**-8  # twice bf16's unit roundoff: generous for rounding to nearest
_CHUNK = 8192
_PREFILTER_GAP = 2.0**-10
"""Rows whose bound is this far (relative) below the threshold are skipped without computing it."""


@dataclass
class Screen:
    """A compressed copy of a head, with the per-row norms its error bound needs."""

    kind: str  # "int4" | "int8"
    matmul: Callable[[torch.Tensor], torch.Tensor]  # (B, K) float32 -> (B, N) float32
    w_norm: torch.Tensor  # (N,) float32 >= |W_r|
    err_norm: torch.Tensor  # (N,) float32 >= |W_r - Q_r|
    tensors: dict[str, torch.Tensor]  # what the conversion cache stores

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _norms_up(x: torch.Tensor) -> torch.Tensor:
    """Row norms in float64, rounded up into float32."""
    return (x.double().norm(dim=1) * (1 + 1e-6) + 1e-30).float()


def build_screen(kind: str, weight: torch.Tensor) -> Screen:
    """The ``kind`` screen of a float ``(N, K)`` head, built a chunk of rows at a time."""
    n = int(weight.shape[0])
    w_norm = torch.empty(n)
    err_norm = torch.empty(n)

    def measure(dense: torch.Tensor, approx: torch.Tensor, r0: int) -> None:
        w_norm[r0 : r0 + dense.shape[0]] = _norms_up(dense)
        err_norm[r0 : r0 + dense.shape[0]] = _norms_up(dense.float() - approx)

    with torch.inference_mode():
        if kind == "int4":
            int4 = qlinear.requantize(weight, on_rows=measure)
            tensors = int4.tensors("screen")
            return Screen(kind, int4, w_norm, err_norm, tensors)
        if kind == "int8":
            q8 = torch.empty(weight.shape, dtype=torch.int8)
            scale = torch.empty(n, dtype=torch.bfloat16)
            for r0 in range(0, n, _CHUNK):
                dense = weight[r0 : r0 + _CHUNK].float()
                s = (dense.abs().amax(dim=1) / 127).to(torch.bfloat16)
                s = torch.where(s > 0, s, torch.ones_like(s))
                q = torch.round(dense / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
                q8[r0 : r0 + _CHUNK], scale[r0 : r0 + _CHUNK] = q, s
                measure(dense, q.float() * s.float()[:, None], r0)
            return Screen(kind, _int8_matmul(q8, scale), w_norm, err_norm,
                          {"screen.q8": q8, "screen.scale": scale})
    raise ValueError(f"screen kind must be one of {', '.join(SCREEN_KINDS)}, got {kind!r}")


# torch 2.13's CPU ``_weight_int8pack_mm`` crashes the process (SIGSEGV, measured here) when the
# inner dimension is not a multiple of 16: such heads are padded with zero columns (and the
# activations with zeros), which leaves every product unchanged.
_INT8_K_MULTIPLE = 16


def _int8_matmul(q8: torch.Tensor, scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    k = int(q8.shape[1])
    pad = -k % _INT8_K_MULTIPLE
    if pad:
        q8 = torch.nn.functional.pad(q8, (0, pad))
    # ... and its operands get aligned, contiguous storage: a tensor mapped from the conversion
    # cache can sit at any offset (an int8 screen read that way crashed a test run)
    if q8.data_ptr() % 64 or not q8.is_contiguous():
        q8 = q8.clone(memory_format=torch.contiguous_format)
    if scale.data_ptr() % 64 or not scale.is_contiguous():
        scale = scale.clone(memory_format=torch.contiguous_format)

    def matmul(h: torch.Tensor) -> torch.Tensor:
        h = h.to(torch.bfloat16)
        if pad:
            h = torch.nn.functional.pad(h, (0, pad))
        return torch._weight_int8pack_mm(h.contiguous(), q8, scale).float()

    return matmul


def screen_from_tensors(kind: str, tensors: dict[str, torch.Tensor], n: int, k: int) -> Screen:
    """A screen read back from the conversion cache (its norms included); raises
    ``KeyError``/``ValueError`` when the tensors do not fit."""
    w_norm, err_norm = tensors["screen.w_norm"], tensors["screen.err_norm"]
    if tuple(w_norm.shape) != (n,) or tuple(err_norm.shape) != (n,):
        raise ValueError("stored norms do not fit the head")
    # copies (2 x 1 MB on the demo model): a view would keep the whole mapped file alive, and
    # its pages resident beside the aligned copies the kernels read (measured: +102 MiB RSS)
    w_norm, err_norm = w_norm.clone(), err_norm.clone()
    if kind == "int4":
        int4 = qlinear.Int4Weight.from_tensors(tensors, "screen", 1, n, k, "int4")
        return Screen(kind, int4, w_norm, err_norm, int4.tensors("screen"))
    if kind == "int8":
        q8, scale = tensors["screen.q8"], tensors["screen.scale"]
        if tuple(q8.shape) != (n, k) or q8.dtype != torch.int8 or tuple(scale.shape) != (n,):
            raise ValueError("stored int8 screen does not fit the head")
        return Screen(kind, _int8_matmul(q8, scale), w_norm, err_norm,
                      {"screen.q8": q8, "screen.scale": scale})
    raise ValueError(f"unknown screen kind {kind!r}")


# --- choosing a screen by measurement ----------------------------------------------------------
_CHOICES: dict[str, str | None] = {}
_CAL_ROWS = 65536  # a slice larger than the last-level cache in every format


def _available(kind: str, k: int) -> bool:
    if kind == "int4":
        return qlinear.available() is None and k % qlinear.GROUP == 0
    return hasattr(torch, "_weight_int8pack_mm") and k % _INT8_K_MULTIPLE == 0


def _machine() -> str:
    """What the timings depend on: CPU model and vector extensions, torch, threads."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), name)
    except OSError:
        pass
    return (f"{name}|{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}"
            f"|{torch.get_num_threads()} threads")


def choose_screen(weight: torch.Tensor, kinds: tuple[str, ...] = SCREEN_KINDS, *,
                  record: Path | None = None) -> str | None:
    """The screen kind that reads this head fastest here, or None when none is clearly faster
    than the float32 head itself (it must take under 70 % of its time: the certification adds
    a few passes over the vocabulary).

    Timed on a slice of the real head (up to 65,536 rows) at the current torch thread count,
    best of three, with the caches flushed between runs. The choice is remembered per machine,
    torch, thread count and head width, in this process and in ``record`` (a JSON file, e.g. in
    the conversion cache), with the times it was based on; delete that file to measure again.
    A choice measured while the machine was busy can only cost speed, never exactness. "No
    screen" measured then (the 1-minute load average above half the CPU count) is used in this
    process but not recorded, so a busy first load does not turn the screen off for good; a
    screen chosen then is recorded (it is the usual winner on a CPU).
    """
    n, k = (int(d) for d in weight.shape)
    rows = min(n, _CAL_ROWS)
    key = f"{_machine()}|{rows}x{k}"
    if key in _CHOICES:
        return _CHOICES[key]
    known = _read_record(record)
    if key in known and (known[key].get("choice") in (None, *kinds)):
        _CHOICES[key] = known[key].get("choice")
        return _CHOICES[key]
    times = _time_screens(weight[:rows], [kind for kind in kinds if _available(kind, k)])
    base = times.pop("float32")
    best = min(times, key=times.__getitem__) if times else None
    choice = best if best is not None and times[best] < 0.7 * base else None
    _CHOICES[key] = choice
    if record is not None and (choice is not None or not _busy()):
        known[key] = {"choice": choice, "seconds": {"float32": base, **times}, "at": time.time()}
        try:
            from ..gguf.cache import write_json

            write_json(record, known)
        except OSError as e:
            log.info("kernel_ext: could not record the screen choice in %s: %s", record, e)
    return choice


def _busy() -> bool:
    """Whether other work competes for the CPUs now (timings taken now are not representative)."""
    try:
        return os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


def _read_record(record: Path | None) -> dict[str, Any]:
    if record is None:
        return {}
    try:
        known = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _time_screens(dense: torch.Tensor, kinds: list[str]) -> dict[str, float]:
    """Seconds per product (best of three) of the float32 slice and of each kind's screen."""
    k = int(dense.shape[1])
    with torch.inference_mode():
        h = torch.randn(1, k, generator=torch.Generator().manual_seed(0))
        flush = torch.zeros(16 << 20)  # 64 MB, more than a last-level cache

        def timed(fn: Callable[[], Any]) -> float:
            fn()
            best = math.inf
            for _ in range(3):
                flush.add_(1.0)
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            return best

        times = {"float32": timed(lambda: F.linear(h, dense))}
        for kind in kinds:
            screen = build_screen(kind, dense)
            times[kind] = timed(lambda s=screen: s.matmul(h))
            del screen
    return times


# --- the head ---------------------------------------------------------------------------------------
def _scans() -> Any:
    """The C scans of :mod:`kernel_ext.gguf.blockdot` (None: torch's, slower here: an argmax
    over 262,144 logits took ~360 us, a one-pass C scan ~60 us)."""
    if "lib" not in _SCANS:
        from ..gguf import blockdot

        _SCANS["lib"] = None if blockdot.unavailable() else blockdot.library()
    return _SCANS["lib"]


_SCANS: dict[str, Any] = {}


def _argmax_finite(a: torch.Tensor) -> int | None:
    """The first index of ``a``'s largest value (float32, contiguous, 1-D), or None when a
    value is not finite."""
    lib = _scans()
    if lib is None or not a.is_contiguous():
        lo, hi = torch.aminmax(a)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            return None
        return int(torch.argmax(a))
    lo_c, hi_c = ctypes.c_float(), ctypes.c_float()
    at = lib.bd_scan(a.data_ptr(), a.numel(), ctypes.byref(lo_c), ctypes.byref(hi_c))
    return None if at < 0 else int(at)


def _at_least(a: torch.Tensor, t: float) -> torch.Tensor:
    """The indexes (ascending, int64) of ``a``'s values ``>= t``."""
    lib = _scans()
    if lib is None or not a.is_contiguous():
        return torch.nonzero(a >= t).flatten()
    out = torch.empty(a.numel(), dtype=torch.int64)  # pages are touched only where written
    n = lib.bd_select_ge(a.data_ptr(), a.numel(), t, out.data_ptr(), a.numel())
    return out[:n]


def _bounded_rows(a: torch.Tensor, t: float, screen: Screen, c_w: float, c_e: float, thr: float
                  ) -> tuple[torch.Tensor, int, float]:
    """The rows ``r`` with ``a_r >= t`` whose bound ``a_r + u|a_r| + c_w |W_r| + c_e
    |W_r - Q_r|`` reaches ``thr`` (ascending), the number with ``a_r >= t``, and the largest
    bound of those under ``thr`` (-inf: none). In C where the block kernels run (one pass,
    bounds in double), else with torch (float32 bounds)."""
    lib = _scans()
    if lib is None or not (a.is_contiguous() and screen.w_norm.is_contiguous()
                           and screen.err_norm.is_contiguous()):
        cand = _at_least(a, t)
        ac = a[cand]
        upper = ac.abs().mul_(_U_BF16).add_(ac)
        upper.add_(screen.w_norm[cand], alpha=c_w).add_(screen.err_norm[cand], alpha=c_e)
        must = upper >= thr
        below = float(upper.masked_fill(must, -math.inf).max()) if cand.numel() else -math.inf
        return cand[must], int(cand.numel()), below
    n = a.numel()
    out = torch.empty(n, dtype=torch.int64)  # pages are touched only where written
    n_cand, below = ctypes.c_long(), ctypes.c_double()
    count = lib.bd_cert_rows(a.data_ptr(), n, t, screen.w_norm.data_ptr(),
                             screen.err_norm.data_ptr(), _U_BF16, c_w, c_e, thr, out.data_ptr(),
                             n, ctypes.byref(n_cand), ctypes.byref(below))
    return out[:count], int(n_cand.value), float(below.value)


class Head:
    """The model's LM head (a bias-free linear, optionally soft-capped), recomputed here.

    ``screen`` certifies greedy tokens (see the module docstring) against exact rows: the
    model's own, or ``rows(index)`` (float32 rows equal to them, e.g. dequantised from the
    file's blocks, which keeps the float32 head out of memory). ``fast()`` (built on first use)
    gives the head computed from the file's blocks for the logits of
    ``decode_mode='quantized'``, or None. Works on a batch of hidden states ``(B, K)``; each row
    is certified on its own.
    """

    def __init__(self, weight: torch.Tensor, softcap: float | None, screen: Screen | None = None,
                 *, fast: Callable[[], Callable[[torch.Tensor], torch.Tensor] | None] | None = None,
                 rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.weight = weight
        self.key = self.key_of(weight)
        self.softcap = softcap
        self.screen = screen
        self.fast = fast
        self.rows = rows
        n, k = weight.shape
        self.gamma = 1.1 * int(k) * 2.0**-24
        self.max_exact = max(64, int(int(n) * MAX_EXACT_SHARE))
        self.w_max = float(screen.w_norm.max()) if screen is not None and n else 0.0
        self.e_max = float(screen.err_norm.max()) if screen is not None and n else 0.0

    @staticmethod
    def key_of(weight: torch.Tensor) -> tuple[Any, ...]:
        """What must not change for the copies to stay valid: storage, dtype, shape, version."""
        return (weight.data_ptr(), weight.dtype, tuple(weight.shape), weight._version)

    @property
    def can_screen(self) -> bool:
        return self.screen is not None

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Exact logits (the model's own head): float32 ``(B, N)``."""
        return self.cap(F.linear(hidden, self.weight)).float()

    def fast_built(self) -> Any:
        """The file's head if it was built already (without building it), else None."""
        peek = getattr(self.fast, "built", None)
        return peek[0] if peek else None

    def sample_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """All logits from the file's head when there is one, else the exact ones."""
        fast = self.fast() if self.fast is not None else None
        if fast is None:
            return self.logits(hidden)
        return self.cap(fast(hidden.float()))

    def screened_argmax(self, hidden: torch.Tensor, *, settle_ties: bool = False) -> list[int | None]:
        """Per row of ``hidden``, the exact greedy token, or None where it cannot be certified.

        ``settle_ties``: a near-tie among the exact rows is decided by our exact logits (lowest
        id first) instead of returning None; for ``decode_mode='quantized'``, whose hidden
        states are approximate anyway, so that the float32 rows decide rather than the file's head.
        """
        assert self.screen is not None
        h32 = hidden.float()
        approx = self.screen.matmul(h32)
        return [self._certify(h32[i : i + 1], approx[i], settle_ties) for i in range(h32.shape[0])]

    def _certify(self, h: torch.Tensor, a: torch.Tensor, settle_ties: bool = False) -> int | None:
        screen = self.screen
        assert screen is not None
        hb = h.to(torch.bfloat16).float()
        h_norm, hb_norm = float(h.double().norm()), float(hb.double().norm())
        delta = float((h - hb).double().norm())
        g = self.gamma
        c_w = (delta + g * h_norm + hb_norm * (_U_BF16 + g)) * (1 + 1e-6)
        c_e = hb_norm * (1 + _U_BF16 + g) * (1 + 1e-6)
        best = _argmax_finite(a)
        if best is None:
            return None
        # every row that could reach the screen's favourite (less the rounding margin below)
        guess = torch.tensor([best])
        margin = 2 * g * h_norm * self.w_max
        thr = float(self._exact(h, guess)[0]) - margin
        if not math.isfinite(thr):
            return None
        # upper[r] >= what the model's own head computes for row r (see the module docstring).
        # It is at most f(a_r) + s_max with f(a) = a + u|a| increasing, so a row whose a_r is
        # below t = f^-1(thr - gap - s_max) stays under thr - gap: only the rows at or above t
        # (a few thousand of 262,144 on the demo model) need the bound, one pass picks them.
        s_max = c_w * self.w_max + c_e * self.e_max
        gap = _PREFILTER_GAP * (1 + abs(thr))
        y = thr - gap - s_max
        t = y / (1 + _U_BF16) if y >= 0 else y / (1 - _U_BF16)
        t -= 1e-6 * (1 + abs(t))  # the comparison's own rounding: keep more rows, never fewer
        # rows (ascending: argmax keeps the lowest id on ties), how many passed the prefilter,
        # and the largest bound among those that stayed under thr
        rows, n_cand, below = _bounded_rows(a, t, screen, c_w, c_e, thr)
        if not 0 < rows.numel() <= self.max_exact:
            return None
        raw = self._exact(h, rows)
        exact = self.cap(raw)
        top2 = torch.topk(exact, min(2, exact.numel()))
        i0 = int(torch.argmax(exact))  # the first of equal maxima: the lowest id
        b_raw = float(raw[i0])
        if not math.isfinite(b_raw):
            return None
        outside = -math.inf  # an upper bound on every row not computed exactly
        if n_cand < a.numel():
            outside = thr - gap
        if rows.numel() < n_cand:
            outside = max(outside, below)
        # the model's own value of the best row is at least b_raw - margin
        if self.softcap is None:
            if not b_raw - margin > outside:
                return None
            slack = 0.0
        else:  # tanh may saturate: require a strict gap after capping, a few ulps wide
            slack = 4 * 2.0**-24 * max(1.0, abs(float(exact[i0])))
            low = float(self.cap(torch.tensor(b_raw - margin)))
            if not low > float(self.cap(torch.tensor(outside))) + slack:
                return None
        if top2.values.numel() > 1 and not settle_ties:
            tie = 2 * margin + slack
            if float(top2.values[0] - top2.values[1]) <= tie:
                return None  # a near-tie: only the full head's own rounding may decide it
        return int(rows[i0])

    def _exact(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        dot = getattr(self.rows, "dot", None)
        if dot is not None:  # float32 products from the file's blocks, in C
            return dot(h, rows)  # type: ignore[no-any-return]
        w = self.rows(rows) if self.rows is not None else self.weight.index_select(0, rows)
        return F.linear(h, w)[0].float()
