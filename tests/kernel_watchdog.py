"""A real kernel (jupyter_client) under an RSS watchdog: a thread samples the kernel's resident
memory and SIGKILLs it above a limit, so a regression that blows up memory fails a test instead
of taking the shared machine down. Also records the peak it saw."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

import psutil

GiB = 1024**3


class WatchedKernel:
    """``with WatchedKernel(cwd, limit_bytes=3 * GiB) as k: status, out = k.run(code)``."""

    def __init__(self, cwd: Path, *, limit_bytes: int = 3 * GiB, env: dict[str, str] | None = None,
                 interval: float = 0.02) -> None:
        self.cwd = cwd
        self.limit = limit_bytes
        self.extra_env = dict(env or {})
        self.interval = interval
        self.peak = 0
        self.killed = False
        self._stop = threading.Event()
        self.km: Any = None
        self.kc: Any = None

    # --- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        import jupyter_client

        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["JPY_SESSION_NAME"] = str(self.cwd / "nb.ipynb")
        env.pop("KERNEL_EXT_CHECKPOINT_KEY", None)
        env.update(self.extra_env)
        self.km = jupyter_client.KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(self.cwd), env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.pid = int(self.run("import os; print(os.getpid())")[1].strip())
        self._proc = psutil.Process(self.pid)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._proc.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                self.killed = True
                os.kill(self.pid, signal.SIGKILL)
                return
            time.sleep(self.interval)

    # --- use --------------------------------------------------------------------------------------
    def rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def reset_peak(self) -> None:
        self.peak = self.rss()

    def run(self, code: str, timeout: float = 300) -> tuple[str, str]:
        """(status, output text): stream text, results, and the error's ``ename: evalue``."""
        out: list[str] = []

        def hook(msg: dict) -> None:
            content = msg["content"]
            kind = msg["msg_type"]
            if kind == "stream":
                out.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                out.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                out.append(f"{content['ename']}: {content['evalue']}\n")

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        if self.killed:
            raise AssertionError(f"the kernel passed {self.limit / GiB:.1f} GiB of RSS and was killed")
        return reply["content"]["status"], "".join(out)

    def ok(self, code: str, timeout: float = 300) -> str:
        status, text = self.run(code, timeout)
        assert status == "ok", text
        return text
