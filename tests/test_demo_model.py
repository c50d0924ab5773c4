"""End to end on the real default model (Gemma 3 270M Q4_K_M) in a real IPython shell."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.slow


def test_default_model_completes_a_fact_the_same_way_twice(ip: Any, demo_model_path: Any, capsys: Any) -> None:
    ip.run_line_magic("model", "load --no-progress")
    out = capsys.readouterr().out
    assert "loaded gemma3-270m: gemma3" in out and "cpu / float32" in out
    session = ip.configurables[-1].session
    entry = session.models.get()
    assert entry.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert entry.summary["n_params"] > 250_000_000

    ip.run_cell_magic("infer", "--max-new-tokens 8 -o first", "The capital of France is the city of")
    streamed = capsys.readouterr().out
    first = ip.user_ns["first"]
    assert "Paris" in first.text
    assert first.text in streamed and "tok/s" in streamed
    ip.run_cell_magic("infer", "--max-new-tokens 8 -o second --quiet", "The capital of France is the city of")
    assert ip.user_ns["second"].text == first.text

    # the audit log saw the load and the inferences
    kinds = [r["kind"] for r in session.audit.read()]
    assert "model.load" in kinds


def test_default_model_info_and_unload(ip: Any, demo_model_path: Any, capsys: Any) -> None:
    ip.run_line_magic("model", "load --no-progress --name g")
    ip.run_line_magic("model", "info g")
    info = capsys.readouterr().out
    assert "gemma3" in info and "Q4_K" in info and "Q5_0" in info
    ip.run_line_magic("model", "unload g")
    assert "freed" in capsys.readouterr().out
