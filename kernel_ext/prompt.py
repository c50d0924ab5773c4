"""Prompt building: ``{variable}`` interpolation and sandboxed chat templates.

Interpolation (decided and documented in the README):
- ``{name}`` is replaced by ``str(value)`` of a notebook variable; ``{{`` and ``}}`` are literal braces.
- Format specs are bounded: a width or precision (any number in the spec) above
  :data:`MAX_FORMAT_NUMBER` is refused, so ``{x:99999999999}`` is a clear error, not a
  ``MemoryError``.
- A safe subset of expressions is allowed: attribute access (``{doc.title}``, no names starting
  with ``_``), indexing with literal keys (``{rows[0]}``, ``{cfg['lang']}``) and slicing with
  literal integers (``{doc[:200]}``), plus ``!r``/``!s`` conversions and format specs
  (``{score:.2f}``). Nothing is ``eval``-ed: no calls, operators or comprehensions; they are
  refused with a :class:`PromptError` that says what is allowed.

Chat templates (from GGUF metadata ``tokenizer.chat_template``) are rendered only in Jinja's
immutable sandbox, with caps on template size, render time (loop iterations and a deadline) and
output size.
"""

from __future__ import annotations

import ast
import re
import string
import time
from collections.abc import Mapping
from typing import Any

from jinja2 import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .errors import PromptError, TemplateError

__all__ = ["ALLOWED_EXPRESSIONS", "MAX_FORMAT_NUMBER", "interpolate", "render_chat_template"]

MAX_FORMAT_NUMBER = 10_000
"""The largest width or precision a ``{name:spec}`` format spec may ask for."""
# [[fill]align][sign][z][#][0][width][grouping][.precision][type]: the standard mini-language
_STANDARD_SPEC = re.compile(
    r"^(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d+))?[a-zA-Z%]?$", re.DOTALL
)

ALLOWED_EXPRESSIONS = (
    "{name}, {name.attr}, {name[0]}, {name['key']}, {name[:200]}, {name!r}, {name:.2f}; "
    "write {{ and }} for literal braces"
)
_MISSING = object()


def _literal(node: ast.AST, field: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str)):
        return node.value
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, int)):
        return -node.operand.value
    raise PromptError(
        f"{{{field}}}: only literal integers or strings may appear inside [ ]; allowed: "
        f"{ALLOWED_EXPRESSIONS}"
    )


def _evaluate(node: ast.AST, ns: Mapping[str, Any], field: str) -> Any:
    if isinstance(node, ast.Name):
        value = ns.get(node.id, _MISSING)
        if value is _MISSING:
            raise PromptError(
                f"{{{field}}}: there is no variable {node.id!r} in the notebook; define it first, "
                "or write {{ and }} for literal braces"
            )
        return value
    if isinstance(node, ast.Attribute):
        if node.attr.startswith("_"):
            raise PromptError(f"{{{field}}}: private attributes ({node.attr!r}) are not allowed")
        base = _evaluate(node.value, ns, field)
        try:
            return getattr(base, node.attr)
        except AttributeError as e:
            raise PromptError(f"{{{field}}}: {type(base).__name__} has no attribute {node.attr!r}") from e
    if isinstance(node, ast.Subscript):
        base = _evaluate(node.value, ns, field)
        sl = node.slice
        if isinstance(sl, ast.Slice):
            key: Any = slice(*(None if part is None else _literal(part, field)
                               for part in (sl.lower, sl.upper, sl.step)))
        else:
            key = _literal(sl, field)
        try:
            return base[key]
        except (LookupError, TypeError, ValueError) as e:
            raise PromptError(f"{{{field}}}: cannot index {type(base).__name__} with {key!r}: {e}") from e
    raise PromptError(f"{{{field}}}: expressions are not evaluated; allowed: {ALLOWED_EXPRESSIONS}")


def _check_spec(field: str, spec: str) -> None:
    """Refuse a width or precision above :data:`MAX_FORMAT_NUMBER` before formatting."""
    m = _STANDARD_SPEC.match(spec)
    if m is not None:
        parts = [("width", m.group("width")), ("precision", m.group("precision"))]
    else:  # a type's own spec (dates: {when:%Y-%m-%d}): bound every number in it
        parts = [("number", n) for n in re.findall(r"\d+", spec)]
    for what, digits in parts:
        if digits and (len(digits) > 6 or int(digits) > MAX_FORMAT_NUMBER):
            hint = "" if what == "width" else (
                f"; to cut text short use a slice such as {{{field}[:200]}}")
            raise PromptError(
                f"{{{field}:{spec}}}: a format {what} of {digits} is too large (at most "
                f"{MAX_FORMAT_NUMBER}){hint}"
            )


