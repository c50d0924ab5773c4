"""The decode loop (kernel_ext.providers.decode) on tiny real GGUF models.

Reference: Hugging Face ``model.generate`` on the same loaded model. Greedy tokens must be
identical in every head mode that claims exactness, seeded sampling must reproduce generate's
samples, and the provider keeps stop strings, timeouts and streaming.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kernel_ext.errors import ProviderError
from kernel_ext.providers.base import GenerationParams
from kernel_ext.providers.decode import DECODE_MODES, SCREEN_CANDIDATES, Sampling, decode
from kernel_ext.providers.transformers_gguf import LocalModel, TransformersGGUFProvider
from provider_contract import ProviderTests
from tinymodels import EOS_ID, PAD_ID, write_tiny_gemma3, write_tiny_llama

PROMPTS = ("the capital of France is", "hello world", "a")


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A tiny real model (fresh weights per module: some tests change them, then restore)."""
    folder = tmp_path_factory.mktemp(request.param)
    writer = write_tiny_llama if request.param == "llama" else write_tiny_gemma3
    return _load(writer(folder / f"{request.param}.gguf", seed=3))


def _ids(tok: Any, prompt: str) -> torch.Tensor:
    return tok(prompt, return_tensors="pt").input_ids


def _generate(model: Any, ids: torch.Tensor, n: int, **kw: Any) -> list[int]:
    if not kw:
        kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, pad_token_id=PAD_ID, **kw)
    return out[0, ids.shape[1]:].tolist()


