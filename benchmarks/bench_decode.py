"""Decode speed of the demo model: stock ``model.generate`` against :mod:`kernel_ext.providers.decode`.

    python -m benchmarks.bench_decode [--tokens N] [--repeats R] [--threads T] [--no-bf16]
                                      [--no-llama-cpp]

Everything is measured in this run, on the same loaded fp32 model and the same prompts, the
variants interleaved round-robin (these machines are shared and noisy) and summarised by the
median. Printed: tokens/s of each variant and its ratio to stock fp32 ``generate``; whether its
greedy tokens are identical to stock's; the fp16 screen's certification count; the
memory-bandwidth bound (weight bytes read per token / bandwidth measured now); llama-cpp-python
when it is importable; and, unless ``--no-bf16``, the same model cast to bf16 (stock and ours),
with how many greedy tokens change against fp32.

With ``--threads 1`` a second figure is printed: tokens per second of *CPU time* of the one
compute thread (``time.thread_time``), which other processes on a shared machine barely move;
use it for ratios when the machine is busy (``uptime``'s load above the core count).

Ratios ("x") are medians over median stock fp32; "best x" compares the fastest runs, which on a
busy machine are the ones least disturbed by other processes.

Tokens/s here is end to end (prefill of a short prompt included): new tokens / wall time; an
answer may end early at EOS, on every side alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["main"]

PROMPTS = (
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "The three most important inventions of the nineteenth century were",
)


def _bandwidth_gbs() -> tuple[float, float]:
    """(read-only GB/s, memcpy GB/s counting read + write) over a 512 MiB buffer."""
    import torch

    src = torch.ones(128 * 2**20, dtype=torch.float32)  # 512 MiB, larger than any cache
    dst = torch.empty_like(src)
    read, copy = [], []
    for _ in range(5):
        t = time.perf_counter()
        src.sum()
        read.append(time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - t)
    nbytes = src.numel() * 4
    return nbytes / min(read) / 1e9, 2 * nbytes / min(copy) / 1e9


def _weight_bytes(model: Any) -> tuple[int, int]:
    """(bytes of all distinct parameters, bytes of the LM head): a tied head is counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    head = model.get_output_embeddings().weight
    return total, head.numel() * head.element_size()


def _load(path: str | None) -> Any:
    from kernel_ext.default_model import default_model_path
    from kernel_ext.gguf.loader import load_transformers
    from kernel_ext.paths import user_cache_dir

    cache = user_cache_dir()
    target = path or default_model_path(cache)
    t = time.perf_counter()
    art = load_transformers(target, cache_dir=cache / "conversions")
    print(f"model: {target} loaded in {time.perf_counter() - t:.1f} s")
    return art, target


def main(argv: list[str] | None = None) -> int:
    import torch

    from kernel_ext.providers.decode import Sampling, decode

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all variants and prompts")
    ap.add_argument("--model", default=None, help="a GGUF file (default: the demo model)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 variants")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama-cpp-python")
    args = ap.parse_args(argv)
    n = args.tokens
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_clock = torch.get_num_threads() == 1

    art, path = _load(args.model)
    model, tok = art.model, art.tokenizer
    eos = tok.eos_token_id
    gen_eos = model.generation_config.eos_token_id
    eos_ids = {eos, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    inputs = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} new tokens, "
          f"{len(PROMPTS)} prompts, {args.repeats} rounds; greedy unless noted; tok/s of "
          + ("CPU time (one thread)" if cpu_clock else "wall time"))

    def stock(ids: Any, sample: bool = False) -> list[int]:
        kw: dict[str, Any] = (dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=64) if sample
                              else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        with torch.inference_mode(), torch.random.fork_rng():
            torch.manual_seed(0)
            out = model.generate(ids, max_new_tokens=n, pad_token_id=eos, **kw)
        return out[0, ids.shape[1]:].tolist()

    stats: dict[str, dict[str, int]] = {}

    def ours(head: str, sample: bool = False) -> Callable[[Any], list[int]]:
        sampling = Sampling(0.8, 0.95, 64) if sample else Sampling()

        def run(ids: Any) -> list[int]:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                r = decode(model, ids, max_new_tokens=n, sampling=sampling, mode=head, eos_ids=eos_ids)
            s = stats.setdefault(f"{head}{' sample' if sample else ''}", {"screened": 0, "fallbacks": 0})
            s["screened"] += r.screened
            s["fallbacks"] += r.fallbacks
            return r.tokens
        return run

    variants: dict[str, Callable[[Any], list[int]]] = {
        "stock generate fp32": stock,
        "ours full head fp32": ours("full"),
        "ours exact (fp16 screen)": ours("exact"),
        "ours fp16 weights (opt-in)": ours("fp16"),
        "stock generate fp32, sampling": lambda ids: stock(ids, sample=True),
        "ours exact, sampling": ours("exact", sample=True),
        "ours fp16 weights, sampling": ours("fp16", sample=True),
    }
    times, outputs = _measure(variants, inputs, args.repeats, n, cpu_clock)
    # the fp16 head copy is built on first use: count it, once, in the report
    reference = outputs["stock generate fp32"]
    _report(times, outputs, reference, n, stats)
    sampled_ref = outputs["stock generate fp32, sampling"]
    for name in ("ours exact, sampling", "ours fp16 weights, sampling"):
        same = sum(a == b for a, b in zip(outputs[name], sampled_ref))
        print(f"  {name}: same sampled tokens as stock (seed 0) for {same}/{len(PROMPTS)} prompts")

    total, head_bytes = _weight_bytes(model)
    read_gbs, copy_gbs = _bandwidth_gbs()
    fp32_bytes = total
    screen_bytes = total - head_bytes // 2  # body fp32 + fp16 head (+16 rows, negligible)
    linear_bytes = sum(m.weight.numel() * 4 for m in model.base_model.modules()
                       if isinstance(m, torch.nn.Linear))
    fp16_bytes = screen_bytes - linear_bytes // 2
    print(f"bandwidth now: read {read_gbs:.1f} GB/s, memcpy {copy_gbs:.1f} GB/s (read+write)")
    print(f"bytes/token: fp32 model {fp32_bytes / 1e6:.0f} MB (head {head_bytes / 1e6:.0f} MB) -> "
          f"bound {read_gbs * 1e9 / fp32_bytes:.1f} tok/s; exact screen {screen_bytes / 1e6:.0f} MB -> "
          f"bound {read_gbs * 1e9 / screen_bytes:.1f} tok/s; fp16 weights {fp16_bytes / 1e6:.0f} MB -> "
          f"bound {read_gbs * 1e9 / fp16_bytes:.1f} tok/s")

    if not args.no_llama_cpp:
        _llama_cpp(str(path), n, times["stock generate fp32"], cpu_clock)
    if not args.no_bf16:
        model.to(torch.bfloat16)
        bf = {"stock generate bf16": stock, "ours bf16 (full head)": ours("exact")}
        bt, bo = _measure(bf, inputs, args.repeats, n, cpu_clock)
        times.update(bt)
        _report(bt, bo, reference, n, {}, base=statistics.median(times["stock generate fp32"]))
        print("  (bf16 changes numerics: 'identical' above compares against stock fp32)")
    return 0


