"""A fused single-token decode step for the common decoder families (CPU, float32 models).

Transformers' forward for one new token costs far more in Python than in arithmetic on a small
model: per layer it calls a dozen modules, builds masks, recomputes the rotary angles and grows
a ``DynamicCache`` by concatenation. On the demo model (Gemma 3 270M, 18 layers) that overhead
was ~14 ms of a ~25 ms token. :class:`FusedDecoder` computes the same layer with plain torch
ops and the fewest calls:

* a **static KV cache** (:class:`FusedState`), preallocated for the prompt and the tokens to
  come and filled from the cache the model's own forward built while prefilling. Full-attention
  layers keep every position; a sliding-window layer keeps a *doubled ring* of ``2 W`` slots
  (each key is written at ``p mod W`` and ``p mod W + W``), so its window is always one
  contiguous slice in chronological order: no mask, no copy, and the keys sum in the order the
  model's own attention sums them;
* **fused projections** in ``decode_mode='quantized'``: the int4 weights that read the same
  input (q, k and v; gate and up) are concatenated along their output rows once, so one kernel
  call computes them (:func:`fuse_int4`, checked to give exactly what the separate calls give);
* **rotary from a table** computed once by the model's own rotary module for every position
  (local and global bases of Gemma 3 each), applied with one ``roll`` (``rotate_half`` is
  ``roll(x, D/2)`` with the first half's sine negated);
* norms with the model's own formula (Gemma's ``(1 + w)`` weights folded in once);
* in ``decode_mode='quantized'`` with every projection on the file's blocks
  (:mod:`kernel_ext.gguf.blockdot`), a layer is about ten C calls
  (:meth:`FusedDecoder._step_blocks`): the input and feed-forward norms folded into the
  products' input, q/k norms and rotary in place, the KV write with the attention, the
  post-norms with the residual adds. Its hidden states equal the unfused quantized path's to
  float32 rounding (``tests/test_fused.py``).

Supported: ``llama``, ``mistral``, ``qwen2`` (q/k/v biases), ``qwen3`` (q/k norms) and
``gemma3_text`` (q/k norms, four norms per layer, embedding scale, local/global rope, sliding
window, gelu-tanh), float32 weights on CPU, rotary types whose angles do not depend on the
sequence length. :func:`unsupported` says why anything else runs the model's own forward.

With dense weights the step computes what the model computes, op for op (the same matmuls,
norms, rotary values, and SDPA over the same keys in the same order, on the same kernel path:
the masked one with packed query heads once a window is full, as Transformers calls it): its
hidden states are *bitwise* the model's own. ``tests/test_fused.py`` checks that with
``torch.equal`` past sliding windows on tiny llama, qwen2, qwen3, gemma3, mistral and windowed
qwen2 models and on the demo model; it relies on Transformers 5's SDPA dispatch (checked
against 5.24), so a change there shows as a failing test, not as changed text. Models that
attend with another implementation (eager, flash) are refused by :func:`unsupported`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..gguf import qlinear

__all__ = ["FUSED_FAMILIES", "FusedDecoder", "FusedState", "fuse_int4", "unsupported"]

FUSED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text"})
"""``config.model_type`` values the fused step computes (see the module docstring)."""

_GEMMA = frozenset({"gemma3_text"})
_ROPE_OK = frozenset({"default", "linear", "llama3", "yarn"})  # angles fixed per position

# --- projections ---------------------------------------------------------------------------------
class _Int4Group:
    """Int4 weights that read one input, fused along their output rows: one kernel call."""

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, repeat: int, in_features: int,
                 spans: list[tuple[int, int]]) -> None:
        self.packed, self.sz, self.repeat = packed, sz, repeat
        self.in_features = in_features
        self.rows = int(packed.shape[0])
        self.spans = spans  # (start, stop) of each weight's columns in the output

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        """``xb``: bf16 ``(1, in_features * repeat)`` -> float32 ``(1, rows)``."""
        return torch._weight_int4pack_mm_for_cpu(xb, self.packed, qlinear.GROUP, self.sz).float()


def fuse_int4(weights: Sequence[qlinear.Int4Weight]) -> _Int4Group | None:
    """One kernel for ``weights`` (same inputs, same number of parts), or None when they do not
    fuse (different shapes of input, or the packed layout does not concatenate: checked by
    comparing with the separate calls on a probe, which must be *equal*)."""
    first = weights[0]
    if any(w.repeat != first.repeat or w.in_features != first.in_features or len(w.parts) != 1
           for w in weights):
        return None
    spans, at = [], 0
    for w in weights:
        spans.append((at, at + w.out_features))
        at += int(w.parts[0].packed.shape[0])  # rows padded to the packing's multiple
    group = _Int4Group(
        torch.cat([w.parts[0].packed for w in weights]).contiguous(),
        torch.cat([w.parts[0].scales_zeros for w in weights], dim=1).contiguous(),
        first.repeat, first.in_features, spans)
    probe = torch.randn(1, first.in_features, generator=torch.Generator().manual_seed(0))
    got = group(_rep(probe.to(torch.bfloat16), first.repeat))
    for w, (a, b) in zip(weights, spans):
        if not torch.equal(got[:, a:b], w(probe)):
            return None
    return group


def _rep(xb: torch.Tensor, repeat: int) -> torch.Tensor:
    return xb if repeat == 1 else torch.cat([xb] * repeat, dim=1)


class _Projection:
    """Linear layers reading one input (q/k/v, gate/up, or one layer alone): their outputs,
    float32, in order.

    Int4 weights with the same input layout run as one fused kernel (:func:`fuse_int4`); the
    others (dense layers, e.g. Q6_K in a Q4_K_M file) as ``F.linear``. Biases are added after."""

    def __init__(self, modules: Sequence[torch.nn.Linear], int4: dict[Any, Any],
                 groups: dict[tuple[int, ...], Any] | None) -> None:
        # each call: (fn(x, inputs by repeat) -> y, [(output index, start, stop or -1: all)])
        self.calls: list[tuple[Callable[[torch.Tensor, dict[int, torch.Tensor]], torch.Tensor],
                               list[tuple[int, int, int]]]] = []
        self.bias = [m.bias for m in modules]
        self.has_bias = any(b is not None for b in self.bias)
        self.n = len(modules)
        pending: dict[int, list[int]] = {}  # repeat -> indexes of int4 weights
        for i, m in enumerate(modules):
            w = int4.get(m)
            if w is None:
                weight = m.weight
                self.calls.append((lambda x, xb, weight=weight: F.linear(x, weight), [(i, 0, -1)]))
            elif not isinstance(w, qlinear.Int4Weight):  # another kind of copy (file blocks)
                self.calls.append((lambda x, xb, w=w: w(x), [(i, 0, -1)]))
            else:
                pending.setdefault(w.repeat, []).append(i)
        for repeat, idx in pending.items():
            ws = [int4[modules[i]] for i in idx]
            group = None
            if len(ws) == 1 and len(ws[0].parts) == 1:  # the weight's own tensors, no copy
                w = ws[0]
                group = _Int4Group(w.parts[0].packed, w.parts[0].scales_zeros, w.repeat,
                                   w.in_features, [(0, w.out_features)])
            elif groups is not None:
                key = tuple(id(w) for w in ws)
                if key not in groups:
                    groups[key] = fuse_int4(ws)
                group = groups[key]
            if group is not None:
                spans = [(i, a, -1 if (a, b) == (0, group.rows) else b)
                         for i, (a, b) in zip(idx, group.spans)]
                self.calls.append((lambda x, xb, g=group, r=repeat: g(xb[r]), spans))
            else:
                for i, w in zip(idx, ws):
                    self.calls.append((lambda x, xb, w=w: w(x), [(i, 0, -1)]))
        self.repeats = tuple(sorted(pending))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        xb: dict[int, torch.Tensor] = {}
        if self.repeats:
            b = x.to(torch.bfloat16)
            xb = {r: _rep(b, r) for r in self.repeats}
        out: list[Any] = [None] * self.n
        for call, spans in self.calls:
            y = call(x, xb)
            for i, a, b in spans:
                out[i] = y if b < 0 else y[:, a:b]
        if self.has_bias:
            for i, bias in enumerate(self.bias):
                if bias is not None:
                    out[i] = out[i] + bias
        return out


# --- norms ---------------------------------------------------------------------------------------
def _norm_weight(module: Any, gemma: bool) -> tuple[torch.Tensor, float]:
    """An RMSNorm's weight as ``F.rms_norm`` takes it, and its epsilon: Gemma's ``1 + w`` (its
    norm computes ``(x * rsqrt(mean(x^2) + eps)) * (1 + w)``), Llama's ``w``."""
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
    return (1.0 + module.weight.float() if gemma else module.weight), eps


