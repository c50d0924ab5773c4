"""The decode modes on the real demo model (Gemma 3 270M Q4_K_M): ``exact`` gives stock
``generate``'s greedy text with the head's screen doing the work; ``quantized`` (computed on the
file's own blocks) keeps the quickstart's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kernel_ext.providers.decode import Source, decode, prepare

pytestmark = pytest.mark.slow

QUICKSTART = (  # notebooks/01_quickstart.ipynb
    "The capital of France is the city of",
    "Q: What is the capital of Japan?\nA:",
    "def fibonacci(n):",
)


@pytest.fixture(scope="module")
def demo(demo_model_path: Path, cache_dir: Path) -> tuple[Any, Any, Source]:
    from kernel_ext.gguf.cache import entry_dir
    from kernel_ext.gguf.loader import load_transformers

    art = load_transformers(demo_model_path, cache_dir=cache_dir / "conversions")
    source = Source(demo_model_path, entry_dir(cache_dir / "conversions", art.sha256))
    for mode in ("exact", "quantized"):
        # the int4 screen, not the one timed on this machine: a busy machine may pick none
        prepare(art.model, mode, source=source, screen="int4")
    return art.model, art.tokenizer, source


def _stock(model: Any, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, temperature=None,
                             top_p=None, top_k=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()  # type: ignore[no-any-return]


@pytest.mark.parametrize("prompt", QUICKSTART)
def test_exact_greedy_text_equals_stock_generate(demo: tuple[Any, Any, Source], prompt: str) -> None:
    model, tok, _ = demo
    ids = tok(prompt, return_tensors="pt").input_ids
    expected = _stock(model, ids, 24)
    got = decode(model, ids, max_new_tokens=24, mode="exact")
    assert got.tokens == expected
    assert got.screened >= len(got.tokens) - 2  # the screen did the work, not the full head


def test_quantized_keeps_the_quickstart_answers(demo: tuple[Any, Any, Source]) -> None:
    """The first token equals stock's on every quickstart prompt, unless the float32 model is
    itself at a near-tie there (then it is stock's runner-up). On the demo model the Q/A prompt
    is such a case: " Tokyo" 19.184 against " Japan" 19.174; quantized answers "Tokyo, Japan"
    today, with the float32 rows deciding the near-tie, but a CPU that rounds differently may
    not."""
    model, tok, _ = demo
    for prompt in QUICKSTART:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            top2 = torch.topk(model(ids).logits[0, -1], 2)
        got = decode(model, ids, max_new_tokens=8, mode="quantized")
        assert got.mode == "quantized"
        first, runner_up = (int(t) for t in top2.indices)
        if got.tokens[0] != first:
            assert float(top2.values[0] - top2.values[1]) < 0.05 and got.tokens[0] == runner_up, prompt
        if prompt.startswith("Q:") and got.tokens[0] == first:
            answer = tok.decode(got.tokens, skip_special_tokens=True).split("\n")[0]
            assert answer.strip() == "Tokyo, Japan", answer


def test_quantized_logits_are_close_to_the_float32_model(demo: tuple[Any, Any, Source]) -> None:
    """Within the rounding of the activations: the next-token logits move by a small fraction
    of their spread (llama.cpp on the same blocks moved ~3 %; the block kernels' two int8
    levels ~0.01 %, torch's int4 kernel with bf16 activations ~0.5 %)."""
    from kernel_ext.providers.decode import _Stepper

    model, tok, _ = demo
    ready = prepare(model, "quantized")
    assert ready.head is not None
    for prompt in QUICKSTART:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            exact = model(ids).logits[0, -1]
            step = _Stepper(model, ready)
            with step.weights():
                step.feed(ids)
            quant = ready.head.logits(step.last)[0]
        rel = float((quant - exact).abs().mean() / exact.std())
        assert rel < 0.03 and int(quant.argmax()) == int(exact.argmax()), (prompt, rel)
