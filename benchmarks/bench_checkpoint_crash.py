"""Random SIGKILLs during checkpoint commits, with the lease and make-up saves in play.

``python -m benchmarks.bench_checkpoint_crash [--kills 200] [--mb 2] [--dir PATH] [--seed 0]``
(CI-size run: ``--kills 10``)

Each round forks a "kernel": a real IPython shell with kernel_ext loaded, driven by a tornado
event loop as ipykernel drives it (so idle make-up saves run on the loop between cells). It
takes the store's lease from the previous round's dead kernel (which it must report as an
unclean end), ``%resume``s, then runs cells as fast as a "Run All" and with idle pauses, each
cell changing every variable to the next generation ``g``: a cell is checkpointed after it when
due, else before the next cell or when the loop idles past the interval. At a random instant
the parent SIGKILLs it (most instants fall inside a commit: ``--mb`` of array data changes every
third cell) and then, as a reader, restores the newest snapshot.

A restore is bad when it raises, reports damage, mixes generations (every variable of a
snapshot must come from the same cell), or is older than the newest commit the kernel had
finished before it died. Reported: kills, kills inside a commit, bad restores (must be 0),
unclean ends reported by the next kernel, leftovers in ``tmp/`` at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

FORK = mp.get_context("fork")
IN_COMMIT, ACKED, FINISHED, UNCLEAN = range(4)  # slots of the shared flags (kill-safe memory)
INTERVAL = 0.05  # checkpoint_interval of the children: make-up saves happen all the time
CELL = ("g = {k}\narr[:] = {k}\nmeta = {{'g': {k}, 'tags': ['x'] * ({k} % 5)}}\n"
        "blob = bytes([{k} % 256]) * 1000\n"
        "if {k} % 3 == 0:\n    big = np.full(big.shape, {k}.0)")


def _kernel(root: str, size: int, seed: int, flags: Any, ready: Any) -> None:
    """One kernel's life, until the parent kills it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    from IPython.core.interactiveshell import InteractiveShell
    from tornado.ioloop import IOLoop
    from traitlets.config import Config

    import kernel_ext
    from kernel_ext.checkpoint.schedule import IOLoopScheduler
    from kernel_ext.checkpoint.store import Store

    config = Config()
    config.HistoryManager.enabled = False
    config.KernelExt.state_dir = root
    config.KernelExt.checkpoint_interval = INTERVAL
    shell = InteractiveShell.instance(config=config)
    banner = io.StringIO()
    with contextlib.redirect_stdout(banner):
        shell.extension_manager.load_extension("kernel_ext")
        if "ended without shutting down" in banner.getvalue():
            flags[UNCLEAN] = 1
        shell.run_cell("import numpy as np")
        if Store(Path(root) / "checkpoints").snapshots():
            shell.run_cell("%resume")
        else:  # the first kernel: a first snapshot before the kills begin
            shell.run_cell(f"g = 0\narr = np.zeros(10_000)\nmeta = {{'g': 0, 'tags': []}}\n"
                           f"blob = bytes([0]) * 1000\nbig = np.zeros({size})")
            shell.run_cell("%checkpoint now")
    manager = kernel_ext.current_session().checkpoints
    store_commit = type(manager.store).commit

    def commit(store: Any, *args: Any, **kwargs: Any) -> Any:
        flags[IN_COMMIT] = 1
        try:
            result = store_commit(store, *args, **kwargs)
        finally:
            flags[IN_COMMIT] = 0
        flags[ACKED] = int(shell.user_ns["g"])  # a finished commit of this generation
        return result

    type(manager.store).commit = commit  # type: ignore[method-assign]
    loop = IOLoop()
    loop.make_current() if hasattr(loop, "make_current") else None
    manager.loop = IOLoopScheduler(loop)
    rng = np.random.default_rng(seed)

    def cell() -> None:
        k = int(shell.user_ns["g"]) + 1
        with contextlib.redirect_stdout(io.StringIO()):
            shell.run_cell(CELL.format(k=k))
        flags[FINISHED] = k
        pause = float(rng.choice([0.0, 0.0, 0.0, INTERVAL / 2, INTERVAL * 2]))
        loop.call_later(pause, cell)  # some cells follow at once, some after an idle pause

    ready.set()
    loop.add_callback(cell)
    loop.start()


