"""Optional authenticated encryption of snapshot objects (AES-GCM, ``cryptography``).

The key is base64 (16, 24 or 32 bytes) in the environment variable named by
``KernelExt.checkpoint_key_env``. Data is sealed in 64 MiB frames, each with its own random
nonce and associated data binding it to the object's name, its frame number and whether it
is the last frame, so frames cannot be swapped, dropped or moved to another object.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct

from ..errors import CheckpointCorruptError, CheckpointError

__all__ = ["MAGIC", "Cipher", "key_from_env"]

MAGIC = b"KXE1"
FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct("<12sQ")  # nonce, ciphertext length


def key_from_env(env_name: str) -> bytes | None:
    """The key from ``$env_name`` (None when unset or empty)."""
    if not env_name:
        return None
    text = os.environ.get(env_name, "").strip()
    if not text:
        return None
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CheckpointError(
            f"${env_name} is not valid base64; set it to base64 of 32 random bytes, e.g. "
            "python -c \"import os,base64;print(base64.b64encode(os.urandom(32)).decode())\""
        ) from e
    if len(key) not in (16, 24, 32):
        raise CheckpointError(f"${env_name} decodes to {len(key)} bytes; an AES key has 16, 24 "
                              "or 32 bytes (use 32)")
    return key


class Cipher:
    """AES-GCM sealing of whole objects, framed."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)

    def seal(self, name: str, data: bytes | memoryview) -> bytes:
        view = memoryview(data).cast("B")
        count = max(1, -(-len(view) // FRAME))
        out = [MAGIC, struct.pack("<I", count)]
        for i in range(count):
            nonce = os.urandom(12)
            chunk = bytes(view[i * FRAME:(i + 1) * FRAME])
            ct = self._aead.encrypt(nonce, chunk, _aad(name, i, count))
            out.append(_HEADER.pack(nonce, len(ct)))
            out.append(ct)
        return b"".join(out)

    def open(self, name: str, sealed: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        if sealed[:4] != MAGIC or len(sealed) < 8:
            raise CheckpointCorruptError(f"{name}: not an encrypted kernel_ext object")
        (count,) = struct.unpack_from("<I", sealed, 4)
        pos, out = 8, []
        try:
            for i in range(count):
                nonce, length = _HEADER.unpack_from(sealed, pos)
                pos += _HEADER.size
                ct = sealed[pos:pos + length]
                if len(ct) != length:
                    raise CheckpointCorruptError(f"{name}: truncated encrypted object")
                pos += length
                out.append(self._aead.decrypt(nonce, ct, _aad(name, i, count)))
        except (InvalidTag, struct.error) as e:
            raise CheckpointCorruptError(
                f"{name}: authentication failed: the snapshot was tampered with, is damaged, "
                "or was written with another key") from e
        if pos != len(sealed):
            raise CheckpointCorruptError(f"{name}: trailing bytes after the encrypted object")
        return b"".join(out)


def is_sealed(data: bytes) -> bool:
    return data[:4] == MAGIC


def _aad(name: str, index: int, count: int) -> bytes:
    return f"kernel_ext:{name}:{index}:{count}".encode()
