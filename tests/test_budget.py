"""Budgets before work: prompts beyond the context, absurdly long prompts and requests whose KV
cache would not fit are refused with the numbers before any big allocation; truncation is
opt-in. Real IPython shell, real tiny GGUF models (llama: full attention; gemma3: sliding
window layers)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from tinymodels import write_tiny_gemma3, write_tiny_llama

from kernel_ext.budget import (
    AttentionLayout,
    RequestGuard,
    RequestLimits,
    kv_cache_bytes,
    max_piece_chars,
    prefill_bytes,
)
from kernel_ext.errors import (
    ContextOverflowError,
    MemoryBudgetError,
    PromptError,
    RequestMemoryError,
)


def cell(ip: Any, args: str, body: str) -> Any:
    return ip.run_cell_magic("infer", args, body)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny-llama.gguf", seed=1, context=256)


@pytest.fixture
def loaded(ip: Any, tiny: Path) -> Any:
    ip.run_line_magic("model", f"load {tiny} --name tiny --no-progress")
    return next(c for c in ip.configurables if type(c).__name__ == "KernelExt").session


def _tokens(session: Any, text: str) -> int:
    tok = session.models.get("tiny").provider.local.tokenizer
    return len(tok(text)["input_ids"])


# --- the layout and the byte estimates --------------------------------------------------------
def test_layout_counts_sliding_window_layers(tmp_path: Path) -> None:
    from transformers import Gemma3TextConfig, LlamaConfig

    gemma = Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                             sliding_window=512, max_position_embeddings=32768, vocab_size=262144)
    lay = AttentionLayout.from_config(gemma)
    assert (lay.layers, lay.kv_heads, lay.head_dim, lay.sliding_window) == (18, 1, 256, 512)
    assert lay.sliding_layers == 15 and lay.context == 32768  # Gemma 3: 5 sliding : 1 full
    per_position = 2 * 1 * 256 * 4
    # 3 full layers keep every position, 15 sliding layers the last 512
    assert kv_cache_bytes(gemma, 10_000) == per_position * (3 * 10_000 + 15 * 512)
    assert kv_cache_bytes(gemma, 100) == per_position * 18 * 100
    assert kv_cache_bytes(gemma, 100, batch=3) == 3 * kv_cache_bytes(gemma, 100)
    llama = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, max_position_embeddings=8192, vocab_size=128256)
    # Llama 3 8B in bf16: 128 KiB per token
    assert kv_cache_bytes(llama, 1000, dtype="bfloat16") == 1000 * 2 * 32 * 8 * 128 * 2
    # prefill grows with the square of the prompt (masks), chunks bound it
    assert prefill_bytes(gemma, 16384) > 3 * prefill_bytes(gemma, 8192)
    assert prefill_bytes(gemma, 8192, chunk=512) < prefill_bytes(gemma, 8192) / 8


def test_max_piece_chars_bounds_characters_per_token(loaded: Any) -> None:
    tok = loaded.models.get("tiny").provider.local.tokenizer
    piece = max_piece_chars(tok)
    assert piece == max(len(p) for p in tok.get_vocab())
    for text in ("hello world", "a" * 300, "the cat sat on the mat " * 20):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) >= len(text) / piece


# --- in a real shell --------------------------------------------------------------------------
def test_prompt_beyond_the_context_is_refused_with_the_numbers(ip: Any, loaded: Any) -> None:
    ip.user_ns["big"] = "cat " * 400  # well beyond the 256-token context of the tiny model
    with pytest.raises(UsageError) as err:
        cell(ip, "-n 16", "{big}")
    msg = str(err.value)
    assert "ContextOverflowError" in msg and "context of 256 tokens" in msg
    n = _tokens(loaded, "cat " * 400)
    assert f"{n:,} tokens + --max-new-tokens 16" in msg and "truncate_left" in msg
    assert "\n" not in msg  # one line


def test_max_new_tokens_counts_against_the_context(ip: Any, loaded: Any) -> None:
    text = "cat " * 60
    n = _tokens(loaded, text)
    ip.user_ns["text"] = text
    cell(ip, f"-n {256 - n} -q -o ok", "{text}")  # exactly fits
    with pytest.raises(UsageError, match=f"{n:,} tokens \\+ --max-new-tokens {257 - n}"):
        cell(ip, f"-n {257 - n} -q -o r", "{text}")
    with pytest.raises(UsageError, match="leaves no room for the prompt"):
        cell(ip, "-n 300 -q -o r", "hello")


def test_huge_prompt_is_refused_by_its_length_before_tokenizing(ip: Any, loaded: Any,
                                                               monkeypatch: Any) -> None:
    tok = loaded.models.get("tiny").provider.local.tokenizer
    piece = max_piece_chars(tok)
    calls: list[int] = []
    real = type(tok).__call__

    def spy(self: Any, text: Any, *a: Any, **k: Any) -> Any:
        calls.append(len(text))
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", spy)
    ip.user_ns["huge"] = "x" * 10_000_000
    with pytest.raises(UsageError) as err:
        cell(ip, "-n 8", "{huge}")
    msg = str(err.value)
    assert "10,000,008 characters" not in msg  # the prompt is the cell as interpolated
    assert re.search(r"the prompt is 10,000,000 characters, so at least [\d,]+ tokens", msg)
    assert f"more than {piece} characters" in msg and "context of 256 tokens" in msg
    assert calls == []  # the tokenizer never saw it


def test_truncate_left_keeps_the_end_with_a_note(ip: Any, loaded: Any) -> None:
    ip.run_line_magic("config", "KernelExt.context_overflow = 'truncate_left'")
    ip.user_ns["big"] = "cat " * 400 + "THE END"
    cell(ip, "-n 8 -q -o r", "{big}")
    r = ip.user_ns["r"]
    assert r.prompt_tokens == 256 - 8
    assert any("truncated from the left to 248 tokens" in n for n in r.notes)
    assert "truncated" in r.footer()
    ip.user_ns["huge"] = "dog " * 2_000_000  # 8M characters: only the tail is tokenized
    cell(ip, "-n 8 -q -o r2", "{huge}")
    assert ip.user_ns["r2"].prompt_tokens == 248


def test_request_memory_limit_refuses_with_the_layout(ip: Any, tmp_path: Path) -> None:
    path = write_tiny_gemma3(tmp_path / "g.gguf", seed=3, context=4096, sliding_window=64)
    ip.run_line_magic("model", f"load {path} --name g --no-progress")
    ip.run_line_magic("config", "KernelExt.request_memory_gb = 0.0001")  # ~105 KB
    with pytest.raises(UsageError) as err:
        cell(ip, "-n 64", "hello " * 300)
    msg = str(err.value)
    assert "RequestMemoryError" in msg and "KV cache" in msg
    assert "2 layers x 1 KV heads x 32 dims" in msg and "64-token window" in msg
    assert "more than the 104.9 KiB allowed (%config KernelExt.request_memory_gb)" in msg
    ip.run_line_magic("config", "KernelExt.request_memory_gb = 1")
    cell(ip, "-n 4 -q -o r", "hello " * 300)  # the same request fits under a larger limit
    assert ip.user_ns["r"].completion_tokens >= 1


def test_refusals_are_memory_budget_errors_the_breaker_does_not_count(ip: Any, loaded: Any) -> None:
    assert issubclass(ContextOverflowError, MemoryBudgetError)
    assert issubclass(RequestMemoryError, MemoryBudgetError)
    assert issubclass(ContextOverflowError, PromptError)
    ip.user_ns["big"] = "cat " * 400
    for _ in range(4):
        with pytest.raises(UsageError):
            cell(ip, "-n 8", "{big}")
    breaker = loaded.resilience.breaker("tiny")
    assert breaker.state.value == "closed"
    cell(ip, "-n 2 -q -o r", "hello")  # the model still answers
    assert ip.user_ns["r"].completion_tokens >= 1


def test_guard_without_a_shell_uses_the_available_memory(tiny: Path) -> None:
    import torch

    from kernel_ext.gguf.loader import load_transformers

    art = load_transformers(tiny)
    guard = RequestGuard(lambda: RequestLimits(memory_fraction=0.5), available=lambda dev: 200_000)
    ok = guard.prepare(art.model, art.tokenizer, "hello", max_new_tokens=4)
    assert ok.limit_bytes == 100_000 and ok.estimate_bytes <= ok.limit_bytes
    assert isinstance(ok.input_ids, torch.Tensor) and ok.input_ids.shape[0] == 1
    with pytest.raises(RequestMemoryError, match=r"50% of 195.3 KiB available on cpu"):
        guard.prepare(art.model, art.tokenizer, "hello " * 30, max_new_tokens=100)


@pytest.mark.parametrize("setting", ["resident_max_gb", "load_timeout", "request_memory_gb"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_limit_settings_refuse_nan_inf_and_negatives(setting: str, value: float) -> None:
    from traitlets import TraitError

    from kernel_ext.config import KernelExtConfig

    cfg = KernelExtConfig()
    with pytest.raises(TraitError, match=f"{setting} must be a finite number >= 0"):
        setattr(cfg, setting, value)
    setattr(cfg, setting, 2.5)
    assert getattr(cfg, setting) == 2.5
    with pytest.raises(TraitError):
        cfg.context_overflow = "truncate_right"
