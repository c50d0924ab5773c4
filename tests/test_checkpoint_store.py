"""The snapshot store on real Zarr stores (a directory and memory://): round trips of every
storable kind, incremental writes, retention, corruption fallback, encryption, pickle safety."""

from __future__ import annotations

import base64
import json
import os
import pickle
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kernel_ext.checkpoint._codec import Unstorable, encode
from kernel_ext.checkpoint.store import Store
from kernel_ext.errors import CheckpointCorruptError, CheckpointError

KEY_ENV = "KERNEL_EXT_TEST_CKPT_KEY"


def enc_all(values: dict) -> dict:
    return {k: encode(v) for k, v in values.items()}


def assert_same(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a == b
    else:
        assert a == b


def sample_values() -> dict:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((64, 33)).astype(np.float32),
        "i8": np.arange(-50, 50, dtype=np.int8),
        "u64": np.array([2**63 + 5], dtype=np.uint64),
        "c128": np.array([1 + 2j, -3j]),
        "bools": np.array([[True, False], [False, True]]),
        "f16_fortran": np.asfortranarray(rng.standard_normal((5, 7)).astype(np.float16)),
        "big_endian": np.arange(6, dtype=">i4"),
        "empty": np.zeros((3, 0), dtype=np.float64),
        "zero_d": np.array(7.5),
        "scalar": np.float32(2.5),
        "dates": np.array(["2020-01-01", "2024-02-29"], dtype="M8[D]"),
        "zeros": np.zeros(300_000),  # compresses: stored with Blosc
        "bf16": torch.randn(4, 5).to(torch.bfloat16),
        "t_f32_grad": torch.randn(3, requires_grad=True),
        "t_int": torch.arange(10),
        "t_view": torch.arange(12.0).reshape(3, 4).t(),
        "json": {"a": [1, 2.5, None, "s", True], "b": {"c": []}, "ü": "ñ"},
        "text": "hello",
        "num": 3,
        "raw": b"\x00\xffbytes",
        "buf": bytearray(b"abc"),
        "df": pd.DataFrame({"n": [1, 2, 3], "x": [0.5, np.nan, 2.0], "s": ["a", None, "c"],
                            "t": pd.to_datetime(["2020-01-01", "2021-01-01", "2022-01-01"])},
                           index=pd.Index([10, 20, 30], name="id")),
    }


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "ckpt", keep=3)


def array_objects(store: Store) -> list[Path]:
    """The arrays under objects/ (not the Zarr group that holds them)."""
    return [p for p in (store.backend.root / "objects").iterdir() if p.name != "zarr.json"]


def test_every_storable_kind_round_trips_with_dtype_and_shape(store: Store) -> None:
    values = sample_values()
    store.commit(enc_all(values))
    restored = store.restore()
    assert set(restored.values) == set(values)
    for name, value in values.items():
        got = restored.values[name]
        if name == "t_f32_grad":
            assert got.requires_grad and torch.equal(got.detach(), value.detach())
        elif name == "f16_fortran":
            np.testing.assert_array_equal(got, value)
            assert got.dtype == value.dtype
        elif name == "big_endian":
            np.testing.assert_array_equal(got, value)
        elif name == "t_view":
            assert torch.equal(got, value)
        else:
            assert_same(value, got)
    # arrays really are Zarr v3 arrays in the store, the big zero array compressed
    import zarr

    ref = store.manifest(restored.snapshot)["variables"]["zeros"]["parts"][0]
    z = zarr.open_array(store=store.backend.array_store(f"objects/{ref['hash']}"), mode="r")
    assert z.metadata.zarr_format == 3 and z.compressors
    on_disk = sum(p.stat().st_size for p in (store.backend.root / "objects" / ref["hash"])
                  .rglob("*") if p.is_file())
    assert on_disk < ref["nbytes"] / 20


@pytest.mark.parametrize("value, reason", [
    ((1, 2), "tuple"),
    ({1: "a"}, "not JSON"),
    (np.array(["a"], dtype=object), "dtype object"),
    (np.ma.array([1, 2]), "subclass"),
    (object(), "not a storable kind"),
    (lambda: 1, "function"),
    (os, "module"),
    (torch.nn.Linear(2, 2), "model object"),
])
def test_unstorable_values_say_why(value, reason: str) -> None:
    with pytest.raises(Unstorable, match=reason):
        encode(value)


