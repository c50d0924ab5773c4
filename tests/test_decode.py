"""The decode loop (kernel_ext.providers.decode) on tiny real GGUF models.

Reference: Hugging Face ``model.generate`` on the same loaded model. Greedy tokens must be
identical in every mode that claims exactness (with each screen of the LM head), seeded
sampling must reproduce generate's samples, prompts are processed in chunks that give the
logits of one pass, and the provider keeps stop strings, timeouts, interrupts and streaming.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from provider_contract import ProviderTests
from tinymodels import EOS_ID, PAD_ID, write_tiny_gemma3, write_tiny_llama

from kernel_ext.errors import ProviderError
from kernel_ext.providers.base import GenerationParams
from kernel_ext.providers.decode import DECODE_MODES, Sampling, Source, decode, prepare
from kernel_ext.providers.head import SCREEN_KINDS
from kernel_ext.providers.transformers_gguf import LocalModel, TransformersGGUFProvider

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
        kw = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, pad_token_id=PAD_ID, **kw)
    return out[0, ids.shape[1]:].tolist()


# --- greedy: identical to generate ------------------------------------------------------------
@pytest.mark.parametrize("screen", SCREEN_KINDS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_generate_with_each_screen(tiny: tuple[Any, Any], screen: str,
                                                        prompt: str) -> None:
    model, tok = tiny
    ids = _ids(tok, prompt)
    expected = _generate(model, ids, 40)
    prepare(model, "exact", screen=screen)
    got = decode(model, ids, max_new_tokens=40, eos_ids={EOS_ID}, mode="exact")
    assert got.tokens == expected
    assert got.prompt_tokens == ids.shape[1] and got.prefilled == ids.shape[1]
    # the screen ran and certified every token of these float32 heads
    assert got.mode == "exact" and got.screened == len(got.tokens) and got.fallbacks == 0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_full_mode_equals_generate(tiny: tuple[Any, Any], prompt: str) -> None:
    model, tok = tiny
    ids = _ids(tok, prompt)
    got = decode(model, ids, max_new_tokens=40, eos_ids={EOS_ID}, mode="full")
    assert got.tokens == _generate(model, ids, 40) and got.screened == 0


def test_ties_fall_back_to_the_full_head_and_keep_the_lowest_id(tiny: tuple[Any, Any]) -> None:
    """Two identical head rows tie exactly: argmax picks the lower id, and so must the screen."""
    model, tok = tiny
    ids = _ids(tok, "hello world")
    first = _generate(model, ids, 1)[0]
    weight = model.get_output_embeddings().weight
    other = 7 if first > 7 else first + 7  # a row above or below the winner
    saved = weight[other].clone()
    prepare(model, "exact", screen="int4")
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
    # the screen follows the restored weights (in-place changes invalidate it)
    again = decode(model, ids, max_new_tokens=12, eos_ids={EOS_ID})
    assert again.tokens == _generate(model, ids, 12) and again.screened == len(again.tokens)


def test_final_logit_softcapping_is_applied_like_the_model(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    if model.config.model_type != "gemma3_text":
        pytest.skip("soft-capping is a Gemma feature")
    ids = _ids(tok, "the capital of France is")
    model.config.final_logit_softcapping = 0.05  # saturating: capped logits tie often
    prepare(model, "exact", screen="int4")
    try:
        expected = _generate(model, ids, 20)
        for head in ("exact", "full"):
            assert decode(model, ids, max_new_tokens=20, eos_ids={EOS_ID}, mode=head).tokens == expected
        kw = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
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
    assert got.screened == 0  # the screen is only certified for float32 heads
    # no GGUF file known for this model: quantized decoding says so and decodes exactly
    quant = decode(model, ids, max_new_tokens=24, eos_ids={EOS_ID}, mode="quantized")
    assert quant.mode == "exact" and quant.tokens == got.tokens
    assert "quantized decoding unavailable" in quant.notes[0] and "GGUF file" in quant.notes[0]


def _linears(model: Any) -> list[torch.nn.Linear]:
    return [m for m in model.base_model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """A tiny llama in Q8_0 loaded by our loader (so its GGUF tensors map onto the model)."""
    from kernel_ext.gguf.loader import load_transformers

    path = write_tiny_llama(tmp_path_factory.mktemp("q8") / "q8.gguf", quant="Q8_0", seed=5)
    art = load_transformers(path)
    return art.model, art.tokenizer, path


def test_quantized_mode_runs_int4_layers_then_restores_the_model(tiny_q8: tuple[Any, Any, Path]) -> None:
    model, tok, path = tiny_q8
    ready = prepare(model, "quantized", source=Source(path))
    assert ready.mode == "quantized" and "Q8_0" in ready.summary and ready.nbytes > 0
    ids = _ids(tok, "hello world")
    with torch.inference_mode():
        before = model(ids).logits
    seen: list[bool] = []

    def hook(token: int) -> bool:  # during decoding, the linears run the int4 copies
        seen.append(all("forward" in vars(m) for m in _linears(model)))
        return False

    got = decode(model, ids, max_new_tokens=6, mode="quantized", on_token=hook)
    assert got.mode == "quantized" and len(got.tokens) == 6 and seen and all(seen)
    assert not any("forward" in vars(m) for m in _linears(model))  # restored
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)


def test_quantized_logits_stay_close_to_the_float32_model(tiny_q8: tuple[Any, Any, Path]) -> None:
    """The int4 layers compute the file's own numbers: the logits move by about the bf16
    rounding of activations and scales, far less than their spread."""
    model, tok, path = tiny_q8
    ready = prepare(model, "quantized", source=Source(path))
    ids = _ids(tok, "the capital of France is")
    with torch.inference_mode():
        exact = model(ids).logits[0, -1]
        from kernel_ext.providers.decode import _Stepper

        step = _Stepper(model, ready)
        with step.weights():
            step.feed(ids)
            quant = ready.head.sample_logits(step.last)[0]  # type: ignore[union-attr]
    assert ready.head is not None and ready.head.fast is not None
    assert ready.head.fast() is not None  # the Q8_0 head has an int4 form too, built on demand
    # greedy tokens are certified against rows dequantised from the file, equal to the model's
    assert ready.head.rows is not None
    index = torch.tensor([0, 5, 300])
    assert torch.equal(ready.head.rows(index), model.lm_head.weight[index])
    diff = float((quant - exact).abs().max())
    assert diff < 0.02 * float(exact.std()) * 10, diff
    assert int(quant.argmax()) == int(exact.argmax())


@pytest.mark.parametrize("kind", SCREEN_KINDS)
def test_the_screen_bound_holds_for_random_hidden_states(tiny: tuple[Any, Any], kind: str) -> None:
    """What the model's head computes never exceeds the certificate's upper bound, for any
    hidden state (large, tiny, one-hot, negative), whichever kernel rounding applies."""
    from kernel_ext.providers import head as mod

    model, _ = tiny
    ready = prepare(model, "exact", screen=kind)
    head = ready.head
    assert head is not None and head.screen is not None and head.screen.kind == kind
    gen = torch.Generator().manual_seed(0)
    hidden_size = model.config.hidden_size
    weight = head.weight.detach()
    for scale in (1e-3, 1.0, 30.0, 3000.0):
        for h in (torch.randn(1, hidden_size, generator=gen) * scale,
                  torch.eye(hidden_size)[:1] * scale, -torch.rand(1, hidden_size, generator=gen) * scale):
            a = head.screen.matmul(h)[0]
            hb = h.to(torch.bfloat16).float()
            c_w = float((h - hb).norm()) + float(hb.norm()) * (mod._U_BF16 + head.gamma)
            c_e = float(hb.norm()) * (1 + mod._U_BF16 + head.gamma)
            bound = a.abs() * mod._U_BF16 + head.screen.w_norm * c_w + head.screen.err_norm * c_e
            exact = torch.nn.functional.linear(h.double(), weight.double())[0]
            assert bool(((exact - a.double()).abs() <= bound.double()).all()), (kind, scale)


def test_the_copies_do_not_keep_a_model_alive(tmp_path: Path) -> None:
    """Unloading a model frees it, and the decoding copies with it."""
    import gc
    import weakref

    from kernel_ext.gguf.loader import load_transformers
    from kernel_ext.providers import decode as mod

    path = write_tiny_gemma3(tmp_path / "gone.gguf", seed=5, quant="Q8_0")
    art = load_transformers(path)
    model, tok = art.model, art.tokenizer
    prepare(model, "quantized", source=Source(path), screen="int4")
    for mode in ("exact", "quantized"):
        decode(model, _ids(tok, "hello"), max_new_tokens=2, mode=mode)
    assert model in mod._PREPARED
    alive = weakref.ref(model)
    del model, art
    gc.collect()
    assert alive() is None


# --- chunked prefill ------------------------------------------------------------------------------
def _long_ids(tok: Any, n: int) -> torch.Tensor:
    words = ["the", "capital", "of", "France", "is", "Paris", "and", "hello", "world", "model", "test", "kernel", "notebook"]
    ids = tok(" ".join(words[i % len(words)] for i in range(n)), return_tensors="pt").input_ids
    assert ids.shape[1] >= n
    return ids


@pytest.mark.parametrize("chunk", [5, 48])
def test_chunked_prefill_gives_the_logits_of_one_pass(tmp_path: Path, chunk: int) -> None:
    """Across gemma3's sliding window (16 here) and full-attention layers, prompt chunks give
    the last position's hidden state of one pass (to float32 rounding) and the same tokens."""
    from kernel_ext.providers.decode import _Stepper

    model, tok = _load(write_tiny_gemma3(tmp_path / "sw.gguf", seed=7, sliding_window=16,
                                         layers=6))
    assert "full_attention" in model.config.layer_types
    ids = _long_ids(tok, 30)  # ~110 tokens
    ready = prepare(model, "exact", screen="int4")
    states = []
    for size in (10_000, chunk):
        step = _Stepper(model, ready)
        with torch.inference_mode():
            assert step.prefill(ids, size, None)
        states.append(step.last)
    torch.testing.assert_close(states[1], states[0], rtol=1e-5, atol=1e-5)
    one = decode(model, ids, max_new_tokens=12, prefill_chunk=10_000)
    chunked = decode(model, ids, max_new_tokens=12, prefill_chunk=chunk)
    assert chunked.tokens == one.tokens == _generate(model, ids, 12)


