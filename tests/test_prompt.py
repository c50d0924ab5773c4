"""{variable} interpolation and sandboxed chat templates."""

from __future__ import annotations

import pytest

from kernel_ext.errors import KernelExtError, PromptError, TemplateError
from kernel_ext.prompt import interpolate, render_chat_template


class Doc:
    title = "Zarr"
    _secret = "no"


NS = {"name": "Ada", "doc": "x" * 500, "rows": [10, 20, 30], "cfg": {"lang": "fr"}, "score": 0.12345,
      "obj": Doc()}


@pytest.mark.parametrize(
    "template, expected",
    [
        ("Hello {name}", "Hello Ada"),
        ("{doc[:3]}", "xxx"),
        ("{rows[0]} {rows[-1]}", "10 30"),
        ("{rows[::2]}", "[10, 30]"),
        ("{cfg['lang']}", "fr"),
        ('{cfg["lang"]}', "fr"),
        ("{obj.title}", "Zarr"),
        ("{score:.2f}", "0.12"),
        ("{name!r}", "'Ada'"),
        ("{{literal}} {name}", "{literal} Ada"),
        ("no fields", "no fields"),
    ],
)
def test_interpolation_fills_safe_fields(template: str, expected: str) -> None:
    assert interpolate(template, NS) == expected


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{missing}", "no variable 'missing'"),
        ("{name.upper()}", "not evaluated"),
        ("{__import__('os').system('true')}", "not evaluated"),
        ("{rows[0] + 1}", "not evaluated"),
        ("{obj._secret}", "private attributes"),
        ("{obj.__class__}", "private attributes"),
        ("{rows[name]}", "literal integers or strings"),
        ("{rows[10]}", "cannot index list"),
        ("{cfg['nope']}", "cannot index dict"),
        ("{obj.nope}", "has no attribute"),
        ("{}", "empty {}"),
        ("{ name", "unbalanced braces"),
        ("name }", "unbalanced braces"),
        ("{score:{name}}", "nested fields"),
        ("{name:d}", "{name:d}"),
    ],
)
def test_interpolation_refuses_with_a_clear_prompt_error(template: str, fragment: str) -> None:
    with pytest.raises(PromptError) as info:
        interpolate(template, NS)
    assert fragment in str(info.value)
    assert isinstance(info.value, KernelExtError) and isinstance(info.value, ValueError)


def test_interpolation_never_calls_anything() -> None:
    calls = []

    class Spy:
        @property
        def boom(self) -> str:  # attribute access is allowed and runs properties, calls are not
            return "prop"

        def __call__(self) -> None:
            calls.append(1)

    assert interpolate("{s.boom}", {"s": Spy()}) == "prop"
    with pytest.raises(PromptError):
        interpolate("{s()}", {"s": Spy()})
    assert calls == []


GEMMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
    "else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_chat_template_renders_messages() -> None:
    out = render_chat_template(GEMMA_LIKE, [{"role": "user", "content": " Hi "}], bos_token="<bos>")
    assert out == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_chat_template_raise_exception_is_a_template_error() -> None:
    tpl = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(TemplateError, match="System role not supported"):
        render_chat_template(tpl, [])


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{{ messages.__class__.__mro__ }}", "unsafe"),
        ("{{ ''.__class__.__subclasses__() }}", "unsafe"),
        ("{% set x = messages.append(1) %}", "unsafe"),
        ("{% for i in range(10) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop"),
        ("{{ 'x' * 100000000 }}", "output cap"),
        ("{% for i in range(100000) %}xxxxxxxxxxxxxxxxxxxx{% endfor %}", "exceeds"),
        ("{{ 9 ** 999999 }}", "power"),
        ("{% if %}", "failed to render"),
    ],
)
def test_chat_template_sandbox_refuses(template: str, fragment: str) -> None:
    with pytest.raises(TemplateError) as info:
        render_chat_template(template, [{"role": "user", "content": "hi"}], max_output_chars=100_000)
    assert fragment in str(info.value)  # and it returns: a hang would hit pytest-timeout


def test_chat_template_size_cap() -> None:
    with pytest.raises(TemplateError, match="over the cap"):
        render_chat_template("x" * 100, [], max_template_chars=10)
