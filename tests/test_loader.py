"""kernel_ext.gguf.loader on real GGUF files: tiny ones written per test, and the demo model.

Reference: stock Transformers, ``from_pretrained(dir, gguf_file=...)`` on the same file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGUFWriter

from kernel_ext.errors import GGUFFormatError, GGUFUnsupportedError, KernelExtError
from kernel_ext.gguf import read_gguf
from kernel_ext.gguf.loader import LoadedArtifacts, LoadError, estimate_bytes, load_transformers
from tinymodels import EOS_ID, write_tiny_gemma3, write_tiny_llama

PROMPT = "The capital of France is"
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def _stock(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def _compare(ours: LoadedArtifacts, stock_model: Any, stock_tok: Any, new_tokens: int) -> None:
    ids = stock_tok(PROMPT, return_tensors="pt")
    assert ours.tokenizer(PROMPT).input_ids == ids.input_ids[0].tolist()
    with torch.no_grad():
        ref = stock_model(**ids).logits
        got = ours.model(**ids).logits
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 1e-4
    kw = {"max_new_tokens": new_tokens, "do_sample": False}
    out_ref = stock_model.generate(**ids, **kw)
    out = ours.model.generate(**ids, **kw)
    assert out.tolist() == out_ref.tolist()
    assert ours.tokenizer.decode(out[0]) == stock_tok.decode(out_ref[0])


@pytest.mark.parametrize(
    ("writer", "quant", "extra"),
    [
        (write_tiny_llama, "F32", {}),
        (write_tiny_llama, "Q8_0", {"tie_embeddings": True}),
        (write_tiny_llama, "Q4_K", {"hidden": 256, "ffn": 256}),
        (write_tiny_gemma3, "Q5_0", {}),
        (write_tiny_gemma3, "F16", {}),
    ],
    ids=["llama-F32", "llama-Q8_0-tied", "llama-Q4_K", "gemma3-Q5_0", "gemma3-F16"],
)
def test_tiny_models_match_stock_transformers(
    tmp_path: Path, writer: Any, quant: str, extra: dict[str, Any]
) -> None:
    path = writer(tmp_path / "tiny.gguf", quant=quant, **extra)
    ours = load_transformers(path)
    stock_model, stock_tok = _stock(path)
    _compare(ours, stock_model, stock_tok, new_tokens=8)
    # the tokenizer is the one AutoTokenizer builds: same class, same serialisation
    assert type(ours.tokenizer) is type(stock_tok)
    assert ours.tokenizer.backend_tokenizer.to_str() == stock_tok.backend_tokenizer.to_str()
    assert not ours.model.training


def test_tiny_model_generates_and_reports(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", chat_template=TEMPLATE)
    calls: list[tuple[int, int, str]] = []
    art = load_transformers(path, progress=lambda d, t, s: calls.append((d, t, s)))
    with read_gguf(path) as gf:
        n_tensors = len(gf.tensors)
    assert [c[0] for c in calls] == list(range(1, n_tensors + 1))
    assert {c[1] for c in calls} == {n_tensors} and {c[2] for c in calls} == {"weights"}
    assert art.chat_template == TEMPLATE
    assert art.tokenizer.chat_template == TEMPLATE
    assert art.summary["architecture"] == "llama" and art.summary["n_tensors"] == n_tensors
    assert art.config.model_type == "llama" and art.dtype == torch.float32
    assert set(art.timings) >= {"parse", "config", "tokenizer", "weights", "total"}
    assert art.load_s == art.timings["total"] > 0
    assert art.peak_rss is None or art.peak_rss > 0
    assert art.sha256 is None and art.cache_hits == {
        "config": False,
        "tokenizer": False,
        "weights": False,
    }
    ids = art.tokenizer("hello world", return_tensors="pt")
    out = art.model.generate(**ids, max_new_tokens=6, do_sample=False)
    text = art.tokenizer.decode(out[0][ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert out.shape[1] == ids.input_ids.shape[1] + 6 and text.strip()
    assert (
        art.tokenizer.eos_token_id == EOS_ID and art.tokenizer.bos_token_id == ids.input_ids[0, 0]
    )


def test_bfloat16_load_is_close_to_float32(tmp_path: Path) -> None:
    path = write_tiny_gemma3(tmp_path / "tiny.gguf", quant="Q8_0")
    full = load_transformers(path)
    half = load_transformers(path, dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    ids = full.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        a = full.model(**ids).logits
        b = half.model(**ids).logits.float()
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


def test_device_map_hook_goes_through_transformers(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    plain = load_transformers(path)
    mapped = load_transformers(path, device_map={"": "cpu"})
    ids = plain.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(mapped.model(**ids).logits, plain.model(**ids).logits)


def test_quantization_needs_cuda(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    with pytest.raises(GGUFUnsupportedError, match="CUDA"):
        load_transformers(path, quantization="8bit")
    with pytest.raises(ValueError, match="quantization"):
        load_transformers(path, quantization="3bit")


def test_estimate_bytes_is_the_dequantised_footprint(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", quant="Q8_0")
    with read_gguf(path) as gf:
        n = sum(t.n_elements for t in gf.tensors.values())
        fp32, bf16 = estimate_bytes(gf, torch.float32), estimate_bytes(gf, "bfloat16")
    assert n * 4 <= fp32 <= n * 4 * 1.05 + (16 << 20)
    assert n * 2 <= bf16 < fp32
    art = load_transformers(path)
    real = sum(p.numel() * p.element_size() for p in art.model.parameters())
    assert real <= fp32


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "deepseek2.gguf"
    w = GGUFWriter(str(path), "deepseek2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFUnsupportedError) as info:
        load_transformers(path)
    message = str(info.value)
    assert "'deepseek2'" in message
    # both paths' lists: the fast path's adapters and what Transformers loads
    assert all(a in message for a in ("gemma3", "llama", "qwen3moe", "mamba", "qwen35"))


def test_missing_tensor_is_a_format_error(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", drop=["blk.1.ffn_up.weight"])
    with pytest.raises(GGUFFormatError, match="layers.1.mlp.up_proj"):
        load_transformers(path)


def test_file_without_vocabulary_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "novocab.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFUnsupportedError, match="tokenizer"):
        load_transformers(path)


def test_bad_dtype_is_refused(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    with pytest.raises(ValueError, match="dtype"):
        load_transformers(path, dtype="int8")


# --- the real demo model -------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_model_matches_stock_cold_and_warm(
    demo_model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "conversions"
    with caplog.at_level(logging.WARNING):
        cold = load_transformers(demo_model_path, cache_dir=cache)
    assert not any("rebuilding" in r.getMessage() for r in caplog.records)
    assert cold.cache_hits == {"config": False, "tokenizer": False, "weights": False}
    warm = load_transformers(demo_model_path, cache_dir=cache, sha256=cold.sha256)
    assert warm.cache_hits == {"config": True, "tokenizer": True, "weights": True}
    assert "hash" not in warm.timings  # a known digest is not recomputed
    stock_model, stock_tok = _stock(demo_model_path)
    for art in (cold, warm):
        _compare(art, stock_model, stock_tok, new_tokens=16)
    # The base model's greedy continuation of PROMPT (stock Transformers' too) is " the capital
    # of the country of France. It is the largest city in France and": no "Paris". Paris is
    # its third choice there, and the greedy answer to a question.
    ids = warm.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        top = warm.model(**ids).logits[0, -1].topk(3).indices.tolist()
    assert "Paris" in [warm.tokenizer.decode([i]).strip() for i in top]
    ids = warm.tokenizer("Q: What is the capital of France?\nA:", return_tensors="pt")
    out = warm.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in warm.tokenizer.decode(out[0][ids.input_ids.shape[1] :])


@pytest.mark.parametrize("scores", ["distinct", "ties", "none"])
@pytest.mark.parametrize("skip", [None, ["<s>", "a", "\u2581t"]])
def test_merges_fast_path_equals_transformers(scores: str, skip: list[str] | None) -> None:
    import random

    from transformers.tokenization_utils_base import generate_merges

    from kernel_ext.gguf.convert import _generate_merges

    rnd = random.Random(0)
    letters = "abt\u2581"
    tokens = ["<s>"] + list(letters)
    while len(tokens) < 400:
        t = "".join(rnd.choice(letters) for _ in range(rnd.randint(2, 6)))
        if t not in tokens:
            tokens.append(t)
    vocab = {t: i for i, t in enumerate(tokens)}
    table = {
        "distinct": {t: rnd.random() for t in tokens},
        "ties": {t: float(rnd.randint(0, 5)) for t in tokens},
        "none": None,
    }[scores]
    expected = generate_merges(vocab, table, skip)
    assert len(expected) > 100
    assert _generate_merges(vocab, table, skip) == expected


# --- errors from outside kernel_ext are wrapped, with the stage that failed ----------------------
def test_tokenizer_build_error_is_a_load_error_naming_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernel_ext.gguf import convert

    path = write_tiny_llama(tmp_path / "tiny.gguf")

    def broken(metadata: Any, model_type: str) -> Any:
        raise KeyError("tokenizer.ggml.merges")

    monkeypatch.setattr(convert, "build_tokenizer", broken)
    with pytest.raises(LoadError, match="while converting the tokenizer: KeyError") as info:
        load_transformers(path)
    assert isinstance(info.value, KernelExtError)
    assert isinstance(info.value.__cause__, KeyError)


def test_config_error_is_a_load_error_and_oom_passes_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kernel_ext.gguf import convert, loader

    path = write_tiny_llama(tmp_path / "tiny.gguf")
    with monkeypatch.context() as m:

        def bad_config(*args: Any, **kwargs: Any) -> Any:
            raise TypeError("unexpected keyword 'rope_scaling'")

        m.setattr(convert, "build_config", bad_config)
        with pytest.raises(LoadError, match="tiny.gguf failed while building the model config"):
            load_transformers(path)

    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(loader, "_new_model", oom)
    with pytest.raises(torch.OutOfMemoryError):
        load_transformers(path)


def test_an_open_gguf_file_is_used_as_is_not_parsed_again(tmp_path: Path, monkeypatch: Any) -> None:
    from kernel_ext.gguf import loader as loader_mod
    from kernel_ext.gguf.reader import read_gguf

    path = write_tiny_llama(tmp_path / "t.gguf")
    calls: list[object] = []
    monkeypatch.setattr(loader_mod, "read_gguf", lambda *a, **k: calls.append(a) or read_gguf(*a, **k))
    with read_gguf(path) as gf:
        art = load_transformers(gf, cache_dir=None)
    assert calls == []
    assert art.summary["architecture"] == "llama"
    assert art.model(**art.tokenizer("hi", return_tensors="pt")).logits.shape[-1] > 0
