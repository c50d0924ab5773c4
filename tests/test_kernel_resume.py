"""A real kernel is SIGKILLed in the middle of a resumable loop; a fresh kernel for the same
notebook resumes: variables come back, the loop finishes with the results of an
uninterrupted run, and only the items after the last task checkpoint are computed again."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

jupyter_client = pytest.importorskip("jupyter_client")

LOOP = """
import os, time, kernel_ext
t = kernel_ext.task("squares", list(range(40)), every_items=5, progress=False)
for item in t:
    with open("computed.log", "a") as f:
        f.write(f"{item}\\n")
    t.record(item * item)
    if t.done == 13 and os.path.exists("block"):
        print("reached 13", flush=True)
        time.sleep(600)   # the kernel is killed here, mid-loop
print("finished", t.done, t.restored)
"""


def start(tmp_path: Path) -> tuple[Any, Any]:
    env = dict(os.environ)
    env["JPY_SESSION_NAME"] = str(tmp_path / "nb.ipynb")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("KERNEL_EXT_CHECKPOINT_KEY", None)
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path), env=env)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    return km, kc


def execute(kc: Any, code: str, timeout: float = 120) -> str:
    out: list[str] = []

    def hook(msg: dict) -> None:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            out.append(content["text"])
        elif msg["msg_type"] in ("execute_result", "display_data"):
            out.append(content["data"].get("text/plain", ""))
        elif msg["msg_type"] == "error":
            out.append("\n".join(content["traceback"]))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    text = "".join(out)
    assert reply["content"]["status"] == "ok", text
    return text


def wait_for_output(kc: Any, needle: str, timeout: float = 120) -> None:
    seen = ""
    while needle not in seen:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
        elif msg["msg_type"] == "error":
            raise AssertionError("\n".join(msg["content"]["traceback"]))


def stop(km: Any, kc: Any) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def test_sigkill_mid_loop_then_resume_in_a_fresh_kernel(tmp_path: Path) -> None:
    (tmp_path / "block").write_text("")
    km, kc = start(tmp_path)
    try:
        assert sys.executable.split("/bin/")[0] in execute(kc, "import sys; print(sys.executable)")
        execute(kc, "%load_ext kernel_ext")
        execute(kc, "%config KernelExt.checkpoint_interval = 0")
        execute(kc, "import numpy as np\nweights = np.linspace(0, 1, 1000)\n"
                    "settings = {'lr': 0.1, 'tags': ['a', 'b']}")
        pid = int(execute(kc, "import os; print(os.getpid())").strip())
        kc.execute(LOOP)
        wait_for_output(kc, "reached 13")
        os.kill(pid, signal.SIGKILL)
    finally:
        stop(km, kc)

    (tmp_path / "block").unlink()
    km, kc = start(tmp_path)
    try:
        banner = execute(kc, "%load_ext kernel_ext")
        assert "the previous kernel of this notebook ended without shutting down" in banner
        assert "task 'squares': 10/40 items done" in banner
        report = execute(kc, "%resume")
        assert "weights" in report and "settings" in report
        assert execute(kc, "print(weights.shape, weights[-1], settings)").strip() == \
            "(1000,) 1.0 {'lr': 0.1, 'tags': ['a', 'b']}"
        assert "finished 40 10" in execute(kc, LOOP)
        assert execute(kc, "print(t.results == [i * i for i in range(40)])").strip() == "True"
    finally:
        stop(km, kc)

    computed = [int(x) for x in (tmp_path / "computed.log").read_text().split()]
    assert sorted(set(computed)) == list(range(40))  # no item lost
    recomputed = sorted({i for i in computed if computed.count(i) > 1})
    assert recomputed == [10, 11, 12]  # only those after the last checkpoint (every 5 items)
    assert (tmp_path / ".kernel_ext" / "nb" / "checkpoints" / "HEAD").exists()