def _check(root: Path, acked: int) -> str | None:
    """Why the newest snapshot is a bad restore, or None."""
    from kernel_ext.checkpoint.store import Store

    try:
        restored = Store(root / "checkpoints").restore()
    except Exception as e:  # noqa: BLE001 - any failure is a bad restore, reported
        return f"restore failed: {type(e).__name__}: {e}"
    if restored.notes or restored.lost or restored.damaged or restored.refused:
        return f"damage reported: {restored.notes} {restored.lost}"
    v = restored.values
    g = int(v["g"])
    expected_big = float(g - g % 3)
    problems = []
    if not (v["arr"] == g).all():
        problems.append("arr")
    if v["meta"] != {"g": g, "tags": ["x"] * (g % 5)}:
        problems.append("meta")
    if v["blob"] != bytes([g % 256]) * 1000:
        problems.append("blob")
    if not (v["big"] == expected_big).all():
        problems.append("big")
    if problems:
        return f"generation {g} mixed with others in: {', '.join(problems)}"
    if g < acked:
        return f"restored generation {g}, but the kernel had finished committing {acked}"
    return None


def _warm_up(state: Path) -> None:
    """Import and load everything once in this process, so forks start warm."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    config.KernelExt.state_dir = str(state)
    shell = InteractiveShell.instance(config=config)
    with contextlib.redirect_stdout(io.StringIO()):
        shell.extension_manager.load_extension("kernel_ext")
        shell.run_cell("x = 1")
        shell.extension_manager.unload_extension("kernel_ext")  # stops its threads
    InteractiveShell.clear_instance()
    import tornado.ioloop  # noqa: F401


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_checkpoint_crash")
    ap.add_argument("--kills", type=int, default=200, help="rounds, one SIGKILL each (200)")
    ap.add_argument("--mb", type=float, default=2.0, help="MB of array data changed every "
                    "third cell (bigger: more instants inside a commit)")
    ap.add_argument("--max-delay", type=float, default=0.4,
                    help="seconds after start-up within which the kill falls (uniform)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a "
                    "temporary directory in the current one, on the real disk)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench-ckpt-crash-", dir=args.dir or Path.cwd()))
    _warm_up(scratch / "warm-up")  # each forked kernel then starts in ~0.1 s, not ~1 s
    root = scratch / "state"
    size = max(1, int(args.mb * 1e6 / 8))
    rng = np.random.default_rng(args.seed)
    flags = FORK.RawArray("q", 4)
    bad: list[str] = []
    in_commit = unclean = lost_cells = 0
    t0 = time.perf_counter()
    try:
        for i in range(args.kills):
            flags[IN_COMMIT] = flags[FINISHED] = flags[UNCLEAN] = 0
            ready = FORK.Event()
            proc = FORK.Process(target=_kernel, args=(str(root), size, args.seed + i, flags,
                                                      ready))
            proc.start()
            if not ready.wait(60):
                proc.kill()
                bad.append(f"round {i}: the kernel did not start")
                continue
            time.sleep(float(rng.uniform(0.0, args.max_delay)))
            inside = flags[IN_COMMIT]
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            in_commit += int(inside)
            if i > 0:
                unclean += int(flags[UNCLEAN])
            why = _check(root, int(flags[ACKED]))
            if why is not None:
                bad.append(f"round {i}: {why}")
            else:
                from kernel_ext.checkpoint.store import Store

                g = int(Store(root / "checkpoints").restore(names=["g"]).values["g"])
                lost_cells = max(lost_cells, int(flags[FINISHED]) - g)
            flags[ACKED] = 0
        from kernel_ext.checkpoint.store import Store

        Store(root / "checkpoints")  # opening cleans what dead writers left in tmp/
        leftovers = sorted(p.name for p in (root / "checkpoints" / "tmp").iterdir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    print(f"kills: {args.kills} ({in_commit} inside a commit), {elapsed:.1f} s, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"unclean ends reported by the next kernel: {unclean} of {max(0, args.kills - 1)}")
    print(f"most finished cells lost by one kill (killed before or while their make-up save was "
          f"written; allowed): {lost_cells}")
    print(f"temporary leftovers after the last open: {len(leftovers)}")
    print(f"bad restores: {len(bad)}")
    for line in bad[:20]:
        print(f"  {line}")
    return 1 if bad or leftovers or unclean < args.kills - 1 else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
