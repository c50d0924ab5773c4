"""The conversion cache (kernel_ext.gguf.cache) through the loader, on real tiny GGUF files."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tinymodels import write_tiny_gemma3, write_tiny_llama

from kernel_ext.gguf import cache, sha256_file
from kernel_ext.gguf.loader import LoadedArtifacts, load_transformers

PROMPT = "hello world"


def _logits(art: LoadedArtifacts) -> torch.Tensor:
    ids = art.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return art.model(**ids).logits


def _entry(root: Path, gguf: Path) -> Path:
    return cache.entry_dir(root, sha256_file(gguf))


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gemma3(tmp_path / "tiny.gguf", quant="Q8_0")


def test_second_load_hits_every_piece_and_matches(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cold = load_transformers(tiny, cache_dir=root)
    assert cold.cache_hits == {"config": False, "tokenizer": False, "weights": False}
    assert cold.sha256 == sha256_file(tiny)
    entry = _entry(root, tiny)
    assert (entry / "config.json").is_file() and (entry / "tokenizer" / "tokenizer.json").is_file()
    assert (entry / "weights-float32.safetensors").is_file()
    warm = load_transformers(tiny, cache_dir=root)
    assert warm.cache_hits == {"config": True, "tokenizer": True, "weights": True}
    assert type(warm.tokenizer) is type(cold.tokenizer)
    assert warm.tokenizer.backend_tokenizer.to_str() == cold.tokenizer.backend_tokenizer.to_str()
    assert warm.tokenizer(PROMPT).input_ids == cold.tokenizer(PROMPT).input_ids
    torch.testing.assert_close(_logits(warm), _logits(cold), rtol=0, atol=0)
    nocache = load_transformers(tiny)
    torch.testing.assert_close(_logits(cold), _logits(nocache), rtol=0, atol=0)
    assert not list(root.rglob("*.tmp")), "no temporary files are left behind"


def test_deferred_cache_writes_finish_after_the_load_and_are_complete(
    tiny: Path, tmp_path: Path
) -> None:
    """With defer_cache_writes the load returns a usable model and tokenizer while the
    converted tokenizer may still be written; the entry is complete (and sealed) once
    finish_cache_writes returns, never half there before."""
    root = tmp_path / "cache"
    cold = load_transformers(tiny, cache_dir=root, defer_cache_writes=True)
    tdir = _entry(root, tiny) / "tokenizer"
    assert cold.tokenizer(PROMPT).input_ids  # usable at once
    assert not tdir.exists() or (tdir / "tokenizer.json").is_file()  # all there or not at all
    cold.finish_cache_writes()
    cache.verify_tree(tdir)  # complete and sealed
    cold.finish_cache_writes()  # idempotent
    warm = load_transformers(tiny, cache_dir=root)
    assert warm.cache_hits == {"config": True, "tokenizer": True, "weights": True}
    assert warm.tokenizer(PROMPT).input_ids == cold.tokenizer(PROMPT).input_ids


def test_precomputed_sha256_is_the_key_and_skips_hashing(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    digest = sha256_file(tiny)
    art = load_transformers(tiny, cache_dir=root, sha256=digest)
    assert "hash" not in art.timings and art.sha256 == digest
    assert [e.sha256 for e in cache.list_entries(root)] == [digest]


def test_changed_file_never_hits_the_stale_entry(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    path = tmp_path / "model.gguf"
    write_tiny_llama(path, seed=1)
    first = load_transformers(path, cache_dir=root)
    write_tiny_llama(path, seed=2)  # same path, same size, new content
    second = load_transformers(path, cache_dir=root)
    assert second.cache_hits == {"config": False, "tokenizer": False, "weights": False}
    assert second.sha256 != first.sha256
    assert not torch.equal(_logits(first), _logits(second))
    torch.testing.assert_close(_logits(second), _logits(load_transformers(path)), rtol=0, atol=0)
    assert {e.sha256 for e in cache.list_entries(root)} == {first.sha256, second.sha256}


def test_in_place_edits_of_a_cached_model_do_not_reach_the_cache(
    tiny: Path, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    cold = load_transformers(tiny, cache_dir=root)
    before = _logits(cold)
    with torch.no_grad():
        for p in cold.model.parameters():
            p.mul_(0.5)  # copy-on-write: the mapped cache file stays as it was
    warm = load_transformers(tiny, cache_dir=root)
    assert warm.cache_hits["weights"]
    torch.testing.assert_close(_logits(warm), before, rtol=0, atol=0)


@pytest.mark.parametrize("garbage", [b"", b"{not json", b'{"version": "1.0", "model": 3}'])
def test_corrupt_tokenizer_is_ignored_and_rebuilt(
    tiny: Path, tmp_path: Path, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    cold = load_transformers(tiny, cache_dir=root)
    tok_json = _entry(root, tiny) / "tokenizer" / "tokenizer.json"
    tok_json.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="kernel_ext.gguf.cache"):
        again = load_transformers(tiny, cache_dir=root)
    assert again.cache_hits["tokenizer"] is False
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert again.tokenizer(PROMPT).input_ids == cold.tokenizer(PROMPT).input_ids
    json.loads(tok_json.read_text())  # rebuilt and readable
    assert load_transformers(tiny, cache_dir=root).cache_hits["tokenizer"] is True


def test_truncated_weights_are_ignored_and_rebuilt(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    cold = load_transformers(tiny, cache_dir=root)
    expected = _logits(cold)
    weights = _entry(root, tiny) / "weights-float32.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="kernel_ext.gguf.cache"):
        again = load_transformers(tiny, cache_dir=root)
    assert again.cache_hits["weights"] is False
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(_logits(again), expected, rtol=0, atol=0)
    assert weights.stat().st_size == size


def test_weights_with_a_lying_header_are_rebuilt(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    load_transformers(tiny, cache_dir=root)
    weights = _entry(root, tiny) / "weights-float32.safetensors"
    raw = bytearray(weights.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1, 1]  # still a valid file, wrong for the model
    text = json.dumps(header).encode().ljust(n)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + bytes(raw[8 + n :]))
    again = load_transformers(tiny, cache_dir=root)
    assert again.cache_hits["weights"] is False
    assert load_transformers(tiny, cache_dir=root).cache_hits["weights"] is True


def test_corrupt_config_is_rewritten(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    load_transformers(tiny, cache_dir=root)
    config = _entry(root, tiny) / "config.json"
    config.write_text("[1, 2")
    assert load_transformers(tiny, cache_dir=root).cache_hits["config"] is False
    assert json.loads(config.read_text())["model_type"] == "gemma3_text"


def test_list_and_clear(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1)
    b = write_tiny_gemma3(tmp_path / "b.gguf", seed=2)
    assert cache.list_entries(root) == [] and cache.clear(root) == 0
    load_transformers(a, cache_dir=root)
    load_transformers(b, cache_dir=root)
    entries = cache.list_entries(root)
    assert [e.source for e in entries] == ["a.gguf", "b.gguf"]  # least recently used first
    assert all(e.weights == ("float32",) and e.size_bytes > 0 for e in entries)
    load_transformers(a, cache_dir=root)  # a is now the most recent
    assert [e.source for e in cache.list_entries(root)] == ["b.gguf", "a.gguf"]
    freed = cache.clear(root, sha256_file(b))
    assert freed == entries[1].size_bytes
    assert [e.source for e in cache.list_entries(root)] == ["a.gguf"]
    assert cache.clear(root) > 0 and cache.list_entries(root) == []
    with pytest.raises(ValueError, match="SHA-256"):
        cache.clear(root, "../etc")


def test_size_cap_evicts_least_recently_used_weights(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=2)
    load_transformers(a, cache_dir=root)
    one = cache.list_entries(root)[0].size_bytes
    # room for both entries' tokenizers but for only one set of weights
    load_transformers(b, cache_dir=root, cache_max_bytes=int(one * 1.5))
    by_source = {e.source: e for e in cache.list_entries(root)}
    assert by_source["a.gguf"].weights == () and by_source["b.gguf"].weights == ("float32",)
    assert (by_source["a.gguf"].path / "tokenizer" / "tokenizer.json").is_file()
    assert sum(e.size_bytes for e in by_source.values()) <= int(one * 1.5)
    # a still loads from its cached tokenizer, and decodes its weights again
    again = load_transformers(a, cache_dir=root, cache_weights=False)
    assert again.cache_hits == {"config": True, "tokenizer": True, "weights": False}


def test_weights_over_the_cap_are_not_cached(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    art = load_transformers(tiny, cache_dir=root, cache_max_bytes=1024)
    entry = cache.list_entries(root)[0]
    assert entry.weights == () and art.cache_hits["weights"] is False
    assert load_transformers(tiny, cache_dir=root).cache_hits["tokenizer"] is True


def test_weights_are_keyed_by_dtype_and_are_plain_safetensors(tiny: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    root = tmp_path / "cache"
    full = load_transformers(tiny, cache_dir=root)
    half = load_transformers(tiny, cache_dir=root, dtype=torch.bfloat16)
    assert half.cache_hits == {"config": True, "tokenizer": True, "weights": False}
    assert cache.list_entries(root)[0].weights == ("bfloat16", "float32")
    state = dict(full.model.named_parameters())
    with safe_open(str(_entry(root, tiny) / "weights-float32.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and set(keys) <= set(state)
        for key in keys:
            torch.testing.assert_close(f.get_tensor(key), state[key].detach(), rtol=0, atol=0)


def test_writer_abort_and_incomplete_commit_leave_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    specs = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    w = cache.WeightsWriter(tmp_path / "w.safetensors", specs)
    w.put("a", torch.ones(2, 3))
    w.abort()
    w = cache.WeightsWriter(tmp_path / "w.safetensors", specs)
    with pytest.raises(ValueError, match="out of order"):
        w.put("b", torch.ones(4, dtype=torch.bfloat16))
    w.put("a", torch.ones(1, 3))  # rows arrive in parts
    with caplog.at_level(logging.WARNING, logger="kernel_ext.gguf.cache"):
        assert w.commit() is None  # "a" is half written, "b" missing
    assert "not cached" in caplog.text
    assert list(tmp_path.iterdir()) == []
    w = cache.WeightsWriter(tmp_path / "w.safetensors", specs)
    w.put("a", torch.arange(3.0).repeat(2, 1)[:1])
    w.put("a", torch.arange(3.0).repeat(2, 1)[1:])
    w.put("b", torch.arange(4.0).to(torch.bfloat16))
    assert w.commit() == (tmp_path / "w.safetensors").stat().st_size
    back = cache.load_weights(tmp_path / "w.safetensors", {"a": ((2, 3), torch.float32)})
    assert back["a"].tolist() == [[0.0, 1.0, 2.0]] * 2 and back["b"].dtype == torch.bfloat16


def test_clear_with_a_bad_key_is_a_typed_error_and_a_usage_error(tmp_path: Path, ip: Any) -> None:
    from IPython.core.error import UsageError

    from kernel_ext.errors import KernelExtError

    with pytest.raises(cache.CacheError, match="64 hexadecimal") as info:
        cache.clear(tmp_path, "BADSHA")
    assert isinstance(info.value, KernelExtError) and isinstance(info.value, ValueError)
    with pytest.raises(UsageError, match="not a conversion cache key"):
        ip.run_line_magic("model", "cache clear BADSHA")


def _in_thread(fn: Callable[[], object]) -> list[object]:
    """Run ``fn`` on a daemon thread; a hang fails the test (after 60 s) instead of the run."""
    out: list[object] = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    th.start()
    th.join(timeout=60)
    assert not th.is_alive(), "the writer blocked"
    return out


def test_writer_that_fails_with_any_error_never_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(fh: Any, t: torch.Tensor) -> None:
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(cache, "_write_tensor", broken)
    specs = [(f"t{i}", (4,), torch.float32) for i in range(10)]
    w = cache.WeightsWriter(tmp_path / "w.safetensors", specs, depth=1)

    def feed() -> int | None:
        for name, _, _ in specs:
            w.put(name, torch.ones(4))
        return w.commit()

    with caplog.at_level(logging.WARNING, logger="kernel_ext.gguf.cache"):
        assert _in_thread(feed) == [None]
    assert isinstance(w.error, RuntimeError) and "on fire" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_load_survives_a_failing_weights_writer(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plain = load_transformers(tiny)
    calls = 0

    def broken(fh: Any, t: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(cache, "_write_tensor", broken)
    root = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        (art,) = _in_thread(lambda: load_transformers(tiny, cache_dir=root))
    assert isinstance(art, LoadedArtifacts) and calls >= 1
    assert art.cache_hits["weights"] is False
    assert "not cached" in caplog.text and "on fire" in caplog.text
    torch.testing.assert_close(_logits(art), _logits(plain), rtol=0, atol=0)
    entry = _entry(root, tiny)
    assert not list(entry.glob("weights-*")) and not list(entry.glob(".weights-*"))


def test_interrupted_load_stops_the_writer_and_removes_its_file(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernel_ext.gguf import loader

    real = loader._decode
    calls = 0

    def interrupted(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "_decode", interrupted)
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_transformers(tiny, cache_dir=root)
    assert calls == 3
    assert not [t for t in threading.enumerate() if t.name == "kernel_ext-weights-cache"]
    entry = _entry(root, tiny)
    assert not list(entry.glob("weights-*")) and not list(entry.glob(".weights-*"))
