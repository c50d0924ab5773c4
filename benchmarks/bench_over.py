"""``%%infer --over`` batched against one item at a time, on the demo model (CPU, greedy).

    python -m benchmarks.bench_over [--items 16 64] [--tokens 24] [--rounds 1] [--batch-size N]
        [--remote-items 16] [--concurrency 4] [--no-remote]

Both variants go through :func:`kernel_ext.over.run_over` (the scheduler behind ``--over`` and
``infer_many``) on the same loaded model in one process: ``--batch-size 1`` (each item through
the chain alone, what ``--over`` did before batching) and batched (default batch size, or
``--batch-size``). Variants are interleaved round by round; medians are reported with the load
average, the ratio of items/s (wall clock, and per CPU-second of this process, which a
busy shared machine distorts less), whether the answers were equal, and the peak RSS above the
loaded model while each variant ran.

**Remote** (unless ``--no-remote``, and when llama.cpp's server is built: ``make llama-server``):
the same scheduler against llama.cpp's OpenAI-compatible server on the same file, one request
at a time against ``--concurrency`` requests in flight (each through the breaker, retry and
rate-limit chain), interleaved, with the answers compared. The server runs with
``--interrupt_requests False`` (llama-cpp-python otherwise ends a streaming answer when another
request arrives) and serves requests one after another inside (llama-cpp-python has one
context), so the gain measured is the overlap of HTTP, tokenisation and our chain with the
server's compute, not parallel decoding on the server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

__all__ = ["main"]

TOPICS = ["Paris", "the ocean", "bread", "a cat", "winter", "music", "trains", "the moon",
          "coffee", "rivers", "gardens", "chess", "mountains", "rain", "books", "birds"]


class _PeakRss:
    """Samples this process's RSS every 20 ms while active."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> Self:
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    from kernel_ext.default_model import default_model_path
    from kernel_ext.over import run_over
    from kernel_ext.paths import user_cache_dir
    from kernel_ext.providers.base import GenerationParams
    from kernel_ext.session import Session

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_over")
    ap.add_argument("--items", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None, help="default: from the KV budget")
    ap.add_argument("--remote-items", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--no-remote", action="store_true", help="skip llama.cpp's server")
    args = ap.parse_args(argv)

    state = Path(tempfile.mkdtemp(prefix="bench_over_"))
    session = Session(state_dir=state)
    session.config.offline_cache = False
    path = default_model_path(user_cache_dir())
    session.models.load(str(path), progress=False)
    params = GenerationParams(max_new_tokens=args.tokens)
    print(f"demo model loaded; {args.tokens} new tokens per item, greedy; "
          f"torch threads {__import__('torch').get_num_threads()}")
    # warm-up: one-time allocations (decode's fp16 head copy, the first batch) are not measured
    for bs in (1, 2):
        run_over(session, ["Hello", "World"], params.replace(max_new_tokens=2), name=f"warm{bs}",
                 batch_size=bs, progress=False)
    run = 0
    for n in args.items:
        prompts = [f"Write one sentence about {TOPICS[i % len(TOPICS)]} (#{i}):" for i in range(n)]
        rates: dict[str, list[float]] = {"one at a time": [], "batched": []}
        cpu: dict[str, list[float]] = {"one at a time": [], "batched": []}
        tps: dict[str, list[float]] = {"one at a time": [], "batched": []}
        peaks: dict[str, int] = {}
        texts: dict[str, list[str]] = {}
        loads = []
        mode = ""
        for _ in range(args.rounds):
            for variant, bs in (("one at a time", 1), ("batched", args.batch_size)):
                run += 1
                loads.append(os.getloadavg()[0])
                with _PeakRss() as rss:
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = run_over(session, prompts, params, name=f"bench{run}", batch_size=bs,
                                   progress=False)
                    took, cpu_s = time.perf_counter() - t0, time.process_time() - c0
                assert out.restored == 0 and not out.failed, out.summary
                rates[variant].append(n / took)
                cpu[variant].append(n / cpu_s)
                tps[variant].append(out.completion_tokens / took)
                peaks[variant] = max(peaks.get(variant, 0), rss.peak - rss.base)
                texts[variant] = out.texts
                if variant == "batched":
                    mode = out.mode
        same = sum(a == b for a, b in zip(texts["one at a time"], texts["batched"]))
        one, bat = statistics.median(rates["one at a time"]), statistics.median(rates["batched"])
        print(f"\n{n} items ({mode}); load average during the run {statistics.median(loads):.2f}")
        for v, r in rates.items():
            print(f"  {v:14s}: {statistics.median(r):6.3f} items/s  "
                  f"{statistics.median(tps[v]):7.2f} tok/s  {statistics.median(cpu[v]):6.3f} "
                  f"items per CPU-second  peak RSS +{peaks[v] / 2**20:7.1f} MiB")
        cpu_ratio = statistics.median(cpu["batched"]) / statistics.median(cpu["one at a time"])
        print(f"  ratio batched / one at a time: {bat / one:.2f}x items/s (wall), "
              f"{cpu_ratio:.2f}x items per CPU-second; "
              f"identical answers {same}/{n}")
    if not args.no_remote:
        _remote(session, path, params, args)
    print(f"\nload average at the end: {os.getloadavg()}")
    session.close()
    return 0


def _remote(session: object, path: Path, params: object, args: argparse.Namespace) -> None:
    """One request at a time against ``--concurrency`` in flight, to llama.cpp's server."""
    import subprocess
    import sys

    from kernel_ext.over import run_over
    from kernel_ext.providers.remote import RemoteProvider
    from kernel_ext.resilience import attach

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import llama_server as ls

    if ls.server_python() is None:
        print("\nremote: llama.cpp's server is not built (make llama-server); skipped")
        return
    real_popen = subprocess.Popen

    def popen(cmd: list[str], **kwargs: object) -> object:
        return real_popen([*cmd, "--interrupt_requests", "False"], **kwargs)

    server = ls.LlamaServer(path, Path(tempfile.mkdtemp(prefix="bench_over_llama_")))
    ls.subprocess.Popen = popen  # the command line only: a real server
    try:
        server.start()
    finally:
        ls.subprocess.Popen = real_popen
    try:
        hub = attach(session)
        hub.add_provider("llama", RemoteProvider("llama", server.url))
        n = args.remote_items
        prompts = [f"Write one sentence about {TOPICS[i % len(TOPICS)]} (#{i}):" for i in range(n)]
        variants = (("one at a time", 1), (f"concurrency {args.concurrency}", args.concurrency))
        rates: dict[str, list[float]] = {v: [] for v, _ in variants}
        texts: dict[str, list[str]] = {}
        loads = []
        for r in range(args.rounds):
            for variant, c in variants:
                loads.append(os.getloadavg()[0])
                t0 = time.perf_counter()
                out = run_over(session, prompts, params, model="llama", name=f"remote{r}{c}",
                               concurrency=c, progress=False)
                took = time.perf_counter() - t0
                assert out.restored == 0 and not out.failed, out.summary
                rates[variant].append(n / took)
                texts[variant] = out.texts
        (one, _), (many, _) = variants
        same = sum(a == b for a, b in zip(texts[one], texts[many]))
        print(f"\nremote: llama.cpp's server on the same file, {n} items; "
              f"load average during the run {statistics.median(loads):.2f}")
        for v, r in rates.items():
            print(f"  {v:14s}: {statistics.median(r):6.3f} items/s")
        ratio = statistics.median(rates[many]) / statistics.median(rates[one])
        print(f"  ratio {many} / one at a time: {ratio:.2f}x items/s; identical answers {same}/{n}")
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
