"""Where each Transformers parameter of a loaded model came from in the GGUF file.

A stable, data-only API: :attr:`kernel_ext.gguf.loader.LoadedArtifacts.weight_sources` maps every
parameter name of the model (``"model.layers.0.self_attn.q_proj.weight"``) to a
:class:`WeightSource`, for models loaded on the fast path (it is empty for the Transformers
fallback, which does not say). It is meant for code that works on the file's own quantised blocks
instead of the dequantised weights (e.g. a matmul over Q4_K rows):

* **rows.** A GGUF tensor of shape ``(ne0, ne1, ...)`` (``ne0`` fastest) is ``n_elements // ne0``
  *rows* of ``ne0`` values; every row is a whole number of quantisation blocks and occupies
  ``row_nbytes = nbytes // n_rows`` consecutive bytes. A parameter of PyTorch shape
  ``(..., cols)`` is likewise ``numel // cols`` rows (its leading dimensions flattened: the
  stacked experts ``(E, 2F, H)`` are ``E * 2F`` rows of ``H``).
* **row_op.** ``True`` when every parameter row *is* one GGUF row, values unchanged (only
  reordered, sliced or stacked): then :attr:`WeightSource.rows` says exactly which GGUF row fills
  which parameter row, and the quantised bytes of a parameter row are those of its GGUF row.
  ``False`` when values or the row layout changed (a norm stored as ``1 + w``, GPT-2's
  transposed matrices): then :attr:`WeightSource.rows` still names the tensor(s) read, but a
  parameter row is not a GGUF row.
* **transform.** What was done, one of :data:`TRANSFORMS`.

Example, llama's query projection (rows un-permuted per head)::

    src = artifacts.weight_sources["model.layers.0.self_attn.q_proj.weight"]
    src.transform, src.row_op          # ("row_permutation", True)
    part = src.rows[0]                 # RowRange(tensor="blk.0.attn_q.weight", start=0, stop=4096,
                                       #          at=0, permutation=(0, 2, 4, ..., 1, 3, ...))
    src.gguf_rows()                    # [("blk.0.attn_q.weight", 0), ("blk.0.attn_q.weight", 2), ...]

Qwen MoE experts ``mlp.experts.gate_up_proj`` (``E x 2F x H``) are ``2E`` ranges alternating
``blk.N.ffn_gate_exps.weight`` rows ``[e*F, (e+1)*F)`` and ``blk.N.ffn_up_exps.weight`` rows
``[e*F, (e+1)*F)``, transform ``"expert_stack"``.

The quantised bytes of GGUF row ``g`` of a tensor, from the file's tensor table
(:class:`kernel_ext.gguf.TensorInfo`, e.g. ``read_gguf(path).tensors[name]``)::

    rows = info.n_elements // info.shape[0]         # info.shape[0] is ne0, the row length
    row_nbytes = info.nbytes // rows
    start = info.offset + g * row_nbytes            # absolute file offset

Every parameter of a fast-path model has an entry, also after a load from the weights cache (the
sources come from the file's metadata, not from decoding). A tied parameter (an output head that
shares the embeddings) has ``tied_to`` set and its target's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ROW_TRANSFORMS", "TRANSFORMS", "RowRange", "WeightSource"]

# What a parameter's values are, relative to the GGUF rows they were read from.
ROW_TRANSFORMS: frozenset[str] = frozenset({
    "identity",  # the tensor's rows in order (maybe reshaped: same rows, same row length)
    "row_permutation",  # the tensor's rows reordered (llama q/k un-permute, bloom's fused qkv)
    "row_slice",  # a contiguous run of one tensor's rows, or several such runs concatenated
    "expert_stack",  # experts' rows interleaved from several stacked tensors (gate and up)
})
TRANSFORMS: frozenset[str] = ROW_TRANSFORMS | frozenset({
    "norm_offset",  # value + constant (gemma's and nemotron's norms are stored as 1 + w)
    "transpose",  # the tensor transposed (GPT-2's Conv1D matrices)
    "other",  # anything else an adapter does to the values
})


@dataclass(frozen=True)
class RowRange:
    """GGUF rows ``[start, stop)`` of ``tensor`` fill parameter rows ``[at, at + stop - start)``.

    With a ``permutation``, parameter row ``at + i`` is GGUF row ``start + permutation[i]``
    (``permutation`` is a permutation of ``range(stop - start)``); without one, row ``at + i``
    is GGUF row ``start + i``.
    """

    tensor: str
    start: int
    stop: int
    at: int = 0
    permutation: tuple[int, ...] | None = None

    @property
    def count(self) -> int:
        return self.stop - self.start

    def gguf_row(self, i: int) -> int:
        """The GGUF row that fills parameter row ``at + i``."""
        return self.start + (self.permutation[i] if self.permutation is not None else i)


@dataclass(frozen=True)
class WeightSource:
    """Where the Transformers parameter ``parameter`` (of PyTorch ``shape``) came from.

    ``rows`` are sorted by :attr:`RowRange.at` and, for a row operation, cover every parameter
    row exactly once. ``tied_to`` names the parameter whose storage this one shares (an output
    head tied to the embeddings); its ``rows`` are that parameter's.
    """

    parameter: str
    shape: tuple[int, ...]
    transform: str
    rows: tuple[RowRange, ...]
    tied_to: str | None = None

    @property
    def row_op(self) -> bool:
        """True when every parameter row is one GGUF row, values unchanged (see the module)."""
        return self.transform in ROW_TRANSFORMS

    @property
    def tensors(self) -> tuple[str, ...]:
        """The GGUF tensors read, in order of first use."""
        return tuple(dict.fromkeys(r.tensor for r in self.rows))

    @property
    def n_rows(self) -> int:
        """The parameter's rows: ``numel // shape[-1]`` (1 for a scalar)."""
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n

    def gguf_rows(self) -> list[tuple[str, int]]:
        """``(tensor, gguf_row)`` for every parameter row, in parameter-row order.

        Only meaningful for a row operation (``row_op``); raises ``ValueError`` otherwise."""
        if not self.row_op:
            raise ValueError(
                f"{self.parameter} is not a row operation of its GGUF rows "
                f"(transform {self.transform!r})"
            )
        out: list[tuple[str, int]] = []
        for r in self.rows:
            out.extend((r.tensor, r.gguf_row(i)) for i in range(r.count))
        return out
