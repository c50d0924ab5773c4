"""Resident models in a real kernel under an RSS watchdog: a load past load_timeout leaves
nothing behind; the demo model's reported memory matches the kernel's RSS growth (runtime
copies included); a second name for the same file shares its weights; the LRU cap evicts and
reloads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kernel_watchdog import GiB, WatchedKernel
from tinymodels import write_tiny_llama

pytestmark = pytest.mark.slow

pytest.importorskip("jupyter_client")

MiB = 1024**2

WARM = """
%load_ext kernel_ext
import gc, torch, transformers
import kernel_ext.gguf.loader, kernel_ext.providers.decode, kernel_ext.budget
from transformers.models.gemma3 import modeling_gemma3
def S():
    return next(c for c in get_ipython().configurables if type(c).__name__ == "KernelExt").session
gc.collect()
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> WatchedKernel:
    cwd = tmp_path_factory.mktemp("residency_kernel")
    with WatchedKernel(cwd, limit_bytes=4 * GiB, env={"KERNEL_EXT_CACHE": str(cache_dir)}) as k:
        k.ok(WARM)
        yield k


def test_load_timeout_leaves_nothing_loaded(kernel: WatchedKernel) -> None:
    kernel.ok("%model load --no-progress --name warmup\n%model unload warmup\ngc.collect()")
    before = kernel.rss()
    kernel.ok("%config KernelExt.load_timeout = 0.05")
    status, out = kernel.run("%model load --no-progress --name slow")
    assert status == "error"
    assert out.startswith("UsageError: LoadTimeoutError: loading slow took longer than "
                          "load_timeout = 0.05 s"), out
    assert out.count("\n") == 1  # one line
    out = kernel.ok("%model list\nimport json\n"
                    "print(json.dumps([r['kind'] for r in S()"
                    ".audit.read('model.load_failed')]))")
    assert "no model loaded" in out and "model.load_failed" in out
    kernel.ok("gc.collect()")
    assert kernel.rss() - before < 100 * MiB, (kernel.rss() - before) / MiB
    kernel.ok("%config KernelExt.load_timeout = 300")


def test_reported_memory_matches_rss_growth_and_a_second_name_shares(kernel: WatchedKernel) -> None:
    kernel.ok("gc.collect()")
    before = kernel.rss()
    kernel.ok("%model load --no-progress --name a")
    # sampled, so the whole float32 LM head is read: a greedy answer reads only the rows the
    # head's screen cannot rule out, and the unread pages of the mapped weights stay out of RSS
    kernel.ok("%%infer -n 4 -q -o r --model a -t 0.7 --seed 1\nHello")
    kernel.ok("gc.collect()")
    grown = kernel.rss() - before
    out = kernel.ok("m = S().models.memory('a')\n"
                    "print(m['total'], m['copies'])")
    total, copies = (int(x) for x in out.split())
    assert copies >= 262144 * 640 // 2  # decode_mode="exact" keeps an int4 screen of the LM head
    assert abs(total - grown) <= 0.2 * grown, (total / MiB, grown / MiB)
    mid = kernel.rss()
    out = kernel.ok("%model load --no-progress --name b")
    assert "note: shares the weights of a" in out
    kernel.ok("%%infer -n 4 -q -o rb --model b -t 0.7 --seed 1\nHello")
    kernel.ok("gc.collect()")
    assert kernel.rss() - mid < 64 * MiB, (kernel.rss() - mid) / MiB
    assert kernel.ok("print(r.text == rb.text)").strip() == "True"
    out = kernel.ok("%model list")
    assert "(shares weights with b)" in out and "(shares weights with a)" in out
    out = kernel.ok("%model info a")
    # sampling read every page of the mapped weights ("... in memory of 1022.7 MiB" otherwise)
    assert re.search(r"measured: weights (\S+ \w?i?B in memory of )?1022\.7 MiB \+ runtime copies ",
                     out), out
    kernel.ok("%model unload a\n%model unload b\ngc.collect()")


def test_lru_cap_evicts_and_reloads(kernel: WatchedKernel) -> None:
    a = write_tiny_llama(kernel.cwd / "lru-a.gguf", seed=1)
    b = write_tiny_llama(kernel.cwd / "lru-b.gguf", seed=2)
    kernel.ok(f"%model load {a} --name a --no-progress")
    kernel.ok("%%infer -n 6 -q -o first --model a\nHello")
    kernel.ok("est = S().models.get('a').plan.estimate_bytes\n"
              "get_ipython().run_line_magic('config', "
              "f'KernelExt.resident_max_gb = {1.2 * est / 1024**3!r}')")
    out = kernel.ok(f"%model load {b} --name b --no-progress")
    assert "note: evicted a (least recently used" in out
    assert "evicted" in kernel.ok("%model list").split("* b")[0]
    out = kernel.ok("%%infer -n 6 -o again --model a\nHello")
    assert "a had been evicted (resident_max_gb); reloaded from the conversion cache" in out
    assert kernel.ok("print(again.text == first.text)").strip() == "True"
    out = kernel.ok("%model list")
    assert "b" in out and "evicted" in out
