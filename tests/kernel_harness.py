"""A real kernel under the RSS watchdog (:class:`kernel_watchdog.WatchedKernel`), driven the
way a front end drives it: a cell's output split into stdout, stderr, displays, the error and
a pager payload (``%%infer?``), cells that run while the test waits for their first words, and
the stop button.

    with Kernel(tmp_path) as k:
        out = k.cell_ok("%load_ext kernel_ext")     # Output: stdout, stderr, error, displays
        msg_id = k.submit(long_cell)                # run without waiting
        k.wait_for_stdout(msg_id, "first words")
        k.interrupt()                               # the stop button
        out = k.collect(msg_id)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

from kernel_watchdog import GiB, WatchedKernel

__all__ = ["Kernel", "Output"]


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


class Kernel(WatchedKernel):
    """One ipykernel process in ``cwd`` under the watchdog (limit 3 GiB by default)."""

    def __init__(self, cwd: Path, *, limit_bytes: int = 3 * GiB,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(cwd, limit_bytes=limit_bytes, env=env)
        self._outputs: dict[str, Output] = {}

    def check_memory(self) -> None:
        assert not self.killed, (
            f"the kernel passed {self.limit / GiB:.1f} GiB of RSS and the watchdog killed it"
        )

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

    def cell(self, code: str, timeout: float = 120) -> Output:
        return self.collect(self.submit(code), timeout=timeout)

    def cell_ok(self, code: str, timeout: float = 120) -> Output:
        """``cell``, asserting that the cell succeeded."""
        out = self.cell(code, timeout=timeout)
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
