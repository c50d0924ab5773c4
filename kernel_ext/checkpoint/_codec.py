"""Turning notebook values into content-addressed parts, and back.

A value becomes an :class:`Encoded`: a ``kind``, JSON ``meta`` (dtype, shape, ...) and one or
more :class:`Part` objects, each either an array (stored as a Zarr array) or a blob of bytes.
Parts are named by their xxh3-128 content hash, which is verified on restore.

Kinds: ``ndarray`` (numpy arrays and scalars), ``torch`` (tensors, any device, bfloat16
included; restored on the CPU, with a warning, when the original device does not exist;
GPU tensors are hashed once per change, see :class:`_DeviceHashes`), ``json`` (nested
dict/list/str/int/float/bool/None), ``plain`` (JSON with kernel_ext's own result objects inside,
e.g. a ``%%infer -o`` result or an ``--into`` list of them; see :func:`register_plain_type`),
``bytes``/``bytearray``, ``dataframe`` (pandas, column by column) and ``pickle`` (only for
variables the user opted in; restoring runs code).

:func:`check` says why a value would be skipped without encoding it (for ``%checkpoint
status``); it applies the same rules as :func:`encode`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import xxhash

__all__ = [
    "Encoded",
    "NotRestorable",
    "Part",
    "PickleRefused",
    "Unstorable",
    "array_hash",
    "blob_hash",
    "check",
    "decode",
    "encode",
    "is_bulk",
    "json_bytes",
    "never_reason",
    "register_plain_type",
]

_ARRAY_KINDS = set("biufc")
_TIME_KINDS = set("Mm")


class Unstorable(Exception):
    """Internal: a value that cannot be stored; ``str(e)`` is the reason shown to the user."""


class PickleRefused(Exception):
    """Internal: a pickled value that the caller did not allow to be unpickled."""


class NotRestorable(Exception):
    """Internal: an intact stored value this version cannot rebuild (``str(e)`` says why)."""


@dataclass
class Part:
    """One immutable object of a snapshot: an array or a blob, named by its content hash."""

    hash: str
    array: np.ndarray | None = None
    data: bytes | None = None

    @property
    def is_array(self) -> bool:
        return self.array is not None

    @property
    def nbytes(self) -> int:
        if self.array is not None:
            return int(self.array.nbytes)
        return len(self.data or b"")

    def ref(self) -> dict[str, Any]:
        """How a manifest refers to this part."""
        if self.array is not None:
            return {"hash": self.hash, "type": "array", "dtype": self.array.dtype.str,
                    "shape": list(self.array.shape), "nbytes": self.nbytes}
        return {"hash": self.hash, "type": "blob", "nbytes": self.nbytes}


@dataclass
class Encoded:
    kind: str
    meta: dict[str, Any]
    parts: list[Part] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def digest(self) -> str:
        """Changes whenever the stored form would change (content, dtype, shape, kind)."""
        h = xxhash.xxh3_128(self.kind.encode())
        h.update(json.dumps(self.meta, sort_keys=True).encode())
        for p in self.parts:
            h.update(p.hash.encode())
        return h.hexdigest()


# --- hashing ------------------------------------------------------------------------------------
def array_hash(arr: np.ndarray) -> str:
    """xxh3-128 of dtype, shape and the bytes of a C-contiguous array."""
    h = xxhash.xxh3_128(f"array:{arr.dtype.str}:{arr.shape}:".encode())
    if arr.size:
        h.update(cast(Any, arr.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def blob_hash(data: bytes) -> str:
    h = xxhash.xxh3_128(b"blob:")
    h.update(data)
    return h.hexdigest()


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# --- what is never stored -----------------------------------------------------------------------
def never_reason(value: Any) -> str | None:
    """Why a value is never checkpointed (modules, functions, classes, model objects), or None."""
    if isinstance(value, types.ModuleType):
        return "module (re-import it)"
    if isinstance(value, type):
        return "class (re-run its definition)"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                          functools.partial)):
        return "function (re-run its definition)"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.nn.Module):
        return "model object (torch.nn.Module): %resume reloads models loaded with %model"
    for cls in type(value).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if module.startswith(("transformers.", "tokenizers")):
            return f"model object ({cls.__name__}): %resume reloads models loaded with %model"
    return None


def is_bulk(value: Any) -> bool:
    """Whether :func:`encode` stores ``value`` as bulk data without looking inside it (numeric
    arrays, dense tensors, DataFrames, bytes): costly to encode, so a status lists it unencoded."""
    if type(value) is np.ndarray:
        return value.dtype.kind in _ARRAY_KINDS or value.dtype.kind in _TIME_KINDS
    if type(value) in (bytes, bytearray):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.layout == torch.strided and not value.is_quantized
    pd = sys.modules.get("pandas")
    return pd is not None and type(value) is pd.DataFrame


# --- encoding -----------------------------------------------------------------------------------
def _array_part(arr: np.ndarray) -> Part:
    arr = np.ascontiguousarray(arr)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return Part(hash=array_hash(arr), array=arr)


def _blob_part(data: bytes) -> Part:
    return Part(hash=blob_hash(data), data=data)


def _encode_ndarray(arr: np.ndarray, scalar: bool = False) -> Encoded:
    kind = arr.dtype.kind
    meta: dict[str, Any] = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if scalar:
        meta["scalar"] = True
    if kind in _ARRAY_KINDS:
        return Encoded("ndarray", meta, [_array_part(arr)])
    if kind in _TIME_KINDS:
        stored = np.ascontiguousarray(arr).view(np.int64)
        return Encoded("ndarray", meta, [_array_part(stored)])
    _check_ndarray(arr)
    raise AssertionError("unreachable")  # pragma: no cover


_TORCH_INT_BY_SIZE = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def _host_array(t: Any) -> np.ndarray:
    """A dense tensor's values as a host numpy array (bfloat16 & co. as same-size integers)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg().contiguous()
    try:
        return t.numpy()
    except TypeError:  # bfloat16, float8...: keep the bits in an integer of the same size
        size = t.element_size()
        if size not in _TORCH_INT_BY_SIZE:
            raise Unstorable(f"torch tensor of dtype {t.dtype}") from None
        return t.view(getattr(torch, _TORCH_INT_BY_SIZE[size])).numpy()


