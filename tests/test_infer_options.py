"""%%infer's limits in a real IPython shell: help, refusals that never reach a provider or a
breaker, timeouts and interrupts that never count, rate-limit waits, the offline answer cache's
cap and commands. Providers are a real HTTP server (the stdlib stub) and a double for the stop
button (``fakes.InterruptingProvider``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fakes import InterruptingProvider
from IPython.core.error import UsageError
from openai_stub import OpenAIStub


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub(answer="Paris is the capital of France.", trickle_s=0.02) as s:
        yield s


def session(ip: Any) -> Any:
    import kernel_ext

    return kernel_ext.current_session()


def remote(ip: Any, stub: OpenAIStub, name: str = "srv") -> None:
    ip.run_line_magic("model", f"remote {name} --url {stub.url}")


def infer(ip: Any, args: str, body: str = "Q") -> Any:
    return ip.run_cell_magic("infer", args, body)


# --- help ---------------------------------------------------------------------------------------
def test_help_is_printed_by_question_mark_and_dash_dash_help(ip: Any, capsys: Any) -> None:
    doc = ip.find_cell_magic("infer").__doc__
    for fragment in ("%%infer [-m NAME] [-n N] [-t T]", "--temperature T", "--timeout S",
                     "a finite number from 0 to 86400", "GenerationResult", "interrupted"):
        assert fragment in doc, fragment
    ip.run_cell("%%infer?")  # IPython's pager prints the docstring in a plain shell
    assert "--max-new-tokens N" in capsys.readouterr().out
    for cell in ("%%infer --help", "%%infer --help\nsome prompt", "%%infer -n 3 -h\n"):
        result = ip.run_cell(cell)
        out = capsys.readouterr()
        assert result.success and "body is empty" not in out.err, cell
        assert out.out.lstrip().startswith("%%infer [-m NAME]") and "--top-p P" in out.out
    assert session(ip).breakers == {}


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("model --help", "%model answers [list|clear [NAME]]"),
        ("model load --help", "%model load [--name NAME]"),
        ("model remote --help", "%model remote [--url URL]"),
        ("breaker --help", "%breaker reset NAME|all"),
        ("audit --help", "%audit [--tail N]"),
        ("dashboard --help", "%dashboard [--interval S]"),
    ],
)
def test_every_magic_prints_its_help(ip: Any, capsys: Any, line: str, fragment: str) -> None:
    assert ip.run_cell(f"%{line}").success
    assert fragment in capsys.readouterr().out
    magic = line.split()[0]
    assert ip.find_line_magic(magic).__doc__.strip()


def test_a_mistake_is_one_line_that_points_at_the_help(ip: Any) -> None:
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("model", "load --bogus")
    assert str(info.value) == (
        "%model load: unrecognized arguments: --bogus (see %model load --help)"
    )


# --- refusals never reach a provider or a breaker ----------------------------------------------
def test_bad_options_three_times_leave_the_breaker_closed(ip: Any, stub: OpenAIStub) -> None:
    remote(ip, stub)
    for args in ("-t nan", "-t nan", "-t nan", "--timeout nan", "--top-p inf", "-n -5",
                 "--model nosuch", "-o print", "-o get_ipython"):
        with pytest.raises(UsageError):
            infer(ip, args)
    assert stub.requests == [] and session(ip).breakers == {}
    infer(ip, "-o r -q")
    snap = session(ip).breakers["srv"].snapshot()
    assert snap.state == "closed" and snap.total_calls == 1 and snap.failures_in_window == 0
    assert ip.user_ns["r"].text == stub.answer and "print" not in ip.user_ns
    assert "nosuch" not in session(ip).breakers


def test_three_user_timeouts_do_not_open_the_breaker(ip: Any, stub: OpenAIStub) -> None:
    remote(ip, stub)
    for _ in range(3):
        stub.script("trickle")
        infer(ip, "-n 5000 --timeout 0.15 -o r -q")
        assert ip.user_ns["r"].timed_out and ip.user_ns["r"].text.startswith("Paris")
    snap = session(ip).breakers["srv"].snapshot()
    assert snap.state == "closed" and snap.failures_in_window == 0
    # slow-call counting on: a call cut after at least that long is a slow call
    ip.run_line_magic("config", "KernelExt.breaker_slow_call_seconds = 0.1")
    stub.script("trickle")
    infer(ip, "-n 5000 --timeout 0.15 -o r -q")
    assert session(ip).breakers["srv"].snapshot().failures_in_window == 1


def test_a_known_name_whose_model_is_gone_is_answered_from_the_offline_cache(
    ip: Any, stub: OpenAIStub
) -> None:
    remote(ip, stub)
    infer(ip, "-o first -q")
    ip.run_line_magic("model", "remote srv --remove")
    infer(ip, "--model srv -o again -q")  # not refused: its answers are kept
    assert ip.user_ns["again"].cached and ip.user_ns["again"].text == ip.user_ns["first"].text


def test_a_model_whose_load_failed_is_a_provider_fault_not_a_typo(
    ip: Any, stub: OpenAIStub, tmp_path: Any
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 24)
    with pytest.raises(UsageError, match="GGUFFormatError"):
        ip.run_line_magic("model", f"load {corrupt} --name primary")
    remote(ip, stub)
    ip.run_line_magic("model", "fallback srv")
    infer(ip, "--model primary -o r -q")  # accepted: the chain counts primary's failure
    r = ip.user_ns["r"]
    assert r.provider == "srv" and r.attempts[0]["outcome"] == "unavailable"
    assert session(ip).breakers["primary"].snapshot().failures_in_window == 1
    with pytest.raises(UsageError, match="no model or provider called 'primari'"):
        infer(ip, "--model primari -o r -q")  # a typo is refused, nothing counted
    assert "primari" not in session(ip).breakers


# --- the stop button ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["returns", "raises"])
def test_an_interrupted_infer_keeps_the_partial_answer(ip: Any, capsys: Any, mode: str) -> None:
    hub = session(ip).resilience
    hub.add_provider("stopper", InterruptingProvider("stopper", mode))
    result = ip.run_cell("%%infer --model stopper -o r\nTell me a story")
    out = capsys.readouterr()
    assert result.success and result.error_in_exec is None
    assert "Traceback" not in out.out + out.err and "KeyboardInterrupt" not in out.out + out.err
    assert "alpha beta" in out.out and "INTERRUPTED (partial)" in out.out
    r = ip.user_ns["r"]
    assert r.finish_reason == "interrupted" and r.text == "alpha beta"
    record = session(ip).audit.read(kind="infer")[-1]
    assert record["outcome"] == "interrupted" and record["correlation_id"] == r.correlation_id
    assert hub.breakers["stopper"].snapshot().total_calls == 0


def test_an_interrupted_quiet_infer_says_so_in_one_line(ip: Any, capsys: Any) -> None:
    session(ip).resilience.add_provider("stopper", InterruptingProvider("stopper"))
    infer(ip, "--model stopper -o r -q")
    out = capsys.readouterr().out
    assert out == "%%infer interrupted: the partial answer (10 characters) is in r\n"


def test_an_interrupted_infer_over_keeps_the_finished_answers(ip: Any, capsys: Any) -> None:
    stopper = InterruptingProvider("stopper", interrupt_on_call=2)
    session(ip).resilience.add_provider("stopper", stopper)
    ip.user_ns["words"] = ["cat", "dog", "owl"]
    infer(ip, "--model stopper --over words --into answers -q", "say {item}")
    # the finished answer is kept in its place, the unanswered items are None (issue 14's
    # result objects: str() is the text)
    answers = ip.user_ns["answers"]
    texts = [str(a) if a is not None else None for a in answers]
    # concurrent workers: which items finished beside the interrupted one varies; the finished
    # ones are kept in place, the interrupted one is not
    assert None in texts and set(texts) <= {"whole", None}
    out = capsys.readouterr().out
    assert "interrupted" in out and "run the cell again" in out
    before = len(stopper.calls)
    infer(ip, "--model stopper --over words --into answers -q", "say {item}")
    assert [str(a) for a in ip.user_ns["answers"]] == ["whole", "whole", "whole"]
    assert len(stopper.calls) - before == texts.count(None)  # finished answers are not asked again


# --- rate limits -------------------------------------------------------------------------------
def test_a_rate_limit_waits_and_the_footer_says_so(ip: Any, stub: OpenAIStub, capsys: Any) -> None:
    remote(ip, stub)
    # 2 calls/s: the second call comes well inside half a second, even on a busy machine
    ip.run_line_magic("config", "KernelExt.rate_limit_per_second = 2.0")
    ip.run_line_magic("config", "KernelExt.rate_limit_burst = 1")
    infer(ip, "-o a")
    infer(ip, "-o b")  # the bucket is empty: waits up to 0.5 s instead of failing
    assert ip.user_ns["b"].provider == "srv"
    assert any("for srv's rate limit (2 calls/s, burst 1)" in n for n in ip.user_ns["b"].notes)
    assert "waited 0." in capsys.readouterr().out.splitlines()[-1]


# --- the offline answer cache -------------------------------------------------------------------
def test_answers_list_clear_and_cap(ip: Any, stub: OpenAIStub, capsys: Any) -> None:
    remote(ip, stub)
    capsys.readouterr()
    ip.run_line_magic("model", "answers")
    assert "is empty (cap 95.4 MiB)" in capsys.readouterr().out
    for i in range(3):
        infer(ip, "-q -o r", f"question number {i}")
    ip.run_line_magic("model", "answers list")
    listing = capsys.readouterr().out
    assert listing.startswith("3 answer(s), ") and "'question number 2' -> 31 chars" in listing
    assert listing.index("number 2") < listing.index("number 0")  # most recently used first
    cache = session(ip).resilience.offline_cache
    one = cache.size_bytes() // 3
    # cap it below three answers: the least recently used go first
    ip.run_line_magic("config", f"KernelExt.offline_cache_max_mb = {2.5 * one / 1e6}")
    infer(ip, "-q -o r", "question number 0")  # not a hit (a provider answers), but rewritten
    kept = [e.prompt for e in cache.entries()]
    assert kept == ["question number 0", "question number 2"]
    ip.run_line_magic("model", "answers clear srv")
    assert "removed 2 answer(s) of srv" in capsys.readouterr().out
    with pytest.raises(UsageError, match="no answers were kept for 'ghost'"):
        ip.run_line_magic("model", "answers clear ghost")
    infer(ip, "-q -o r", "again")
    ip.run_line_magic("model", "answers clear")
    assert "1 answer(s) removed" in capsys.readouterr().out and len(cache) == 0