def test_unchanged_variables_are_not_written_again(store: Store) -> None:
    a = np.random.default_rng(1).standard_normal(100_000)
    b = np.random.default_rng(2).standard_normal(100_000)
    first = store.commit(enc_all({"a": a, "b": b, "j": [1, 2]}))
    assert first.written_bytes == a.nbytes + b.nbytes + len(b"[1,2]")
    b[0] = 42.0
    second = store.commit(enc_all({"a": a, "b": b, "j": [1, 2]}))
    assert second.written_bytes == b.nbytes
    objects = array_objects(store)
    assert len(objects) == 3  # a, old b, new b
    np.testing.assert_array_equal(store.restore().values["b"], b)
    old = store.restore(first.snapshot).values["b"]
    assert old[0] != 42.0


def test_retention_keeps_k_snapshots_and_collects_unreferenced_objects(store: Store) -> None:
    ids = [store.commit(enc_all({"x": np.full(1000, i), "s": f"v{i}"})).snapshot
           for i in range(6)]
    assert store.snapshots() == ids[::-1][:3]
    assert sorted(p.name for p in (store.backend.root / "snapshots").iterdir()) == \
        sorted(f"{i}.json" for i in ids[-3:])
    assert len(array_objects(store)) == 3
    assert len(list((store.backend.root / "blobs").iterdir())) == 3
    assert store.restore(ids[3]).values["s"] == "v3"
    with pytest.raises(CheckpointError, match="no single snapshot"):
        store.restore(ids[0])
    assert store.resolve("-2") == ids[4]


def test_task_objects_survive_collection(store: Store) -> None:
    store.commit_task("t", [(0, None, encode(np.arange(5)))], total=3)
    for i in range(5):
        store.commit(enc_all({"x": np.full(10, i)}))
    ((key, fp, value),) = store.load_task("t")
    assert key == 0 and fp is None
    np.testing.assert_array_equal(value, np.arange(5))


def _chunk_files(store: Store, snapshot: str, name: str) -> list[Path]:
    ref = store.manifest(snapshot)["variables"][name]["parts"][0]
    return sorted(p for p in (store.backend.root / "objects" / ref["hash"] / "c").rglob("*")
                  if p.is_file())


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_chunk_is_detected_and_restore_falls_back(store: Store, damage: str) -> None:
    rng = np.random.default_rng(3)
    old = {"x": rng.standard_normal(5000), "keep": "same"}
    new = {"x": rng.standard_normal(5000), "keep": "same"}
    store.commit(enc_all(old))
    sid = store.commit(enc_all(new)).snapshot
    (chunk,) = _chunk_files(store, sid, "x")
    if damage == "delete":
        chunk.unlink()
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:100])
    else:
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    restored = store.restore()
    assert restored.snapshot == sid and restored.values["keep"] == "same"
    np.testing.assert_array_equal(restored.values["x"], old["x"])  # its older intact copy
    assert restored.sources == {"x": store.snapshots()[1]} and not restored.lost
    assert restored.notes and sid in restored.notes[0] and "damaged" in restored.notes[0]
    assert store.restore(sid).sources == restored.sources  # the same from an explicit snapshot
    assert store.restore(store.snapshots()[1]).sources == {}


def test_one_damaged_object_shared_by_every_snapshot_costs_only_its_variable(store: Store
                                                                             ) -> None:
    """The issue's case: one flipped byte in an object every snapshot shares."""
    shared = np.arange(5000.0)
    for i in range(3):
        store.commit(enc_all({"shared": shared, "n": i, "text": f"v{i}"}))
    (chunk,) = _chunk_files(store, store.snapshots()[0], "shared")
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))
    restored = store.restore()
    assert restored.values == {"n": 2, "text": "v2"}
    assert list(restored.lost) == ["shared"] and "damaged" in restored.lost["shared"]
    assert len(restored.damaged["shared"]) == 1  # the shared object is read (and reported) once


def test_damaged_blob_and_missing_manifest_fall_back(store: Store) -> None:
    store.commit(enc_all({"j": {"v": 1}}))
    sid = store.commit(enc_all({"j": {"v": 2}})).snapshot
    h = store.manifest(sid)["variables"]["j"]["parts"][0]["hash"]
    (store.backend.root / "blobs" / h).write_bytes(b'{"v":3}')
    assert store.restore().values["j"] == {"v": 1}
    sid3 = store.commit(enc_all({"j": {"v": 4}})).snapshot
    (store.backend.root / "snapshots" / f"{sid3}.json").unlink()
    store._manifests.clear()
    assert store.restore().values["j"] == {"v": 1}