def test_should_stop_is_polled_between_prompt_chunks(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ids = _long_ids(tok, 30)
    polls: list[int] = []

    def should_stop() -> bool:  # "time is up" at the third check
        polls.append(1)
        return len(polls) >= 3

    got = decode(model, ids, max_new_tokens=5, prefill_chunk=8, should_stop=should_stop)
    assert got.finish_reason == "cancelled" and got.tokens == []
    assert got.prefilled == 24 < ids.shape[1]  # three chunks were processed, no more


def test_keyboard_interrupt_during_prefill_returns_what_there_is(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ids = _long_ids(tok, 30)
    polls: list[int] = []

    def should_stop() -> bool:  # the stop button, pressed while the prompt is processed
        polls.append(1)
        if len(polls) == 2:
            raise KeyboardInterrupt
        return False

    got = decode(model, ids, max_new_tokens=5, prefill_chunk=8, should_stop=should_stop)
    assert got.finish_reason == "interrupted" and got.tokens == [] and got.prefilled == 16


def test_keyboard_interrupt_while_decoding_keeps_the_tokens(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ids = _ids(tok, "hello world")
    seen: list[int] = []

    def hook(token: int) -> bool:
        seen.append(token)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return False

    got = decode(model, ids, max_new_tokens=20, on_token=hook)
    assert got.finish_reason == "interrupted" and got.tokens == seen
    assert got.tokens == _generate(model, ids, 4)


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
        ({"prefill_chunk": 0}, "prefill_chunk must be >= 1"),
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


def test_modes_and_screens_are_public() -> None:
    assert DECODE_MODES[0] == "exact" and set(DECODE_MODES) == {"exact", "full", "quantized"}
    assert set(SCREEN_KINDS) == {"int4", "int8"}
    with pytest.raises(ProviderError, match="screen must be"):
        prepare(object(), "exact", screen="fp16")


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
    provider.decode_mode = "quantized"  # the fixture's path is no GGUF file: said, then exact
    r = provider.generate("hello", params)
    assert r.text == a and "quantized decoding unavailable" in r.notes[0]
    provider.decode_mode = "int3"
    with pytest.raises(ProviderError, match="decode mode must be one of"):
        provider.generate("hello", params)


def test_provider_returns_partial_text_when_interrupted(provider: TransformersGGUFProvider) -> None:
    """The stop button (KeyboardInterrupt, here raised where the text streams) ends the call
    with the text so far: returned, not raised."""
    full = provider.generate("hello world", GenerationParams(max_new_tokens=12)).text
    pieces: list[str] = []

    def on_token(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    r = provider.generate("hello world", GenerationParams(max_new_tokens=12), on_token=on_token)
    assert r.finish_reason == "interrupted" and not r.timed_out
    assert r.text and full.startswith(r.text) and 1 <= r.completion_tokens < 12


@pytest.fixture(scope="module")
def long_provider(tmp_path_factory: pytest.TempPathFactory) -> TransformersGGUFProvider:
    """A tiny model with a context long enough for prompts of several prefill chunks."""
    path = write_tiny_llama(tmp_path_factory.mktemp("long") / "long.gguf", seed=8, context=4096)
    model, tok = _load(path)
    local = LocalModel(model=model, tokenizer=tok, path=path, sha256="0" * 64, device="cpu",
                       dtype="float32")
    return TransformersGGUFProvider("long", local)


def test_provider_interrupted_while_the_prompt_is_processed(
        long_provider: TransformersGGUFProvider) -> None:
    def should_stop() -> bool:
        raise KeyboardInterrupt

    prompt = " ".join(["the capital of France is Paris"] * 100)  # > one prefill chunk
    r = long_provider.generate(prompt, GenerationParams(max_new_tokens=12), should_stop=should_stop)
    assert r.finish_reason == "interrupted" and r.text == "" and r.completion_tokens == 0


def test_provider_deadline_during_prefill_is_a_timeout(
        long_provider: TransformersGGUFProvider) -> None:
    prompt = " ".join(["the capital of France is Paris"] * 100)
    r = long_provider.generate(prompt, GenerationParams(max_new_tokens=12),
                               should_stop=lambda: True)
    assert r.finish_reason == "timeout" and r.text == "" and r.completion_tokens == 0


def test_provider_seeded_sampling_is_reproducible(provider: TransformersGGUFProvider) -> None:
    params = GenerationParams(max_new_tokens=12, temperature=1.3, seed=9)
    assert provider.generate("a", params).text == provider.generate("a", params).text
    state = torch.random.get_rng_state()
    provider.generate("a", params)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched


class TestLocalProviderContract(ProviderTests):
    """The local provider, decoding with this loop, passes the contract every provider passes."""

    @pytest.fixture
    def provider(self, tiny: tuple[Any, Any], tmp_path: Path) -> TransformersGGUFProvider:
        model, tok = tiny
        local = LocalModel(model=model, tokenizer=tok, path=tmp_path / "tiny.gguf",
                           sha256="0" * 64, device="cpu", dtype="float32")
        return TransformersGGUFProvider("tiny-local", local)


def test_the_setting_reaches_loaded_models(ip: Any, tmp_path: Path) -> None:
    """%config KernelExt.decode_mode applies to models already loaded, at the next %%infer;
    %model info says how the model decodes (the fused step here)."""
    from IPython.utils.capture import capture_output

    path = write_tiny_llama(tmp_path / "cfg.gguf", seed=6, quant="Q8_0")
    ip.run_line_magic("model", f"load {path} --no-progress")
    ip.run_cell_magic("infer", "-n 4 -o a -q", "hello")
    assert ip.user_ns["a"].notes == []
    ip.run_line_magic("config", "KernelExt.decode_mode = 'quantized'")
    ip.run_cell_magic("infer", "-n 4 -o b -q", "hello")
    assert "quantized weights" in ip.user_ns["b"].notes
    with capture_output() as out:
        ip.run_line_magic("model", "info")
    assert "decoding  quantized (" in out.stdout and "fused decode step" in out.stdout
    ip.run_line_magic("config", "KernelExt.decode_mode = 'int8'")  # refused (logged), value kept
    ext = next(c for c in ip.configurables if type(c).__name__ == "KernelExt")
    assert ext.decode_mode == "quantized"


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


def test_the_memory_guard_counts_each_modes_copies() -> None:
    from kernel_ext.models import _decode_copies

    summary = {"n_params": 1000, "vocab_size": 100}
    head = 100 * (64 + 8)  # the screen: at most a byte per head weight plus two norms per row
    assert _decode_copies("exact", "cpu", summary, 64) == (head, 0)
    assert _decode_copies("quantized", "cpu", summary, 64) == (head, 1250)
    assert _decode_copies("full", "cpu", summary, 64) == (0, 0)
    assert _decode_copies("quantized", "cuda:0", summary, 64) == (0, 0)


def test_switching_modes_keeps_one_screen(tiny_q8: tuple[Any, Any, Path]) -> None:
    from kernel_ext.providers.decode import copy_bytes

    model, _, path = tiny_q8
    exact = prepare(model, "exact", source=Source(path), screen="int4")
    quant = prepare(model, "quantized", source=Source(path), screen="int4")
    assert exact.head is not None and quant.head is not None
    assert quant.head.screen is exact.head.screen  # shared, not built twice
    assert copy_bytes(model) == exact.nbytes + quant.nbytes - exact.nbytes + (
        quant.head.fast_built().nbytes if quant.head.fast_built() is not None else 0)


def test_int8_screen_of_a_head_whose_width_is_not_a_multiple_of_16() -> None:
    """torch 2.13's int8 CPU kernel segfaults for such widths (the whole kernel dies): the
    screen pads instead, and its products are those of the unpadded weight."""
    from kernel_ext.providers.head import _int8_matmul

    q8 = torch.randint(-127, 127, (300, 40), dtype=torch.int8)
    scale = torch.rand(300, dtype=torch.bfloat16)
    h = torch.randn(4, 40)
    want = h.to(torch.bfloat16).float() @ (q8.float() * scale.float()[:, None]).T
    got = _int8_matmul(q8[:, :], scale)(h)
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_no_screen_timed_on_a_busy_machine_is_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy first load must not turn the head screen off for good: "none" timed then is used
    in that process only; a quiet choice is recorded (and read back instead of timing again)."""
    import json

    from kernel_ext.providers import head as head_mod

    weight = torch.randn(512, 64)
    record = tmp_path / "decode-screens.json"
    monkeypatch.setattr(head_mod, "_CHOICES", {})
    monkeypatch.setattr(head_mod, "_busy", lambda: True)  # the load average, injected
    monkeypatch.setattr(head_mod, "_time_screens", lambda dense, kinds: {"float32": 1.0, "int8": 0.9})
    assert head_mod.choose_screen(weight, record=record) is None  # not clearly faster: none
    assert not record.exists()
    monkeypatch.setattr(head_mod, "_CHOICES", {})  # a screen chosen while busy is recorded
    monkeypatch.setattr(head_mod, "_time_screens", lambda dense, kinds: {"float32": 1.0, "int8": 0.5})
    assert head_mod.choose_screen(weight, record=record) == "int8" and record.exists()
    record.unlink()
    monkeypatch.undo()
    monkeypatch.setattr(head_mod, "_CHOICES", {})
    monkeypatch.setattr(head_mod, "_busy", lambda: False)
    choice = head_mod.choose_screen(weight, record=record)
    (entry,) = json.loads(record.read_text()).values()
    assert entry["choice"] == choice and "float32" in entry["seconds"]
    monkeypatch.setattr(head_mod, "_CHOICES", {})
    monkeypatch.setattr(head_mod, "_time_screens", lambda *a: pytest.fail("timed again"))
    assert head_mod.choose_screen(weight, record=record) == choice
