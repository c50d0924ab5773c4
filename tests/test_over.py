"""``%%infer --over`` and ``kernel_ext.infer_many``: item identity, per-item outcomes, batched
local generation (continuous batching) and concurrent remote calls, in a real IPython shell
with tiny real GGUF models and a real HTTP server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from openai_stub import OpenAIStub
from tinymodels import write_tiny_gemma3, write_tiny_llama

import kernel_ext
from kernel_ext.over import ItemError, item_keys
from kernel_ext.providers.base import GenerationParams, GenerationResult
from kernel_ext.providers.batch import BatchEngine, BatchRequest, default_batch_size
from kernel_ext.providers.decode import Sampling


def cell(ip: Any, args: str, body: str) -> Any:
    return ip.run_cell_magic("infer", args, body)


def session_of(ip: Any) -> Any:
    return kernel_ext.current_session()


def count_starts(session: Any) -> list[Any]:
    calls: list[Any] = []
    session.events.subscribe("infer", lambda e: calls.append(e) if e["action"] == "start" else None)
    return calls


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny-llama.gguf", seed=1)


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub() as s:
        yield s


# --- identity and outcomes ----------------------------------------------------------------------
def test_a_changed_interpolated_variable_recomputes_every_item(ip: Any, tiny: Path) -> None:
    ip.run_line_magic("model", f"load {tiny} --no-progress")
    ip.user_ns.update(words=["cat", "dog", "owl"], lang="English")
    body = "Say {item} in {lang}:"
    cell(ip, "--over words --into answers -n 3 -q", body)
    first = ip.user_ns["answers"]
    assert [r.prompt for r in first] == [f"Say {w} in English:" for w in ("cat", "dog", "owl")]
    calls = count_starts(session_of(ip))
    ip.user_ns["lang"] = "French"  # the template is the same; the rendered prompts are not
    cell(ip, "--over words --into answers -n 3 -q", body)
    again = ip.user_ns["answers"]
    assert len(calls) == 3 and again.restored == 0
    assert [r.prompt for r in again] == [f"Say {w} in French:" for w in ("cat", "dog", "owl")]
    # the same prompts again: nothing is computed, the saved answers come back
    cell(ip, "--over words --into answers -n 3 -q", body)
    assert len(calls) == 3 and ip.user_ns["answers"].restored == 3
    assert ip.user_ns["answers"].texts == again.texts
    # a changed generation option changes every key too
    cell(ip, "--over words --into answers -n 4 -q", body)
    assert len(calls) == 6


def test_keys_cover_prompt_model_and_options_and_tell_repeats_apart() -> None:
    p = GenerationParams(max_new_tokens=8)
    a = item_keys(["x", "y", "x"], "sha256:aa", p)
    assert a[0] != a[1] and a[2] == f"{a[0]}#2"
    assert item_keys(["x"], "sha256:bb", p)[0] != a[0]
    assert item_keys(["x"], "sha256:aa", p.replace(temperature=0.7))[0] != a[0]
    assert item_keys(["x"], "sha256:aa", p.replace(timeout=5))[0] == a[0]  # not an answer change


def test_results_are_objects_in_item_order_with_a_summary(
    ip: Any, tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_line_magic("model", f"load {tiny} --no-progress")
    ip.user_ns["words"] = ["cat", "dog", "owl", "emu", "cat"]
    cell(ip, "--over words --into answers -n 3", "{index}: say {item}")
    answers = ip.user_ns["answers"]
    assert all(isinstance(r, GenerationResult) for r in answers)
    assert [r.prompt for r in answers] == [f"{i}: say {w}" for i, w in enumerate(ip.user_ns["words"])]
    assert [str(r) for r in answers] == answers.texts  # old code reading strings still works
    assert all(r.provider == "tiny-llama" and r.completion_tokens == 3 for r in answers)
    assert "answers: 5/5 answered (5 from tiny-llama)" in capsys.readouterr().out
    # each answer is what a single %%infer of that prompt gives (greedy)
    cell(ip, "-n 3 -o one -q", "3: say emu")
    assert answers[3].text == ip.user_ns["one"].text


def test_a_failing_item_is_recorded_with_its_error_not_the_run(
    ip: Any, stub: OpenAIStub, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_line_magic("config", "KernelExt.retry_attempts = 1")
    ip.run_line_magic("model", f"remote srv --url {stub.url}")
    ip.user_ns["qs"] = ["q0", "q1", "q2", "q3"]
    stub.script("ok", 404)  # the second request fails for good
    cell(ip, "--over qs --into out --concurrency 1", "{item}")
    out = ip.user_ns["out"]
    assert [type(r) for r in out] == [GenerationResult, ItemError, GenerationResult, GenerationResult]
    assert "404" in out[1].error and out[1].prompt == "q1" and str(out[1]) == "" and not out[1]
    text = capsys.readouterr().out
    assert "3/4 answered (3 from srv)" in text and "1 failed (first: item 1: " in text
    # a re-run retries only the failed item
    n = len(stub.requests)
    cell(ip, "--over qs --into out --concurrency 1 -q", "{item}")
    assert len(stub.requests) == n + 1 and ip.user_ns["out"].failed == []
    # every item failing is an error of the cell, the list still holds the errors
    ip.user_ns["qs"] = ["z0", "z1"]
    stub.script(404, 404)
    with pytest.raises(UsageError, match="every item failed"):
        cell(ip, "--over qs --into bad --concurrency 1 -q", "{item}")
    assert len(ip.user_ns["bad"].failed) == 2


@pytest.mark.parametrize("args, fragment", [
    ("--batch-size 0", "--batch-size must be >= 1"),
    ("--concurrency -2", "--concurrency must be >= 1"),
])
def test_bad_batch_options_are_usage_errors(ip: Any, args: str, fragment: str) -> None:
    ip.user_ns["words"] = ["a"]
    with pytest.raises(UsageError, match=fragment):
        cell(ip, f"--over words --into x {args}", "{item}")


# --- batched local generation ---------------------------------------------------------------------
def _engine(ip: Any) -> tuple[Any, BatchEngine]:
    from kernel_ext.providers.transformers_gguf import _eos_ids

    provider = session_of(ip).models.get().provider
    local = provider.local
    return provider, BatchEngine(local.model, local.tokenizer, eos_ids=_eos_ids(local))


@pytest.mark.parametrize("writer", [write_tiny_llama, write_tiny_gemma3])
def test_batched_greedy_equals_one_at_a_time_and_rows_join_as_others_finish(
    ip: Any, tmp_path: Path, writer: Any
) -> None:
    path = writer(tmp_path / "m.gguf", seed=3)
    ip.run_line_magic("model", f"load {path} --no-progress")
    provider, engine = _engine(ip)
    tok = provider.local.tokenizer
    prompts = ["a", "the cat sat on", "1 2 3", "hello world, this is longer", "x y", "q"]
    lengths = [7, 2, 5, 1, 9, 3]  # rows finish at different steps
    single = [provider.generate(p, GenerationParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)]
    outs: dict[int, Any] = {}
    reqs = [BatchRequest(i, tok(p)["input_ids"], n) for i, (p, n) in enumerate(zip(prompts, lengths))]
    engine.run(reqs, batch_size=2, on_done=lambda o: outs.__setitem__(o.request.tag, o))
    assert [outs[i].text for i in range(6)] == [r.text for r in single]
    assert [len(outs[i].tokens) for i in range(6)] == lengths
    assert all(outs[i].finish_reason == "length" for i in range(6))
    # continuous batching: after the first prefill, new rows were admitted one by one while
    # the other row kept decoding, never waiting for a whole batch to drain
    assert engine.admissions[0] == (0, 2) and len(engine.admissions) == 5
    assert all(n == 1 for _, n in engine.admissions[1:])
    assert engine.steps < sum(lengths)  # fewer forwards than one row at a time


@pytest.mark.parametrize("mode", ["exact", "quantized"])
def test_batched_rows_decode_like_a_single_call_in_its_decode_mode(
    ip: Any, tmp_path: Path, mode: str
) -> None:
    """The engine runs the model's body and the decode mode's head: the certified screen picks
    every greedy token (the float32 head's choice), and quantized mode's int4 linears compute
    the batch as they compute a single call; answers say "quantized weights" as single calls do."""
    from kernel_ext.providers.decode import prepare
    from kernel_ext.providers.transformers_gguf import _eos_ids

    path = write_tiny_llama(tmp_path / "q8.gguf", seed=3, quant="Q8_0")
    ip.run_line_magic("config", f"KernelExt.decode_mode = {mode!r}")
    ip.run_line_magic("model", f"load {path} --no-progress")
    models = session_of(ip).models
    models.wait_idle()  # the load's own preparation first: ours must not race it
    provider = models.get().provider
    local = provider.local
    prepare(local.model, mode, screen="int8")  # a tiny head: the timing would pick no screen
    prompts = ["a", "the cat sat on", "1 2 3", "hello world, this is longer"]
    lengths = [5, 2, 6, 3]
    single = [provider.generate(p, GenerationParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)]
    engine = BatchEngine(local.model, local.tokenizer, eos_ids=_eos_ids(local),
                         prepared=provider.prepare_decode())
    outs: dict[int, Any] = {}
    reqs = [BatchRequest(i, local.tokenizer(p)["input_ids"], n)
            for i, (p, n) in enumerate(zip(prompts, lengths))]
    engine.run(reqs, batch_size=3, on_done=lambda o: outs.__setitem__(o.request.tag, o))
    assert engine.mode == mode and engine.head is not None
    assert [outs[i].text for i in range(4)] == [r.text for r in single]
    assert engine.screened == sum(lengths)  # every greedy token certified, none from the full head
    ip.user_ns["qs"] = prompts
    cell(ip, "--over qs --into out -n 3 --batch-size 4 -q", "{item}")
    out = ip.user_ns["out"]
    assert out.mode == "batches of 4" and not out.failed
    assert all(("quantized weights" in r.notes) == (mode == "quantized") for r in out)


def test_seeded_sampling_is_reproducible_per_item_whatever_the_batch(ip: Any, tiny: Path) -> None:
    ip.run_line_magic("model", f"load {tiny} --no-progress")
    provider, engine = _engine(ip)
    tok = provider.local.tokenizer
    sampling = Sampling(temperature=0.9, top_k=20, top_p=0.95)

    def run(prompts: list[str], batch: int) -> dict[str, str]:
        outs: dict[str, str] = {}
        reqs = [BatchRequest(p, tok(p)["input_ids"], 8, sampling, seed=7) for p in prompts]
        engine.run(reqs, batch_size=batch, on_done=lambda o: outs.__setitem__(o.request.tag, o.text))
        return outs

    a = run(["one", "two", "three"], 3)
    b = run(["three", "zzz", "one", "two"], 2)
    assert all(a[p] == b[p] for p in a)
    alone = provider.generate("two", GenerationParams(max_new_tokens=8, temperature=0.9, top_k=20,
                                                      top_p=0.95, seed=7))
    assert a["two"] == alone.text  # and the same as %%infer --seed 7 on that prompt alone


def test_stop_strings_and_eos_end_rows_early(ip: Any, tiny: Path) -> None:
    ip.run_line_magic("model", f"load {tiny} --no-progress")
    provider, engine = _engine(ip)
    tok = provider.local.tokenizer
    full = provider.generate("abc", GenerationParams(max_new_tokens=12)).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    ref = provider.generate("abc", GenerationParams(max_new_tokens=12, stop=(stop,)))
    outs: list[Any] = []
    engine.run([BatchRequest(0, tok("abc")["input_ids"], 12, stop=(stop,)),
                BatchRequest(1, tok("zz")["input_ids"], 12)], batch_size=2, on_done=outs.append)
    first = next(o for o in outs if o.request.tag == 0)
    assert first.text == ref.text and first.finish_reason == "stop" and outs[0] is first


def test_default_batch_size_follows_the_kv_budget() -> None:
    class Config:
        num_hidden_layers, num_key_value_heads, head_dim, vocab_size = 18, 1, 256, 262144

    per_token = 2 * 18 * 1 * 256 * 4
    row = per_token * 100 + 262144 * 4
    assert default_batch_size(Config(), 100, row * 3 + 1) == 3
    assert default_batch_size(Config(), 100, 1) == 1
    assert default_batch_size(Config(), 100, 10**12) == 16


def test_over_on_a_local_model_runs_batched_through_the_breaker_and_audit(
    ip: Any, tiny: Path
) -> None:
    ip.run_line_magic("model", f"load {tiny} --no-progress")
    ip.user_ns["words"] = [f"w{i}" for i in range(7)]
    cell(ip, "--over words --into out -n 4 --batch-size 3 -q", "say {item}")
    out = ip.user_ns["out"]
    assert out.mode == "batches of 3" and len(out) == 7
    session = session_of(ip)
    audits = session.audit.read(kind="infer")
    assert len(audits) == 7 and all(a["batch_size"] == 3 and a["outcome"] == "ok" for a in audits)
    assert session.breakers["tiny-llama"].snapshot().total_calls == 7
    cell(ip, "--over words --into one -n 4 --batch-size 1 -q", "say {item}")
    assert ip.user_ns["one"].texts == out.texts  # one at a time gives the same answers


def test_infer_many_is_the_python_api(ip: Any, tiny: Path) -> None:
    import pandas as pd

    ip.run_line_magic("model", f"load {tiny} --no-progress")
    df = pd.DataFrame({"text": ["alpha", "beta", "gamma"]})
    df["answer"] = kernel_ext.infer_many(df["text"].tolist(), max_new_tokens=3, progress=False)
    assert [str(a) for a in df["answer"]] == [a.text for a in df["answer"]]
    assert df["answer"][1].prompt == "beta"
    again = kernel_ext.infer_many(df["text"], max_new_tokens=3, progress=False)  # a Series works
    assert again.restored == 3 and again.texts == [a.text for a in df["answer"]]
    with pytest.raises(kernel_ext.KernelExtError, match="not one string"):
        kernel_ext.infer_many("alpha")
    with pytest.raises(kernel_ext.KernelExtError, match="top_p"):
        kernel_ext.infer_many(["a"], top_p=0)


# --- remote concurrency ---------------------------------------------------------------------------
def test_concurrent_remote_calls_keep_order_and_per_item_errors(ip: Any, stub: OpenAIStub) -> None:
    ip.run_line_magic("config", "KernelExt.retry_attempts = 1")
    ip.run_line_magic("config", "KernelExt.breaker_min_calls = 100")  # stays closed here
    ip.run_line_magic("model", f"remote srv --url {stub.url}")
    items = [f"q{i}" for i in range(12)]
    ip.user_ns["qs"] = items
    stub.script("ok", 500, "ok", 404, "ok", 500)  # three of the first six requests fail
    cell(ip, "--over qs --into out --concurrency 4 -q", "{item}")
    out = ip.user_ns["out"]
    assert [r.prompt for r in out] == items  # answers in item order
    assert len(out.failed) == 3 and all(isinstance(r, ItemError) for r in out.failed)
    assert sorted(b["body"]["prompt"] for b in stub.requests) == sorted(items)
    snap = session_of(ip).breakers["srv"].snapshot()
    assert snap.total_calls == 12 and snap.state == "closed"


def test_concurrent_failures_open_the_breaker_as_single_calls_do(ip: Any, stub: OpenAIStub) -> None:
    ip.run_line_magic("config", "KernelExt.retry_attempts = 1")
    ip.run_line_magic("config", "KernelExt.breaker_consecutive_failures = 3")
    ip.run_line_magic("model", f"remote srv --url {stub.url}")
    ip.user_ns["qs"] = [f"q{i}" for i in range(12)]
    stub.script(*[500] * 12)
    with pytest.raises(UsageError, match="every item failed"):
        cell(ip, "--over qs --into out --concurrency 2 -q", "{item}")
    out = ip.user_ns["out"]
    assert session_of(ip).breakers["srv"].snapshot().state == "open"
    # once open, the breaker turned the remaining items away without calling the server
    assert len(stub.requests) < 12
    assert any("breaker" in r.error for r in out.failed)


def test_concurrent_workers_share_one_rate_limiter(ip: Any, stub: OpenAIStub) -> None:
    ip.run_line_magic("config", "KernelExt.rate_limit_per_second = 50.0")
    ip.run_line_magic("config", "KernelExt.rate_limit_burst = 2")
    ip.run_line_magic("model", f"remote srv --url {stub.url}")
    ip.user_ns["qs"] = [f"q{i}" for i in range(8)]
    cell(ip, "--over qs --into out --concurrency 4 -q", "{item}")
    out = ip.user_ns["out"]
    # the workers waited for the shared bucket instead of being turned away by it
    assert out.failed == [] and not any(r.cached for r in out)
    notes = [n for r in out for n in r.notes]
    assert not any("rate limited" in n for n in notes)


# --- progress ---------------------------------------------------------------------------------------
def test_progress_shows_items_tokens_per_second_and_eta(
    ip: Any, tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from widgets.dashboard import open_dashboards

    ip.run_line_magic("model", f"load {tiny} --no-progress")
    ip.run_line_magic("dashboard", "--interval 0")
    (dash,) = open_dashboards()
    events: list[Any] = []
    kernel_ext.current_session().events.subscribe("task", events.append)
    try:
        ip.user_ns["words"] = [f"w{i}" for i in range(6)]
        cell(ip, "--over words --into out -n 6 --batch-size 2", "say {item}")
        mid = [e for e in events if 0 < e["done"] < 6 and "eta_s" in e]
        assert mid and all(e["total"] == 6 for e in mid)
        assert any(e["tokens_per_s"] > 0 and e["eta_s"] > 0 for e in mid)
        row = dash.progress.rows_box.children[-1]
        text = row.children[2].value
        assert "6 / 6" in text and "tok/s" in text and "done" in text
        assert "infer:out" in row.children[0].value
        err = capsys.readouterr().err
        assert "infer:out" in err and "tok/s" in err  # the cell's own bar
    finally:
        dash.close()


# --- the demo model ---------------------------------------------------------------------------------
DEMO_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
                "The three primary colours are", "Water boils at", "import numpy as np\n",
                "My favourite season is", "The quick brown fox"]


@pytest.mark.slow
def test_demo_model_batched_greedy_answers_equal_one_at_a_time(
    ip: Any, demo_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    ip.run_line_magic("model", f"load {demo_model_path} --name demo --no-progress")
    ip.user_ns["qs"] = DEMO_PROMPTS
    cell(ip, "--over qs --into one -n 16 --batch-size 1 -q", "{item}")
    cell(ip, "--over qs --into many -n 16 --batch-size 4 -q", "{item}")
    one, many = ip.user_ns["one"], ip.user_ns["many"]
    assert many.mode == "batches of 4" and one.failed == many.failed == []
    provider = kernel_ext.current_session().models.get("demo").provider
    local = provider.local
    near_ties = []
    for i, (a, b) in enumerate(zip(one, many)):
        if a.text == b.text:
            continue
        # fp32 batched products sum in another order: a different token is only acceptable
        # where the one-at-a-time logits of the first differing token were a near-tie
        ids = local.tokenizer(a.prompt, return_tensors="pt")["input_ids"]
        ref = local.tokenizer(a.text, add_special_tokens=False)["input_ids"]
        got = local.tokenizer(b.text, add_special_tokens=False)["input_ids"]
        k = next(j for j, (x, y) in enumerate(zip(ref + [-1], got + [-2])) if x != y)
        with torch.inference_mode():
            seq = torch.cat([ids, torch.tensor([ref[:k]], dtype=ids.dtype)], dim=1)
            logits = local.model(input_ids=seq).logits[0, -1].float()
        top = torch.topk(logits, 2).values
        margin = float(top[0] - top[1])
        assert margin < 1e-3 * max(1.0, abs(float(top[0]))), (i, a.text, b.text, margin)
        near_ties.append((i, margin))
    with capsys.disabled():
        print(f"\nbatched vs one at a time: {len(DEMO_PROMPTS) - len(near_ties)}/"
              f"{len(DEMO_PROMPTS)} identical; near-ties: {near_ties}")


@pytest.fixture(scope="module")
def llama_server_serving_all(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """llama.cpp's server started with ``--interrupt_requests False``: by default
    llama-cpp-python's server ends a streaming answer early (a clean ``[DONE]``, no finish
    reason) as soon as another request arrives, which cuts concurrent answers short."""
    import subprocess

    import llama_server as ls

    if ls.server_python() is None:
        pytest.skip("llama.cpp's server is not built: run .ci/build-llama-server.sh")
    from kernel_ext.default_model import default_model_path
    from kernel_ext.paths import user_cache_dir

    real_popen = subprocess.Popen

    def popen(cmd: list[str], **kwargs: Any) -> Any:
        return real_popen([*cmd, "--interrupt_requests", "False"], **kwargs)

    server = ls.LlamaServer(default_model_path(user_cache_dir()), tmp_path_factory.mktemp("llama"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ls.subprocess, "Popen", popen)  # the command line only: a real server
        server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_concurrent_calls_to_llama_cpp_server_equal_one_at_a_time(
    ip: Any, llama_server_serving_all: Any
) -> None:
    ip.run_line_magic("model", f"remote llama --url {llama_server_serving_all.url}")
    ip.user_ns["qs"] = DEMO_PROMPTS[:6]
    cell(ip, "--over qs --into one -n 8 --concurrency 1 -q", "{item}")
    cell(ip, "--over qs --into many -n 8 --concurrency 3 -q", "{item}")
    one, many = ip.user_ns["one"], ip.user_ns["many"]
    assert one.failed == many.failed == [] and many.mode == "3 concurrent requests"
    assert [r.prompt for r in many] == DEMO_PROMPTS[:6]  # in item order
    assert many.texts == one.texts and all(r.completion_tokens == 8 for r in many)


def test_an_over_results_list_is_checkpointed_as_plain_data(tmp_path: Path) -> None:
    """`--into` holds answers and ItemErrors in a list subclass: a real store keeps both."""
    from kernel_ext.checkpoint import Store, _codec
    from kernel_ext.over import OverResults
    from kernel_ext.providers.base import GenerationResult

    out = OverResults([GenerationResult("Paris", model="m"), ItemError(1, "p", "boom", "ValueError")])
    store = Store(str(tmp_path / "ckpt"))
    store.commit({"out": _codec.encode(out)})
    back = store.restore().values["out"]
    assert [type(x).__name__ for x in back] == ["GenerationResult", "ItemError"]
    assert str(back[0]) == "Paris" and back[1].error == "boom"
