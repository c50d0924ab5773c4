"""%%infer against a plain ``model.generate`` of the same prompt on the same loaded model.

    python -m benchmarks.bench_infer [--tokens N] [--repeats R]

Both run greedy for exactly N new tokens (no stop strings; EOS suppressed on both sides) in one
process; the ratio shows what the magic layer (interpolation, streaming, the fallback chain,
breakers, audit, footer) costs on top of the model itself.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    import torch
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_infer")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    prompt = "The history of the city of Paris"

    cfg = Config()
    cfg.HistoryManager.enabled = False
    ip = InteractiveShell.instance(config=cfg)
    ip.extension_manager.load_extension("kernel_ext")
    ip.run_line_magic("config", "KernelExt.checkpoint_enabled = False")
    t0 = time.perf_counter()
    ip.run_line_magic("model", "load --no-progress")
    print(f"load (through %model load, conversion cache as found): {time.perf_counter() - t0:.2f} s")
    import kernel_ext

    session = kernel_ext.current_session()
    local = session.models.get().provider.local
    model, tok = local.model, local.tokenizer

    ids = tok(prompt, return_tensors="pt").input_ids
    eos = tok.eos_token_id

    def plain() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 do_sample=False, pad_token_id=eos)
        dt = time.perf_counter() - t
        assert out.shape[1] - ids.shape[1] == args.tokens
        return args.tokens / dt

    def magic() -> float:
        sink = io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stdout(sink):
            ip.run_cell_magic("infer", f"-n {args.tokens} -o r --no-stream -q", prompt)
        dt = time.perf_counter() - t
        return ip.user_ns["r"].completion_tokens / dt

    plain()  # warm-up both paths once
    magic()
    p = [plain() for _ in range(args.repeats)]
    m = [magic() for _ in range(args.repeats)]
    r = ip.user_ns["r"]
    print(f"plain model.generate : {statistics.median(p):6.2f} tokens/s (median of {args.repeats})")
    print(f"%%infer              : {statistics.median(m):6.2f} tokens/s end to end "
          f"({r.completion_tokens} tokens, finish={r.finish_reason})")
    print(f"ratio %%infer / generate: {statistics.median(m) / statistics.median(p):.2f}")
    ip.extension_manager.unload_extension("kernel_ext")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
