"""Memory the registry reports vs the kernel's measured RSS growth (target: within 10 %).

``python -m benchmarks.bench_memory [--rounds N]``

Each round runs in a fresh Python process (imports warmed first, so their cost is not
counted; likewise the shared libraries' code that torch pages in at its kernels' first use,
once per process, is measured and left out): RSS before the load, then the demo model is loaded and answers one prompt (the first
inference makes decoding's runtime copies and pages the memory-mapped weights in); the RSS
growth is compared with ``%model info``'s measured total (weights + runtime copies + tokenizer
and buffers). The old number (the weights alone) is shown for comparison. A second name for the
same file must add (almost) nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_ROUND = r"""
import gc, json, psutil
import torch, transformers
import kernel_ext.gguf.loader, kernel_ext.providers.decode, kernel_ext.budget
from transformers.models.gemma3 import modeling_gemma3
from kernel_ext.session import Session
from kernel_ext.providers.base import GenerationParams
proc = psutil.Process()


def code_rss():
    # resident pages of shared libraries (torch's kernels are paged in at their first use,
    # once per process, whatever model runs): not the model's memory
    total, lib = 0, False
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as fh:
        for line in fh:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                parts = line.split(None, 5)
                lib = len(parts) == 6 and ".so" in parts[5]
            elif lib and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


s = Session(state_dir=os.environ["BENCH_STATE"])
gc.collect()
before, code0 = proc.memory_info().rss, code_rss()
s.models.load(None, name="a", progress=False)
s.infer("The capital of France is", GenerationParams(max_new_tokens=8), model="a")
gc.collect()
code = code_rss() - code0
grown = proc.memory_info().rss - before - code
m = s.models.memory("a")
mid = proc.memory_info().rss
s.models.load(None, name="b", progress=False)
s.infer("The capital of France is", GenerationParams(max_new_tokens=8), model="b")
gc.collect()
second = proc.memory_info().rss - mid
print("RESULT " + json.dumps({"grown": grown, "total": m["total"], "weights": m["weights"],
                              "weights_total": m["weights_total"],
                              "copies": m["copies"], "overhead": m["overhead"],
                              "second": second, "code": code}))
"""


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_memory")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import tempfile

    rows = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as state:
            env = dict(os.environ, BENCH_STATE=state)
            proc = subprocess.run([sys.executable, "-c", "import os\n" + _ROUND], env=env,
                                  capture_output=True, text=True, timeout=600, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-2000:])
            return 1
        rows.append(json.loads(line[len("RESULT "):]))
    mib = 1024**2
    ratio = statistics.median(r["total"] / r["grown"] for r in rows)
    old = statistics.median(r["weights_total"] / r["grown"] for r in rows)
    r = rows[len(rows) // 2]
    print(f"load average {os.getloadavg()[0]:.2f}; {args.rounds} fresh processes; medians")
    print(f"  RSS growth (load + first inference)   {statistics.median(x['grown'] for x in rows) / mib:8.1f} MiB"
          f"   (shared-library code paged in besides, not counted: "
          f"{statistics.median(x['code'] for x in rows) / mib:.1f} MiB)")
    print(f"  reported: weights {r['weights'] / mib:.1f} (in memory, of {r['weights_total'] / mib:.1f} "
          f"mapped) + runtime copies {r['copies'] / mib:.1f} "
          f"+ tokenizer and buffers {r['overhead'] / mib:.1f} MiB")
    print(f"  reported / measured                   {ratio:8.3f}   (all weights, as before: {old:.3f})")
    print(f"  a second name for the same file adds  "
          f"{statistics.median(x['second'] for x in rows) / mib:8.1f} MiB")
    ok = abs(ratio - 1) <= 0.10
    print("PASS: within 10 %" if ok else "FAIL: reported memory is off by more than 10 %")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
