"""%model and %%infer in a real IPython shell: user mistakes are short UsageErrors, tiny real
GGUF models load and answer, settings work through %config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from tinymodels import write_tiny_gemma3, write_tiny_llama

CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def line(ip: Any, magic: str, text: str = "") -> Any:
    return ip.run_line_magic(magic, text)


def cell(ip: Any, args: str, body: str) -> Any:
    return ip.run_cell_magic("infer", args, body)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny-llama.gguf", seed=1)


@pytest.fixture
def tiny_chat(tmp_path: Path) -> Path:
    return write_tiny_gemma3(tmp_path / "tiny-gemma3-chat.gguf", seed=2, chat_template=CHAT)


# --- user mistakes -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "magic, text, fragment",
    [
        ("model", "frobnicate", "unknown subcommand 'frobnicate'"),
        ("model", "load /nonexistent/model.gguf", "neither a file nor a known model name"),
        ("model", "load --dtype int3", "invalid choice"),
        ("model", "load --device tpu", "--device must be"),
        ("model", "info", "no model is loaded"),
        ("model", "unload nothing", "no model named 'nothing'"),
        ("model", "unload", "usage: %model unload NAME"),
        ("model", "load 'unterminated", "check your quotes"),
    ],
)
def test_model_mistakes_are_usage_errors(ip: Any, magic: str, text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        line(ip, magic, text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "args, body, fragment",
    [
        ("", "   \n", "the cell is empty"),
        ("", "Hello", "no model to run"),
        ("--max-new-tokens 0", "x", "--max-new-tokens must be a whole number from 1 to 32768"),
        ("-n 40000", "x", "--max-new-tokens must be a whole number from 1 to 32768, got 40000"),
        ("--temperature -1", "x", "--temperature must be a finite number from 0 to 100"),
        ("-t nan", "x", "--temperature must be a finite number from 0 to 100 (0 is greedy), got nan"),
        ("-t inf", "x", "--temperature must be a finite number from 0 to 100 (0 is greedy), got inf"),
        ("-t 1e999", "x", "got inf"),
        ("-t abc", "x", "%%infer: argument -t/--temperature: invalid float value: 'abc'"),
        ("--top-p 0", "x", "--top-p must be a finite number in (0, 1]"),
        ("--top-p nan", "x", "--top-p must be a finite number in (0, 1], got nan"),
        ("--top-k -1", "x", "--top-k must be a whole number from 0 to 1000000"),
        ("--top-k 1.5", "x", "invalid int value"),
        ("--seed -3", "x", "--seed must be a whole number from 0 to"),
        ("--seed 99999999999999999999", "x", "--seed must be a whole number from 0 to"),
        ("--timeout -2", "x", "--timeout must be a finite number from 0 to 86400"),
        ("--timeout nan", "x",
         "--timeout must be a finite number from 0 to 86400 (seconds; 0: no timeout), got nan"),
        ("--timeout inf", "x", "--timeout must be a finite number from 0 to 86400"),
        ("--timeout 1e9", "x", "--timeout must be a finite number from 0 to 86400"),
        (" ".join(["--stop x"] * 17), "x", "--stop takes at most 16 stop strings, got 17"),
        ("--stop " + "y" * 300, "x", "--stop strings are at most 256 characters"),
        ("--bogus", "x", "unrecognized arguments: --bogus (see %%infer --help)"),
        ("--quiet", "x", "give -o VAR"),
        ("-o 1abc", "x", "needs a Python variable name"),
        ("-o for", "x", "-o/--out needs a Python variable name, got 'for'"),
        ("-o print", "x", "-o/--out print would replace Python's builtin 'print'"),
        ("-o len", "x", "would replace Python's builtin 'len'"),
        ("-o get_ipython", "x", "-o/--out get_ipython would replace IPython's own 'get_ipython'"),
        ("-o In", "x", "would replace IPython's own 'In'"),
        ("-o Out", "x", "would replace IPython's own 'Out'"),
        ("-o exit", "x", "would replace"),
        ("-o quit", "x", "would replace"),
        ("-o _", "x", "would replace IPython's own '_'"),
        ("-o __", "x", "would replace IPython's own '__'"),
        ("-o _i", "x", "would replace IPython's own '_i'"),
        ("-o _i3", "x", "would replace IPython's own '_i3'"),
        ("-o _7", "x", "would replace IPython's own '_7'"),
        ("-o _oh", "x", "would replace IPython's own '_oh'"),
        ("-o display", "x", "would replace IPython's own 'display'"),
        ("-o open", "x", "would replace Python's builtin 'open'"),
        ("-o __name__", "x", "would replace IPython's own '__name__'"),
        ("--over words --into print", "{item}", "--into print would replace Python's builtin"),
        ("--chat --no-chat", "x", "not allowed with argument"),
        ("--over items", "{item}", "go together"),
        ("", "Hi {nobody}", "no variable 'nobody'"),
        ("", "Hi {name.upper()}", "not evaluated"),
        ("", "Hi {name:99999999999}", "a format width of 99999999999 is too large (at most 10000)"),
        ("", "Hi {name:.99999999999}", "a format precision of 99999999999 is too large"),
        ("--model nosuch", "x", "%%infer --model: no model or provider called 'nosuch'"),
    ],
)
def test_infer_mistakes_are_usage_errors(ip: Any, args: str, body: str, fragment: str) -> None:
    ip.user_ns["name"] = "Ada"
    ip.user_ns["words"] = ["a"]
    with pytest.raises(UsageError) as info:
        cell(ip, args, body)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)  # one line
    session = ip.configurables[-1].session
    assert session.breakers == {}  # refused before any provider: no breaker was even made


def test_a_magic_error_in_a_cell_shows_one_line_not_a_traceback(ip: Any, capsys: Any) -> None:
    ip.run_cell("%model load /nonexistent.gguf")
    err = capsys.readouterr().err
    assert "UsageError" in err and "neither a file" in err
    assert "Traceback" not in err


def test_config_traits_validate(ip: Any) -> None:
    ext = ip.configurables[-1]
    line(ip, "config", "KernelExt.max_new_tokens = 7")
    assert ext.max_new_tokens == 7 and ext.session.config.max_new_tokens == 7
    line(ip, "config", "KernelExt.memory_fraction = 1.5")  # refused, value kept
    assert ext.memory_fraction == 0.8


@pytest.mark.parametrize(
    "assignment, fragment",
    [
        ("memory_fraction = 1.5", "memory_fraction must be in (0, 1], got 1.5"),
        ("timeout = float('nan')", "timeout must be a finite number from 0 to 86400"),
        ("timeout = -1.0", "timeout must be a finite number from 0 to 86400"),
        ("temperature = float('inf')", "temperature must be a finite number from 0 to 100"),
        ("max_new_tokens = 40000", "max_new_tokens must be a whole number from 1 to 32768"),
        ("breaker_open_seconds = float('nan')", "breaker_open_seconds must be a finite number"),
        ("offline_cache_max_mb = 0.0", "offline_cache_max_mb must be a finite number > 0"),
        ("timeout = 'soon'", "timeout expected a float, not the str 'soon'"),
    ],
)
def test_config_refusals_are_one_clean_line(ip: Any, capsys: Any, assignment: str,
                                            fragment: str) -> None:
    ext = ip.configurables[-1]
    name = assignment.split(" = ")[0]
    before = getattr(ext, name)
    ip.run_cell(f"%config KernelExt.{assignment}")
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("%config refused: ") and fragment in err, err
    assert "\n" not in err and "ERROR:root" not in err + captured.out
    assert f"(kept {name} = {before!r})" in err
    assert getattr(ext, name) == before  # kept


# --- tiny real models ------------------------------------------------------------------------------
def test_load_list_info_unload(ip: Any, tiny: Path, capsys: Any) -> None:
    line(ip, "model", f"load {tiny} --name tiny --no-progress")
    out = capsys.readouterr().out
    assert "loaded tiny: llama" in out and "cpu / float32" in out
    line(ip, "model", "list")
    assert "* tiny" in capsys.readouterr().out
    line(ip, "model", "info")
    info = capsys.readouterr().out
    assert "parameters" in info and "sha256" in info and "estimated" in info and "loaded in" in info
    with pytest.raises(UsageError, match="already loaded"):
        line(ip, "model", f"load {tiny} --name tiny")
    line(ip, "model", "unload tiny")
    assert "freed" in capsys.readouterr().out
    with pytest.raises(UsageError, match="no model is loaded"):
        line(ip, "model", "info")


def test_sha256_pin_mismatch_refuses_the_load(ip: Any, tiny: Path) -> None:
    with pytest.raises(UsageError, match="IntegrityError"):
        line(ip, "model", f"load {tiny} --sha256 {'0' * 64}")
    assert ip.configurables[-1].session.models.names() == []


def test_malformed_file_is_refused_before_loading(ip: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(UsageError, match="GGUFFormatError"):
        line(ip, "model", f"load {bad}")


def test_infer_streams_stores_and_is_deterministic(ip: Any, tiny: Path, capsys: Any) -> None:
    line(ip, "model", f"load {tiny} --no-progress")
    ip.user_ns["topic"] = "cats"
    cell(ip, "-n 8 -o r1", "Tell me about {topic}")
    out = capsys.readouterr().out
    r1 = ip.user_ns["r1"]
    assert r1.prompt == "Tell me about cats"
    assert r1.completion_tokens >= 1 and r1.prompt_tokens > 1
    assert r1.text and r1.text in out  # streamed into the output
    assert "tok/s" in out  # the footer
    cell(ip, "-n 8 -o r2 --quiet", "Tell me about {topic}")
    assert capsys.readouterr().out == ""
    assert ip.user_ns["r2"].text == r1.text  # greedy: same answer twice
    assert repr(r1).startswith("GenerationResult(") and str(r1) == r1.text
    assert type(r1).__name__ == "GenerationResult"


def test_seeded_sampling_is_reproducible(ip: Any, tiny: Path) -> None:
    line(ip, "model", f"load {tiny} --no-progress")
    texts = []
    for out in ("a", "b"):
        cell(ip, f"-n 12 -t 1.5 --seed 7 -o {out} -q", "hello")
        texts.append(ip.user_ns[out].text)
    assert texts[0] == texts[1]
    cell(ip, "-n 12 -t 1.5 --seed 8 -o c -q", "hello")
    cell(ip, "-n 12 -t 1.5 --seed 9 -o d -q", "hello")
    assert len({texts[0], ip.user_ns["c"].text, ip.user_ns["d"].text}) > 1


def test_max_new_tokens_sets_finish_reason(ip: Any, tiny: Path) -> None:
    line(ip, "model", f"load {tiny} --no-progress")
    cell(ip, "-n 3 -o r -q", "abc")
    r = ip.user_ns["r"]
    assert r.completion_tokens <= 3
    assert r.finish_reason in {"length", "stop"}


def test_chat_template_is_used_when_present(ip: Any, tiny_chat: Path, tiny: Path) -> None:
    line(ip, "model", f"load {tiny_chat} --name chatty --no-progress")
    provider = ip.configurables[-1].session.models.get("chatty").provider
    from kernel_ext.providers.base import GenerationParams

    text, used = provider.build_prompt("hi", GenerationParams(system="be brief"))
    assert used and text.endswith("<|assistant|>") and "<|system|>be brief" in text
    text, used = provider.build_prompt("hi", GenerationParams(chat=False))
    assert not used and text == "hi"
    cell(ip, "--model chatty -n 4 -o r -q", "hi")
    assert ip.user_ns["r"].completion_tokens >= 1
    line(ip, "model", f"load {tiny} --name base --no-progress")
    with pytest.raises(UsageError, match="has no chat template"):
        cell(ip, "--model base --chat -n 2 -o r -q", "hi")


def test_infer_over_a_list_is_a_resumable_task(ip: Any, tiny: Path, capsys: Any) -> None:
    line(ip, "model", f"load {tiny} --no-progress")
    ip.user_ns["words"] = ["cat", "dog", "owl"]
    cell(ip, "--over words --into answers -n 3 -q", "{index}: say {item}")
    answers = ip.user_ns["answers"]
    assert len(answers) == 3 and [str(a) for a in answers] == [a.text for a in answers]
    # each answer is the same as a single %%infer of that item's prompt (greedy)
    cell(ip, "-n 3 -o one -q", "1: say dog")
    assert answers[1].text == ip.user_ns["one"].text
    # re-running the cell computes nothing again: the task's results are reused
    session = ip.configurables[-1].session
    calls = []
    session.events.subscribe("infer", lambda e: calls.append(e) if e["action"] == "start" else None)
    ip.user_ns["answers"] = None
    cell(ip, "--over words --into answers -n 3 -q", "{index}: say {item}")
    assert ip.user_ns["answers"].texts == answers.texts and calls == []
    # a changed item, or a changed prompt, is answered again
    ip.user_ns["words"] = ["cat", "emu", "owl"]
    cell(ip, "--over words --into answers -n 3 -q", "{index}: say {item}")
    assert len(calls) == 1 and ip.user_ns["answers"][0].text == answers[0].text
    cell(ip, "--over words --into answers -n 3 -q", "{index}: shout {item}")
    assert len(calls) == 4
    with pytest.raises(UsageError, match="must be a list"):
        ip.user_ns["text"] = "not a list"
        cell(ip, "--over text --into x -q", "{item}")


def test_a_load_that_fails_late_is_one_line_and_audited(ip: Any, tmp_path: Path) -> None:
    # a valid GGUF file whose weights are missing: the header is fine, conversion fails
    broken = write_tiny_llama(tmp_path / "no-output-norm.gguf", drop=("output_norm.weight",))
    with pytest.raises(UsageError) as info:
        line(ip, "model", f"load {broken} --no-progress")
    assert "model.norm.weight" in str(info.value) and "incomplete" in str(info.value)
    session = ip.configurables[-1].session
    failures = session.audit.read(kind="model.load_failed")
    assert failures and failures[-1]["name"] == "no-output-norm"
    assert session.models.names() == []


def test_an_unexpected_load_failure_is_wrapped_not_a_traceback(
    ip: Any, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kernel_ext.gguf.loader as loader

    def broken(*args: Any, **kwargs: Any) -> None:  # a fault we cannot cause for real
        raise RuntimeError("native library fault")

    monkeypatch.setattr(loader, "load_transformers", broken)
    with pytest.raises(UsageError, match="ModelLoadError: loading tiny-llama.gguf failed: "
                                         "RuntimeError: native library fault"):
        line(ip, "model", f"load {tiny} --no-progress")
    session = ip.configurables[-1].session
    assert session.audit.read(kind="model.load_failed")[-1]["error"].startswith("RuntimeError")


def test_unload_removes_everything_and_reload_works(ip: Any) -> None:
    ext = ip.configurables[-1]
    ip.extension_manager.unload_extension("kernel_ext")
    assert ext not in ip.configurables
    assert "KernelExt" not in ip.magics_manager.registry
    assert "infer" not in ip.magics_manager.magics["cell"]
    assert "model" not in ip.magics_manager.magics["line"]
    ip.extension_manager.load_extension("kernel_ext")
    assert ip.configurables[-1] is not ext and "infer" in ip.magics_manager.magics["cell"]


def test_model_cache_list_and_clear(ip: Any, tiny: Path, capsys: Any) -> None:
    line(ip, "model", f"load {tiny} --no-progress")
    capsys.readouterr()
    line(ip, "model", "cache list")
    listing = capsys.readouterr().out
    sha = ip.configurables[-1].session.models.get().sha256
    assert sha[:16] in listing and "float32" in listing and "tiny-llama.gguf" in listing
    with pytest.raises(UsageError, match="64 hexadecimal"):
        line(ip, "model", "cache clear nothex")
    line(ip, "model", f"cache clear {sha}")
    assert f"for {sha}" in capsys.readouterr().out
    line(ip, "model", "cache list")  # other tests' entries share this cache: only ours is gone
    assert sha[:16] not in capsys.readouterr().out


def test_stop_strings_understand_escapes() -> None:
    from kernel_ext.cmd._args import parse
    from kernel_ext.cmd.infer import _params, usage
    from kernel_ext.config import KernelExtConfig

    ns = parse(usage, r"""--stop "\n" --stop "\n\nQ:" --stop 'a\\nb' --stop "." """)
    assert _params(ns, KernelExtConfig()).stop == ("\n", "\n\nQ:", "a\\nb", ".")


@pytest.mark.slow
def test_a_newline_stop_ends_the_demo_models_answer(ip: Any, demo_model_path: Path) -> None:
    line(ip, "model", "load --no-progress")
    cell(ip, r'-n 8 --stop "\n" -o r -q', "Q: What is the capital of Japan?\nA:")
    r = ip.user_ns["r"]
    assert "Tokyo" in r.text and "\n" not in r.text and r.finish_reason == "stop"
