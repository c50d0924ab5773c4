"""A real kernel is SIGKILLed in the middle of a batched ``%%infer --over`` on the demo model;
a fresh kernel for the same notebook re-runs the cell and computes only the missing items."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from test_kernel_resume import execute, start, stop

pytestmark = pytest.mark.slow

CELL = """%%infer --over topics --into answers -n 16 --batch-size 4 -q
One sentence about {item}:"""

SETUP = """
%load_ext kernel_ext
%model load --no-progress
topics = ["Paris", "the ocean", "bread", "a cat", "winter", "music", "trains", "the moon",
          "coffee", "rivers", "gardens", "chess"]
"""


def audited(state_dir: Path) -> int:
    path = state_dir / "audit.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return sum(1 for line in lines if line.strip() and json.loads(line).get("kind") == "infer")


def test_sigkill_mid_batch_resumes_with_only_the_missing_items(
    tmp_path: Path, demo_model_path: Path
) -> None:
    km, kc = start(tmp_path)
    try:
        execute(kc, SETUP, timeout=300)
        state = Path(execute(kc, "import kernel_ext; print(kernel_ext.current_session().state_dir)").strip())
        pid = int(execute(kc, "import os; print(os.getpid())").strip())
        kc.execute(CELL)
        deadline = time.monotonic() + 300
        while audited(state) < 5:  # some items finished (and were saved), others are in flight
            assert time.monotonic() < deadline, "no item finished in time"
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        before = audited(state)
    finally:
        stop(km, kc)
    assert before < 12, "the cell finished before the kill; nothing to resume"
    km, kc = start(tmp_path)
    try:
        execute(kc, SETUP, timeout=300)
        execute(kc, CELL, timeout=300)
        report = execute(kc, "print(answers.restored, answers.computed, len(answers.failed), "
                             "sum(1 for a in answers if a.text))")
        restored, computed, failed, with_text = map(int, report.split())
    finally:
        stop(km, kc)
    assert before - 1 <= restored <= before  # what was saved came back ...
    assert computed == 12 - restored  # ... and only the rest was computed
    assert failed == 0 and with_text == 12
    assert audited(state) == before + computed
