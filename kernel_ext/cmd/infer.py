"""``%%infer``: the cell body is the prompt.

Every option is checked here, before any provider is called (``GenerationParams`` refuses what
:data:`~kernel_ext.providers.base.PARAM_RANGES` does not allow; the model must be known; output
names must not hide Python's or IPython's own names), so a breaker only ever counts provider
faults. The options are IPython ``magic_arguments`` on :func:`usage`, whose help ``%%infer?``
and ``%%infer --help`` print.
"""

from __future__ import annotations

import builtins
import html
import keyword
import re
import sys
from collections.abc import Sequence
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, argument_group, magic_arguments

from ..errors import OptionError
from ..prompt import interpolate
from ..providers.base import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    PARAM_RANGES,
    GenerationParams,
    GenerationResult,
)
from ._args import exclusive_group, parse

__all__ = ["run", "usage"]


def _range(name: str) -> str:
    return PARAM_RANGES[name].describe().replace("%", "%%")


@magic_arguments("%infer")
@argument("-m", "--model", metavar="NAME",
          help="a loaded model or registered server (default: the last loaded; see %%model list)")
@argument("-n", "--max-new-tokens", type=int, metavar="N",
          help=f"tokens to generate at most: {_range('max_new_tokens')} "
               "(default: %%config KernelExt.max_new_tokens)")
@argument("-t", "--temperature", type=float, metavar="T",
          help=f"sampling temperature: {_range('temperature')} "
               "(default: %%config KernelExt.temperature)")
@argument("--top-p", type=float, default=1.0, metavar="P",
          help=f"nucleus sampling mass: {_range('top_p')} (default 1)")
@argument("--top-k", type=int, default=0, metavar="K",
          help=f"sample from the K most likely tokens: {_range('top_k')}")
@argument("--seed", type=int, metavar="S",
          help=f"makes sampling reproducible: {_range('seed')}")
@argument("--stop", action="append", default=[], metavar="STR",
          help=f"stop string, repeatable (at most {MAX_STOPS}, {MAX_STOP_CHARS} characters "
               r"each); \n, \t, \r and \\ are escapes")
@argument("--system", metavar="TEXT", help="system prompt")
@argument("--timeout", type=float, metavar="S",
          help=f"{_range('timeout')}; the partial text comes back marked "
               "(default: %%config KernelExt.timeout)")
@argument_group("output")
@argument("-o", "--out", metavar="VAR", help="store the result (a GenerationResult) in VAR")
@argument("--no-stream", action="store_true", help="print the answer at the end")
@argument("-q", "--quiet", action="store_true", help="print nothing (use with -o)")
@argument("--over", metavar="LIST",
          help="run the prompt once per element of the list LIST ({item}, {index})")
@argument("--into", metavar="VAR", help="with --over: the variable that receives the answers")
@argument("--batch-size", type=int, metavar="N",
          help="with --over on a local model: rows decoded together (default: from memory)")
@argument("--concurrency", type=int, metavar="N",
          help="with --over on a remote provider: requests in flight (default: 4)")
@exclusive_group("chat template")
@argument("--chat", dest="chat", action="store_true", default=None,
          help="use the model's chat template (an error if it has none)")
@argument("--no-chat", dest="chat", action="store_false",
          help="send plain text (default: the template when the model has one)")
def usage(line: str, cell: str) -> None:
    """Run the cell as a prompt; {name} inserts a notebook variable ({{ and }} are braces).

    Tokens stream as they come, then a footer line (model, tokens, tok/s, provider, and
    whether the answer is cached, timed out or interrupted). The stop button keeps the
    partial answer: in -o VAR too, marked finish_reason='interrupted'. Options out of range,
    an unknown --model and output names that would hide Python's or IPython's own names are
    refused before any model is called.
    """