# --- the plan ------------------------------------------------------------------------------------
@dataclass
class _Layer:
    qkv: _Projection
    q_dim: int
    kv_dim: int
    o: _Projection
    q_norm: torch.Tensor | None  # RMSNorm weights (see _norm_weight)
    k_norm: torch.Tensor | None
    in_norm: torch.Tensor
    post_attn_norm: torch.Tensor | None  # Gemma: on the attention's output
    ff_norm: torch.Tensor
    post_ff_norm: torch.Tensor | None  # Gemma: on the MLP's output
    gate_up: _Projection
    act: Callable[[torch.Tensor], torch.Tensor]
    down: _Projection
    scaling: float
    window: int | None  # sliding window (keys attended, the new one included), None: full
    rope: str  # key into the rotary tables


def unsupported(model: Any) -> str | None:
    """Why the fused step cannot compute ``model`` (None: it can)."""
    config = model.config
    family = getattr(config, "model_type", None)
    if family not in FUSED_FAMILIES:
        return f"the fused step does not know the {family!r} architecture"
    try:
        p = next(iter(model.parameters()))
    except StopIteration:
        return "the model has no weights"
    if p.device.type != "cpu":
        return f"it runs on CPU and the model is on {p.device.type}"
    if any(t.dtype != torch.float32 for t in model.parameters()):
        return "it computes float32 models"
    if any("forward" in vars(m) for m in model.modules() if not isinstance(m, torch.nn.Linear)):
        return "modules of this model are hooked (offloading)"
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl != "sdpa":
        return f"the model attends with {impl!r}; the fused step computes what SDPA computes"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping is not implemented"
    for params in _rope_parameters(config).values():
        kind = (params or {}).get("rope_type", "default")
        if kind not in _ROPE_OK:
            return f"rope type {kind!r} depends on the sequence length"
    base = model.base_model
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, name):
            return f"the base model has no {name}"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        mods = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mods += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) is not torch.nn.Linear or "forward" in vars(m) for m in mods):
            return "a layer's projections are not plain linear layers"
        if not hasattr(attn, "scaling") or not hasattr(mlp, "act_fn"):
            return "a layer's attention or MLP has another shape"
    return None


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in params or "rope_theta" in params:
        return {"": params}
    return dict(params)


