"""The main job: a real kernel loads the default model and runs ``notebooks/01_quickstart.ipynb``.

    python -m kernel_ext.demo [NOTEBOOK] [--timeout SECONDS]

Executes the notebook with nbclient (the executed copy is written to ``<notebook>.out.ipynb``
beside it, ignored by git) and prints each ``%%infer`` prompt with its answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent


def _text_outputs(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"] + "\n")
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    parser = argparse.ArgumentParser(prog="python -m kernel_ext.demo", description=__doc__.split("\n")[0])
    parser.add_argument("notebook", nargs="?", default=str(ROOT / "notebooks" / "01_quickstart.ipynb"))
    parser.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds")
    args = parser.parse_args(argv)
    path = Path(args.notebook).resolve()
    if not path.exists():
        parser.error(f"{path} does not exist")
    nb = nbformat.read(path, as_version=4)
    print(f"kernel_ext demo: executing {path.name} in a real kernel ({sys.executable})", flush=True)
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    failed = None
    try:
        client.execute()
    except CellExecutionError as e:
        failed = e
    out_path = path.with_name(path.stem + ".out.ipynb")
    nbformat.write(nb, out_path)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        src = cell.source.strip()
        if src.startswith("%%infer") or src.startswith("%model load") or src.startswith("%model info"):
            print("\n" + "─" * 78)
            print(src)
            print("─" * 78)
            print(_text_outputs(cell).rstrip())
    print(f"\nexecuted {path.name} in {time.perf_counter() - t0:.1f} s; full output in {out_path}")
    if failed is not None:
        print(f"\nA cell failed:\n{failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
