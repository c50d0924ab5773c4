"""Every architecture stock Transformers loads from GGUF, from tiny llama.cpp-style files.

Fast path (kernel_ext's adapters): each architecture is compared with stock Transformers
(``from_pretrained(dir, gguf_file=...)``) on one small file - logits within 1e-4 in fp32, the
same token ids, the same greedy tokens, the same tokenizer and chat-template rendering. The
quantisation types and vocabulary styles rotate over the architectures (:data:`CASES`), so every
kind of transform (row permutation, offset, transpose, stacked experts) meets a block-quantised
type. The row map every load reports (``weight_sources``) is checked against the file's own rows.

Transformers path: the architectures without an adapter load through stock Transformers, offline,
behind the same gate; ``%model load``/``%model info`` say which path loaded a model and why, and
a file that no path loads is refused before it is hashed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from IPython.core.error import UsageError
from tinyarch import (
    FALLBACK_ARCHS,
    FAST_ARCHS,
    K_QUANT_DIMS,
    Dims,
    stock_overrides,
    write_tiny,
)

from kernel_ext.errors import GGUFUnsupportedError
from kernel_ext.gguf import read_gguf
from kernel_ext.gguf.arch import ADAPTERS, TRANSFORMERS_ARCHITECTURES
from kernel_ext.gguf.arch.base import n_rows
from kernel_ext.gguf.dequant import dequantize
from kernel_ext.gguf.loader import LoadedArtifacts, load_transformers
from kernel_ext.gguf.sources import TRANSFORMS

# quantisation and vocabulary per architecture: each transform meets a block-quantised type
CASES: dict[str, tuple[str, str]] = {
    "llama": ("Q4_K", "llama"),  # q/k row permutation on K-quant rows
    "qwen2": ("Q8_0", "gpt2"),
    "qwen3": ("Q4_K", "gpt2"),
    "gemma2": ("Q8_0", "llama"),  # norm offsets
    "gemma3": ("Q6_K", "llama"),
    "phi3": ("F32", "llama"),  # fused qkv and gate/up
    "starcoder2": ("Q8_0", "gpt2"),
    "stablelm": ("Q4_K", "gpt2"),
    "nemotron": ("Q5_0", "llama"),  # norm offsets
    "falcon": ("Q4_K", "gpt2"),
    "gpt2": ("Q8_0", "gpt2"),  # transposed matrices
    "bloom": ("Q4_K", "llama"),  # fused qkv row permutation, bias reorder
    "qwen2moe": ("Q4_K", "gpt2"),  # stacked experts from K-quant rows
    "qwen3moe": ("Q8_0", "gpt2"),
}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
TEXTS = ("The capital of France is", "hello world, what is the kernel?", "  spaced  out\n\n123")
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _dims(quant: str) -> Dims:
    return K_QUANT_DIMS if quant.endswith("_K") else Dims()


def _write(tmp: Path, arch: str, quant: str, vocab: str, **kw: Any) -> Path:
    template = CHATML if vocab == "gpt2" else PLAIN
    return write_tiny(tmp / f"{arch}-{quant}-{vocab}.gguf", arch, quant=quant, vocab=vocab,
                      dims=_dims(quant), chat_template=template, **kw)


def _stock(path: Path, arch: str, dims: Dims) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **stock_overrides(arch, dims)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def _assert_same(ours: LoadedArtifacts, model: Any, tokenizer: Any) -> None:
    assert type(ours.tokenizer) is type(tokenizer)
    assert ours.tokenizer.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    for text in TEXTS:
        assert ours.tokenizer(text).input_ids == tokenizer(text).input_ids, text
    ids = tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        got, ref = ours.model(**ids).logits, model(**ids).logits
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    kw = {"max_new_tokens": 4, "do_sample": False}
    assert ours.model.generate(**ids, **kw).tolist() == model.generate(**ids, **kw).tolist()
    assert ours.chat_template is not None
    ours_chat = ours.tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    stock_chat = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours_chat == stock_chat and "France" in ours_chat


def test_every_case_is_an_adapter_and_the_tables_do_not_overlap() -> None:
    assert set(CASES) == set(FAST_ARCHS) == set(ADAPTERS)
    assert set(FALLBACK_ARCHS) == set(TRANSFORMERS_ARCHITECTURES)
    assert not set(ADAPTERS) & set(TRANSFORMERS_ARCHITECTURES)


@pytest.fixture(scope="module")
def fast_loads(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``load(arch) -> (path, artifacts)`` of each architecture's :data:`CASES` file, loaded
    once for the module."""
    folder = tmp_path_factory.mktemp("archs")
    done: dict[str, tuple[Path, LoadedArtifacts]] = {}

    def load(arch: str) -> tuple[Path, LoadedArtifacts]:
        if arch not in done:
            quant, vocab = CASES[arch]
            path = _write(folder, arch, quant, vocab)
            done[arch] = (path, load_transformers(path))
        return done[arch]

    return load


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fast_path_matches_stock_transformers(arch: str, fast_loads: Any) -> None:
    quant, _ = CASES[arch]
    path, ours = fast_loads(arch)
    assert ours.loader == "fast" and f"{arch} adapter" in ours.loader_reason
    assert not ours.model.training
    _assert_same(ours, *_stock(path, arch, _dims(quant)))


