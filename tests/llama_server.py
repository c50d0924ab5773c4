"""Run llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``) for slow tests.

The server runs from its own virtual environment, built once per machine and portable by
``.ci/build-llama-server.sh`` (``make test`` builds it and passes its interpreter in
``KERNEL_EXT_LLAMA_PYTHON``). It is a real separate process on a fixed loopback port, so a test
can stop it midway and start it again at the same URL. Readiness is polled (the process is
waited on between polls, so a crash is noticed at once), and every start proves one real
completion before any test uses the server: a build that answers ``/v1/models`` but crashes on
its first completion (a CPU-tuned build on another CPU does) fails here, with the log's tail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx

__all__ = ["LlamaServer", "server_python"]

VERSION = "0.3.36"  # keep in step with .ci/llama-server-constraints.txt


def server_python() -> Path | None:
    """The interpreter of the llama.cpp server's venv: ``$KERNEL_EXT_LLAMA_PYTHON``, else the
    default place ``.ci/build-llama-server.sh`` builds it; ``None`` when there is none."""
    configured = os.environ.get("KERNEL_EXT_LLAMA_PYTHON")
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    default = cache / "kernel_ext" / f"llama-server-{VERSION}-portable" / "bin" / "python"
    return default if default.exists() else None


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


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
        python: Path | None = None,
    ) -> None:
        found = python or server_python()
        if found is None:
            raise RuntimeError("llama.cpp's server is not built: run .ci/build-llama-server.sh")
        self.python = found
        self.model = Path(model)
        self.workdir = Path(workdir)
        self.port = port or _free_port()
        self.n_ctx = n_ctx
        self.startup_s = startup_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"llama-server-{self.port}.log"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(self.python),
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
                self._prove_completion()
                return
            try:
                code = self.proc.wait(timeout=0.25)  # doubles as the poll interval
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(
                f"llama.cpp server exited with {code} while starting; last lines of "
                f"{self.log_path}:\n{_log_tail(self.log_path)}"
            )
        self.stop()
        raise RuntimeError(
            f"llama.cpp server did not answer within {self.startup_s:.0f} s; last lines of "
            f"{self.log_path}:\n{_log_tail(self.log_path)}"
        )

    def _prove_completion(self) -> None:
        """One greedy completion must come back whole, or the server is unusable."""
        try:
            r = httpx.post(
                f"{self.url}/completions",
                json={"prompt": "def fibonacci(n):", "max_tokens": 4, "temperature": 0},
                timeout=120.0,
            )
            r.raise_for_status()
            text = r.json()["choices"][0]["text"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            code = self.proc.poll() if self.proc is not None else None
            self.stop()
            raise RuntimeError(
                f"llama.cpp server answered /v1/models but its first completion failed "
                f"({type(e).__name__}: {e}; exit code {code}); last lines of "
                f"{self.log_path}:\n{_log_tail(self.log_path)}"
            ) from e
        if not text:
            self.stop()
            raise RuntimeError("llama.cpp server's first completion was empty")

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