def test_no_intact_copy_names_the_variable_and_no_readable_manifest_raises(store: Store
                                                                           ) -> None:
    sid = store.commit(enc_all({"x": np.arange(10.0)})).snapshot
    for chunk in _chunk_files(store, sid, "x"):
        chunk.unlink()
    restored = store.restore()
    assert restored.values == {} and "is missing" in restored.lost["x"]
    (store.backend.root / "snapshots" / f"{sid}.json").write_text("{")
    store._manifests.clear()
    with pytest.raises(CheckpointCorruptError, match="no readable snapshot"):
        store.restore()


def test_leftover_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.commit(enc_all({"x": 1}))
    (tmp_path / "s" / "tmp" / "deadbeef.part").write_bytes(b"torn")
    (tmp_path / "s" / "tmp" / "halfarray").mkdir()
    (tmp_path / "s" / "snapshots" / "orphan.json").write_bytes(b"{}")
    again = Store(tmp_path / "s")
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
    again.commit(enc_all({"x": 2}))
    assert not (tmp_path / "s" / "snapshots" / "orphan.json").exists()
    assert again.restore().values["x"] == 2


def test_memory_url_uses_the_same_protocol() -> None:
    url = f"memory://kernel-ext-test-{uuid.uuid4().hex}"
    store = Store(url, keep=2)
    values = {"a": np.arange(1000, dtype=np.int32), "j": {"k": [1]}, "t": torch.ones(3)}
    for i in range(3):
        values["a"] = values["a"] + 1
        store.commit(enc_all(values))
    restored = Store(url, keep=2).restore()
    for name, value in values.items():
        assert_same(value, restored.values[name])
    import fsspec

    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    objects = [p for p in fs.ls(f"/{root}/objects", detail=False)
               if not p.endswith((".ok", "zarr.json"))]
    assert len(objects) == 3  # "t" and the two retained versions of "a"; the first collected
    store.commit_task("t", [(0, "fp", "r")], total=1)
    assert store.load_task("t") == [(0, "fp", "r")]


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, base64.b64encode(os.urandom(32)).decode())
    return KEY_ENV


