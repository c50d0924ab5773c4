"""What every architecture adapter shares: config from metadata, tensor names, weight plans.

An :class:`Adapter` turns one GGUF file (its parsed metadata and tensor table) into what the
loader needs. It reads no tensor data except, when given a reader, a few small tensors that
carry configuration (rope factors) and, to tell a repeated output head, the bytes of the two
embedding matrices:

* :meth:`Adapter.config_dict` - the Transformers config. Built the way Transformers'
  ``load_gguf_checkpoint`` builds it, from its own tables (``GGUF_CONFIG_MAPPING``,
  ``GGUF_CONFIG_DEFAULTS_MAPPING`` in ``transformers.integrations.ggml``) applied to our metadata;
  an adapter then adjusts what its architecture needs (:meth:`Adapter.adjust_config`).
* :meth:`Adapter.plan` - for every parameter of the (meta-device) model, which GGUF rows fill it
  and how (:class:`Fill`, carrying a public :class:`~kernel_ext.gguf.sources.WeightSource`). GGUF
  names come from gguf-py's ``TensorNameMap`` (the table Transformers' own
  ``get_gguf_hf_weights_map`` uses); an adapter says what happens to the values
  (:meth:`Adapter.fill`): nothing, a row permutation, an offset, a transpose, experts stacked.

Transforms run as torch operations in the loader, on the target device: a row permutation
reorders the rows' *quantised bytes* before decoding (a GGUF row is whole blocks: ~5x faster
than Transformers' numpy processor on the decoded values, ``benchmarks/bench_load.py
--processors``), an offset is an add, a transpose ``.t()``. Where Transformers has a processor
for the same job (``TENSOR_PROCESSORS`` in ``modeling_gguf_pytorch_utils``), the row order is
computed *by that processor* on an index vector, so both agree by construction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ...errors import GGUFFormatError, GGUFUnsupportedError
from ..convert import plain
from ..reader import TensorInfo
from ..sources import RowRange, WeightSource

__all__ = ["Adapter", "Fill", "WeightPlan", "n_rows"]

ValueOp = Callable[[Any], Any]  # torch.Tensor -> torch.Tensor, on the whole decoded tensor


def n_rows(info: TensorInfo) -> int:
    """GGUF rows of a tensor: ``n_elements // ne0`` (each row is whole quantisation blocks)."""
    return info.n_elements // info.shape[0] if info.shape and info.shape[0] else 1


@functools.lru_cache(maxsize=64)
def _permutation(key: bytes) -> tuple[int, ...]:
    order = np.frombuffer(key, dtype=np.int64)
    if not np.array_equal(np.sort(order), np.arange(len(order))):
        raise GGUFFormatError("internal: a row order that is not a permutation")
    return tuple(order.tolist())


def _as_permutation(order: np.ndarray) -> tuple[int, ...]:
    """``order`` as a checked tuple, one shared object per distinct order (every layer's q
    projection has the same one)."""
    return _permutation(np.ascontiguousarray(order, dtype=np.int64).reshape(-1).tobytes())


@dataclass(frozen=True)
class Fill:
    """How the loader fills one parameter: the public source, plus the value operation for
    transforms that are not row operations (applied to the whole tensor, decoded in fp32)."""

    source: WeightSource
    op: ValueOp | None = None


@dataclass(frozen=True)
class WeightPlan:
    """Every parameter of the model and where its values come from."""

    fills: dict[str, Fill]  # parameter -> fill, in the model's parameter order
    tied: dict[str, str] = field(default_factory=dict)  # tied parameter -> the one it shares
    unused: tuple[str, ...] = ()  # GGUF tensors no parameter reads (e.g. rope_freqs)
    missing: tuple[str, ...] = ()  # parameters no GGUF tensor fills (tied ones excluded)

    @property
    def sources(self) -> dict[str, WeightSource]:
        """Every parameter's :class:`WeightSource`, tied ones included."""
        out = {name: f.source for name, f in self.fills.items()}
        for name, target in self.tied.items():
            if target in out:
                src = out[target]
                out[name] = WeightSource(name, src.shape, src.transform, src.rows, tied_to=target)
        return out