def interpolate(template: str, namespace: Mapping[str, Any]) -> str:
    """Fill ``{...}`` fields of ``template`` from ``namespace`` (see the module docstring)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise PromptError(f"unbalanced braces in the prompt ({e}); write {{{{ and }}}} for literal braces") from e
    out: list[str] = []
    for literal, field, spec, conversion in parts:
        out.append(literal)
        if field is None:
            continue
        if not field.strip():
            raise PromptError("empty {} in the prompt; put a variable name inside or write {{ }}")
        try:
            tree = ast.parse(field.strip(), mode="eval")
        except SyntaxError as e:
            raise PromptError(f"{{{field}}} is not a variable reference; allowed: {ALLOWED_EXPRESSIONS}") from e
        value = _evaluate(tree.body, namespace, field)
        if conversion == "r":
            value = repr(value)
        elif conversion == "a":
            value = ascii(value)
        if spec and ("{" in spec or "}" in spec):
            raise PromptError(f"{{{field}:{spec}}}: nested fields in a format spec are not allowed")
        if spec:
            _check_spec(field, spec)
        try:
            out.append(format(value, spec or "") if spec else str(value))
        except (ValueError, TypeError, OverflowError, MemoryError) as e:
            raise PromptError(f"{{{field}:{spec}}}: {type(e).__name__}: {e}") from e
    return "".join(out)


# --- chat templates --------------------------------------------------------------------------------
class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """An immutable sandbox that also bounds loop work, string repetition and time."""

    intercepted_binops = frozenset(["*", "**"])

    def __init__(self, *, max_iterations: int, deadline_s: float, max_output: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.max_iterations = max_iterations
        self.deadline_s = deadline_s
        self.max_output = max_output
        self._deadline = 0.0
        self._iterations = 0

    def start(self) -> None:
        self._deadline = time.monotonic() + self.deadline_s
        self._iterations = 0

    def tick(self, n: int = 1) -> None:
        self._iterations += n
        if self._iterations > self.max_iterations:
            raise TemplateError(f"chat template did more than {self.max_iterations} loop steps; refused")
        if time.monotonic() > self._deadline:
            raise TemplateError(f"chat template took longer than {self.deadline_s} s to render; refused")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and isinstance(right, int) and isinstance(left, (str, list)):
            if len(left) * right > self.max_output:
                raise TemplateError("chat template builds a string larger than the output cap")
        if operator == "**" and isinstance(right, int) and right > 64:
            raise TemplateError("chat template raises to a power above 64; refused")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.tick()
        return super().getitem(obj, argument)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        self.tick()
        return super().call(__context, __obj, *args, **kwargs)


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template refused the conversation: {message}")


def render_chat_template(
    template: str,
    messages: list[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    max_template_chars: int = 65536,
    max_output_chars: int = 262144,
    max_seconds: float = 2.0,
    max_iterations: int = 200_000,
) -> str:
    """Render a GGUF chat template safely; raises :class:`TemplateError` on any problem."""
    if len(template) > max_template_chars:
        raise TemplateError(
            f"the model's chat template has {len(template)} characters, over the cap of "
            f"{max_template_chars} (%config KernelExt.template_max_chars); use --no-chat"
        )
    env = _BudgetedSandbox(max_iterations=max_iterations, deadline_s=max_seconds,
                           max_output=max_output_chars)
    env.globals["raise_exception"] = _raise_exception
    env.globals["range"] = _counting_range(env)
    try:
        compiled = env.from_string(template)
        env.start()
        size = 0
        chunks: list[str] = []
        for chunk in compiled.generate(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                       add_generation_prompt=add_generation_prompt):
            size += len(chunk)
            if size > max_output_chars:
                raise TemplateError(f"the rendered chat prompt exceeds {max_output_chars} characters")
            env.tick()
            chunks.append(chunk)
        return "".join(chunks)
    except TemplateError:
        raise
    except SecurityError as e:
        raise TemplateError(f"the chat template tried something unsafe and was stopped: {e}") from e
    except (JinjaTemplateError, TypeError, ValueError, LookupError, ArithmeticError, RecursionError) as e:
        raise TemplateError(f"the chat template failed to render: {type(e).__name__}: {e}; "
                            "use --no-chat to send the prompt as plain text") from e


def _counting_range(env: _BudgetedSandbox) -> Any:
    def bounded_range(*args: int) -> Any:
        r = range(*args)
        if len(r) > env.max_iterations:
            raise TemplateError(f"range of {len(r)} items in the chat template exceeds the loop cap")
        for i in r:
            env.tick()
            yield i

    return bounded_range
