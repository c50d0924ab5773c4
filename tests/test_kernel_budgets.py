"""Bounded by design, in a real kernel under an RSS watchdog (SIGKILL above a few GiB), with the
demo model: prompts beyond the context are refused quickly with the numbers and the kernel
stays small."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kernel_watchdog import GiB, WatchedKernel

pytestmark = pytest.mark.slow

pytest.importorskip("jupyter_client")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> WatchedKernel:
    cwd = tmp_path_factory.mktemp("budget_kernel")
    with WatchedKernel(cwd, limit_bytes=4 * GiB, env={"KERNEL_EXT_CACHE": str(cache_dir)}) as k:
        k.ok("%load_ext kernel_ext\n%model load --no-progress")
        yield k


def test_prompt_beyond_the_context_is_refused_quickly_and_the_kernel_stays_small(
        kernel: WatchedKernel) -> None:
    before = kernel.rss()
    kernel.ok('big = "word " * 40000')
    kernel.reset_peak()
    t0 = time.perf_counter()
    status, out = kernel.run("%%infer\n{big}")
    took = time.perf_counter() - t0
    assert status == "error"
    assert "UsageError: ContextOverflowError: gemma3-270m: the prompt is 40,002 tokens" in out
    assert "--max-new-tokens 64 = 40,066, more than the model's context of 32,768 tokens" in out
    assert took < 10, took
    assert kernel.peak - before < 512 * 1024**2, (kernel.peak - before) / 2**20
    assert "Traceback" not in out


def test_a_100_million_character_prompt_is_refused_without_tokenizing(kernel: WatchedKernel) -> None:
    kernel.ok('huge = "x" * 100_000_000')
    before = kernel.rss()
    kernel.reset_peak()
    t0 = time.perf_counter()
    status, out = kernel.run("%%infer\n{huge}")
    took = time.perf_counter() - t0
    assert status == "error"
    assert "the prompt is 100,000,000 characters, so at least 3,225,807 tokens" in out
    assert "context of 32,768 tokens" in out
    assert took < 15, took
    # the interpolated prompt (100 MB) is all it costs: no tokenizer output, no tensors
    assert kernel.peak - before < 600 * 1024**2, (kernel.peak - before) / 2**20
    kernel.ok("del huge, big")


def test_a_request_over_the_memory_limit_is_refused_with_the_layout(kernel: WatchedKernel) -> None:
    kernel.ok("%config KernelExt.request_memory_gb = 0.5\nmid = 'word ' * 16000")
    before = kernel.rss()
    kernel.reset_peak()
    status, out = kernel.run("%%infer -n 8\n{mid}")
    assert status == "error" and "RequestMemoryError: gemma3-270m: this request needs about" in out
    assert "18 layers x 1 KV heads x 256 dims, 15 of 18 layers keep a 512-token window" in out
    assert "more than the 512.0 MiB allowed (%config KernelExt.request_memory_gb)" in out
    assert kernel.peak - before < 256 * 1024**2
    kernel.ok("%config KernelExt.request_memory_gb = 0\ndel mid")


def test_the_kernel_still_answers_and_truncation_is_opt_in(kernel: WatchedKernel) -> None:
    kernel.ok("%%infer -n 4 -q -o r\nThe capital of France is")
    assert kernel.ok("print(r.completion_tokens)").strip() == "4"
    kernel.ok("%config KernelExt.context_overflow = 'truncate_left'\n"
              "tail = 'once upon a time ' * 9000")
    kernel.reset_peak()
    before = kernel.rss()
    # 32,700 new tokens leave 68 for the prompt: its last 68 tokens are kept
    kernel.ok("%%infer -n 32700 --timeout 1 -q -o t\n{tail}The end.")
    out = kernel.ok("print(t.prompt_tokens, t.notes)")
    assert out.startswith("68 ") and "truncated from the left to 68 tokens" in out
    assert kernel.peak - before < 1 * GiB
    kernel.ok("%config KernelExt.context_overflow = 'refuse'")