def _rows_from_file(gf: Any, tensor: str, start: int, stop: int) -> torch.Tensor:
    """GGUF rows [start, stop) of ``tensor``, dequantised straight from the file's bytes."""
    info = gf.tensors[tensor]
    row_bytes = info.nbytes // n_rows(info)
    raw = np.array(gf.tensor_bytes(tensor)[start * row_bytes : stop * row_bytes])
    return dequantize(raw, info.ggml_type, (info.shape[0], stop - start))


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_weight_sources_name_the_gguf_rows_of_every_parameter(
    arch: str, fast_loads: Any
) -> None:
    path, art = fast_loads(arch)
    params = dict(art.model.named_parameters(remove_duplicate=False))
    assert set(art.weight_sources) == set(params)
    with read_gguf(path) as gf:
        _check_sources(arch, art, params, gf)


def _check_sources(arch: str, art: LoadedArtifacts, params: dict[str, Any], gf: Any) -> None:
    names = set(gf.tensors)
    row_ops = 0
    for name, src in art.weight_sources.items():
        param = params[name].detach()
        assert src.parameter == name and src.shape == tuple(param.shape)
        assert src.transform in TRANSFORMS and set(src.tensors) <= names
        if src.tied_to is not None:
            assert params[src.tied_to].data_ptr() == param.data_ptr()
        if not src.row_op:
            continue
        row_ops += 1
        # the parameter's rows are exactly the GGUF rows the source names, in order
        flat = param.reshape(src.n_rows, -1)
        assert [r.at for r in src.rows] == sorted(r.at for r in src.rows)
        for r in src.rows:
            rows = _rows_from_file(gf, r.tensor, r.start, r.stop)
            if r.permutation is not None:
                rows = rows[list(r.permutation)]
            assert torch.equal(flat[r.at : r.at + r.count], rows), (name, r)
        assert len(src.gguf_rows()) == src.n_rows
    # every Linear weight of these models is a row operation of the file's rows (GPT-2's
    # transposed Conv1D matrices are the one exception)
    linears = [n for n, m in art.model.named_modules() if isinstance(m, torch.nn.Linear)]
    for module in linears:
        src = art.weight_sources[f"{module}.weight"]
        assert src.row_op or (arch == "gpt2" and src.transform == "transpose"), src
    assert row_ops > 0


