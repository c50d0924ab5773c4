"""The fused decode step (kernel_ext.providers.fused) against the model's own forward.

Reference: the model's own forward with its own ``DynamicCache`` on the same weights and the
same tokens. The fused step continues from the cache the model's forward filled with the prompt
and must give the model's hidden state at every later position (float32 rounding), including
positions past a sliding window (Gemma 3's local layers, Mistral, Qwen2's windowed layers). In
``decode_mode='quantized'`` it must give today's quantised path's hidden states (same int4
kernels, fused) and the same greedy tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from block_kernels import require_block_kernels
from tinyarch import Dims, write_tiny
from tinymodels import write_tiny_gemma3, write_tiny_llama

from kernel_ext.gguf.loader import load_transformers
from kernel_ext.providers.decode import Source, _cache_kwarg, _Stepper, decode, prepare
from kernel_ext.providers.fused import FusedDecoder, fuse_int4, unsupported

DIMS = Dims(hidden=64, layers=3, heads=4, kv_heads=2, ffn=128, context=256)


def _write(folder: Path, family: str, quant: str = "F32") -> Path:
    path = folder / f"{family}-{quant}.gguf"
    if family == "gemma3":  # a small window, so that 40 tokens run past it
        return write_tiny_gemma3(path, quant=quant, seed=4, layers=3, sliding_window=8)
    if family == "llama":
        return write_tiny_llama(path, quant=quant, seed=4)
    return write_tiny(path, family, quant=quant, dims=DIMS, seed=4)


def _mistral() -> Any:
    """A real Mistral (random weights): every layer has a sliding window of 6."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=6, max_position_embeddings=256)
    return MistralForCausalLM(config).eval()


def _qwen2_windowed() -> Any:
    """A real Qwen2 whose upper layer has a sliding window of 5 (``max_window_layers``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         use_sliding_window=True, sliding_window=5, max_window_layers=1,
                         max_position_embeddings=256)
    return Qwen2ForCausalLM(config).eval()


def _llama_wide_heads() -> Any:
    """A real Llama with heads of 320 values: Transformers packs the query heads per KV head
    for SDPA (no ``enable_gqa`` over 256), and so must the fused step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, head_dim=320,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma3"])