def _measure(variants: dict[str, Callable[[Any], list[int]]], inputs: list[Any], repeats: int,
             n: int, cpu_clock: bool) -> tuple[dict[str, list[float]], dict[str, list[list[int]]]]:
    """tokens/s per variant (wall, or this thread's CPU time when ``cpu_clock``) and first-round tokens."""
    clock = time.thread_time if cpu_clock else time.perf_counter
    for name, run in variants.items():  # warm-up, and first-use costs (the fp16 copies)
        t = time.perf_counter()
        run(inputs[0])
        print(f"  warm-up {name}: {time.perf_counter() - t:.2f} s (wall)", flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict[str, list[list[int]]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, run in variants.items():
            for ids in inputs:
                t = clock()
                out = run(ids)
                dt = clock() - t
                times[name].append(len(out) / dt)
                if r == 0:
                    outputs[name].append(out)
    return times, outputs


def _report(times: dict[str, list[float]], outputs: dict[str, list[list[int]]],
            reference: list[list[int]], n: int, stats: dict[str, dict[str, int]],
            base: float | None = None) -> None:
    ref = times["stock generate fp32"] if "stock generate fp32" in times else None
    base = base if base is not None else statistics.median(ref or [1.0])
    best_base = max(ref) if ref else None
    for name, ts in times.items():
        med = statistics.median(ts)
        best = f", best x{max(ts) / best_base:4.2f}" if best_base else ""
        same = sum(a == b for a, b in zip(outputs[name], reference))
        extra = ""
        if "sampling" not in name:
            first = [_first_diff(a, b) for a, b in zip(outputs[name], reference)]
            diffs = [f for f in first if f is not None]
            extra = f"  greedy identical to stock fp32: {same}/{len(reference)}"
            if diffs:
                extra += f" (first differing token at {min(diffs)} of {n})"
        print(f"{name:34s} {med:6.2f} tok/s  x{med / base:4.2f}  "
              f"(min {min(ts):.2f}, max {max(ts):.2f}{best}){extra}")
    for name, s in stats.items():
        if s["screened"] or s["fallbacks"]:
            print(f"  {name}: fp16 screen certified {s['screened']} tokens, "
                  f"{s['fallbacks']} needed the full head")


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _llama_cpp(path: str, n: int, stock_times: list[float], cpu_clock: bool) -> None:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python: not importable, skipped")
        return
    import os

    # one thread computes on the calling thread, so its CPU time is comparable to ours
    threads = 1 if cpu_clock else (os.cpu_count() or 1)
    clock = time.thread_time if cpu_clock else time.perf_counter
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    rates = []
    for _ in range(3):
        for prompt in PROMPTS:
            t = clock()
            out = llm.create_completion(prompt, max_tokens=n, temperature=0.0)
            dt = clock() - t
            rates.append(int(out["usage"]["completion_tokens"]) / dt)
    med = statistics.median(rates)
    print(f"{'llama-cpp-python (Q4_K_M as is)':34s} {med:6.2f} tok/s  "
          f"x{med / statistics.median(stock_times):4.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
