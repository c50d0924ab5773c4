"""Resident models in a real IPython shell with tiny real GGUF models: the same file + dtype +
device loaded twice shares its weights; a memory cap evicts the least recently used model,
which reloads on next use with a note; a load past load_timeout leaves nothing loaded."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from tinymodels import write_tiny_llama


def line(ip: Any, magic: str, text: str = "") -> Any:
    return ip.run_line_magic(magic, text)


def cell(ip: Any, args: str, body: str) -> Any:
    return ip.run_cell_magic("infer", args, body)


def session(ip: Any) -> Any:
    return next(c for c in ip.configurables if type(c).__name__ == "KernelExt").session


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny-a.gguf", seed=1)


@pytest.fixture
def other(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny-b.gguf", seed=2)


def test_same_file_dtype_device_shares_weights(ip: Any, tiny: Path, capsys: Any) -> None:
    line(ip, "model", f"load {tiny} --name a --no-progress")
    models = session(ip).models
    models.wait_idle()  # the decoding copies are built after the load returns: count them too
    total_one = models.residency.total()
    line(ip, "model", f"load {tiny} --name b --no-progress")
    assert "shares the weights of a" in capsys.readouterr().out
    a, b = models.get("a").provider.local, models.get("b").provider.local
    assert a.model is b.model and a.tokenizer is b.tokenizer
    assert models.residency.total() == total_one  # no second copy
    assert list(models.footprints()) == ["a, b"]  # the dashboard counts it once
    line(ip, "model", "list")
    out = capsys.readouterr().out
    assert "(shares weights with b)" in out and "(shares weights with a)" in out
    line(ip, "model", "info b")
    assert "shared with a" in capsys.readouterr().out
    cell(ip, "-n 6 -q -o ra --model a", "Hello")
    cell(ip, "-n 6 -q -o rb --model b", "Hello")
    assert ip.user_ns["ra"].text == ip.user_ns["rb"].text
    line(ip, "model", "unload a")
    assert "freed 0 B (its weights stay" in capsys.readouterr().out
    cell(ip, "-n 6 -q -o rb2 --model b", "Hello")  # b still answers
    assert ip.user_ns["rb2"].text == ip.user_ns["rb"].text
    line(ip, "model", "unload b")
    out = capsys.readouterr().out
    assert "freed 0 B" not in out and models.residency.total() == 0
    # another dtype is another copy
    line(ip, "model", f"load {tiny} --name f32 --no-progress")
    line(ip, "model", f"load {tiny} --name bf16 --dtype bfloat16 --no-progress")
    assert models.get("f32").provider.local.model is not models.get("bf16").provider.local.model
    assert len(models.residency.residents()) == 2


def test_memory_reported_includes_runtime_copies(ip: Any, tmp_path: Path, capsys: Any) -> None:
    from kernel_ext.providers.decode import copy_bytes

    path = write_tiny_llama(tmp_path / "q8.gguf", seed=1, quant="Q8_0")
    line(ip, "config", "KernelExt.decode_mode = 'quantized'")
    line(ip, "model", f"load {path} --name a --no-progress")  # decoding copies are made at load
    models = session(ip).models
    before = models.memory("a")
    model = models.get("a").provider.local.model
    # weights memory-mapped from the conversion cache count the pages in memory, not more
    assert 0 < before["weights"] <= before["weights_total"] == models.get("a").footprint
    assert before["copies"] == copy_bytes(model) > 0  # the int4 repacks of the layers
    assert before["total"] == before["weights"] + before["copies"] + before["overhead"]
    cell(ip, "-n 4 -q -o r -t 1 --seed 1", "Hello")  # sampling builds the int4 LM head too
    after = models.memory("a")
    head = model.get_output_embeddings().weight
    assert after["copies"] >= before["copies"] + head.numel() // 2  # at least 4 bits a weight
    assert after["total"] == after["weights"] + after["copies"] + after["overhead"]
    assert after["overhead"] == before["overhead"]
    line(ip, "model", "info a")
    out = capsys.readouterr().out
    assert "measured: weights" in out and "runtime copies" in out


def test_decoding_copies_are_built_after_the_load_returns_and_once(ip: Any, tmp_path: Path,
                                                                    other: Path) -> None:
    """%model load returns once the model is usable; its decoding copies are built (and the
    converted tokenizer stored in the conversion cache) on a worker thread, which every later
    use waits for instead of building them again, and which the next load waits for (never two
    builds or loads side by side)."""
    from kernel_ext.gguf import cache
    from kernel_ext.providers import decode

    path = write_tiny_llama(tmp_path / "q8.gguf", seed=1, quant="Q8_0")
    line(ip, "config", "KernelExt.decode_mode = 'quantized'")
    line(ip, "model", f"load {path} --name a --no-progress")
    models = session(ip).models
    prep = models._after_load
    assert prep is not None and prep.name == "a"  # started by the load, maybe still running
    model = models.get("a").provider.local.model
    assert models.memory("a")["copies"] > 0  # waits for the build, then counts it
    assert prep.seconds is not None and not prep._thread.is_alive()
    entry = cache.entry_dir(session(ip).cache_dir / "conversions", models.get("a").sha256)
    cache.verify_tree(entry / "tokenizer")  # the converted tokenizer was stored, sealed
    built = decode._PREPARED[model]["quantized"]
    assert built.mode == "quantized" and built.linears  # the int4 repacks of the layers
    cell(ip, "-n 4 -q -o r", "Hello")
    assert decode._PREPARED[model]["quantized"] is built  # used, not built again
    line(ip, "model", f"load {other} --name b --no-progress")
    second = models._after_load
    line(ip, "model", f"load {path} --name c --no-progress")  # shares a's weights
    assert second is not None and not second._thread.is_alive()  # c's load waited for b's build
    line(ip, "model", "unload c")  # waits for c's (instant) build, then drops it
    assert models._after_load is None


def test_lru_cap_evicts_and_reloads_with_a_note(ip: Any, tiny: Path, other: Path,
                                               capsys: Any) -> None:
    line(ip, "model", f"load {tiny} --name a --no-progress")
    models = session(ip).models
    cell(ip, "-n 6 -q -o before --model a", "Hello")
    est = models.get("a").plan.estimate_bytes
    # room for one tiny model, not for two
    line(ip, "config", f"KernelExt.resident_max_gb = {1.2 * est / 1024**3!r}")
    capsys.readouterr()
    line(ip, "model", f"load {other} --name b --no-progress")
    out = capsys.readouterr().out
    assert "note: evicted a (least recently used" in out and "reloads on next use" in out
    assert models.residency.evicted("a") and models.get("a").provider.local is None
    assert models.names() == ["a", "b"]  # still registered
    line(ip, "model", "list")
    assert "evicted" in capsys.readouterr().out
    cell(ip, "-n 6 -o again --model a", "Hello")  # next use reloads a, evicting b
    out = capsys.readouterr().out
    again = ip.user_ns["again"]
    assert again.text == ip.user_ns["before"].text
    assert any("a had been evicted (resident_max_gb); reloaded from the conversion cache" in n
               for n in again.notes)
    assert any("evicted b" in n for n in again.notes) and "reloaded" in out  # in the footer
    assert models.residency.evicted("b") and not models.residency.evicted("a")
    kinds = [json.loads(x)["kind"] for x in
             (session(ip).state_dir / "audit.jsonl").read_text().splitlines()]
    assert kinds.count("model.evict") == 2 and "model.reload" in kinds
    # a cap below one model refuses the load with the numbers
    line(ip, "config", f"KernelExt.resident_max_gb = {0.5 * est / 1024**3!r}")
    with pytest.raises(UsageError, match="more than the .* that resident models may take"):
        line(ip, "model", f"load {other} --name c --no-progress")
    assert "c" not in models.names()


def test_load_timeout_cancels_between_tensors_and_leaves_nothing(ip: Any, tiny: Path) -> None:
    s = session(ip)

    def slow_stage(event: Any) -> None:  # the injected slowness: each tensor takes 50 ms
        time.sleep(0.05)

    unsubscribe = s.events.subscribe("load_progress", slow_stage)
    line(ip, "config", "KernelExt.load_timeout = 0.3")
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as err:
        line(ip, "model", f"load {tiny} --name slow --no-progress")
    took = time.perf_counter() - t0
    msg = str(err.value)
    assert msg.startswith("LoadTimeoutError: loading slow took longer than load_timeout = 0.3 s")
    assert "\n" not in msg and took < 3
    assert s.models.names() == [] and s.models.residency.total() == 0
    records = [json.loads(x) for x in (s.state_dir / "audit.jsonl").read_text().splitlines()]
    failed = [r for r in records if r["kind"] == "model.load_failed"]
    assert failed and "load_timeout" in failed[-1]["error"]
    unsubscribe()
    line(ip, "model", f"load {tiny} --name slow --no-progress")  # nothing half-done remains
    cell(ip, "-n 2 -q -o r --model slow", "Hello")
    assert ip.user_ns["r"].completion_tokens >= 1