def test_encrypted_snapshots_hide_content_and_refuse_tampering(tmp_path: Path,
                                                                 key_env: str) -> None:
    store = Store(tmp_path / "e", key_env=key_env)
    secret = "TOP-SECRET-PLAINTEXT"
    values = {"s": secret, "a": np.arange(100_000, dtype=np.int64), "b": torch.ones(2,
              dtype=torch.bfloat16)}
    store.commit(enc_all(values))
    for path in (tmp_path / "e").rglob("*"):
        if path.is_file() and path.name != "HEAD":
            assert secret.encode() not in path.read_bytes()
    restored = Store(tmp_path / "e", key_env=key_env).restore()
    for name, value in values.items():
        assert_same(value, restored.values[name])
    sealed = max((tmp_path / "e" / "sealed").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(sealed.read_bytes())
    data[-5] ^= 1
    sealed.write_bytes(bytes(data))
    tampered = Store(tmp_path / "e", key_env=key_env).restore()  # the biggest object is "a"
    assert list(tampered.lost) == ["a"] and "tampered" in tampered.lost["a"]
    assert tampered.values["s"] == secret and "a" not in tampered.values


def test_encrypted_manifest_tampering_and_missing_key(tmp_path: Path, key_env: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "e", key_env=key_env)
    sid = store.commit(enc_all({"x": 1})).snapshot
    path = tmp_path / "e" / "snapshots" / f"{sid}.json"
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(CheckpointCorruptError):
        Store(tmp_path / "e", key_env=key_env).restore()
    # a plaintext manifest swapped in while a key is set is refused too
    path.write_bytes(json.dumps({"variables": {}}).encode())
    with pytest.raises(CheckpointCorruptError, match="not encrypted"):
        Store(tmp_path / "e", key_env=key_env).restore(sid)
    path.write_bytes(original)
    monkeypatch.delenv(key_env)
    with pytest.raises(CheckpointError, match=key_env):
        Store(tmp_path / "e", key_env=key_env).restore(sid)
    monkeypatch.setenv(key_env, "not base64!")
    with pytest.raises(CheckpointError, match="base64"):
        Store(tmp_path / "e", key_env=key_env).restore(sid)


class RunsCode:
    """Unpickling this object creates a marker file (stands in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_values_are_only_unpickled_when_allowed(store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = RunsCode(marker)
    with pytest.raises(Unstorable):
        encode(evil)  # never pickled without opting in
    store.commit({"evil": encode(evil, allow_pickle=True), "ok": encode([1])})
    assert not marker.exists()
    restored = store.restore()
    assert "evil" not in restored.values and "evil" in restored.refused
    assert "runs code" in restored.refused["evil"]
    assert restored.values["ok"] == [1]
    assert not marker.exists()
    store.restore(allow_pickle=lambda name: name == "evil")
    assert marker.exists()
    assert pickle.dumps  # pickle really is what would run


def test_store_in_unwritable_place_raises_typed_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot open the checkpoint store"):
        Store(blocker / "sub")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_copied_to_the_cpu_and_restored_on_the_device(store: Store) -> None:
    t = torch.randn(64, 64, device="cuda").to(torch.bfloat16)
    store.commit({"t": encode(t)})
    entry = store.manifest(store.snapshots()[0])["variables"]["t"]
    assert entry["meta"]["device"].startswith("cuda") and entry["meta"]["torch_dtype"] == "bfloat16"
    got = store.restore().values["t"]
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16 and torch.equal(got, t)


@pytest.mark.parametrize("url, message", [
    ("bogus-proto://bucket/x", "Protocol not known"),
    ("s3://bucket/x", "s3fs"),  # s3fs is not installed here
])
def test_unusable_store_url_is_a_typed_error_that_says_what_to_do(url: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as info:
        Store(url)
    assert "checkpoint_url" in str(info.value)


def test_malformed_manifest_is_corrupt_and_restore_falls_back(store: Store) -> None:
    first = store.commit(enc_all({"x": 1})).snapshot
    second = store.commit(enc_all({"x": 2})).snapshot
    path = Path(store.location) / "snapshots" / f"{second}.json"
    path.write_bytes(json.dumps({"id": second, "variables": {}}).encode())  # no "created"
    fresh = Store(store.location)
    with pytest.raises(CheckpointCorruptError, match="malformed manifest"):
        fresh.manifest(second)
    restored = fresh.restore()
    assert restored.snapshot == first and restored.values == {"x": 1}


def test_plaintext_task_is_refused_when_a_key_is_set(tmp_path: Path, key_env: str) -> None:
    from kernel_ext.checkpoint._codec import blob_hash, json_bytes

    store = Store(tmp_path / "e", key_env=key_env)
    store.commit_task("t", [(0, None, "real")], total=1)
    assert store.load_task("t") == [(0, None, "real")]
    # swap in plaintext progress whose pointer claims "not sealed"
    segment = json_bytes([[0, None, {"json": "forged"}]])
    manifest = json_bytes({"format": 1, "name": "t", "total": 1, "sealed": False, "done": 1,
                           "segments": [blob_hash(segment)], "refs": [blob_hash(segment)]})
    for data in (segment, manifest):
        (tmp_path / "e" / "blobs").mkdir(exist_ok=True)
        (tmp_path / "e" / "blobs" / blob_hash(data)).write_bytes(data)
    (tmp_path / "e" / store._task_key("t")).write_bytes(
        json_bytes({"name": "t", "manifest": blob_hash(manifest), "sealed": False}))
    with pytest.raises(CheckpointCorruptError, match="not encrypted"):
        Store(tmp_path / "e", key_env=key_env).load_task("t")


def test_plain_zarr_finds_the_newest_arrays_by_variable_name(store: Store) -> None:
    import zarr

    store.commit(enc_all({"weights": np.arange(1000.0), "meta": {"k": 1}}))
    store.commit(enc_all({"weights": np.arange(1000.0) * 2, "meta": {"k": 2}}))
    group = zarr.open_group(str(store.backend.root), mode="r")
    assert group.attrs["snapshot"] == store.snapshots()[0]
    assert set(group.attrs["arrays"]) == {"weights"}  # arrays only; the rest are blobs
    np.testing.assert_array_equal(group[group.attrs["arrays"]["weights"]][...],
                                  np.arange(1000.0) * 2)
    assert len(list(group["objects"].array_keys())) == 2  # both kept versions, by hash