class _DevicePart(Part):
    """The part of a device tensor whose hash is known: its bytes are copied to the host only
    if the store reads :attr:`array` (when it does not hold that object yet)."""

    def __init__(self, hash: str, tensor: Any, dtype: str, shape: list[int], nbytes: int) -> None:
        self.hash = hash
        self.data = None
        self._tensor: Any = tensor
        self._array: np.ndarray | None = None
        self._dtype, self._shape, self._nbytes = dtype, shape, nbytes

    @property  # type: ignore[override]
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.ascontiguousarray(_host_array(self._tensor))
            self._tensor = None
        return self._array

    @property
    def is_array(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def ref(self) -> dict[str, Any]:
        return {"hash": self.hash, "type": "array", "dtype": self._dtype,
                "shape": list(self._shape), "nbytes": self._nbytes}


class _DeviceHashes:
    """Content hashes of GPU tensors, kept while the tensor is unchanged.

    Hashing needs the bytes on the host; a checkpoint hook runs after every cell, so without
    this every GPU tensor would be copied to the host every cell. An entry is valid for the
    same tensor object (a weak reference: a freed tensor's address can be reused) with the
    same ``data_ptr``, version counter (bumped by every in-place write, through any view),
    shape, strides, storage offset, dtype and device.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[Any, tuple[Any, ...], str, str, list[int], int]] = {}

    @staticmethod
    def _key(t: Any) -> tuple[Any, ...]:
        return (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()),
                t.storage_offset(), t.dtype, str(t.device))

    def get(self, t: Any) -> _DevicePart | None:
        with self._lock:
            entry = self._entries.get(id(t))
        if entry is None:
            return None
        ref, key, hash_, dtype, shape, nbytes = entry
        if ref() is not t or key != self._key(t):
            return None
        return _DevicePart(hash_, t, dtype, shape, nbytes)

    def put(self, t: Any, part: Part) -> None:
        assert part.array is not None
        ident = id(t)
        ref = weakref.ref(t, lambda _r, ident=ident: self._drop(ident, _r))
        entry = (ref, self._key(t), part.hash, part.array.dtype.str, list(part.array.shape),
                 part.nbytes)
        with self._lock:
            self._entries[ident] = entry

    def _drop(self, ident: int, ref: Any) -> None:
        with self._lock:
            if ident in self._entries and self._entries[ident][0] is ref:
                del self._entries[ident]


_DEVICE_HASHES = _DeviceHashes()


def _encode_torch(t: Any) -> Encoded:
    import torch

    if t.layout != torch.strided or t.is_quantized:
        raise Unstorable(f"torch tensor with layout {t.layout} (only dense tensors)")
    device = str(t.device)
    on_device = t.device.type not in ("cpu", "meta")
    part: Part | None = _DEVICE_HASHES.get(t) if on_device else None
    if part is None:
        part = _array_part(_host_array(t))
        if on_device:
            _DEVICE_HASHES.put(t, part)
    ref = part.ref()
    meta = {"torch_dtype": str(t.dtype).removeprefix("torch."), "device": device,
            "requires_grad": bool(t.requires_grad),
            "dtype": ref["dtype"], "shape": ref["shape"]}
    return Encoded("torch", meta, [part])


def _is_json(value: Any, depth: int = 0) -> bool:
    if depth > 200:
        return False
    t = type(value)
    if value is None or t in (str, int, float, bool):
        return True
    if t is list:
        return all(_is_json(v, depth + 1) for v in value)
    if t is dict:
        return all(type(k) is str and _is_json(v, depth + 1) for k, v in value.items())
    return False


def _column_kind(values: np.ndarray, what: str) -> str:
    """How a column (or index) is stored: ``"array"`` or ``"json"``; raises :class:`Unstorable`.

    Object columns are looked at value by value (they are stored as JSON when every value is a
    number, string, bool or None)."""
    if values.dtype.kind in _ARRAY_KINDS or values.dtype.kind in _TIME_KINDS:
        return "array"
    if values.dtype.kind == "O" and _is_json(values.tolist()):
        return "json"
    raise Unstorable(f"DataFrame {what} of dtype {values.dtype} holds values that are not "
                     "numbers, booleans, datetimes, strings or None")


def _encode_column(values: np.ndarray, what: str) -> tuple[dict[str, Any], Part]:
    if _column_kind(values, what) == "array":
        enc = _encode_ndarray(values)
        return {"enc": "array", "dtype": values.dtype.str}, enc.parts[0]
    return {"enc": "json"}, _blob_part(json_bytes(values.tolist()))


def _frame_plan(df: Any) -> list[str]:
    """The rules :func:`_encode_frame` applies, without copying any data: one entry per column,
    ``"numpy"`` or ``"string"``; raises :class:`Unstorable` with the reason."""
    import pandas as pd

    labels = list(df.columns)
    if not _is_json(labels) or len(set(map(repr, labels))) != len(labels):
        raise Unstorable("DataFrame with non-unique or non-string/int column labels "
                         f"({', '.join(repr(x) for x in labels[:3])}{', ...' if len(labels) > 3 else ''}); "
                         "rename the columns or use --pickle")
    plan = []
    for label, dtype in zip(labels, df.dtypes):
        if isinstance(dtype, np.dtype):
            plan.append("numpy")
        elif pd.api.types.is_string_dtype(dtype):
            plan.append("string")
        else:
            raise Unstorable(f"DataFrame column {label!r} has extension dtype {dtype} "
                             "(use --pickle, or convert the column)")
    index = df.index
    if not (isinstance(index, pd.RangeIndex)
            or (isinstance(index.dtype, np.dtype) and not isinstance(index, pd.MultiIndex))):
        raise Unstorable(f"DataFrame with index of type {type(index).__name__} "
                         "(reset_index() it, or use --pickle)")
    return plan


def _check_frame(df: Any) -> None:
    import pandas as pd

    for i, how in enumerate(_frame_plan(df)):
        if how == "numpy":
            _column_kind(df.iloc[:, i].to_numpy(), f"column {df.columns[i]!r}")
    if not isinstance(df.index, pd.RangeIndex):
        _column_kind(df.index.to_numpy(), "index")


def _encode_frame(df: Any) -> Encoded:
    import pandas as pd

    plan = _frame_plan(df)
    labels = list(df.columns)
    parts: list[Part] = []
    columns: list[dict[str, Any]] = []
    for i, (label, how) in enumerate(zip(labels, plan)):
        col = df.iloc[:, i]
        if how == "numpy":
            info, part = _encode_column(col.to_numpy(), f"column {label!r}")
        else:
            values = col.astype(object).where(col.notna(), None).tolist()
            info, part = {"enc": "json", "pandas_dtype": str(col.dtype)}, _blob_part(
                json_bytes(values))
        columns.append({"label": label, **info})
        parts.append(part)
    index = df.index
    meta: dict[str, Any] = {"columns": columns, "shape": list(df.shape)}
    index_name = index.name if _is_json(index.name) else None
    if isinstance(index, pd.RangeIndex):
        meta["index"] = {"range": [index.start, index.stop, index.step], "name": index_name}
    else:
        info, part = _encode_column(index.to_numpy(), "index")
        meta["index"] = {**info, "name": index_name}
        parts.append(part)
    return Encoded("dataframe", meta, parts)


# --- kernel_ext's own result objects, as plain data ---------------------------------------------
_TAG = "$kernel_ext"
_plain_lock = threading.Lock()
_plain_by_name: dict[str, type] = {}
_plain_name: dict[type, str] = {}
_builtins_registered = False


def register_plain_type(cls: type, *aliases: str) -> None:
    """Save instances of the dataclass ``cls`` as plain data and restore them as ``cls``.

    The fields are read with :func:`dataclasses.fields` at save time, so fields added to the
    class later are saved too; at restore, stored fields the class no longer has are dropped and
    fields the checkpoint lacks take their defaults. Field values may be JSON values, tuples and
    other registered dataclasses. Only registered classes are ever rebuilt: a checkpoint cannot
    make restore construct any other class. ``aliases``: further stored names that mean ``cls``
    (a class that was renamed).
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_plain_type needs a dataclass, got {cls!r}")
    name = f"{cls.__module__}.{cls.__qualname__}"
    with _plain_lock:
        _plain_name[cls] = name
        for n in (name, *aliases):
            _plain_by_name[n] = cls


def _plain_types() -> dict[type, str]:
    """The registered classes; registers kernel_ext's generation result on first use."""
    global _builtins_registered
    if not _builtins_registered:
        from ..providers import base

        # One class, whichever of its two names (README: InferenceResult) the module uses.
        names = ("GenerationResult", "InferenceResult")
        for cls in {getattr(base, n) for n in names if hasattr(base, n)}:
            register_plain_type(cls, *(f"{base.__name__}.{n}" for n in names))
        from ..over import ItemError  # an --over item that got no answer, kept in its place

        register_plain_type(ItemError)
        _builtins_registered = True
    return _plain_name


class _PlainWalk:
    """Turns a value into a JSON tree, tagging registered dataclasses, tuples and dicts whose
    keys would collide with the tag. ``found``: whether a registered dataclass was seen."""

    def __init__(self, types: dict[type, str]) -> None:
        self.types = types
        self.found: set[str] = set()

    def tree(self, value: Any, depth: int = 0) -> Any:
        if depth > 200:
            raise Unstorable("nested more than 200 levels deep")
        t = type(value)
        if value is None or t in (str, int, float, bool):
            return value
        if t is list or (isinstance(value, list) and any(v.__class__ in self.types for v in value)):
            # also an --over result list (a list subclass with a summary): its items are kept,
            # and it comes back as a plain list
            return [self.tree(v, depth + 1) for v in value]
        if t is tuple:
            return {_TAG: "tuple", "items": [self.tree(v, depth + 1) for v in value]}
        if t is dict:
            if not all(type(k) is str for k in value):
                raise Unstorable("a dict with keys that are not str")
            out = {k: self.tree(v, depth + 1) for k, v in value.items()}
            return {_TAG: "dict", "items": out} if _TAG in value else out
        name = self.types.get(t)
        if name is None:
            raise Unstorable(f"{_type_name(value)} (not plain data)")
        self.found.add(name)
        fields = {}
        for f in dataclasses.fields(value):
            try:
                fields[f.name] = self.tree(getattr(value, f.name), depth + 1)
            except Unstorable as e:
                raise Unstorable(f"{t.__qualname__}.{f.name} holds {e}") from None
        return {_TAG: name, "fields": fields}


def _encode_plain(value: Any) -> Encoded | None:
    """``value`` as kind ``plain`` when it is (or holds) a registered dataclass, else None."""
    types = _plain_types()
    if type(value) not in types and not isinstance(value, (list, dict, tuple)):
        return None
    walk = _PlainWalk(types)
    try:
        tree = walk.tree(value)
    except Unstorable:
        if type(value) in types:
            raise
        return None
    if not walk.found:
        return None
    return Encoded("plain", {"types": sorted(walk.found)}, [_blob_part(json_bytes(tree))])


def _from_plain(node: Any) -> Any:
    if type(node) is list:
        return [_from_plain(v) for v in node]
    if type(node) is not dict:
        return node
    tag = node.get(_TAG)
    if tag is None:
        return {k: _from_plain(v) for k, v in node.items()}
    if tag == "dict":
        return {k: _from_plain(v) for k, v in node["items"].items()}
    if tag == "tuple":
        return tuple(_from_plain(v) for v in node["items"])
    _plain_types()
    cls = _plain_by_name.get(tag)
    if cls is None:
        raise NotRestorable(f"{tag} is not a type this version of kernel_ext restores")
    values = {k: _from_plain(v) for k, v in node["fields"].items()}
    known = {f.name: f for f in dataclasses.fields(cls)}
    try:
        obj = cls(**{k: v for k, v in values.items() if k in known and known[k].init})
    except TypeError as e:
        raise NotRestorable(f"{tag} cannot be rebuilt from its stored fields: {e}") from e
    for k, v in values.items():
        if k in known and not known[k].init:
            object.__setattr__(obj, k, v)
    return obj


# --- checking without encoding ------------------------------------------------------------------
def check(value: Any, *, allow_pickle: bool = False) -> str | None:
    """Why :func:`encode` would refuse ``value`` (the same rules), or None when it can be saved.

    Bulk values (arrays, tensors, DataFrames, bytes) are judged by their structure without
    copying or hashing their data; other values are encoded (they are small by nature).
    """
    try:
        if allow_pickle:
            return None
        torch = sys.modules.get("torch")
        pd = sys.modules.get("pandas")
        if type(value) is np.ndarray:
            _check_ndarray(value)
        elif torch is not None and isinstance(value, torch.Tensor):
            _check_torch(value)
        elif pd is not None and type(value) is pd.DataFrame:
            _check_frame(value)
        elif type(value) not in (bytes, bytearray):
            encode(value)
    except Unstorable as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - the same wording as a failed save
        return f"cannot be saved: {type(e).__name__}: {e}"
    return None


def _check_ndarray(arr: np.ndarray) -> None:
    if arr.dtype.kind not in _ARRAY_KINDS and arr.dtype.kind not in _TIME_KINDS:
        raise Unstorable(f"numpy array of dtype {arr.dtype} (only numeric, bool and datetime "
                         "arrays; use `%checkpoint track NAME --pickle`)")


def _check_torch(t: Any) -> None:
    import torch

    if t.layout != torch.strided or t.is_quantized:
        raise Unstorable(f"torch tensor with layout {t.layout} (only dense tensors)")
    if t.device.type == "meta":
        raise Unstorable("cannot be saved: NotImplementedError: a tensor on the meta device "
                         "holds no data")
    if t.element_size() not in _TORCH_INT_BY_SIZE:
        raise Unstorable(f"torch tensor of dtype {t.dtype}")


def encode(value: Any, *, allow_pickle: bool = False) -> Encoded:
    """The storable form of ``value``; raises :class:`Unstorable` with the reason otherwise."""
    if type(value) is np.ndarray:
        return _encode_ndarray(value)
    if isinstance(value, np.generic) and type(value).__module__ == "numpy":
        return _encode_ndarray(np.asarray(value), scalar=True)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor) and not allow_pickle:
        return _encode_torch(value)
    pd = sys.modules.get("pandas")
    if pd is not None and type(value) is pd.DataFrame and not allow_pickle:
        return _encode_frame(value)
    if type(value) is bytes:
        return Encoded("bytes", {}, [_blob_part(value)])
    if type(value) is bytearray:
        return Encoded("bytearray", {}, [_blob_part(bytes(value))])
    if _is_json(value):
        return Encoded("json", {}, [_blob_part(json_bytes(value))])
    plain = _encode_plain(value)
    if plain is not None:
        return plain
    if allow_pickle:
        try:
            data = pickle.dumps(value, protocol=5)
        except Exception as e:  # any pickling failure makes the value unstorable, with reason
            raise Unstorable(f"cannot be pickled: {type(e).__name__}: {e}") from e
        return Encoded("pickle", {"type": _type_name(value)}, [_blob_part(data)])
    reason = never_reason(value)
    if reason is not None:
        raise Unstorable(reason)
    if isinstance(value, np.ndarray):
        raise Unstorable(f"{_type_name(value)} (a numpy array subclass; use --pickle)")
    if isinstance(value, (tuple, set, frozenset)):
        raise Unstorable(f"{type(value).__name__} (store a list, or use --pickle)")
    if isinstance(value, (list, dict)):
        raise Unstorable(f"{type(value).__name__} holding values that are not JSON "
                         "(str/int/float/bool/None, str keys); use --pickle")
    return _unsupported(value)


