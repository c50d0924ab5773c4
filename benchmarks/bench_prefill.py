"""Prompt processing in chunks against one pass, on the demo model.

    python -m benchmarks.bench_prefill [--tokens N] [--chunk C] [--rounds R] [--threads T]

:func:`kernel_ext.providers.decode.decode` processes a prompt ``C`` tokens at a time
(``PREFILL_CHUNK``), so that a deadline or the stop button is noticed between chunks and the
attention's temporary memory stays chunk x context. This measures what that costs: the time
to the first token of an ``N``-token prompt (default 2,048) with chunks against one pass,
interleaved round by round, medians; the target is < 5 % slower. The machine's load while
measuring is reported, and the ratio withheld when other processes kept more than
``--max-busy`` cores busy (see :class:`benchmarks._timing.Contention`).
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks._timing import Contention

__all__ = ["main"]

_TEXT = ("The history of the Roman Empire spans many centuries, from the founding of the city "
         "to the fall of Constantinople, and it shaped law, language and architecture. ")


def main(argv: list[str] | None = None) -> int:
    import torch

    from kernel_ext.default_model import default_model_path
    from kernel_ext.gguf.loader import load_transformers
    from kernel_ext.paths import user_cache_dir
    from kernel_ext.providers.decode import PREFILL_CHUNK, decode, prepare

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_prefill")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens")
    ap.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="tokens per chunk")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--max-busy", type=float, default=0.25)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = user_cache_dir()
    art = load_transformers(default_model_path(cache), cache_dir=cache / "conversions")
    model, tok = art.model, art.tokenizer
    ids = tok(_TEXT * (args.tokens // 20 + 1), return_tensors="pt").input_ids[:, : args.tokens]
    prepare(model, "exact")
    variants = {f"chunks of {args.chunk}": args.chunk, "one pass": ids.shape[1]}
    print(f"prompt {ids.shape[1]} tokens, torch {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds", flush=True)
    decode(model, ids[:, :64], max_new_tokens=1)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    firsts: dict[str, list[int]] = {}
    contention = Contention(threshold=args.max_busy)
    for _ in range(args.rounds):
        contention.sample()
        for name, chunk in variants.items():
            c, t = time.thread_time(), time.perf_counter()
            out = decode(model, ids, max_new_tokens=1, prefill_chunk=chunk)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.thread_time() - c)
            firsts.setdefault(name, out.tokens)
    quiet, load = contention.report()
    base = statistics.median(times["one pass"])
    one_thread = torch.get_num_threads() == 1
    for name, ts in times.items():
        med = statistics.median(ts)
        line = f"{name:16s} {med:7.2f} s to the first token (min {min(ts):.2f}, max {max(ts):.2f})"
        if quiet:
            line += f"  x{med / base:5.3f} of one pass"
        if one_thread:  # CPU time of the one compute thread: barely moved by other processes
            c = statistics.median(cpu[name])
            line += f" | {c:.2f} s CPU x{c / statistics.median(cpu['one pass']):5.3f}"
        print(line)
    if quiet:
        ratio = statistics.median(times[f"chunks of {args.chunk}"]) / base
        print(f"target: chunked < 1.05x one pass: {'met' if ratio < 1.05 else 'NOT met'}")
    same = len({tuple(v) for v in firsts.values()}) == 1
    print(f"same first token both ways: {'yes' if same else 'NO'}")
    print(load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