class FusedDecoder:
    """The plan of one model's fused step (weights by reference; see the module docstring).

    ``int4``: ``nn.Linear`` -> :class:`~kernel_ext.gguf.qlinear.Int4Weight` of
    ``decode_mode='quantized'`` (empty: the model's own dense weights). ``groups`` keeps the
    fused int4 copies between calls (keyed by the weights fused; None: no fusing). Cheap to
    build apart from those copies: one per decode call reads the model's current weights.
    """

    def __init__(self, model: Any, int4: dict[Any, Any],
                 groups: dict[tuple[int, ...], Any] | None = None) -> None:
        config = model.config
        base = model.base_model
        gemma = config.model_type in _GEMMA
        self.model = model
        self.embed = base.embed_tokens
        self.final_norm, self.eps = _norm_weight(base.norm, gemma)
        self.layers: list[_Layer] = []
        types = getattr(config, "layer_types", None)
        for i, layer in enumerate(base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            kind = types[i] if types else "full_attention"
            window = None
            if kind == "sliding_attention" or (types is None and config.model_type == "mistral"):
                window = getattr(config, "sliding_window", None)
            q_norm = getattr(attn, "q_norm", None)
            k_norm = getattr(attn, "k_norm", None)
            self.layers.append(_Layer(
                qkv=_Projection([attn.q_proj, attn.k_proj, attn.v_proj], int4, groups),
                q_dim=attn.q_proj.out_features, kv_dim=attn.k_proj.out_features,
                o=_Projection([attn.o_proj], int4, None),
                q_norm=_norm_weight(q_norm, gemma)[0] if q_norm is not None else None,
                k_norm=_norm_weight(k_norm, gemma)[0] if k_norm is not None else None,
                in_norm=_norm_weight(layer.input_layernorm, gemma)[0],
                post_attn_norm=(_norm_weight(layer.post_attention_layernorm, gemma)[0]
                                if gemma else None),
                ff_norm=_norm_weight(layer.pre_feedforward_layernorm if gemma
                                     else layer.post_attention_layernorm, gemma)[0],
                post_ff_norm=(_norm_weight(layer.post_feedforward_layernorm, gemma)[0]
                              if gemma else None),
                gate_up=_Projection([mlp.gate_proj, mlp.up_proj], int4, groups),
                act=mlp.act_fn, down=_Projection([mlp.down_proj], int4, None),
                scaling=float(attn.scaling), window=int(window) if window else None,
                rope=kind if types and kind in _rope_types(base) else "",
            ))
        first = base.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.kv_heads = first.k_proj.out_features // self.head_dim
        self.heads = first.q_proj.out_features // self.head_dim
        self.blocks = _block_layers(base, int4) if int4 else None

    def start(self, cache: Any, position: int, capacity: int) -> FusedState:
        """A static cache for positions ``< capacity``, filled from ``cache`` (the model's own
        ``DynamicCache`` after prefilling ``position`` tokens)."""
        return FusedState(self, cache, position, capacity)

    def step(self, state: FusedState, ids: torch.Tensor) -> torch.Tensor:
        """The final hidden state ``(1, hidden)`` after feeding one token ``ids`` ``(1, 1)``."""
        p = state.position
        if p >= state.capacity:
            state.grow(max(2 * state.capacity, p + 1))
        if self.blocks is not None:
            return self._step_blocks(state, ids, p)
        h = self.embed(ids)[0]  # (1, hidden)
        d, hd, eps = self.head_dim, self.head_dim // 2, self.eps
        heads, kv_heads = self.heads, self.kv_heads
        hidden, qd = (h.shape[-1],), (d,)
        for li, layer in enumerate(self.layers):
            cos, sin = state.rope[layer.rope]
            c, s = cos[p], sin[p]
            q, k, v = layer.qkv(F.rms_norm(h, hidden, layer.in_norm, eps))
            q = q.view(heads, d)
            k = k.view(kv_heads, d)
            if layer.q_norm is not None:
                q = F.rms_norm(q, qd, layer.q_norm, eps)
            if layer.k_norm is not None:
                k = F.rms_norm(k, qd, layer.k_norm, eps)
            q = q * c + torch.roll(q, hd, -1) * s
            k = k * c + torch.roll(k, hd, -1) * s
            keys, values, lo, hi = state.write(li, p, k, v.view(kv_heads, d))
            masked = layer.window is not None and p >= layer.window - 1
            if masked or (d > 256 and heads != kv_heads):
                # a full window: Transformers passes its sliding mask, and SDPA then runs its
                # masked kernel on the query heads packed per key/value head (as it does for
                # head sizes over 256); so do we, and the sums round as the model's do
                a = F.scaled_dot_product_attention(
                    q.view(1, kv_heads, heads // kv_heads, d), keys[:, :, lo:hi],
                    values[:, :, lo:hi], attn_mask=state.mask(hi - lo) if masked else None,
                    scale=layer.scaling)
            else:
                a = F.scaled_dot_product_attention(
                    q.view(1, heads, 1, d), keys[:, :, lo:hi], values[:, :, lo:hi],
                    scale=layer.scaling, enable_gqa=heads != kv_heads)
            (a,) = layer.o(a.reshape(1, heads * d))
            if layer.post_attn_norm is not None:
                a = F.rms_norm(a, hidden, layer.post_attn_norm, eps)
            h = h + a
            g, u = layer.gate_up(F.rms_norm(h, hidden, layer.ff_norm, eps))
            (m,) = layer.down(layer.act(g) * u)
            if layer.post_ff_norm is not None:
                m = F.rms_norm(m, hidden, layer.post_ff_norm, eps)
            h = h + m
        state.position = p + 1
        return F.rms_norm(h, hidden, self.final_norm, eps)


    def _step_blocks(self, state: FusedState, ids: torch.Tensor, p: int) -> torch.Tensor:
        """:meth:`step` with every projection on the file's blocks (``blockdot``): the norms,
        rotary, attention and residual adds of a layer run in C beside the products, about ten
        calls a layer instead of about forty torch operations."""
        assert self.blocks is not None
        lib = self.blocks[0].qkv.lib
        threads = torch.get_num_threads()
        h = self.embed(ids)[0].float().contiguous()  # (1, hidden), updated in place
        hp, hidden, eps = h.data_ptr(), int(h.shape[-1]), self.eps
        d, heads, kv_heads = self.head_dim, self.heads, self.kv_heads
        for li, (layer, blk) in enumerate(zip(self.layers, self.blocks)):
            cos, sin = state.rope[layer.rope]
            cp, sp = cos.data_ptr() + 4 * p * d, sin.data_ptr() + 4 * p * d
            keys, values = state.keys[li], state.values[li]
            at, at2 = state.slots(li, p)
            lo, hi = state._range(li, p)
            if blk.spec is not None:  # the whole layer in one call
                rc = lib.bd_layer_step(blk.spec_ref, hp, cp, sp, keys.data_ptr(), values.data_ptr(),
                                       int(keys.shape[2]), at, at2, lo, hi, threads)
                if rc != 0:
                    raise RuntimeError(f"the block kernels refused layer {li} ({rc})")
                continue
            qkv = blk.qkv(h, threads, layer.in_norm, eps)
            if blk.qkv_bias is not None:
                qkv.add_(blk.qkv_bias)
            qp = qkv.data_ptr()
            lib.bd_norm_rope(qp, heads, d, blk.q_norm, eps, cp, sp)
            lib.bd_norm_rope(qp + 4 * layer.q_dim, kv_heads, d, blk.k_norm, eps, cp, sp)
            lib.bd_attend(qp, heads, kv_heads, d, keys.data_ptr(), values.data_ptr(),
                          int(keys.shape[2]), qp + 4 * layer.q_dim, qp + 4 * (layer.q_dim + layer.kv_dim),
                          at, at2, lo, hi, layer.scaling, blk.attn.data_ptr())
            o = blk.o(blk.attn, threads)
            lib.bd_add_norm(hp, o.data_ptr(), blk.post_attn_norm, hidden, eps)
            gu = blk.gate_up(h, threads, layer.ff_norm, eps)
            m = (layer.act(gu[:, :blk.ff]) * gu[:, blk.ff:]).contiguous()
            down = blk.down(m, threads)
            lib.bd_add_norm(hp, down.data_ptr(), blk.post_ff_norm, hidden, eps)
        state.position = p + 1
        return F.rms_norm(h, (hidden,), self.final_norm, eps)


@dataclass
class _BlockLayer:
    """A layer's projections as :class:`~kernel_ext.gguf.blockdot.BlockGroup` calls, and the
    buffers and pointers the C steps use."""

    qkv: Any
    o: Any
    gate_up: Any
    down: Any
    ff: int  # the MLP's width
    attn: torch.Tensor  # (1, heads * D): the attention's output
    qkv_bias: torch.Tensor | None
    q_norm: int | None  # pointers to float32 norm weights (None: no norm)
    k_norm: int | None
    post_attn_norm: int | None
    post_ff_norm: int | None
    keep: tuple[Any, ...]  # what the pointers point into
    spec: Any = None  # the layer's record for one bd_layer_step call (None: an activation C lacks)
    spec_ref: Any = None  # ctypes.byref(spec), made once


def _block_layers(base: Any, int4: dict[Any, Any]) -> list[_BlockLayer] | None:
    """The layers as block-kernel calls when every projection of every layer is a
    :class:`~kernel_ext.gguf.blockdot.BlockWeight`, else None (the torch path runs)."""
    import ctypes

    from ..gguf.blockdot import ACTIVATIONS, BlockGroup, BlockWeight, layer_spec

    out = []
    gemma = base.config.model_type in _GEMMA
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        mods = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        ws = [int4.get(m) for m in mods]
        if not all(isinstance(w, BlockWeight) for w in ws):
            return None
        if attn.o_proj.bias is not None or any(m.bias is not None for m in mods[4:]):
            return None
        qkv = BlockGroup(ws[:3])
        biases = [m.bias for m in mods[:3]]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach().float() if b is not None else torch.zeros(m.out_features)
                              for b, m in zip(biases, mods[:3])])[None]
        qd = attn.q_proj.out_features
        norms = []
        for mod in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None),
                    layer.post_attention_layernorm if gemma else None,
                    layer.post_feedforward_layernorm if gemma else None):
            norms.append(None if mod is None else
                         _norm_weight(mod, gemma)[0].detach().float().contiguous())
        groups = [qkv, BlockGroup(ws[3:4]), BlockGroup(ws[4:6]), BlockGroup(ws[6:])]
        spec = keep = None
        act = ACTIVATIONS.get(type(mlp.act_fn).__name__)
        if act is not None:  # the whole layer as one C call
            in_norm = _norm_weight(layer.input_layernorm, gemma)[0]
            ff_norm = _norm_weight(layer.pre_feedforward_layernorm if gemma
                                   else layer.post_attention_layernorm, gemma)[0]
            d = int(attn.head_dim)
            spec, keep = layer_spec(
                groups, dict(zip(("q_norm", "k_norm", "post_attn_norm", "post_ff_norm"), norms),
                             in_norm=in_norm.detach().float().contiguous(),
                             ff_norm=ff_norm.detach().float().contiguous()),
                bias, heads=qd // d, kv_heads=attn.k_proj.out_features // d, head_dim=d,
                act=act, eps=_norm_weight(base.norm, gemma)[1], scaling=float(attn.scaling))
        out.append(_BlockLayer(
            qkv=qkv, o=groups[1], gate_up=groups[2], down=groups[3],
            ff=mlp.gate_proj.out_features,
            attn=torch.empty(1, qd), qkv_bias=bias,
            q_norm=None if norms[0] is None else norms[0].data_ptr(),
            k_norm=None if norms[1] is None else norms[1].data_ptr(),
            post_attn_norm=None if norms[2] is None else norms[2].data_ptr(),
            post_ff_norm=None if norms[3] is None else norms[3].data_ptr(),
            keep=(tuple(norms), keep),
            spec=spec, spec_ref=None if spec is None else ctypes.byref(spec),
        ))
    return out


