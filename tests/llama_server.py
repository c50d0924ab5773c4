"""Run llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``) for slow tests.

The server is a real separate process on a fixed loopback port, so a test can stop it midway
and start it again at the same URL. Readiness is polled (the process is waited on between
polls, so a crash is noticed at once).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["LlamaServer"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    def __init__(
        self,
        model: Path,
        workdir: Path,
        *,
        port: int | None = None,
        n_ctx: int = 512,
        startup_s: float = 180.0,
    ) -> None:
        self.model = Path(model)
        self.workdir = Path(workdir)
        self.port = port or _free_port()
        self.n_ctx = n_ctx
        self.startup_s = startup_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.workdir / f"llama-server-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(self.model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--n_ctx",
                str(self.n_ctx),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            try:
                up = httpx.get(f"{self.url}/models", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                up = False  # not listening yet
            if up:
                return
            try:
                code = self.proc.wait(timeout=0.25)  # doubles as the poll interval
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(
                f"llama.cpp server exited with {code}; see "
                f"{self.workdir}/llama-server-{self.port}.log"
            )
        self.stop()
        raise RuntimeError(f"llama.cpp server did not answer within {self.startup_s:.0f} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
