"""SHA-256 of model files, and checking a file against a pinned digest."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import IntegrityError

__all__ = ["check_pin", "normalize_sha256", "sha256_file", "verify_sha256"]

_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 8 << 20,
                progress: Callable[[int, int], object] | None = None) -> str:
    """The lowercase hex SHA-256 of the file at ``path``.

    ``progress(done_bytes, total_bytes)`` is called after every chunk (and once at the start).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of bytes, got {chunk}")
    p = Path(os.fspath(path))
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(p, "rb") as fh:
        total = os.fstat(fh.fileno()).st_size
        done = 0
        if progress is not None:
            progress(0, total)
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            done += n
            if progress is not None:
                progress(done, total)
    return h.hexdigest()


def normalize_sha256(pin: str) -> str:
    """``pin`` as 64 lowercase hex digits; accepts upper case, surrounding blanks and a
    ``sha256:`` prefix. Raises :class:`IntegrityError` for anything else."""
    if not isinstance(pin, str):
        raise IntegrityError(f"a SHA-256 pin must be a string of 64 hex digits, got "
                             f"{type(pin).__name__}")
    s = pin.strip().lower()
    if s.startswith("sha256:"):
        s = s[len("sha256:"):].strip()
    if not _HEX64.fullmatch(s):
        shown = pin if len(pin) <= 80 else pin[:77] + "..."
        raise IntegrityError(
            f"malformed SHA-256 pin {shown!r}: expected 64 hex digits (0-9, a-f), got "
            f"{len(s)} characters; copy the digest again (e.g. from `sha256sum FILE`)")
    return s


def verify_sha256(path: str | os.PathLike[str], expected: str | None) -> str:
    """Hash ``path`` and compare it with ``expected`` (if given); return the actual digest.

    Raises :class:`IntegrityError` naming both digests when they differ.
    """
    pin = normalize_sha256(expected) if expected is not None else None
    actual = sha256_file(path)
    check_pin(path, actual, pin)
    return actual


def check_pin(path: str | os.PathLike[str], actual: str, expected: str | None) -> None:
    """Compare a digest already computed (e.g. :meth:`GGUFFile.sha256`, over the bytes that
    were parsed) with the pin ``expected`` (any form :func:`normalize_sha256` accepts)."""
    if expected is None:
        return
    pin = normalize_sha256(expected)
    if actual != pin:
        raise IntegrityError(
            f"{os.fspath(path)} has SHA-256 {actual}, but the pin expects {pin}: the file is "
            "corrupt, incomplete or a different version. Download it again, or update the pin "
            "if you changed the file on purpose.")