class Adapter:
    """One GGUF architecture on the fast path; subclasses live in ``arch/<name>.py``.

    Class attributes: ``architecture`` (``general.architecture``), ``config_arch`` (the key of
    Transformers' ``GGUF_CONFIG_MAPPING`` whose renames apply, when it differs), ``verified``
    (how the adapter was checked, for the README table).
    """

    architecture: ClassVar[str]
    config_arch: ClassVar[str | None] = None
    verified: ClassVar[str] = "tiny files (F32, Q8_0, K-quants) against stock Transformers"

    def __init__(
        self,
        metadata: Mapping[str, Any],
        tensors: Mapping[str, TensorInfo],
        read: Callable[[str], Any] | None = None,
    ) -> None:
        """``read(name)``: the raw bytes of a tensor (``GGUFFile.tensor_bytes``), for the few
        small tensors that carry configuration (rope factors); None: they are not read."""
        self.metadata = metadata
        self.tensors = tensors
        self._read = read
        self._config: dict[str, Any] | None = None

    # --- before any work -----------------------------------------------------------------------
    def check(self) -> None:
        """Refuse (``GGUFUnsupportedError``) a variant of the architecture this adapter cannot
        load correctly. Runs on the metadata and tensor table only, before the file is hashed."""

    def key(self, name: str, default: Any = None) -> Any:
        """Metadata ``<architecture>.<name>``, as a plain value."""
        return plain(self.metadata.get(f"{self.architecture}.{name}", default))

    def f32_vector(self, name: str) -> np.ndarray | None:
        """A small F32 tensor's values (rope factors), or None when absent or unreadable."""
        info = self.tensors.get(name)
        if info is None or self._read is None or info.ggml_type != 0 or len(info.shape) != 1:
            return None
        return np.asarray(self._read(name)).view(np.float32).astype(np.float64)

    # --- config --------------------------------------------------------------------------------
    def transformers_arch(self) -> str:
        """The name Transformers' GGUF tables know this file under (its ``updated_architecture``)."""
        return self.config_arch or self.architecture

    def config_dict(self) -> dict[str, Any]:
        """The Transformers config dict (``model_type`` included); computed once."""
        if self._config is None:
            cfg = self._base_config()
            scaling = self.rope_scaling()
            if scaling is not None:
                self.apply_rope_scaling(cfg, scaling)
            self.adjust_config(cfg)
            self._config = cfg
        return dict(self._config)

    def adjust_config(self, config: dict[str, Any]) -> None:
        """Architecture-specific changes to the config built from Transformers' tables."""

    def apply_rope_scaling(self, config: dict[str, Any], scaling: dict[str, Any]) -> None:
        """Set ``scaling`` (from :meth:`rope_scaling`) as the config's ``rope_parameters``, with
        the file's ``rope_theta`` (llama.cpp's default, 10000, when the file has none)."""
        theta = config.pop("rope_theta", None)
        config["rope_parameters"] = {**scaling, "rope_theta": float(theta or 10000.0)}

    def rope_scaling(self) -> dict[str, Any] | None:
        """The file's RoPE scaling (``<arch>.rope.scaling.type`` linear or yarn, with its factor
        and original context) as Transformers' rope parameters (without ``rope_theta``). Stock
        Transformers 5.24 reads none of these keys, so it runs such a model (Gemma 3 4B and
        larger, YaRN-extended Qwen) with unscaled rotary frequencies."""
        kind = self.key("rope.scaling.type")
        factor = self.key("rope.scaling.factor")
        if kind not in ("linear", "yarn") or not isinstance(factor, (int, float)) or factor <= 1:
            return None
        out: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        original = self.key("rope.scaling.original_context_length")
        if kind == "yarn" and isinstance(original, int) and original > 0:
            out["original_max_position_embeddings"] = original
        return out

    def _base_config(self) -> dict[str, Any]:
        """``load_gguf_checkpoint``'s config part, on our metadata."""
        from transformers.integrations.ggml import (
            GGUF_CONFIG_DEFAULTS_MAPPING,
            GGUF_CONFIG_MAPPING,
        )

        arch = self.architecture
        updated = self.transformers_arch()
        config: dict[str, Any] = {
            "tie_word_embeddings": "output.weight" not in self.tensors
            or self._output_repeats_embeddings()
        }
        defaults: Any = GGUF_CONFIG_DEFAULTS_MAPPING.get(updated, {})
        for k, default in defaults.items():
            config.setdefault(k, default)
        for key, raw in self.metadata.items():
            key = key.replace(arch, updated, 1) if key.startswith(arch + ".") else key
            prefix, _, rest = key.partition(".")
            renames: Any = GGUF_CONFIG_MAPPING.get(prefix) or {}
            if rest not in renames:
                continue
            target = renames[rest]
            if target is None or target == -1:
                continue
            value = plain(raw)
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            if isinstance(value, str) and arch in value:
                value = value.replace(arch, updated)
            config[target] = value
        config["model_type"] = updated
        if "vocab_size" not in config:
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            if isinstance(tokens, list):
                config["vocab_size"] = len(tokens)
        return config

    def _output_repeats_embeddings(self) -> bool:
        """Whether ``output.weight`` is ``token_embd.weight`` again, byte for byte (llama.cpp's
        converters write the embeddings twice for tied Bloom, Falcon and GPT-2 models): then the
        head is tied, as stock Transformers ties two equal tensors, and held once."""
        out, emb = self.tensors.get("output.weight"), self.tensors.get("token_embd.weight")
        if self._read is None or out is None or emb is None:
            return False
        if (out.ggml_type, out.shape, out.nbytes) != (emb.ggml_type, emb.shape, emb.nbytes):
            return False
        return bool(np.array_equal(self._read(out.name), self._read(emb.name)))

    # --- tensors -------------------------------------------------------------------------------
    def name_map(self, parameters: list[str], n_layers: int) -> dict[str, list[str]]:
        """Parameter -> the GGUF tensors that fill it, from gguf-py's ``TensorNameMap``.

        The rules of Transformers' ``get_gguf_hf_weights_map``: a parameter ``x.weight`` is
        looked up as ``x``; a model built around a base model (``transformer.h.0...``) is tried
        with its leading module names dropped, outermost first."""
        import gguf

        try:
            arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.architecture)
        except StopIteration:
            raise GGUFUnsupportedError(
                f"gguf-py has no tensor-name table for GGUF architecture {self.architecture!r}"
            ) from None
        table = gguf.get_tensor_name_map(arch, n_layers)
        out: dict[str, list[str]] = {}
        for param in parameters:
            base, dot, suffix = param.rpartition(".")
            if not dot or suffix not in ("weight", "bias"):
                base, suffix = param, ""
            parts = base.split(".")
            for i in range(len(parts)):
                name = table.get_name(".".join(parts[i:]))
                if name is None:
                    continue
                # a stacked-experts parameter has no suffix; its tensor is still "<name>.weight"
                candidates = (f"{name}.{suffix}",) if suffix else (name, f"{name}.weight")
                for candidate in candidates:
                    if candidate in self.tensors:
                        out[param] = [candidate]
                        break
                if param in out:
                    break
        return out

    def plan(self, model: Any) -> WeightPlan:
        """Every parameter of ``model`` (on ``meta`` or not): which GGUF rows fill it, and how."""
        params = dict(model.named_parameters(remove_duplicate=False))
        layers = int(getattr(model.config, "num_hidden_layers", 0) or self.key("block_count", 0))
        sources = self.name_map(list(params), layers)
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        fills: dict[str, Fill] = {}
        for name, param in params.items():
            if name in tied or name not in sources:
                continue
            infos = [self.tensors[t] for t in sources[name]]
            fills[name] = self.fill(name, tuple(param.shape), infos)
        used = {t for f in fills.values() for t in f.source.tensors}
        unused = tuple(t for t in self.tensors if t not in used)
        missing = tuple(n for n in params if n not in fills and n not in tied)
        return WeightPlan(fills, {k: v for k, v in tied.items() if v in fills}, unused, missing)

    def fill(self, name: str, shape: tuple[int, ...], infos: list[TensorInfo]) -> Fill:
        """How parameter ``name`` of ``shape`` is filled from ``infos``. The default: one tensor,
        its rows as they are (a reshape that keeps the row length, e.g. ``(H,)`` -> ``(1, H)``,
        is still an identity of rows); adapters override this for their transforms."""
        info = self.single(name, infos)
        kind = self.row_kind(shape, info)
        if kind == "identity":
            return Fill(self.source(name, shape, info, kind))
        # same values, other rows: decoded whole, then reshaped by the loader
        return Fill(self.source(name, shape, info, kind), op=lambda t: t)

    # --- helpers for fill() ----------------------------------------------------------------------
    @staticmethod
    def single(name: str, infos: list[TensorInfo]) -> TensorInfo:
        if len(infos) != 1:
            raise GGUFFormatError(
                f"{len(infos)} GGUF tensors map to {name} ({', '.join(i.name for i in infos)}); "
                "this architecture's adapter does not combine tensors"
            )
        return infos[0]

    @staticmethod
    def row_kind(shape: tuple[int, ...], info: TensorInfo) -> str:
        """``identity`` when the parameter's rows are the tensor's rows, else ``other``."""
        cols = shape[-1] if shape else 1
        ne0 = info.shape[0] if info.shape else 1
        return "identity" if cols == ne0 else "other"

    @staticmethod
    def source(
        name: str,
        shape: tuple[int, ...],
        info: TensorInfo,
        transform: str,
        permutation: tuple[int, ...] | None = None,
    ) -> WeightSource:
        rows = n_rows(info)
        return WeightSource(
            name, shape, transform, (RowRange(info.name, 0, rows, 0, permutation),)
        )

    def offset(self, name: str, shape: tuple[int, ...], info: TensorInfo, delta: float) -> Fill:
        """Values plus ``delta`` (a norm stored as ``1 + w``)."""
        return Fill(self.source(name, shape, info, "norm_offset"), op=lambda t: t.add_(delta))

    def permuted(
        self, name: str, shape: tuple[int, ...], info: TensorInfo, order: np.ndarray
    ) -> Fill:
        """The tensor's rows reordered: parameter row ``i`` is GGUF row ``order[i]``. A vector
        (a bias: one row) has its values reordered the same way, which is not a row operation."""
        perm = _as_permutation(order)
        if len(info.shape) <= 1:
            if len(perm) != info.n_elements:
                raise GGUFFormatError(f"internal: bad value order for {info.name}")
            index = torch.tensor(perm, dtype=torch.long)
            return Fill(
                self.source(name, shape, info, "other"),
                op=lambda t: t.index_select(0, index.to(t.device)),
            )
        if len(perm) != n_rows(info):
            raise GGUFFormatError(f"internal: bad row order for {info.name}")
        return Fill(self.source(name, shape, info, "row_permutation", perm))

    def transposed(self, name: str, shape: tuple[int, ...], info: TensorInfo) -> Fill:
        return Fill(self.source(name, shape, info, "transpose"), op=lambda t: t.t())