def _unsupported(value: Any) -> Encoded:
    raise Unstorable(f"{_type_name(value)} is not a storable kind "
                     "(arrays, tensors, JSON values, bytes, DataFrames, %%infer results); "
                     "use --pickle")


def _type_name(value: Any) -> str:
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


# --- decoding -----------------------------------------------------------------------------------
def decode(kind: str, meta: dict[str, Any], parts: list[Any], *, allow_pickle: bool = False) -> Any:
    """Rebuild a value from its kind, meta and verified parts (arrays or bytes)."""
    if kind == "ndarray":
        arr = _as_dtype(np.asarray(parts[0]), np.dtype(meta["dtype"])).reshape(meta["shape"])
        return arr[()] if meta.get("scalar") else arr
    if kind == "torch":
        import torch

        arr = np.asarray(parts[0]).reshape(meta["shape"])
        t = torch.from_numpy(np.ascontiguousarray(arr))
        target = getattr(torch, meta["torch_dtype"])
        if t.dtype != target:
            t = t.view(target)
        device = meta.get("device", "cpu")
        if device != "cpu":
            if _device_exists(torch, device):
                t = t.to(device)
            else:
                warnings.warn(f"a tensor saved on {device} was restored on the CPU: this machine "
                              f"has no {device}; move it with .to(...)", RuntimeWarning,
                              stacklevel=2)
        if meta.get("requires_grad"):
            t.requires_grad_(True)
        return t
    if kind == "json":
        return json.loads(parts[0])
    if kind == "plain":
        return _from_plain(json.loads(parts[0]))
    if kind == "bytes":
        return bytes(parts[0])
    if kind == "bytearray":
        return bytearray(parts[0])
    if kind == "dataframe":
        return _decode_frame(meta, parts)
    if kind == "pickle":
        if not allow_pickle:
            raise PickleRefused(meta.get("type", "object"))
        return pickle.loads(parts[0])
    raise ValueError(f"unknown kind {kind!r}")