def test_weight_sources_say_how_llama_q_and_moe_experts_were_built(tmp_path: Path) -> None:
    llama = load_transformers(_write(tmp_path, "llama", "Q8_0", "llama"))
    q = llama.weight_sources["model.layers.0.self_attn.q_proj.weight"]
    heads, head_dim = 4, 16
    assert (q.transform, q.row_op, q.tensors) == ("row_permutation", True, ("blk.0.attn_q.weight",))
    # llama.cpp interleaved each head's two rotary halves: row i of a head came from row 2i
    assert q.rows[0].permutation[: head_dim] == (*range(0, head_dim, 2), *range(1, head_dim, 2))
    assert len(q.rows[0].permutation) == heads * head_dim
    norm = llama.weight_sources["model.layers.0.input_layernorm.weight"]
    assert (norm.transform, norm.row_op) == ("identity", True)

    moe = load_transformers(_write(tmp_path, "qwen3moe", "Q8_0", "gpt2"))
    src = moe.weight_sources["model.layers.1.mlp.experts.gate_up_proj"]
    d = Dims()
    assert src.transform == "expert_stack" and src.row_op
    assert src.tensors == ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight")
    assert len(src.rows) == 2 * d.experts and src.n_rows == d.experts * 2 * d.expert_ffn
    second_up = src.rows[3]  # expert 1, up half
    assert (second_up.tensor, second_up.start, second_up.at) == (
        "blk.1.ffn_up_exps.weight", d.expert_ffn, 3 * d.expert_ffn
    )
    gemma = load_transformers(_write(tmp_path, "gemma2", "F32", "llama"))
    assert gemma.weight_sources["model.norm.weight"].transform == "norm_offset"
    assert not gemma.weight_sources["model.norm.weight"].row_op
    tied = gemma.weight_sources["lm_head.weight"]
    assert tied.tied_to == "model.embed_tokens.weight" and tied.tensors == ("token_embd.weight",)


# --- Mistral naming ------------------------------------------------------------------------------
def test_mistral_named_llama_file_loads_as_llama_like_stock(tmp_path: Path) -> None:
    path = _write(tmp_path, "llama", "Q8_0", "llama", name="Mistral 7B Instruct v0.3")
    ours = load_transformers(path)
    assert type(ours.model).__name__ == "LlamaForCausalLM" and ours.loader == "fast"
    _assert_same(ours, *_stock(path, "llama", Dims()))


