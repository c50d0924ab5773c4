"""The offline answer cache on a real directory: the size cap evicts the least recently used
answers, a hit counts as a use, partial answers are refused, a damaged entry is skipped, and
``clear`` removes everything or one identity's answers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kernel_ext.providers.base import GenerationParams, GenerationResult
from kernel_ext.providers.offline_cache import OfflineCache

P = GenerationParams(max_new_tokens=8)


def answer(text: str = "an answer", finish: str = "stop") -> GenerationResult:
    return GenerationResult(text=text, model="m", provider="p", finish_reason=finish)


def age(path: Path, seconds_ago: float) -> None:
    """Backdate the entry's last use (what a hit or write would have set long ago)."""
    t = path.stat().st_mtime - seconds_ago
    os.utime(path, (t, t))


def test_the_cap_evicts_the_least_recently_used(tmp_path: Path) -> None:
    cache = OfflineCache(tmp_path)
    paths = [cache.put("id", f"prompt {i}", P, answer()) for i in range(3)]
    for i, p in enumerate(paths):
        age(p, 100 - i * 10)  # prompt 0 is the oldest
    size = paths[0].stat().st_size
    assert cache.get(["id"], "prompt 0", P) is not None  # a hit: prompt 0 is now the newest
    cache.max_bytes = int(3.5 * size)
    cache.put("id", "prompt 3", P, answer())
    assert sorted(e.prompt for e in cache.entries()) == ["prompt 0", "prompt 2", "prompt 3"]
    assert cache.size_bytes() <= cache.max_bytes


def test_an_answer_larger_than_the_cap_is_not_kept(tmp_path: Path) -> None:
    cache = OfflineCache(tmp_path, max_bytes=600)
    cache.put("id", "small", P, answer("x"))
    cache.put("id", "huge", P, answer("y" * 1000))
    assert [e.prompt for e in cache.entries()] == ["small"]


def test_partial_answers_are_refused(tmp_path: Path) -> None:
    cache = OfflineCache(tmp_path)
    for finish in ("timeout", "interrupted"):
        with pytest.raises(ValueError, match="partial"):
            cache.put("id", "q", P, answer(finish=finish))
    assert len(cache) == 0


def test_clear_one_identity_or_all_and_skip_damaged_entries(tmp_path: Path) -> None:
    cache = OfflineCache(tmp_path)
    cache.put("a", "q1", P, answer())
    cache.put("a", "q2", P, answer())
    kept = cache.put("b", "q1", P, answer())
    damaged = kept.parent / ("0" * 64 + ".json")
    damaged.write_text("[1, 2]")  # a foreign or torn file: listed nowhere, served never
    assert {e.identity for e in cache.entries()} == {"a", "b"}
    assert cache.clear("a") == 2
    assert [e.identity for e in cache.entries()] == ["b"]
    assert cache.get(["a", "b"], "q1", P).text == "an answer"  # type: ignore[union-attr]
    assert cache.clear() == 2 and len(cache) == 0
