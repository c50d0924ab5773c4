"""%%infer's limits in a real kernel (jupyter_client), as a user meets them, with the kernel
under an RSS watchdog (``kernel_harness``): bad options, unknown models and unsafe output
names are one line and never count against a breaker; timeouts the user asked for do not open
it; the stop button keeps the partial answer (remote stream and local model); rate limits wait;
the offline answer cache is listed and cleared; help is printed; ``%config`` refusals are one
line. Providers: a tiny real GGUF model and a real HTTP server (the stdlib stub)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from kernel_harness import Kernel, Output
from openai_stub import OpenAIStub
from tinymodels import write_tiny_llama

pytestmark = pytest.mark.slow

pytest.importorskip("jupyter_client")


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub(answer="Paris is the capital of France.", trickle_s=0.05) as s:
        yield s


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory, stub: OpenAIStub) -> Iterator[Kernel]:
    root = tmp_path_factory.mktemp("kernel_infer")
    tiny = write_tiny_llama(root / "tiny-llama.gguf", seed=1, context=32768)  # room to run long
    with Kernel(root) as k:
        k.cell_ok("%load_ext kernel_ext")
        k.cell_ok("%config KernelExt.checkpoint_enabled = False")
        k.cell_ok(f"%model load {tiny} --name tiny --no-progress", timeout=300)
        k.cell_ok(f"%model remote srv --url {stub.url}")
        k.cell_ok("import json, kernel_ext\n"
             "def breaker(name):\n"
             "    b = kernel_ext.current_session().breakers.get(name)\n"
             "    print(json.dumps(None if b is None else b.snapshot().to_dict()))")
        yield k
        k.check_memory()


def one_line_refusal(out: Output, fragment: str) -> None:
    """A refused cell: one short line on stderr, no traceback, the cell marked failed."""
    assert out.status == "error" and not out.error, out.everything
    assert "Traceback" not in out.everything and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], out.stderr


def breaker(kernel: Kernel, name: str) -> dict | None:
    return json.loads(kernel.cell_ok(f"breaker({name!r})").stdout)  # type: ignore[no-any-return]


def test_bad_options_are_one_line_and_never_reach_a_breaker(kernel: Kernel) -> None:
    before = breaker(kernel, "tiny")
    for _ in range(3):
        one_line_refusal(kernel.cell("%%infer --model tiny -t nan\nhello"),
                         "UsageError: %%infer: --temperature must be a finite number from 0 to "
                         "100 (0 is greedy), got nan")
    one_line_refusal(kernel.cell("%%infer --model tiny --timeout nan\nhello"),
                     "--timeout must be a finite number from 0 to 86400")
    one_line_refusal(kernel.cell("%%infer --model tiny -n 0\nhello"),
                     "--max-new-tokens must be a whole number from 1 to 32768, got 0")
    one_line_refusal(kernel.cell("%%infer --model nosuch\nhello"),
                     "no model or provider called 'nosuch' (known: srv, tiny)")
    assert breaker(kernel, "nosuch") is None
    assert breaker(kernel, "tiny") == before  # nothing counted, not even created


def test_unsafe_output_names_are_refused_and_everything_still_works(kernel: Kernel) -> None:
    one_line_refusal(kernel.cell("%%infer --model tiny -n 2 -o print\nhi"),
                     "-o/--out print would replace Python's builtin 'print'")
    one_line_refusal(kernel.cell("%%infer --model tiny -n 2 -o get_ipython\nhi"),
                     "would replace IPython's own 'get_ipython'")
    one_line_refusal(kernel.cell("%%infer --model tiny -n 2 -o for\nhi"),
                     "-o/--out needs a Python variable name, got 'for'")
    assert kernel.cell_ok("print('still', 'fine')").stdout == "still fine\n"
    assert "tiny" in kernel.cell_ok("%breaker list").stdout  # magics still work


def test_a_huge_format_width_is_one_line(kernel: Kernel) -> None:
    kernel.cell_ok("x = 3")
    one_line_refusal(kernel.cell("%%infer --model tiny -n 2\nvalue {x:99999999999}"),
                     "PromptError: {x:99999999999}: a format width of 99999999999 is too large")
    kernel.check_memory()


def test_user_timeouts_do_not_open_the_breaker(kernel: Kernel) -> None:
    for _ in range(3):
        out = kernel.cell_ok("%%infer --model tiny -n 2000 --timeout 0.2 -o r\nhello world")
        assert "TIMED OUT (partial)" in out.displays[-1]
    assert kernel.cell_ok("print(r.finish_reason)").stdout == "timeout\n"
    snap = breaker(kernel, "tiny")
    assert snap is not None and snap["state"] == "closed" and snap["failures_in_window"] == 0


def test_config_refusals_are_one_clean_line(kernel: Kernel) -> None:
    out = kernel.cell_ok("%config KernelExt.timeout = float('nan')")
    assert out.stderr.strip() == (
        "%config refused: timeout must be a finite number from 0 to 86400 (seconds; 0: no "
        "timeout), got nan (kept timeout = 300.0)"
    )
    assert "ERROR:root" not in out.everything
    out = kernel.cell_ok("%config KernelExt.memory_fraction = 1.5")
    assert out.stderr.startswith("%config refused: memory_fraction must be in (0, 1]")


def test_help_from_question_mark_and_dash_dash_help(kernel: Kernel) -> None:
    out = kernel.cell_ok("%%infer --help")
    assert out.stdout.lstrip().startswith("%%infer [-m NAME]") and "--timeout S" in out.stdout
    page = kernel.cell_ok("%%infer?").payload_text
    assert "--max-new-tokens N" in page and "finish_reason='interrupted'" in page
    assert "%model answers" in kernel.cell_ok("%model --help").stdout


def test_the_result_is_a_generation_result(kernel: Kernel) -> None:
    kernel.cell_ok("%%infer --model srv -o res -q\nQ")
    out = kernel.cell_ok("print(type(res).__name__); print(repr(res)[:17])").stdout
    assert out == "GenerationResult\nGenerationResult(\n"


def test_a_rate_limit_waits_and_says_so(kernel: Kernel) -> None:
    kernel.cell_ok("%config KernelExt.rate_limit_per_second = 1.0\n"
              "%config KernelExt.rate_limit_burst = 1")
    try:
        kernel.cell_ok("%%infer --model srv -o a -q\nQ1")
        out = kernel.cell_ok("%%infer --model srv -o b\nQ2")
        assert "for srv's rate limit (1 calls/s, burst 1)" in out.displays[-1]
        assert kernel.cell_ok("print(b.provider)").stdout == "srv\n"
    finally:
        kernel.cell_ok("%config KernelExt.rate_limit_per_second = 0.0")


def test_offline_answers_are_listed_and_cleared(kernel: Kernel) -> None:
    kernel.cell_ok("%model answers clear")
    kernel.cell_ok("%%infer --model srv -q -o a\nkeep me")
    listing = kernel.cell_ok("%model answers").stdout
    assert listing.startswith("1 answer(s), ") and "'keep me' -> 31 chars" in listing
    assert "1 answer(s) removed" in kernel.cell_ok("%model answers clear").stdout
    assert "is empty" in kernel.cell_ok("%model answers list").stdout


def interrupted_cell(kernel: Kernel, cell: str) -> Output:
    msg_id = kernel.submit(cell)
    kernel.wait_for_stdout(msg_id)  # the answer is streaming
    kernel.interrupt()  # the ■ button
    return kernel.collect(msg_id)


def assert_interrupted_cleanly(kernel: Kernel, out: Output, model: str, calls_before: int) -> None:
    assert out.status == "ok" and not out.error, out.everything
    assert "Traceback" not in out.everything and "KeyboardInterrupt" not in out.everything
    assert "INTERRUPTED (partial)" in out.displays[-1]
    shown = kernel.cell_ok("print(r.finish_reason, len(r.text) > 0, r.provider)").stdout
    assert shown == f"interrupted True {model}\n"
    record = json.loads(kernel.cell_ok("%audit --kind infer --tail 1 --json").stdout)
    assert record["outcome"] == "interrupted" and record["finish_reason"] == "interrupted"
    snap = breaker(kernel, model)
    assert snap is not None and snap["total_calls"] == calls_before  # untouched
    assert snap["state"] == "closed"


def test_the_stop_button_during_a_remote_stream(kernel: Kernel, stub: OpenAIStub) -> None:
    calls = (breaker(kernel, "srv") or {"total_calls": 0})["total_calls"]
    stub.script("trickle")
    out = interrupted_cell(kernel, "%%infer --model srv -n 5000 -o r\nTell me everything")
    assert out.stdout.startswith("Paris")
    assert_interrupted_cleanly(kernel, out, "srv", calls)
    assert kernel.cell_ok("%%infer --model srv -q -o after\nQ").status == "ok"  # and it goes on


def test_the_stop_button_during_a_local_model(kernel: Kernel) -> None:
    calls = (breaker(kernel, "tiny") or {"total_calls": 0})["total_calls"]
    out = interrupted_cell(kernel, "%%infer --model tiny -n 20000 --timeout 0 -o r\nhello")
    assert_interrupted_cleanly(kernel, out, "tiny", calls)
    kernel.check_memory()
