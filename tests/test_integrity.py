"""Integrity end to end: the pin covers the bytes parsed; conversion-cache entries are sealed
with digests bound to the source SHA-256 and verified on use (real tiny GGUF files, a real
Session and its audit log)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tinymodels import write_tiny_gemma3, write_tiny_llama

from kernel_ext.config import KernelExtConfig
from kernel_ext.errors import IntegrityError
from kernel_ext.gguf import cache, read_gguf, sha256_file
from kernel_ext.gguf.loader import load_transformers
from kernel_ext.session import Session

PROMPT = "hello world"


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def _session(tmp_path: Path) -> Session:
    cfg = KernelExtConfig(cache_dir=str(tmp_path / "kcache"))
    return Session(cfg, None, state_dir=tmp_path / "state")


def _entry_logits(session: Session, name: str) -> torch.Tensor:
    local = session.models.get(name).provider.local
    return _logits(local.model, local.tokenizer)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gemma3(tmp_path / "tiny.gguf", quant="Q8_0")


# --- the pin covers the parsed bytes -------------------------------------------------------------
def test_sha256_is_taken_from_the_open_file(tiny: Path, tmp_path: Path) -> None:
    other = write_tiny_llama(tmp_path / "other.gguf", seed=3)
    with read_gguf(tiny) as gf:
        os.replace(other, tiny)  # the path now names another file
        assert gf.sha256() != sha256_file(tiny)
        with gf.open_data() as fh:
            assert fh.read(4) == b"GGUF"


def test_a_file_swapped_after_opening_cannot_pass_the_pin(tmp_path: Path) -> None:
    """Hash-then-reopen would hash the good file and parse the bad one; we hash what we parse."""
    good = write_tiny_llama(tmp_path / "good.gguf", seed=1)
    pin = sha256_file(good)
    path = write_tiny_llama(tmp_path / "model.gguf", seed=2)  # what is opened and parsed
    session = _session(tmp_path)
    swapped: list[bool] = []

    def swap(ev: Any) -> None:  # runs after read_gguf opened the file, before hashing
        if ev["stage"] == "sha256" and not swapped:
            shutil.copy(good, tmp_path / "incoming")
            os.replace(tmp_path / "incoming", path)
            swapped.append(True)

    session.events.subscribe("load_progress", swap)
    with pytest.raises(IntegrityError, match="pin expects"):
        session.models.load(str(path), name="m", sha256=pin, progress=False)
    assert swapped and sha256_file(path) == pin  # the path does hold the pinned file now
    assert session.audit.read("model.load_failed")[-1]["name"] == "m"
    assert "m" not in session.models.names()


def test_a_swap_after_the_pin_check_still_loads_the_pinned_bytes(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "model.gguf", seed=1)
    pin = sha256_file(path)
    reference = load_transformers(path)
    evil = write_tiny_llama(tmp_path / "evil.gguf", seed=2)
    session = _session(tmp_path)
    session.config.conversion_cache = False  # every tensor is read from the GGUF file
    swapped: list[bool] = []

    def swap(ev: Any) -> None:
        if ev["stage"] == "weights" and not swapped:
            os.replace(evil, path)
            swapped.append(True)

    session.events.subscribe("load_progress", swap)
    session.models.load(str(path), name="m", sha256=pin, progress=False)
    assert swapped
    torch.testing.assert_close(
        _entry_logits(session, "m"), _logits(reference.model, reference.tokenizer),
        rtol=0, atol=0)


# --- the conversion cache is sealed and verified -------------------------------------------------
def _overwrite_middle(path: Path, n: int = 4096) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\xff" * min(n, size - size // 2))


def test_tampered_cached_weights_are_rebuilt_and_audited(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's report: 4 KiB overwritten in the cached weights were served (NaN logits)."""
    clean = load_transformers(tiny)
    expected = _logits(clean.model, clean.tokenizer)
    session = _session(tmp_path)
    session.models.load(str(tiny), name="first", progress=False)
    session.models.wait_idle()  # the converted tokenizer is stored after the load returns
    entry = cache.entry_dir(session.cache_dir / "conversions", sha256_file(tiny))
    weights = entry / "weights-float32.safetensors"
    digests = json.loads((entry / cache.DIGESTS).read_text())
    assert digests["source_sha256"] == entry.name
    assert {"config.json", "weights-float32.safetensors",
            "tokenizer/tokenizer.json"} <= set(digests["files"])
    session.models.unload("first")  # its weights map the cache file (see the README)
    _overwrite_middle(weights)
    capsys.readouterr()
    session.models.load(str(tiny), name="second", progress=False)
    torch.testing.assert_close(_entry_logits(session, "second"), expected, rtol=0, atol=0)
    notice = capsys.readouterr().out
    assert "did not match its recorded digest" in notice and "second" in notice
    [rec] = session.audit.read("cache.rebuilt")
    assert rec["tampered"] is True and rec["piece"] == str(weights) and rec["name"] == "second"
    assert "changed after it was cached" in rec["reason"]
    # the rebuilt file is sealed again: the next load uses it without a note
    session.models.load(str(tiny), name="third", progress=False)
    assert len(session.audit.read("cache.rebuilt")) == 1
    torch.testing.assert_close(_entry_logits(session, "third"), expected, rtol=0, atol=0)