def _rope_types(base: Any) -> set[str]:
    return {t for t in (getattr(base.config, "layer_types", None) or [])
            if hasattr(base.rotary_emb, f"{t}_inv_freq")}


class FusedState:
    """Static per-layer KV buffers and rotary tables for one decode call."""

    def __init__(self, plan: FusedDecoder, cache: Any, position: int, capacity: int) -> None:
        self.plan = plan
        self.position = position
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.masks: dict[int, torch.Tensor] = {}
        layers = _cache_layers(cache)
        if len(layers) != len(plan.layers):
            raise ValueError(f"the cache has {len(layers)} layers, the model {len(plan.layers)}")
        self.grow(max(capacity, position + 1), [(k, v) for k, v in layers])

    def mask(self, n: int) -> torch.Tensor:
        """An all-true attention mask over ``n`` keys (kept: one per window size)."""
        m = self.masks.get(n)
        if m is None:
            m = self.masks[n] = torch.ones(1, 1, 1, n, dtype=torch.bool)
        return m

    def _slots(self, window: int | None) -> int:
        if window is None or self.capacity <= 2 * window:
            return self.capacity
        return 2 * window

    def grow(self, capacity: int, cached: list[tuple[torch.Tensor, torch.Tensor]] | None = None
             ) -> None:
        """(Re)allocate the buffers for positions ``< capacity``, keeping what they hold."""
        plan = self.plan
        if cached is None:  # keep the window of each layer: re-read it from the buffers
            cached = [self._window(i) for i in range(len(plan.layers))]
        self.capacity = capacity
        self.keys, self.values = [], []
        shape = (1, plan.kv_heads, 0, plan.head_dim)
        for li, layer in enumerate(plan.layers):
            slots = self._slots(layer.window)
            k = torch.empty(shape[:2] + (slots,) + shape[3:])  # only written slots are read
            v = torch.empty_like(k)
            self.keys.append(k)
            self.values.append(v)
            ck, cv = cached[li]
            n = int(ck.shape[-2])  # the cache holds the last n positions, in order
            if n:
                self._put(li, torch.arange(self.position - n, self.position), ck[0], cv[0])
        self.rope = _rope_tables(plan.model, capacity)

    def _window(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._range(li, self.position - 1)
        if hi <= lo:
            empty = self.keys[li][:, :, :0]
            return empty, empty
        return self.keys[li][:, :, lo:hi].clone(), self.values[li][:, :, lo:hi].clone()

    def _range(self, li: int, p: int) -> tuple[int, int]:
        """The slots holding the keys position ``p`` attends to, in chronological order."""
        window = self.plan.layers[li].window
        if window is None:
            return 0, p + 1
        if self.keys[li].shape[2] == self.capacity:  # no ring: a slice of the positions
            return max(0, p - window + 1), p + 1
        if p < window:
            return 0, p + 1
        start = (p + 1) % window
        return start, start + window

    def _put(self, li: int, p: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values ``(kv_heads, D)`` of position ``p`` (an int), or ``(kv_heads,
        n, D)`` of positions ``p`` (a tensor)."""
        keys, values = self.keys[li], self.values[li]
        window = self.plan.layers[li].window
        ring = window is not None and keys.shape[2] != self.capacity
        if isinstance(p, torch.Tensor):
            slots = [p % window, p % window + window] if ring else [p]
            for at in slots:
                keys[0].index_copy_(1, at, k)
                values[0].index_copy_(1, at, v)
        elif ring:
            s = p % window
            keys[0, :, s] = k
            keys[0, :, s + window] = k
            values[0, :, s] = v
            values[0, :, s + window] = v
        else:
            keys[0, :, p] = k
            values[0, :, p] = v

    def slots(self, li: int, p: int) -> tuple[int, int]:
        """Where position ``p``'s key and value go in layer ``li``'s buffers: a slot, and a
        second one for a doubled ring (else -1), as :meth:`_put` stores them."""
        window = self.plan.layers[li].window
        if window is not None and self.keys[li].shape[2] != self.capacity:
            return p % window, p % window + window
        return p, -1

    def write(self, li: int, p: int, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Store position ``p``'s key and value; the buffers and the slice ``p`` attends to."""
        self._put(li, p, k, v)
        lo, hi = self._range(li, p)
        return self.keys[li], self.values[li], lo, hi


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError("the cache has no per-layer tensors")
    out = []
    for layer in layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.shape[0] != 1:
            raise ValueError("a cache layer holds no key/value tensors of one sequence")
        out.append((k, v))
    return out


def _rope_tables(model: Any, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``cos, sin`` ``(n, head_dim)`` per rope kind from the model's own rotary module, the
    sine's first half negated (``rotate_half(x) * sin == roll(x, D/2) * sin_signed``)."""
    base = model.base_model
    rotary = base.rotary_emb
    x = torch.zeros(1, dtype=next(iter(model.parameters())).dtype)
    positions = torch.arange(n)[None]
    kinds = _rope_types(base) or {""}
    takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
    out = {}
    for kind in kinds:
        cos, sin = rotary(x, positions, kind) if (kind and takes_type) else rotary(x, positions)
        cos, sin = cos[0].contiguous(), sin[0].clone()
        half = sin.shape[-1] // 2
        sin[:, :half].neg_()
        out[kind] = (cos, sin)
    if "" not in out:
        out[""] = next(iter(out.values()))
    return out


def capacity_for(prompt: int, new_tokens: int) -> int:
    """Positions the static cache holds for a call: the prompt and the tokens to come."""
    return prompt + max(1, new_tokens)

