"""``make gpu-check``: what a CUDA machine must show before the GPU paths count as verified.

1. the card: ``nvidia-smi``, torch's view of each device (name, compute capability, memory,
   UUID), the versions of torch/CUDA, Transformers, accelerate, bitsandbytes, and NVML;
2. the tests marked ``cuda`` (everywhere in tests/), plus tests/test_gpu.py and
   tests/test_gpu_plans.py whole (their fake-inventory tests must hold on a real GPU too);
3. the GPU benchmark (:mod:`benchmarks.bench_gpu`): each plan's load time, GPU memory against
   the guard's estimate, decode speed against the CPU reference.

Sized to finish in well under 10 minutes on one GPU (the demo model is 270M parameters).
Exit status: 0 when all passed; 2 without a CUDA GPU (nothing was verified); 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

__all__ = ["main"]

BUDGET_S = 600


def _card() -> bool:
    if shutil.which("nvidia-smi"):
        query = "index,name,uuid,driver_version,memory.total,memory.used,compute_cap"
        subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], check=False)
    else:
        print("nvidia-smi: not found")
    import torch

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")
    for name in ("transformers", "accelerate", "bitsandbytes", "pynvml"):
        try:
            module = __import__(name)
            print(f"{name} {getattr(module, '__version__', '(version unknown)')}")
        except ImportError:
            print(f"{name}: not installed")
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to verify here")
        return False
    from kernel_ext.memory import cuda_devices, half_dtype, sample_memory

    for d in cuda_devices():
        print(f"cuda:{d.index} {d.name} sm_{d.capability[0]}{d.capability[1]} "
              f"{d.total / 1024**3:.1f} GiB {d.uuid} -> dtype=auto: {half_dtype(f'cuda:{d.index}')}")
    for g in sample_memory().gpus:
        print(f"  sampled cuda:{g.index}: {g.used / 1024**3:.2f} of {g.total / 1024**3:.1f} GiB used")
    return True


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    print("=== the card " + "=" * 60, flush=True)
    if not _card():
        return 2
    print("\n=== the cuda tests " + "=" * 54, flush=True)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "-m", "cuda or not slow", "tests/test_gpu.py", "tests/test_gpu_plans.py"],
        check=False,
    ).returncode
    marked = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
         "tests", "--ignore=tests/test_gpu.py", "--ignore=tests/test_gpu_plans.py"],
        check=False,
    ).returncode
    marked = 0 if marked == 5 else marked  # 5: no other test is marked cuda
    store = subprocess.run(  # the checkpoint store's own CUDA round trip (skipif, not marked)
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda",
         "tests/test_checkpoint_store.py"],
        check=False,
    ).returncode
    marked = marked or (0 if store == 5 else store)
    print("\n=== the GPU benchmark " + "=" * 51, flush=True)
    from benchmarks import bench_gpu

    bench = bench_gpu.main(argv)
    took = time.perf_counter() - t0
    print(f"\ngpu-check: tests {'passed' if tests == 0 == marked else 'FAILED'}, benchmark "
          f"{'ran' if bench == 0 else 'FAILED'}; {took:.0f} s"
          + (f" (over the {BUDGET_S} s budget)" if took > BUDGET_S else ""))
    return 0 if tests == marked == bench == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