def test_file_named_exactly_mistral_is_a_mistral_model_with_llama_weights(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    a = load_transformers(_write(tmp_path / "a", "llama", "F32", "llama", name="mistral"))
    b = load_transformers(_write(tmp_path, "llama", "F32", "llama", name="some llama"))
    assert type(a.model).__name__ == "MistralForCausalLM"
    assert type(b.model).__name__ == "LlamaForCausalLM"
    ids = b.tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(a.model(**ids).logits, b.model(**ids).logits, rtol=0, atol=1e-5)


# --- architecture details stock gets wrong or refuses ----------------------------------------------
def test_qwen3_head_size_comes_from_the_file(tmp_path: Path) -> None:
    dims = Dims(head_dim=32)  # stock keeps 128, whatever the file says
    path = write_tiny(tmp_path / "q3.gguf", "qwen3", dims=dims)
    art = load_transformers(path)
    assert art.config.head_dim == 32
    # the same model as stock built with the file's head size
    _assert_same_logits(art, *_stock(path, "qwen3", dims))


def test_moe_expert_widths_come_from_the_file(tmp_path: Path) -> None:
    dims = Dims(expert_ffn=32, shared_ffn=96)
    path = write_tiny(tmp_path / "moe.gguf", "qwen2moe", dims=dims)
    art = load_transformers(path)
    assert art.config.moe_intermediate_size == 32
    assert art.config.shared_expert_intermediate_size == 96
    _assert_same_logits(art, *_stock(path, "qwen2moe", dims))


def _assert_same_logits(ours: LoadedArtifacts, model: Any, tokenizer: Any) -> None:
    ids = tokenizer(TEXTS[1], return_tensors="pt")
    with torch.no_grad():
        assert (ours.model(**ids).logits - model(**ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("arch", "extra", "match"),
    [
        ("falcon", "blk.0.attn_norm_2.weight", "Falcon-40B"),
        ("stablelm", "blk.0.attn_q_norm.weight", "per-head q/k norms"),
    ],
    ids=["falcon-40b-layout", "stablelm-qk-norm"],
)
def test_variants_no_path_loads_are_refused_with_the_reason(
    arch: str, extra: str, match: str, tmp_path: Path
) -> None:
    tensors = {extra: np.ones(64, dtype=np.float32)}
    path = write_tiny(tmp_path / f"{arch}.gguf", arch, extra_tensors=tensors)
    with pytest.raises(GGUFUnsupportedError, match=match):
        load_transformers(path)


# --- the Transformers path -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", FALLBACK_ARCHS)
def test_transformers_path_loads_what_has_no_adapter(arch: str, tmp_path: Path) -> None:
    # Q8_0 through the legacy loader; the GgufConfig loader's own dequantisation is F32 here
    # (its kernels are slow on CPU and the type check is tested below)
    quant = "F32" if TRANSFORMERS_ARCHITECTURES[arch] == "gguf" else "Q8_0"
    path = _write(tmp_path, arch, quant, "gpt2")
    calls: list[tuple[int, int, str]] = []
    ours = load_transformers(path, progress=lambda d, t, s: calls.append((d, t, s)))
    assert ours.loader == "transformers" and f"no kernel_ext adapter for {arch!r}" in (
        ours.loader_reason
    )
    assert ours.weight_sources == {} and ours.cache_hits == {
        "config": False, "tokenizer": False, "weights": False
    }
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] > 0  # progress: start and end
    _assert_same(ours, *_stock(path, arch, Dims()))


def test_hub_offline_blocks_every_hub_request_and_restores_the_switch() -> None:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    from kernel_ext.gguf.fallback import hub_offline

    before = constants.HF_HUB_OFFLINE
    with hub_offline():
        assert constants.HF_HUB_OFFLINE is True
        with pytest.raises((OfflineModeIsEnabled, LocalEntryNotFoundError)):
            hf_hub_download("ggml-org/ggml-quantization", "no-such-file.bin",
                            cache_dir="/nonexistent-kernel-ext-cache")
    assert constants.HF_HUB_OFFLINE == before


def test_types_the_transformers_path_cannot_decode_are_refused_early(tmp_path: Path) -> None:
    # Transformers' GGUF path (lfm2) has no Q5_0 kernel
    path = write_tiny(tmp_path / "lfm2.gguf", "lfm2", quant="Q5_0")
    with pytest.raises(GGUFUnsupportedError, match="Q5_0, which Transformers cannot dequantise"):
        load_transformers(path)


# --- through %model, in a real IPython shell -----------------------------------------------------
def _line(ip: Any, line: str) -> None:
    ip.run_line_magic("model", line)


def test_model_info_says_which_path_loaded_it_and_why(
    ip: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kernel_ext.gguf.fallback import PEAK_FACTOR

    fast = _write(tmp_path, "qwen2", "Q8_0", "gpt2")
    slow = _write(tmp_path, "mamba", "Q8_0", "gpt2")
    _line(ip, f"load {fast} --no-progress --name q")
    _line(ip, f"load {slow} --no-progress --name m")
    capsys.readouterr()
    _line(ip, "info q")
    info = capsys.readouterr().out
    assert "loader    fast path: kernel_ext's qwen2 adapter" in info
    _line(ip, "info m")
    info = capsys.readouterr().out
    assert "loader    Transformers: no kernel_ext adapter for 'mamba'" in info
    session = ip.configurables[-1].session
    loads = {r["name"]: r for r in session.audit.read(kind="model.load")}
    assert loads["q"]["loader"] == "fast" and loads["m"]["loader"] == "transformers"
    # the memory guard plans the Transformers path with its higher peak
    entry = session.models.get("m")
    n = entry.summary["n_params"]
    assert entry.plan.estimate_bytes >= int(n * 4 * PEAK_FACTOR)
    ip.run_cell_magic("infer", "--model m -n 3 -q -o out", "hello world")
    assert ip.user_ns["out"].finish_reason == "length"


def test_unloadable_file_is_refused_before_it_is_hashed(
    ip: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernel_ext.gguf import integrity

    hashed: list[object] = []
    real_file, real_verify = integrity.sha256_file, integrity.verify_sha256
    monkeypatch.setattr(integrity, "sha256_file",
                        lambda *a, **k: hashed.append(a) or real_file(*a, **k))
    monkeypatch.setattr(integrity, "verify_sha256",
                        lambda *a, **k: hashed.append(a) or real_verify(*a, **k))
    unsupported = _with_architecture(tmp_path, "deepseek2")
    with pytest.raises(UsageError) as info:
        _line(ip, f"load {unsupported} --no-progress")
    message = str(info.value)
    assert "'deepseek2' is not supported" in message and "qwen2moe" in message
    assert "lfm2" in message and hashed == []
    session = ip.configurables[-1].session
    assert session.audit.read(kind="model.load_failed")[-1]["name"] == "deepseek2"
    assert session.audit.read(kind="model.plan") == []


def _with_architecture(tmp: Path, arch: str) -> Path:
    """A file with a complete vocabulary and architecture ``arch``, which no path loads."""
    from gguf import GGUFWriter

    path = tmp / f"{arch}.gguf"
    w = GGUFWriter(str(path), arch)
    w.add_name(arch)
    w.add_block_count(1)
    w.add_token_list(["<s>", "</s>", "a", "b"])
    w.add_tokenizer_model("llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- RoPE scaling stock Transformers ignores ----------------------------------------------------
def _llama3_factors() -> np.ndarray:
    from kernel_ext.gguf.arch.llama import llama3_rope_factors

    # head size 16, base 10000: the three regimes (unscaled, smoothed, divided by 8) all occur
    return llama3_rope_factors(10000.0, 16, 8.0, 1.0, 4.0, 8192)


_LONG = np.linspace(1.0, 3.0, 8, dtype=np.float32)
_SHORT = np.linspace(1.0, 1.5, 8, dtype=np.float32)
ROPE_CASES: dict[str, dict[str, Any]] = {
    # Llama 3.1-3.3: the scaling exists only as the rope_freqs tensor
    "llama": {
        "tensors": lambda: {"rope_freqs.weight": _llama3_factors()},
        "rope": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                 "rope_theta": 10000.0},
    },
    # Gemma 3 4B+: linear scaling of the global layers only (the sixth layer is the first)
    "gemma3": {
        "keys": {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0},
        "dims": Dims(layers=6),
        "rope": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    },
    # YaRN-extended Qwen2.5
    "qwen2": {
        "keys": {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
                 "qwen2.rope.scaling.original_context_length": 64},
        "rope": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                 "rope_theta": 10000.0},
    },
    # Phi-3.5-mini / Phi-4-mini: LongRoPE factors as tensors
    "phi3": {
        "tensors": lambda: {"rope_factors_long.weight": _LONG, "rope_factors_short.weight": _SHORT},
        "keys": {"phi3.rope.scaling.original_context_length": 64},
        "rope": {"rope_type": "longrope", "long_factor": _LONG.tolist(),
                 "short_factor": _SHORT.tolist(), "factor": 4.0, "rope_theta": 10000.0},
        "extra": {"original_max_position_embeddings": 64},
    },
}


@pytest.mark.parametrize("arch", sorted(ROPE_CASES))
def test_rope_scaling_of_the_file_is_kept(arch: str, tmp_path: Path) -> None:
    """Ours equals stock *given the file's rope scaling* and differs from plain stock, which
    drops it (stock reads neither these keys nor these tensors)."""
    from transformers import AutoModelForCausalLM

    case = ROPE_CASES[arch]
    tensors = case["tensors"]() if "tensors" in case else None
    path = write_tiny(tmp_path / f"{arch}.gguf", arch, dims=case.get("dims"),
                      extra_tensors=tensors, extra_keys=case.get("keys"))
    ours = load_transformers(path)
    folder, name = str(path.parent), path.name
    scaled = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, rope_parameters=case["rope"],
        **case.get("extra", {}))
    plain = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ids = torch.tensor([list(range(300, 340)) * 3])  # 120 positions: past the original 64
    with torch.no_grad():
        got = ours.model(ids).logits
        assert (got - scaled(ids).logits).abs().max().item() <= 1e-4
        assert (got - plain(ids).logits).abs().max().item() > 1e-3


def test_unknown_rope_freqs_are_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    factors = np.linspace(1.0, 5.0, 8, dtype=np.float32)  # no Llama 3 parameters give these
    path = write_tiny(tmp_path / "l.gguf", "llama", extra_tensors={"rope_freqs.weight": factors})
    art = load_transformers(path)
    assert art.config.rope_parameters["rope_type"] == "default"
    assert "matches no known Llama 3 rope scaling" in caplog.text


@pytest.mark.parametrize("arch", ["bloom", "falcon", "gpt2"])
def test_an_output_head_that_repeats_the_embeddings_is_held_once(arch: str, tmp_path: Path) -> None:
    path = write_tiny(tmp_path / f"{arch}.gguf", arch, quant="Q8_0", output_copy=True)
    art = load_transformers(path)
    head, emb = art.model.get_output_embeddings().weight, art.model.get_input_embeddings().weight
    assert head.data_ptr() == emb.data_ptr()  # one copy, as stock ties two equal tensors
    tied = [s for s in art.weight_sources.values() if s.tied_to is not None]
    assert len(tied) == 1 and tied[0].tensors == ("token_embd.weight",)
    _assert_same_logits(art, *_stock(path, arch, Dims()))


def test_readme_table_lists_every_architecture_with_its_path() -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architectures", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`[^|]+`) \| [^|]+ \| (fast|Transformers[^|]*) \|", section, re.MULTILINE)
    listed = {name.strip("`"): path for cell, path in rows
              for name in re.findall(r"`([^`]+)`", cell)}
    assert {a for a, p in listed.items() if p == "fast"} == set(ADAPTERS)
    assert {a for a, p in listed.items() if p != "fast"} == set(TRANSFORMERS_ARCHITECTURES)