def _device_exists(torch: Any, device: str) -> bool:
    """Whether ``device`` ("cuda:N", "mps", ...) exists here (asking creates no CUDA context)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        return False
    if dev.type == "cuda":
        return torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    module = getattr(torch, dev.type, None)
    is_available = getattr(module, "is_available", None)
    return bool(is_available and is_available())


def _as_dtype(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The stored (native, maybe integer-viewed) array as ``dtype``."""
    native = dtype.newbyteorder("=")
    if arr.dtype != native:
        arr = arr.view(native)
    return arr.astype(dtype) if dtype != native else arr


def _decode_column(info: dict[str, Any], part: Any) -> np.ndarray:
    if info["enc"] == "array":
        return _as_dtype(np.asarray(part), np.dtype(info["dtype"]))
    values = json.loads(part)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _decode_frame(meta: dict[str, Any], parts: list[Any]) -> Any:
    import pandas as pd

    cols = meta["columns"]
    data = {i: _decode_column(info, parts[i]) for i, info in enumerate(cols)}
    idx_meta = meta["index"]
    if "range" in idx_meta:
        index: Any = pd.RangeIndex(*idx_meta["range"], name=idx_meta.get("name"))
    else:
        index = pd.Index(_decode_column(idx_meta, parts[len(cols)]), name=idx_meta.get("name"))
    df = pd.DataFrame(data, index=index)
    for i, info in enumerate(cols):
        if "pandas_dtype" in info:
            df[i] = df[i].astype(info["pandas_dtype"])
    df.columns = [c["label"] for c in cols]
    return df
