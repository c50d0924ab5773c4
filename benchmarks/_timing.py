"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["Contention", "best_of", "per_call"]


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` wall-clock runs of ``fn`` (seconds): the least disturbed one."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def per_call(fn: Callable[[], object], n: int, rounds: int = 5) -> float:
    """Seconds per call of ``fn``: the median over ``rounds`` rounds of ``n`` calls."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)
@dataclass
class Contention:
    """How busy the machine was with *other* work while a benchmark ran.

    From the kernel's CPU accounting (psutil): CPU seconds spent by everything on the machine,
    minus those of this process and of ``pids`` (helpers the benchmark started), over the wall
    time = the average number of cores other processes kept busy. Unlike the load average
    (a one-minute damped count of runnable threads, which includes our own), it covers
    exactly the measured interval. Load averages are sampled as well, for the record.

    Why a threshold: with 2 cores and torch using both, any other runnable process takes its
    share of a core from the variant running at that moment, unevenly across variants; a
    contended run here once showed our decode at 1.79x stock where a quiet one showed 0.93x.
    """

    pids: Iterable[int] = ()
    threshold: float = 0.25  # cores busy elsewhere above which ratios are withheld
    loads: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float]:
        import psutil

        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        ours = 0.0
        for pid in (os.getpid(), *self.pids):
            try:
                c = psutil.Process(pid).cpu_times()
                ours += c.user + c.system
            except psutil.Error:
                continue
        return time.perf_counter(), busy, ours

    def sample(self) -> None:
        """Record the load average now (call between rounds)."""
        self.loads.append(os.getloadavg()[0])

    def others_cores(self) -> float:
        wall0, busy0, ours0 = self._start
        wall1, busy1, ours1 = self._snapshot()
        wall = max(wall1 - wall0, 1e-9)
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / wall)

    def report(self) -> tuple[bool, str]:
        """(quiet enough for ratios, one line saying why)."""
        self.sample()
        others = self.others_cores()
        quiet = others <= self.threshold
        text = (f"machine load while measuring: other processes kept {others:.2f} cores busy "
                f"on average ({os.cpu_count()} cores); 1-min load average "
                f"{min(self.loads):.2f}..{max(self.loads):.2f} (ours included)")
        if not quiet:
            text += (f"\nCONTENDED (> {self.threshold:.2f} cores busy elsewhere): ratios are "
                     "withheld; rerun on a quiet machine")
        return quiet, text
