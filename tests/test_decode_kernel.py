"""The stop button in a real kernel: ``interrupt_kernel()`` while a local model generates ends
the cell with the partial answer (``finish_reason == "interrupted"``), not a traceback, and
the kernel goes on working."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tinymodels import write_tiny_llama

pytestmark = pytest.mark.slow

jupyter_client = pytest.importorskip("jupyter_client")


def test_interrupt_while_generating_returns_the_partial_answer(tmp_path: Path) -> None:
    from test_kernel_resume import execute, start, stop

    model = write_tiny_llama(tmp_path / "long.gguf", seed=2, context=65536)
    km, kc = start(tmp_path)
    try:
        execute(kc, "%load_ext kernel_ext")
        execute(kc, "%config KernelExt.checkpoint_enabled = False")
        execute(kc, f"%model load {model} --no-progress")
        kc.execute("%%infer -n 30000 -o r\nthe capital of France is")
        streamed = ""
        deadline = time.monotonic() + 120
        while len(streamed) < 20:  # tokens are streaming: the model is generating
            msg = kc.get_iopub_msg(timeout=max(1.0, deadline - time.monotonic()))
            if msg["msg_type"] == "stream":
                streamed += msg["content"]["text"]
            assert msg["msg_type"] != "error", msg["content"]
        km.interrupt_kernel()  # the stop button
        reply = kc.get_shell_msg(timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        out = execute(kc, "print(r.finish_reason, r.completion_tokens, len(r.text) > 0)")
        reason, tokens, has_text = out.split()
        assert reason == "interrupted" and 0 < int(tokens) < 30000 and has_text == "True"
        assert "ok" in execute(kc, "print('ok')")  # the kernel goes on
    finally:
        stop(km, kc)
