"""A real Jupyter kernel (jupyter_client) for tests, under an RSS watchdog.

The machine is shared: a regression that makes the kernel allocate without bound must not take
it down, so a thread samples the kernel's resident memory (with its children, psutil) and
SIGKILLs it above ``rss_limit`` bytes; the test then fails saying so.

    with Kernel(tmp_path) as k:
        out = k.run("%load_ext kernel_ext")        # Output: stdout, stderr, error, displays
        msg_id = k.submit(long_cell)                # run without waiting
        k.wait_for_stdout(msg_id, "first words")
        k.interrupt()                               # the stop button
        out = k.collect(msg_id)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

import psutil

__all__ = ["Kernel", "Output"]

GIB = 1024**3


@dataclass
class Output:
    """What one cell produced, as the front end would show it."""

    stdout: str = ""
    stderr: str = ""
    displays: list[str] = field(default_factory=list)  # text/plain of display/execute_result
    error: list[str] = field(default_factory=list)  # traceback lines of an error message
    status: str = ""  # the execute_reply's status: ok | error | aborted
    payload_text: str = ""  # text/plain of a pager payload (``%%infer?``)

    @property
    def everything(self) -> str:
        return "\n".join([self.stdout, self.stderr, *self.displays, *self.error])


class Kernel:
    """One ipykernel process in ``cwd`` with this interpreter's environment."""

    def __init__(self, cwd: Path, *, rss_limit: int = 3 * GIB, env: dict[str, str] | None = None,
                 ready_timeout: float = 120) -> None:
        import jupyter_client

        full_env = dict(os.environ)
        full_env["JPY_SESSION_NAME"] = str(cwd / "notebook.ipynb")
        full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
        full_env.pop("KERNEL_EXT_CHECKPOINT_KEY", None)
        full_env.update(env or {})
        self.rss_limit = rss_limit
        self.peak_rss = 0
        self.killed_for_memory: int | None = None
        self.km = jupyter_client.KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd), env=full_env)
        self.pid = int(self.km.provisioner.pid)  # type: ignore[union-attr]
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()
        self._outputs: dict[str, Output] = {}
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=ready_timeout)

    # --- the watchdog -------------------------------------------------------------------------
    def _watch(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.wait(0.1):
            try:
                rss = proc.memory_info().rss + sum(
                    c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                return
            self.peak_rss = max(self.peak_rss, rss)
            if rss > self.rss_limit:
                self.killed_for_memory = rss
                os.kill(self.pid, signal.SIGKILL)
                return

    def check_memory(self) -> None:
        assert self.killed_for_memory is None, (
            f"the kernel was SIGKILLed by the test's watchdog at {self.killed_for_memory / GIB:.2f}"
            f" GiB resident (limit {self.rss_limit / GIB:.2f} GiB)"
        )

    # --- running cells --------------------------------------------------------------------------
    def submit(self, code: str) -> str:
        return str(self.kc.execute(code, stop_on_error=False))

    def _next(self, msg_id: str, deadline: float) -> dict[str, Any] | None:
        """The next iopub message of cell ``msg_id``, or None after a quiet second."""
        self.check_memory()
        if time.monotonic() > deadline:
            out = self._outputs.get(msg_id)
            raise TimeoutError(f"cell still running at its deadline; output so far: {out}")
        try:
            msg = self.kc.get_iopub_msg(timeout=1.0)
        except Empty:
            return None
        if msg["parent_header"].get("msg_id") != msg_id:
            return None
        out = self._outputs.setdefault(msg_id, Output())
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                out.stdout += content["text"]
            else:
                out.stderr += content["text"]
        elif kind in ("display_data", "execute_result"):
            out.displays.append(content["data"].get("text/plain", ""))
        elif kind == "error":
            out.error = list(content["traceback"])
        return msg

    def collect(self, msg_id: str, timeout: float = 120) -> Output:
        """Everything the cell ``msg_id`` printed, once the kernel is idle again."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next(msg_id, deadline)
            if msg is not None and msg["msg_type"] == "status" and \
                    msg["content"]["execution_state"] == "idle":
                break
        out = self._outputs.pop(msg_id, Output())
        reply = self.kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
        out.status = reply["content"]["status"]
        for p in reply["content"].get("payload", []):
            if p.get("source") == "page":
                out.payload_text += p["data"].get("text/plain", "")
        return out

    def run(self, code: str, timeout: float = 120) -> Output:
        return self.collect(self.submit(code), timeout=timeout)

    def ok(self, code: str, timeout: float = 120) -> Output:
        """``run``, asserting that the cell succeeded."""
        out = self.run(code, timeout=timeout)
        assert out.status == "ok" and not out.error, out.everything
        return out

    def wait_for_stdout(self, msg_id: str, needle: str = "", timeout: float = 120) -> None:
        """Wait until the running cell ``msg_id`` has printed ``needle`` (empty: anything; the
        cell runs on, and its output so far stays part of what :meth:`collect` returns)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self._outputs.get(msg_id)
            if out is not None and out.stdout.strip() and needle in out.stdout:
                return
            if out is not None and out.error:
                raise AssertionError("\n".join(out.error))
            self._next(msg_id, deadline)

    def interrupt(self) -> None:
        """The ■ button: an interrupt request (SIGINT for ipykernel)."""
        self.km.interrupt_kernel()

    # --- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=True)
        self._watchdog.join(timeout=5)

    def __enter__(self) -> Kernel:  # noqa: PYI034 - a plain class, never subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
