"""``%%infer``: the cell body is the prompt.

    %%infer [--model M] [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
            [--stop STR]... [--system TEXT] [--chat | --no-chat] [--timeout S]
            [-o VAR] [--no-stream] [--quiet] [--over LIST --into VAR]
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from IPython.core.error import UsageError

from ..prompt import interpolate
from ..providers.base import GenerationParams, GenerationResult
from ._args import MagicParser

__all__ = ["run", "parser"]

MAX_NEW_TOKENS_CAP = 32768


def parser() -> MagicParser:
    p = MagicParser("%%infer", description="Run the cell as a prompt; {var} interpolates variables.")
    p.add_argument("--model", "-m", help="model name (default: the last loaded; see %%model list)")
    p.add_argument("--max-new-tokens", "-n", type=int, help="tokens to generate at most")
    p.add_argument("--temperature", "-t", type=float, help="0 = greedy and deterministic")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="sample from the K most likely (0: off)")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[],
                   help=r"stop string (repeatable); \n, \t, \r and \\ are escapes")
    p.add_argument("--system", help="system prompt")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="use the model's chat template (error if it has none)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="plain completion")
    p.add_argument("--timeout", type=float, help="seconds; partial text is returned, marked")
    p.add_argument("-o", "--out", help="store the result object in this variable")
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing (use with -o)")
    p.add_argument("--over", help="run the prompt once per element of this list ({item})")
    p.add_argument("--into", help="with --over: the variable that receives the list of answers")
    return p


def _params(ns: Any, config: Any) -> GenerationParams:
    max_new = ns.max_new_tokens if ns.max_new_tokens is not None else config.max_new_tokens
    temperature = ns.temperature if ns.temperature is not None else config.temperature
    timeout = ns.timeout if ns.timeout is not None else config.timeout
    if not 1 <= max_new <= MAX_NEW_TOKENS_CAP:
        raise UsageError(f"%%infer: --max-new-tokens must be between 1 and {MAX_NEW_TOKENS_CAP}, got {max_new}")
    if temperature < 0:
        raise UsageError(f"%%infer: --temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < ns.top_p <= 1:
        raise UsageError(f"%%infer: --top-p must be in (0, 1], got {ns.top_p}")
    if ns.top_k < 0:
        raise UsageError(f"%%infer: --top-k must be >= 0, got {ns.top_k}")
    if timeout < 0:
        raise UsageError(f"%%infer: --timeout must be >= 0 seconds, got {timeout}")
    return GenerationParams(
        max_new_tokens=max_new, temperature=temperature, top_p=ns.top_p, top_k=ns.top_k,
        seed=ns.seed, stop=tuple(_unescape(s) for s in ns.stop if s), system=ns.system, chat=ns.chat,
        timeout=timeout or None,
    )


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(text: str) -> str:
    """``--stop "\\n"`` means a newline: a magic line cannot hold a real one."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _check_name(flag: str, name: str | None) -> None:
    if name is not None and not name.isidentifier():
        raise UsageError(f"%%infer: {flag} needs a Python variable name, got {name!r}")


def _footer(result: GenerationResult) -> None:
    from IPython.display import display

    text = result.footer()
    colour = "#b45309" if (result.cached or result.timed_out) else "#6b7280"
    display({
        "text/plain": f"── {text}",
        "text/html": f'<div class="kernel-ext-footer" style="color:{colour};font-size:0.85em;'
                     f'border-top:1px solid #e5e7eb;margin-top:4px">{html.escape(text)}</div>',
    }, raw=True)


def _stream_to_stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def run(ext: Any, magic: str, line: str, cell: str | None = None) -> Any:
    ns = parser().parse(line)
    for flag, value in (("-o/--out", ns.out), ("--over", ns.over), ("--into", ns.into)):
        _check_name(flag, value)
    if ns.quiet and ns.out is None and ns.into is None:
        raise UsageError("%%infer: --quiet prints nothing, so give -o VAR (or --into VAR) to keep the result")
    template = (cell or "").rstrip()
    if not template.strip():
        raise UsageError("%%infer: the cell is empty; write the prompt in the cell body")
    params = _params(ns, ext.session.config)
    user_ns = ext.shell.user_ns
    if ns.over is not None or ns.into is not None:
        return _run_over(ext, ns, template, params, user_ns)
    prompt = interpolate(template, user_ns)
    stream = ext.session.config.stream and not ns.no_stream and not ns.quiet
    result = ext.session.infer(prompt, params, model=ns.model,
                               on_token=_stream_to_stdout if stream else None)
    if not ns.quiet:
        if not stream:
            print(result.text, end="")
        print()
        _footer(result)
    if ns.out:
        user_ns[ns.out] = result
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
    from ..checkpoint.tasks import task

    # The task's name covers what makes an answer: a changed prompt, model or option starts
    # over instead of reusing old answers. Items travel with their index (as lists, which the
    # task fingerprints) so {index} is right and a changed item is answered again.
    model = ns.model or ext.session.models.active
    recipe = json.dumps([template, model, params.cache_key()], sort_keys=True, default=str)
    name = f"infer:{ns.into}:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    t = task(name, [[i, item] for i, item in enumerate(items)], key=lambda pair: pair[0],
             session=ext.session, progress=not ns.quiet)
    for index, item in t:
        prompt = interpolate(template, {**user_ns, "item": item, "index": index})
        result = ext.session.infer(prompt, params, model=ns.model)
        t.record(result.text)
    user_ns[ns.into] = list(t.results)
    if not ns.quiet:
        print(f"{len(t.results)} answers in {ns.into}")