def dense(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = _write(tmp_path_factory.mktemp(request.param), request.param)
    return load_transformers(path).model


def _tokens(model: Any, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(min(300, vocab // 2), vocab, (1, n), generator=g)


def _own_hidden(model: Any, ids: torch.Tensor, prompt: int) -> list[torch.Tensor]:
    """The model's own last hidden state after each token from ``prompt`` on (one at a time,
    with its own cache, as generate decodes)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model.base_model(input_ids=ids[:, :prompt], **{_cache_kwarg(model.base_model): cache}, use_cache=True)
    hidden = [out.last_hidden_state[:, -1]]
    for i in range(prompt, ids.shape[1]):
        out = model.base_model(input_ids=ids[:, i:i + 1], **{_cache_kwarg(model.base_model): cache}, use_cache=True)
        hidden.append(out.last_hidden_state[:, -1])
    return hidden


def _fused_hidden(model: Any, ids: torch.Tensor, prompt: int, *, capacity: int | None = None,
                  int4: dict[Any, Any] | None = None, groups: dict[Any, Any] | None = None
                  ) -> list[torch.Tensor]:
    """The same through the fused step, continuing from the model's own prefill."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model.base_model(input_ids=ids[:, :prompt], **{_cache_kwarg(model.base_model): cache}, use_cache=True)
    hidden = [out.last_hidden_state[:, -1]]
    plan = FusedDecoder(model, int4 or {}, groups)
    state = plan.start(cache, prompt, capacity if capacity is not None else ids.shape[1])
    for i in range(prompt, ids.shape[1]):
        hidden.append(plan.step(state, ids[:, i:i + 1]))
    return hidden


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        scale = float(w.abs().max())
        diff = float((g - w).abs().max())
        assert diff <= rtol * max(scale, 1.0), f"position {i}: off by {diff} (scale {scale})"


@pytest.mark.parametrize("prompt", [1, 5, 20])
def test_dense_step_gives_the_models_hidden_states(dense: Any, prompt: int) -> None:
    """40 tokens: past Gemma 3's window of 8 whatever the prompt's length."""
    assert unsupported(dense) is None
    ids = _tokens(dense, 40)
    with torch.inference_mode():
        _assert_close(_fused_hidden(dense, ids, prompt), _own_hidden(dense, ids, prompt), rtol=0.0)


@pytest.mark.parametrize("build", [_mistral, _qwen2_windowed, _llama_wide_heads],
                         ids=["mistral", "qwen2-window", "llama-head-320"])
def test_sliding_windows_and_wide_heads_of_other_families(build: Any) -> None:
    model = build()
    assert unsupported(model) is None
    ids = _tokens(model, 30)
    with torch.inference_mode():
        for prompt in (2, 9):
            _assert_close(_fused_hidden(model, ids, prompt), _own_hidden(model, ids, prompt), rtol=0.0)


def test_the_cache_grows_past_its_capacity(dense: Any) -> None:
    """A state sized for fewer tokens than come reallocates, keeping every window."""
    ids = _tokens(dense, 30, seed=2)
    with torch.inference_mode():
        _assert_close(_fused_hidden(dense, ids, 4, capacity=5), _own_hidden(dense, ids, 4), rtol=0.0)


def test_decode_uses_the_fused_step_and_says_so_when_not(tmp_path: Path) -> None:
    path = _write(tmp_path, "llama", "Q8_0")
    ready = prepare(load_transformers(path).model, "quantized", source=Source(path))
    assert ready.fused and "fused decode step" in ready.summary
    path = write_tiny(tmp_path / "phi3.gguf", "phi3", quant="Q8_0", seed=1)
    phi3 = load_transformers(path)
    ready = prepare(phi3.model, "quantized", source=Source(path))
    assert not ready.fused
    assert any("model's own forward per token" in n and "phi3" in n for n in ready.notes)
    ids = torch.tensor([[5, 300, 301, 302]])
    got = decode(phi3.model, ids, max_new_tokens=3, mode="quantized")
    assert len(got.tokens) == 3 and any("phi3" in n for n in got.notes)


def test_unsupported_models_are_named() -> None:
    model = _mistral()
    model.config._attn_implementation = "eager"  # rounds otherwise than SDPA: not bitwise
    assert "'eager'" in str(unsupported(model))
    model.config._attn_implementation = "sdpa"
    assert unsupported(model) is None
    assert unsupported(model.to(torch.bfloat16)) == "it computes float32 models"


# --- quantized ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[
    (family, quant, kernels)
    for family, quant in (("llama", "Q8_0"), ("gemma3", "Q4_0"), ("qwen2", "Q5_0"), ("qwen3", "Q4_K"))
    for kernels in ("blocks", "int4")
], ids=lambda p: "-".join(p))
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny quantised model prepared for ``decode_mode='quantized'`` with the block kernels
    (``blockdot``: the file's blocks, int8 activations) or torch's int4 kernel (the fallback
    where no C compiler is, ``KERNEL_EXT_BLOCKDOT=0``)."""
    family, quant, kernels = request.param
    if kernels == "blocks":
        require_block_kernels()
    folder = tmp_path_factory.mktemp(family)
    if family == "qwen3":  # K-quant blocks need rows of 256
        path = write_tiny(folder / "qwen3.gguf", "qwen3", quant=quant, seed=4,
                          dims=Dims(hidden=256, layers=2, heads=2, kv_heads=1, head_dim=128, ffn=256))
    else:
        path = _write(folder, family, quant)
    art = load_transformers(path)
    with pytest.MonkeyPatch.context() as mp:
        if kernels == "int4":
            mp.setenv("KERNEL_EXT_BLOCKDOT", "0")
        ready = prepare(art.model, "quantized", source=Source(path))  # kept with the model
    assert ready.mode == "quantized", ready.notes
    assert ("computed on the file's blocks" in ready.summary) == (kernels == "blocks"), ready.summary
    return art.model, path


def test_fused_int4_projections_equal_the_separate_ones(quantized: tuple[Any, Path]) -> None:
    """Gate and up (rows a multiple of the packing's 64-row blocks) always fuse; q/k/v fuse
    when their rows allow it, else they run one call each (never a wrong concatenation)."""
    from kernel_ext.gguf.qlinear import Int4Weight
    from kernel_ext.providers.fused import _rep

    model, path = quantized
    ready = prepare(model, "quantized", source=Source(path))
    if not all(isinstance(w, Int4Weight) for w in ready.linears.values()):
        pytest.skip("the block kernels compute these layers (one call per group, by design)")
    layer = model.base_model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for modules in ((mlp.gate_proj, mlp.up_proj), (attn.q_proj, attn.k_proj, attn.v_proj)):
        ws = [ready.linears[m] for m in modules]
        group = fuse_int4(ws)
        if group is None:
            assert any(w.out_features % 64 for w in ws)
            continue
        x = torch.randn(3, ws[0].in_features)
        y = group(_rep(x.to(torch.bfloat16), ws[0].repeat))
        for w, (a, b) in zip(ws, group.spans):
            assert torch.equal(y[:, a:b], w(x))


def test_quantized_step_gives_todays_quantized_hidden_states(quantized: tuple[Any, Path]) -> None:
    """Same int4 kernels on the same bf16 inputs: equal to float32 rounding."""
    model, path = quantized
    ready = prepare(model, "quantized", source=Source(path))
    assert ready.mode == "quantized" and ready.fused, ready.notes
    ids = _tokens(model, 24, seed=3)
    with torch.inference_mode():
        step = _Stepper(model, ready)
        with step.weights():
            want = _own_hidden(model, ids, 6)
            got = _fused_hidden(model, ids, 6, int4=ready.linears, groups=ready.fused_groups)
    _assert_close(got, want, rtol=1e-4)


def test_block_kernels_run_the_whole_layer_step(quantized: tuple[Any, Path]) -> None:
    """With every projection on the file's blocks, single-token steps run the C layer step
    (norms, rotary, attention and residuals beside the products); with int4 copies, torch's."""
    from kernel_ext.gguf.blockdot import BlockWeight

    model, path = quantized
    ready = prepare(model, "quantized", source=Source(path))
    plan = FusedDecoder(model, ready.linears, ready.fused_groups)
    blocks = all(isinstance(w, BlockWeight) for w in ready.linears.values())
    assert (plan.blocks is not None) == blocks
    if plan.blocks is not None:  # gelu-tanh (gemma3) and SiLU (the others): one C call a layer
        assert all(b.spec is not None for b in plan.blocks)


def test_quantized_greedy_tokens_equal_todays_path(quantized: tuple[Any, Path]) -> None:
    model, path = quantized
    ready = prepare(model, "quantized", source=Source(path))
    ids = _tokens(model, 7, seed=5)
    fused = decode(model, ids, max_new_tokens=20, mode="quantized")
    ready.fused = False
    try:
        today = decode(model, ids, max_new_tokens=20, mode="quantized")
    finally:
        ready.fused = True
    assert fused.tokens == today.tokens


# --- the decode loop ---------------------------------------------------------------------------
def test_exact_greedy_tokens_equal_generate_past_the_window(dense: Any) -> None:
    """``decode_mode='exact'`` runs the fused step: still generate's greedy tokens, 40 of them
    (past Gemma 3's window of 8)."""
    ready = prepare(dense, "exact")
    assert ready.fused
    ids = _tokens(dense, 5, seed=7)
    with torch.inference_mode():
        want = dense.generate(ids, max_new_tokens=40, do_sample=False, temperature=None,
                              top_p=None, top_k=None, pad_token_id=0)[0, 5:].tolist()
    got = decode(dense, ids, max_new_tokens=40, mode="exact")
    assert got.tokens[:len(want)] == want


@pytest.mark.slow
def test_demo_model_hidden_states_are_the_models_own_past_the_window(demo_model_path: Path,
                                                                      cache_dir: Path) -> None:
    """Gemma 3 270M: 15 of 18 layers see a window of 512; a 600-token prompt runs past it."""
    model = load_transformers(demo_model_path, cache_dir=cache_dir / "conversions").model
    assert unsupported(model) is None
    ids = _tokens(model, 616, seed=11)
    with torch.inference_mode():
        _assert_close(_fused_hidden(model, ids, 600), _own_hidden(model, ids, 600), rtol=0.0)
