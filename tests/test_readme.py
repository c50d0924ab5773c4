"""The README stays true: every setting and magic is documented, the two commands exist."""

from __future__ import annotations

import re
from pathlib import Path

from kernel_ext.config import KernelExtConfig
from kernel_ext.magics import _COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_with_its_default() -> None:
    for name, trait in KernelExtConfig.class_traits(config=True).items():
        assert f"| `{name}` | `{trait.default()!r}` |" in README, name


def test_every_magic_is_documented() -> None:
    for magic in _COMMANDS:
        assert re.search(rf"%%?{magic}\b", README), magic


def test_two_commands_and_ci() -> None:
    assert "make demo" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_notebook_is_listed() -> None:
    for nb in (ROOT / "notebooks").glob("[0-9]*.ipynb"):
        if not nb.name.endswith(".out.ipynb"):
            assert nb.name in README, nb.name