def _params(ns: Any, config: Any) -> GenerationParams:
    """The request, every field checked (config supplies what the line left out)."""
    chosen = {
        "max_new_tokens": ns.max_new_tokens if ns.max_new_tokens is not None
        else config.max_new_tokens,
        "temperature": ns.temperature if ns.temperature is not None else config.temperature,
        "timeout": ns.timeout if ns.timeout is not None else config.timeout,
    }
    try:
        params = GenerationParams(
            top_p=ns.top_p, top_k=ns.top_k, seed=ns.seed,
            stop=tuple(_unescape(s) for s in ns.stop if s), system=ns.system, chat=ns.chat,
            **chosen,
        )
    except OptionError as e:
        raise UsageError(f"%%infer: --{e.option.replace('_', '-')} {e.requirement}") from None
    return params.replace(timeout=params.timeout or None)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(text: str) -> str:
    """``--stop "\\n"`` means a newline: a magic line cannot hold a real one."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


# IPython's own names in the namespace: _, __, ___ (outputs), _i, _ii, _iii, _iN, _N (history),
# and the dunders of the module namespace (__name__, __builtins__, ...)
_IPYTHON_NAME = re.compile(r"_+|_i+|_i?\d+|__\w*__")
_IPYTHON_NAMES = frozenset(("get_ipython", "In", "Out", "exit", "quit", "display", "__IPYTHON__"))


def _check_name(flag: str, name: str | None) -> None:
    if name is not None and (not name.isidentifier() or keyword.iskeyword(name)):
        raise UsageError(f"%%infer: {flag} needs a Python variable name, got {name!r}")


def _check_target(flag: str, name: str | None, shell: Any) -> None:
    """``-o``/``--into``: a variable name that hides nothing Python or IPython needs."""
    _check_name(flag, name)
    if name is None:
        return
    hidden = getattr(shell, "user_ns_hidden", {}) if shell is not None else {}
    if name in _IPYTHON_NAMES or _IPYTHON_NAME.fullmatch(name) or \
            (name in hidden and not hasattr(builtins, name)):
        what = f"IPython's own {name!r}"
    elif hasattr(builtins, name):
        what = f"Python's builtin {name!r}"
    else:
        return
    raise UsageError(f"%%infer: {flag} {name} would replace {what}; choose another name")


def _check_model(ext: Any, name: str | None) -> None:
    """An unknown ``--model`` is refused here: no breaker is created, no failure counted."""
    if name is None:
        return
    hub = ext.session.resilience
    if hub is None:
        if name not in ext.session.models.names():
            raise UsageError(f"%%infer: no model called {name!r}; see %model list")
        return
    if hub.is_known(name):
        return
    raise UsageError(f"%%infer --model: {hub.describe_unknown(name)}")


def _footer(result: GenerationResult) -> None:
    from IPython.display import display

    text = result.footer()
    colour = "#b45309" if (result.cached or result.partial) else "#6b7280"
    display({
        "text/plain": f"── {text}",
        "text/html": f'<div class="kernel-ext-footer" style="color:{colour};font-size:0.85em;'
                     f'border-top:1px solid #e5e7eb;margin-top:4px">{html.escape(text)}</div>',
    }, raw=True)


def _stream_to_stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def run(ext: Any, magic: str, line: str, cell: str | None = None) -> Any:
    ns = parse(usage, line)
    shell = ext.shell
    _check_target("-o/--out", ns.out, shell)
    _check_target("--into", ns.into, shell)
    _check_name("--over", ns.over)
    if ns.quiet and ns.out is None and ns.into is None:
        raise UsageError("%%infer: --quiet prints nothing, so give -o VAR (or --into VAR) to keep the result")
    template = (cell or "").rstrip()
    if not template.strip():
        raise UsageError("%%infer: the cell is empty; write the prompt in the cell body")
    params = _params(ns, ext.session.config)
    _check_model(ext, ns.model)
    user_ns = shell.user_ns
    if ns.over is not None or ns.into is not None:
        return _run_over(ext, ns, template, params, user_ns)
    prompt = interpolate(template, user_ns)
    stream = ext.session.config.stream and not ns.no_stream and not ns.quiet
    result = ext.session.infer(prompt, params, model=ns.model,
                               on_token=_stream_to_stdout if stream else None)
    if ns.out:
        user_ns[ns.out] = result
    if not ns.quiet:
        if not stream:
            print(result.text, end="")
        print()
        _footer(result)
    elif result.interrupted:
        print(f"%%infer interrupted: the partial answer ({len(result.text)} characters) is in "
              f"{ns.out}")
    return None


def _run_over(ext: Any, ns: Any, template: str, params: GenerationParams, user_ns: dict[str, Any]) -> None:
    if ns.over is None or ns.into is None:
        raise UsageError("%%infer: --over LIST and --into VAR go together")
    if ns.over not in user_ns:
        raise UsageError(f"%%infer --over: there is no variable {ns.over!r}")
    items = user_ns[ns.over]
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise UsageError(f"%%infer --over: {ns.over!r} must be a list (or tuple) of items, "
                         f"not {type(items).__name__}")
    for flag, value in (("--batch-size", ns.batch_size), ("--concurrency", ns.concurrency)):
        if value is not None and value < 1:
            raise UsageError(f"%%infer: {flag} must be >= 1, got {value}")
    from ..over import run_over

    # Each item's identity is its rendered prompt + the model + the options (kernel_ext.over):
    # only items whose prompt, model or options changed are answered again.
    prompts = [interpolate(template, {**user_ns, "item": item, "index": i})
               for i, item in enumerate(items)]
    results = run_over(ext.session, prompts, params, model=ns.model, name=f"infer:{ns.into}",
                       batch_size=ns.batch_size, concurrency=ns.concurrency,
                       progress=not ns.quiet)
    user_ns[ns.into] = results
    if results.interrupted:
        print(f"%%infer --over interrupted: {len(results) - results.missing} of {len(results)} "
              f"answers in {ns.into}; run the cell again to answer the rest")
        return
    if not ns.quiet or results.failed:
        print(f"{ns.into}: {results.summary}", file=sys.stderr if results.failed and ns.quiet
              else sys.stdout)
    if results and len(results.failed) == len(results):
        raise UsageError(f"%%infer --over: every item failed; {ns.into} holds the errors. "
                         f"First: {results.failed[0].error_type}: {results.failed[0].error}")