# --- greedy: identical to generate ------------------------------------------------------------
@pytest.mark.parametrize("head", ["exact", "full"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_generate(tiny: tuple[Any, Any], head: str, prompt: str) -> None:
    model, tok = tiny
    ids = _ids(tok, prompt)
    expected = _generate(model, ids, 40)
    got = decode(model, ids, max_new_tokens=40, eos_ids={EOS_ID}, mode=head)
    assert got.tokens == expected
    assert got.prompt_tokens == ids.shape[1]
    if head == "exact":  # the fp16 screen ran and certified every token of these fp32 heads
        assert got.mode == "exact" and got.screened == len(got.tokens) and got.fallbacks == 0
    else:
        assert got.screened == 0


def test_ties_fall_back_to_the_full_head_and_keep_the_lowest_id(tiny: tuple[Any, Any]) -> None:
    """Two identical head rows tie exactly: argmax picks the lower id, and so must the screen."""
    model, tok = tiny
    ids = _ids(tok, "hello world")
    first = _generate(model, ids, 1)[0]
    weight = model.get_output_embeddings().weight
    other = 7 if first > 7 else first + 7  # a row above or below the winner
    saved = weight[other].clone()
    try:
        with torch.no_grad():
            weight[other] = weight[first]
        expected = _generate(model, ids, 12)
        assert expected[0] == min(first, other)
        got = decode(model, ids, max_new_tokens=12, eos_ids={EOS_ID}, mode="exact")
        assert got.tokens == expected
        assert got.fallbacks >= 1  # the tie was not decided by the screen
    finally:
        with torch.no_grad():
            weight[other] = saved
    # the head copy follows the restored weights (in-place changes invalidate it)
    assert decode(model, ids, max_new_tokens=12, eos_ids={EOS_ID}).tokens == _generate(model, ids, 12)


def test_final_logit_softcapping_is_applied_like_the_model(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    if model.config.model_type != "gemma3_text":
        pytest.skip("soft-capping is a Gemma feature")
    ids = _ids(tok, "the capital of France is")
    model.config.final_logit_softcapping = 0.05  # saturating: capped logits tie often
    try:
        expected = _generate(model, ids, 20)
        for head in ("exact", "full"):
            assert decode(model, ids, max_new_tokens=20, eos_ids={EOS_ID}, mode=head).tokens == expected
        kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            sampled = _generate(model, ids, 20, **kw)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            got = decode(model, ids, max_new_tokens=20, eos_ids={EOS_ID}, sampling=Sampling(1.0))
        assert got.tokens == sampled
    finally:
        model.config.final_logit_softcapping = None


def test_a_bf16_model_uses_its_own_head_and_matches_generate(tmp_path: Path) -> None:
    model, tok = _load(write_tiny_llama(tmp_path / "bf16.gguf", seed=4))
    model.to(torch.bfloat16)
    ids = _ids(tok, "the capital of France is")
    got = decode(model, ids, max_new_tokens=24, eos_ids={EOS_ID}, mode="exact")
    assert got.tokens == _generate(model, ids, 24)
    assert got.screened == 0  # the fp16 screen is only certified for float32 heads
    fp16 = decode(model, ids, max_new_tokens=24, eos_ids={EOS_ID}, mode="fp16")
    assert fp16.mode == "exact" and fp16.tokens == got.tokens  # no fp16 copies of a bf16 model


def _linears(model: Any) -> list[torch.nn.Linear]:
    return [m for m in model.base_model.modules() if isinstance(m, torch.nn.Linear)]


def test_fp16_mode_uses_fp16_weights_then_restores_the_model(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ids = _ids(tok, "hello world")
    with torch.inference_mode():
        before = model(ids).logits
    seen: list[bool] = []

    def hook(token: int) -> bool:  # during decoding, the linears run the fp16 copies
        seen.append(all("forward" in vars(m) for m in _linears(model)))
        return False

    got = decode(model, ids, max_new_tokens=6, mode="fp16", on_token=hook)
    assert got.mode == "fp16" and len(got.tokens) == 6 and all(seen) and seen
    assert not any("forward" in vars(m) for m in _linears(model))  # restored
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)
    # fp16 weights change logits a little, not the greedy choice of these tiny models' first token
    assert got.tokens[0] == decode(model, ids, max_new_tokens=1).tokens[0]


def test_fp16_overflow_is_a_clear_error_and_restores_the_model(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    weight = _linears(model)[-1].weight  # the last MLP projection feeds the final norm
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1e6)  # beyond fp16's range once copied
        with pytest.raises(ProviderError, match="fp16 weights overflowed"):
            decode(model, _ids(tok, "hello"), max_new_tokens=3, mode="fp16")
        assert not any("forward" in vars(m) for m in _linears(model))
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    # the fp16 copies follow the restored weights
    got = decode(model, _ids(tok, "hello"), max_new_tokens=3, mode="fp16")
    assert len(got.tokens) == 3


def test_the_screen_bound_holds_for_random_hidden_states(tiny: tuple[Any, Any]) -> None:
    """|fp16 logits - fp32 logits| <= the certificate's bound, also for large and tiny inputs."""
    from kernel_ext.providers import decode as mod

    model, _ = tiny
    head = mod._head_for(model)
    assert head is not None and head.can_screen
    gen = torch.Generator().manual_seed(0)
    hidden_size = model.config.hidden_size
    for scale in (1e-3, 1.0, 30.0, 3000.0):
        h = torch.randn(1, hidden_size, generator=gen) * scale
        exact = torch.nn.functional.linear(h, head.weight.detach())
        approx = torch.nn.functional.linear(h.half(), head.half).float()
        h16 = h.half().float()
        bound = (h.norm() * head.d + (h - h16).norm() * head.wmax
                 + h16.norm() * head.wmax * (2.0**-10 + 2 * head.gamma))
        assert float((exact - approx).abs().max()) <= float(bound)


def test_the_fp16_copies_do_not_keep_a_model_alive(tmp_path: Path) -> None:
    """Unloading a model frees it, and its cached fp16 copies with it."""
    import gc
    import weakref

    from kernel_ext.providers import decode as mod

    model, tok = _load(write_tiny_gemma3(tmp_path / "gone.gguf", seed=5))
    for mode in ("exact", "fp16"):
        decode(model, _ids(tok, "hello"), max_new_tokens=2, mode=mode)
    assert model in mod._HEADS
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


# --- sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.5, 1.0, 20),
                                                        (1.2, 0.8, 30)])
def test_seeded_sampling_matches_generate(tiny: tuple[Any, Any], temperature: float, top_p: float,
                                          top_k: int) -> None:
    model, tok = tiny
    ids = _ids(tok, "hello world")
    with torch.random.fork_rng():
        torch.manual_seed(11)
        expected = _generate(model, ids, 24, do_sample=True, temperature=temperature, top_p=top_p,
                             top_k=top_k)
    for head in ("exact", "full"):
        with torch.random.fork_rng():
            torch.manual_seed(11)
            got = decode(model, ids, max_new_tokens=24, eos_ids={EOS_ID}, mode=head,
                         sampling=Sampling(temperature, top_p, top_k))
        assert got.tokens == expected


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ids = _ids(tok, "a")

    def run(seed: int) -> list[int]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return decode(model, ids, max_new_tokens=16, sampling=Sampling(1.5)).tokens

    assert run(5) == run(5)
    assert len({tuple(run(s)) for s in (5, 6, 7)}) > 1


# --- ending -------------------------------------------------------------------------------------
def test_max_new_tokens_is_respected(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    for n in (1, 2, 7):
        got = decode(model, _ids(tok, "hello"), max_new_tokens=n)  # no EOS ids: always n
        assert len(got.tokens) == n and got.finish_reason == "length"
        assert got.first_token_s is not None and got.total_s >= got.first_token_s


def test_eos_stops_and_is_the_last_token(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ids = _ids(tok, "the capital of France is")
    free = decode(model, ids, max_new_tokens=12).tokens
    eos = free[4]  # pretend the fifth token is an end-of-sequence token
    got = decode(model, ids, max_new_tokens=12, eos_ids={eos})
    assert got.finish_reason == "eos"
    assert got.tokens == free[: free.index(eos) + 1]


def test_hook_sees_every_token_and_can_stop(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ids = _ids(tok, "hello world")
    seen: list[int] = []

    def hook(token: int) -> bool:
        seen.append(token)
        return len(seen) == 3

    got = decode(model, ids, max_new_tokens=10, on_token=hook)
    assert got.finish_reason == "stopped" and got.tokens == seen and len(seen) == 3


def test_clock_is_injected(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ticks = iter(range(100))
    got = decode(model, _ids(tok, "hi"), max_new_tokens=3, clock=lambda: float(next(ticks)))
    # the clock is read three times only: at the start, at the first token, at the end
    assert got.first_token_s == 1.0 and got.total_s == 2.0
    assert got.decode_tokens_per_s == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"mode": "int3"}, "decode mode must be one of"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"input_ids": torch.ones(2, 3, dtype=torch.long)}, "input_ids must have shape (1, n)"),
        ({"input_ids": torch.ones(1, 0, dtype=torch.long)}, "input_ids must have shape (1, n)"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny: tuple[Any, Any], kwargs: dict[str, Any], fragment: str) -> None:
    model, tok = tiny
    args: dict[str, Any] = {"input_ids": _ids(tok, "hi"), "max_new_tokens": 2, **kwargs}
    with pytest.raises(ProviderError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        decode(model, **args)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
     ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k")],
)
def test_bad_sampling_is_a_clear_error(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ProviderError, match=fragment):
        Sampling(**kwargs)


def test_head_modes_and_candidates_are_public() -> None:
    assert DECODE_MODES[0] == "exact" and set(DECODE_MODES) == {"exact", "full", "fp16"}
    assert SCREEN_CANDIDATES >= 2


# --- through the provider: streaming, stop strings, timeouts -------------------------------
@pytest.fixture
def provider(tiny: tuple[Any, Any], tmp_path: Path) -> TransformersGGUFProvider:
    model, tok = tiny
    local = LocalModel(model=model, tokenizer=tok, path=tmp_path / "tiny.gguf", sha256="0" * 64,
                       device="cpu", dtype="float32")
    return TransformersGGUFProvider("tiny", local)


def test_provider_streams_the_same_text_it_returns(provider: TransformersGGUFProvider) -> None:
    pieces: list[str] = []
    r = provider.generate("the capital of France is", GenerationParams(max_new_tokens=20),
                          on_token=pieces.append)
    assert r.text and "".join(pieces) == r.text
    assert r.completion_tokens >= 1 and r.finish_reason in {"length", "stop"}
    model, tok = provider.local.model, provider.local.tokenizer  # type: ignore[union-attr]
    ids = _ids(tok, "the capital of France is")
    assert tok.decode(_generate(model, ids, 20), skip_special_tokens=True) == r.text


def test_provider_stop_string_cuts_the_text(provider: TransformersGGUFProvider) -> None:
    full = provider.generate("the capital of France is", GenerationParams(max_new_tokens=30)).text
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = full.index(stop)
    pieces: list[str] = []
    r = provider.generate("the capital of France is", GenerationParams(max_new_tokens=30, stop=(stop,)),
                          on_token=pieces.append)
    assert r.text == full[:cut] and "".join(pieces) == r.text
    assert r.finish_reason == "stop"


def test_provider_should_stop_is_a_timeout_with_partial_text(provider: TransformersGGUFProvider) -> None:
    polls = 0

    def should_stop() -> bool:  # "time is up" after the third token
        nonlocal polls
        polls += 1
        return polls >= 3

    full = provider.generate("hello world", GenerationParams(max_new_tokens=12))
    r = provider.generate("hello world", GenerationParams(max_new_tokens=12), should_stop=should_stop)
    assert r.finish_reason == "timeout" and r.timed_out
    assert r.completion_tokens == 3 and polls == 3
    assert full.text.startswith(r.text)


def test_provider_honours_the_mode_setting(provider: TransformersGGUFProvider) -> None:
    params = GenerationParams(max_new_tokens=8)
    provider.decode_mode = "full"
    a = provider.generate("hello", params).text
    reads: list[str] = []
    provider.decode_mode = lambda: reads.append("exact") or "exact"  # a live setting
    r = provider.generate("hello", params)
    assert r.text == a and r.notes == [] and reads == ["exact"]
    provider.decode_mode = "fp16"
    r = provider.generate("hello", params)
    assert r.notes == ["fp16 weights"] and "fp16 weights" in r.footer()
    provider.decode_mode = "int3"
    with pytest.raises(ProviderError, match="decode mode must be one of"):
        provider.generate("hello", params)


def test_provider_seeded_sampling_is_reproducible(provider: TransformersGGUFProvider) -> None:
    params = GenerationParams(max_new_tokens=12, temperature=1.3, seed=9)
    assert provider.generate("a", params).text == provider.generate("a", params).text
    state = torch.random.get_rng_state()
    provider.generate("a", params)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched


class TestLocalProviderContract(ProviderTests):
    """The local provider, decoding with this loop, passes the contract every provider passes."""

    # LEAD: delete once wt-15-decode (the local provider returns the partial answer on
    # KeyboardInterrupt) is merged.
    interrupt_pending = "the local provider catches KeyboardInterrupt in wt-15-decode's branch"

    @pytest.fixture
    def provider(self, tiny: tuple[Any, Any], tmp_path: Path) -> TransformersGGUFProvider:
        model, tok = tiny
        local = LocalModel(model=model, tokenizer=tok, path=tmp_path / "tiny.gguf",
                           sha256="0" * 64, device="cpu", dtype="float32")
        return TransformersGGUFProvider("tiny-local", local)


def test_the_setting_reaches_loaded_models(ip: Any, tmp_path: Path) -> None:
    """%config KernelExt.decode_mode applies to models already loaded, at the next %%infer."""
    path = write_tiny_llama(tmp_path / "cfg.gguf", seed=6)
    ip.run_line_magic("model", f"load {path} --no-progress")
    ip.run_cell_magic("infer", "-n 4 -o a -q", "hello")
    assert ip.user_ns["a"].notes == []
    ip.run_line_magic("config", "KernelExt.decode_mode = 'fp16'")
    ip.run_cell_magic("infer", "-n 4 -o b -q", "hello")
    assert "fp16 weights" in ip.user_ns["b"].notes
    ip.run_line_magic("config", "KernelExt.decode_mode = 'int8'")  # refused (logged), value kept
    ext = next(c for c in ip.configurables if type(c).__name__ == "KernelExt")
    assert ext.decode_mode == "fp16"


def test_a_hooked_head_runs_the_models_own_forward(tiny: tuple[Any, Any]) -> None:
    """Accelerate's offloading replaces a module's forward: then only that forward is right."""
    model, tok = tiny
    head = model.get_output_embeddings()
    calls: list[int] = []
    original = head.forward

    def hooked(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return original(x)

    head.forward = hooked
    try:
        ids = _ids(tok, "hello world")
        got = decode(model, ids, max_new_tokens=5, mode="exact")
        assert got.mode == "full" and len(calls) == len(got.tokens)
        assert got.tokens == _generate(model, ids, 5)[: len(got.tokens)]
    finally:
        del head.forward
