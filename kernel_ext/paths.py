"""Where kernel_ext keeps things: per-notebook state and the per-user cache."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["notebook_path", "notebook_state_dir", "user_cache_dir"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def notebook_path(user_ns: dict[str, Any] | None = None) -> str | None:
    """The notebook this kernel belongs to, as JupyterLab tells the kernel, or None.

    JupyterLab sets ``JPY_SESSION_NAME`` in the kernel's environment; ipykernel also puts it in
    the namespace as ``__session__``.
    """
    name = os.environ.get("JPY_SESSION_NAME")
    if not name and user_ns is not None:
        value = user_ns.get("__session__")
        name = value if isinstance(value, str) else None
    return name or None


def notebook_state_dir(user_ns: dict[str, Any] | None = None, cwd: str | Path | None = None) -> Path:
    """``.kernel_ext/<notebook stem>/`` beside the notebook.

    Without a notebook (a plain IPython shell, a script) the fallback is stable for a working
    directory: ``<cwd>/.kernel_ext/_default/``.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    name = notebook_path(user_ns)
    if not name:
        return base / ".kernel_ext" / "_default"
    nb = Path(name)
    if not nb.is_absolute():
        nb = base / nb
    stem = _UNSAFE.sub("_", nb.stem) or "notebook"
    # Two notebooks with the same name in one folder cannot exist; the stem is enough.
    return nb.parent / ".kernel_ext" / stem


def user_cache_dir(configured: str = "") -> Path:
    """The per-user cache: the setting, then $KERNEL_EXT_CACHE, then ~/.cache/kernel_ext."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("KERNEL_EXT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "kernel_ext"


def short_hash(text: str, n: int = 12) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]
