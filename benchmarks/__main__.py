"""``python -m benchmarks``: run every benchmark module in this folder, one after another.

Each benchmark measures its reference in the same run and prints ratios; see each module.
Pass names to run a subset: ``python -m benchmarks bench_load bench_decode``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = argv or sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    failed = []
    for name in names:
        print(f"\n=== {name} " + "=" * (70 - len(name)), flush=True)
        t0 = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        try:
            rc = module.main([]) if hasattr(module, "main") else 0
        except Exception as e:  # report and go on with the other benchmarks
            print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
            rc = 1
        if rc:
            failed.append(name)
        print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
