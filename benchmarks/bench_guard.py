"""The request guard's per-call cost (target: < 1 ms), on the demo model.

``python -m benchmarks.bench_guard [--rounds N]``

Interleaved round by round, medians reported with the load average:
- reference: tokenizing a short prompt into a tensor (what the provider did before the guard);
- guarded: :meth:`RequestGuard.prepare` on the same prompt (the context check, the character
  bound, tokenizing, the KV/prefill estimate and the memory probe); the guard's own cost is the
  difference;
- the checks alone (no tokenizer): character bound, token count, memory estimate and probe;
- refusing a 100-million-character prompt (the character bound; the tokenizer never runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _per_call(fn: object, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - t0) / n


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_guard")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args(argv)

    import torch

    from kernel_ext.budget import AttentionLayout, RequestGuard, RequestLimits, max_piece_chars
    from kernel_ext.default_model import default_model_path
    from kernel_ext.errors import ContextOverflowError
    from kernel_ext.gguf.loader import load_transformers
    from kernel_ext.paths import user_cache_dir

    cache = user_cache_dir("")
    art = load_transformers(default_model_path(cache), cache_dir=cache / "conversions")
    model, tok = art.model, art.tokenizer
    guard = RequestGuard(RequestLimits)
    prompt = "Write a short poem about the sea, the wind and the lighthouse keeper. " * 2
    huge = "x" * 100_000_000
    max_piece_chars(tok)  # measured once per tokenizer (cached), as in a kernel
    layout = AttentionLayout.from_config(model.config, model.dtype)
    limits = RequestLimits()
    n_tokens = len(tok(prompt)["input_ids"])

    def reference() -> None:
        torch.tensor([tok(prompt)["input_ids"]], dtype=torch.long)

    def guarded() -> None:
        guard.prepare(model, tok, prompt, max_new_tokens=64)

    def checks() -> None:
        lay = AttentionLayout.from_config(model.config, model.dtype)
        room = guard.room(lay, 64, "m")
        guard.check_chars(len(prompt), 31, room, 64, "m", lay.context)
        guard.check_tokens(n_tokens, room, 64, "m", lay.context)
        guard.check_memory(layout, n_tokens, 64, "cpu", "m", limits)

    def refuse_huge() -> None:
        try:
            guard.prepare(model, tok, huge, max_new_tokens=64)
        except ContextOverflowError:
            return
        raise AssertionError("the 100M-character prompt was not refused")

    rows: dict[str, list[float]] = {"reference": [], "guarded": [], "checks": [], "huge": []}
    for _ in range(args.rounds):  # interleaved, round by round
        rows["reference"].append(_per_call(reference, args.calls))
        rows["guarded"].append(_per_call(guarded, args.calls))
        rows["checks"].append(_per_call(checks, args.calls))
        rows["huge"].append(_per_call(refuse_huge, 20))
    med = {k: statistics.median(v) for k, v in rows.items()}
    overhead = med["guarded"] - med["reference"]
    print(f"load average {os.getloadavg()[0]:.2f}; {n_tokens} prompt tokens; "
          f"medians of {args.rounds} interleaved rounds x {args.calls} calls")
    print(f"  reference (tokenize -> tensor)      {med['reference'] * 1e6:9.1f} us")
    print(f"  guarded   (RequestGuard.prepare)    {med['guarded'] * 1e6:9.1f} us  "
          f"({med['guarded'] / med['reference']:.2f}x the reference)")
    print(f"  the guard's own cost                {overhead * 1e6:9.1f} us")
    print(f"  checks alone (no tokenizer)         {med['checks'] * 1e6:9.1f} us")
    print(f"  refusing 100M characters            {med['huge'] * 1e6:9.1f} us")
    ok = overhead < 1e-3 and med["checks"] < 1e-3 and med["huge"] < 1e-3
    print("PASS: the guard costs < 1 ms per call" if ok else "FAIL: the guard costs >= 1 ms")
    return 0 if ok else 1


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
