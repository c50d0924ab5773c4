"""Every notebook in notebooks/ runs top to bottom, on the default model, on a CPU.

Each one is executed with nbclient in a real kernel running this venv's Python, with the
working directory a temporary copy of notebooks/ (so ``.kernel_ext/`` state lands there, not
in the repository) and ``JPY_SESSION_NAME`` set the way JupyterLab sets it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
# Every notebook, except the executed copies `make demo` leaves beside them (git-ignored).
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")
                   if not p.name.endswith(".out.ipynb"))
CELL_TIMEOUT_S = 600

_PROBE = "import sys as _sys; print('KERNEL-PYTHON=' + _sys.executable)"


def _repo_state() -> dict[str, float]:
    """Files under notebooks/.kernel_ext with their mtimes (to prove a run did not touch it)."""
    root = NOTEBOOK_DIR / ".kernel_ext"
    return {str(p): p.stat().st_mtime for p in root.rglob("*")} if root.exists() else {}


def test_notebooks_exist() -> None:
    assert NOTEBOOKS, f"{NOTEBOOK_DIR} holds no notebooks: the demo notebooks are missing"


def test_notebooks_are_valid_and_open_without_a_kernel_dialog() -> None:
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        nbformat.validate(nb)
        spec = nb.metadata.get("kernelspec", {})
        assert spec.get("name") == "python3", f"{name}: kernelspec.name must be python3"


def test_notebooks_are_committed_clean() -> None:
    """Outputs hold machine-specific paths, times and sizes: notebooks are committed without."""
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells)
                 if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
        assert not dirty, (f"{name}: code cells {dirty} carry outputs; clear them before "
                           "committing (JupyterLab: Edit > Clear Outputs of All Cells)")


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name: str, tmp_path: Path, cache_dir: Path) -> None:
    work = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, work, ignore=shutil.ignore_patterns(".kernel_ext",
                                                                      ".ipynb_checkpoints"))
    path = work / name
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
    env = dict(os.environ, KERNEL_EXT_CACHE=str(cache_dir), JPY_SESSION_NAME=str(path))
    env.pop("KERNEL_EXT_CHECKPOINT_KEY", None)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(work)}},
        allow_errors=False,  # any cell error raises CellExecutionError naming the cell
    )
    before = _repo_state()
    files_before = _files(work)
    client.execute(env=env)

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "a code cell did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    probe = "".join(o.get("text", "") for o in code[-1].outputs)
    assert f"KERNEL-PYTHON={sys.executable}" in probe, probe
    # The notebook's state went to the temporary copy, never into the repository.
    assert (work / ".kernel_ext" / path.stem).is_dir()
    assert _repo_state() == before
    # ... and left no scratch files beside the notebooks (a user runs them in notebooks/).
    assert _files(work) == files_before, sorted(_files(work) - files_before)


def _files(root: Path) -> set[str]:
    """Files below ``root``, except kernel_ext's own state and JupyterLab's checkpoints."""
    skip = (".kernel_ext", ".ipynb_checkpoints")
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not any(part in skip for part in p.relative_to(root).parts)}