def test_weight_sources_are_reported_for_a_load_from_the_weights_cache(tmp_path: Path) -> None:
    path = _write(tmp_path, "qwen2moe", "Q8_0", "gpt2")
    cold = load_transformers(path, cache_dir=tmp_path / "cache")
    warm = load_transformers(path, cache_dir=tmp_path / "cache", sha256=cold.sha256)
    assert warm.cache_hits["weights"] and not cold.cache_hits["weights"]
    assert warm.weight_sources == cold.weight_sources and len(warm.weight_sources) > 10


@pytest.mark.parametrize("arch", FAST_ARCHS + FALLBACK_ARCHS)
def test_infer_decoding_equals_generate_on_every_architecture(arch: str, tmp_path: Path) -> None:
    """%%infer's decoding loop (kernel_ext.providers.decode) gives ``model.generate``'s greedy
    tokens on every architecture that loads, the Transformers path's included (their caches
    differ: Mamba's state, LFM2's convolutions, Qwen3.5's linear attention)."""
    from kernel_ext.providers.decode import decode

    art = load_transformers(write_tiny(tmp_path / f"{arch}.gguf", arch, vocab="gpt2"))
    ids = art.tokenizer("hello world, the capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = art.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    got = decode(art.model, ids, max_new_tokens=6).tokens
    assert got[: len(ref)] == ref.tolist()  # generate stops at EOS, decode without eos_ids not