def test_an_entry_without_digests_from_an_older_version_is_rebuilt_without_crying_wolf(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An upgrade: entries written before digests existed are rebuilt (never served
    unverified), and the notice says why in words a user can act on."""
    session = _session(tmp_path)
    session.models.load(str(tiny), name="first", progress=False)
    entry = cache.entry_dir(session.cache_dir / "conversions", sha256_file(tiny))
    session.models.unload("first")
    (entry / cache.DIGESTS).unlink()
    capsys.readouterr()
    session.models.load(str(tiny), name="second", progress=False)
    notice = capsys.readouterr().out
    assert "had no recorded digest (an older kernel_ext wrote it" in notice
    assert "did not match" not in notice
    assert all("no digest recorded" in r["reason"] for r in session.audit.read("cache.rebuilt"))


@pytest.mark.parametrize("piece", ["config.json", "tokenizer/tokenizer.json",
                                   "tokenizer/tokenizer_config.json"])
def test_tampered_small_pieces_are_rebuilt(tiny: Path, tmp_path: Path, piece: str) -> None:
    root = tmp_path / "cache"
    cold = load_transformers(tiny, cache_dir=root)
    target = cache.entry_dir(root, cold.sha256) / piece
    doc = json.loads(target.read_text())
    doc["kernel_ext_test_edit"] = True  # still valid JSON, still a usable file
    target.write_text(json.dumps(doc))
    with cache.collect_discards() as notes:
        again = load_transformers(tiny, cache_dir=root)
    assert notes and notes[0]["tampered"] and piece.split("/")[0] in notes[0]["path"]
    key = "config" if piece == "config.json" else "tokenizer"
    assert again.cache_hits[key] is False
    assert "kernel_ext_test_edit" not in target.read_text()
    assert load_transformers(tiny, cache_dir=root).cache_hits[key] is True


def test_a_removed_tokenizer_file_is_noticed(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cold = load_transformers(tiny, cache_dir=root)
    tdir = cache.entry_dir(root, cold.sha256) / "tokenizer"
    (tdir / "tokenizer_config.json").unlink()
    with pytest.raises(cache.TamperedEntryError, match="removed"):
        cache.verify_tree(tdir)


def test_digests_are_bound_to_the_source(tmp_path: Path) -> None:
    """An entry copied under another file's SHA-256, digests and all, does not verify."""
    root = tmp_path / "cache"
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=2)
    first = load_transformers(a, cache_dir=root)
    second = load_transformers(b, cache_dir=root)
    ea, eb = cache.entry_dir(root, first.sha256), cache.entry_dir(root, second.sha256)
    shutil.rmtree(eb)
    shutil.copytree(ea, eb)  # a's weights posing as b's
    doc = json.loads((eb / cache.DIGESTS).read_text())
    doc["source_sha256"] = eb.name  # even with the record relabelled
    (eb / cache.DIGESTS).write_text(json.dumps(doc))
    with pytest.raises(cache.TamperedEntryError):
        cache.verify(eb / "weights-float32.safetensors")
    again = load_transformers(b, cache_dir=root)
    assert again.cache_hits["weights"] is False
    torch.testing.assert_close(_logits(again.model, again.tokenizer),
                               _logits(second.model, second.tokenizer), rtol=0, atol=0)


def test_entries_without_digests_are_not_trusted(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cold = load_transformers(tiny, cache_dir=root)
    (cache.entry_dir(root, cold.sha256) / cache.DIGESTS).unlink()  # as a version-1 entry
    with cache.collect_discards() as notes:
        again = load_transformers(tiny, cache_dir=root)
    assert again.cache_hits == {"config": False, "tokenizer": False, "weights": False}
    assert all("no digest recorded" in n["why"] for n in notes) and len(notes) == 3
    assert load_transformers(tiny, cache_dir=root).cache_hits["weights"] is True


def test_any_artifact_can_be_sealed(tmp_path: Path) -> None:
    entry = cache.entry_dir(tmp_path, "ab" * 32)
    entry.mkdir(parents=True)
    extra = entry / "repacked-int4.bin"  # e.g. another branch's new artifact
    extra.write_bytes(b"\x01" * 1000)
    cache.seal(extra)
    cache.verify(extra)
    extra.write_bytes(b"\x01" * 999 + b"\x02")
    with pytest.raises(cache.TamperedEntryError):
        cache.verify(extra)
    with pytest.raises(cache.CacheError):
        cache.seal(tmp_path / "outside.bin")
