"""Model signatures with the OpenSSF ``model-signing`` library, verified offline.

A signature is a Sigstore bundle written by ``model_signing`` (its CLI: ``model_signing sign
key|certificate MODEL --signature FILE``; Python: ``model_signing.signing.Config()``). It is
checked against the trusted material in ``%config KernelExt.signature_trusted_keys``: PEM
public keys (elliptic-curve, ``sign key``) or PEM certificate chains (``sign certificate``; the
signing certificate must chain to one of them). No network is used.

On top of the library's own check (it re-hashes the file by its path), the SHA-256 the signed
manifest records for the file must equal the digest of the bytes the loader parsed
(:meth:`GGUFFile.sha256`), so the signature covers exactly what is loaded.

Policy (``signature_policy``): ``optional`` verifies a signature when there is one (given with
``--signature`` or found beside the model as ``MODEL.gguf.sig``) and refuses the load when it
does not verify; ``require`` also refuses unsigned models. Every decision is an audit record
of kind ``model.signature``.

Keyless Sigstore bundles (Fulcio certificates, Rekor entries) are checked by ``model-signing``
against Sigstore's trust root, fetched over the network unless a trust configuration file is
given; they are not supported here (none could be produced or tested offline; see the README).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SignatureError

__all__ = ["SignatureCheck", "find_signature", "verify_model_signature"]

POLICIES = ("optional", "require")


@dataclass(frozen=True)
class SignatureCheck:
    """What was decided about a model's signature."""

    outcome: str  # "verified" | "unsigned"
    signature: str | None = None
    trusted_by: str | None = None  # the key or certificate file that verified it
    key_sha256: str | None = None  # fingerprint of that material


def find_signature(model: Path, given: str | os.PathLike[str] | None) -> Path | None:
    """The signature file: ``given`` (which must exist), else ``MODEL.sig`` beside the model."""
    if given:
        sig = Path(given).expanduser()
        if not sig.is_file():
            raise SignatureError(f"no signature file at {sig}: give the path of the .sig file "
                                 "written by `model_signing sign`")
        return sig
    beside = model.with_name(model.name + ".sig")
    return beside if beside.is_file() else None


def verify_model_signature(
    model: Path,
    digest: str,
    *,
    signature: str | os.PathLike[str] | None,
    trusted: list[str],
    policy: str,
) -> SignatureCheck:
    """Check ``model`` (whose parsed bytes have SHA-256 ``digest``) under ``policy``.

    Returns the decision; raises :class:`SignatureError` when the load must be refused."""
    if policy not in POLICIES:
        raise SignatureError(f"signature_policy must be one of {', '.join(POLICIES)}, "
                             f"not {policy!r}")
    sig = find_signature(model, signature)
    if sig is None:
        if policy == "require":
            raise SignatureError(
                f"{model.name} is not signed and signature_policy is 'require': sign it "
                "(`model_signing sign key MODEL --private_key KEY --signature MODEL.sig`) and "
                "pass --signature FILE, or put MODEL.gguf.sig beside it")
        return SignatureCheck("unsigned")
    if not trusted:
        raise SignatureError(
            f"{model.name} has a signature ({sig}) but no trusted key or certificate is "
            "configured: %config KernelExt.signature_trusted_keys = ['/path/to/key.pub.pem']")
    raw = sig.read_bytes()
    signed_digest = _signed_file_digest(raw, sig)
    errors: list[str] = []
    for entry in trusted:
        material = Path(entry).expanduser()
        try:
            text = material.read_bytes()
        except OSError as e:
            errors.append(f"{material}: cannot read it: {e.strerror or e}")
            continue
        try:
            _verify_with(model, raw, material, text)
        except SignatureError as e:
            errors.append(f"{material.name}: {e}")
            continue
        if signed_digest is not None and signed_digest != digest:
            raise SignatureError(
                f"{model.name}: the signature in {sig.name} is valid for a file with SHA-256 "
                f"{signed_digest}, but the bytes loaded have {digest}: the file changed while "
                "it was being loaded")
        return SignatureCheck("verified", str(sig), str(material),
                              hashlib.sha256(text).hexdigest())
    tampered = [e for e in errors if "Hash mismatch" in e or "hash mismatch" in e]
    if tampered:
        raise SignatureError(
            f"{model.name} does not match its signature {sig.name}: the file was modified "
            "after it was signed (or the signature belongs to another file); refusing to load "
            "it. Get the file again from its publisher.")
    raise SignatureError(
        f"the signature {sig.name} of {model.name} does not verify against any trusted key or "
        f"certificate ({'; '.join(errors)}); refusing to load it")


def _signed_file_digest(raw: bytes, sig: Path) -> str | None:
    """The SHA-256 the signed manifest records for a single-file model, if it says so plainly
    (``files`` serialization, one resource); None for sharded or directory manifests."""
    try:
        bundle = json.loads(raw)
        payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        predicate = payload["predicate"]
        resources = predicate["resources"]
    except (ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"{sig} is not a model-signing signature (a Sigstore bundle with "
                             f"a DSSE envelope): {type(e).__name__}: {e}") from e
    serialization = predicate.get("serialization") or {}
    if (serialization.get("method") == "files" and len(resources) == 1
            and resources[0].get("algorithm") == "sha256"):
        return str(resources[0].get("digest"))
    return None


def _verify_with(model: Path, raw: bytes, material: Path, text: bytes) -> None:
    """model-signing's verification of the bundle ``raw`` with one trusted key/certificate."""
    from model_signing import verifying

    config = verifying.Config()
    if b"BEGIN CERTIFICATE" in text:
        config.use_certificate_verifier(certificate_chain=[material])
    elif b"PUBLIC KEY" in text:
        config.use_elliptic_key_verifier(public_key=material)
    else:
        raise SignatureError("not a PEM public key or certificate")
    # verify the very bytes we parsed the digest from, not the file again
    fd, name = tempfile.mkstemp(suffix=".sig")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        config.verify(model, name)
    except SignatureError:
        raise
    except Exception as e:
        raise SignatureError(" ".join(f"{type(e).__name__}: {e}".split())[:300]) from e
    finally:
        os.unlink(name)


def describe(check: SignatureCheck) -> dict[str, Any]:
    return {"outcome": check.outcome, "signature": check.signature,
            "trusted_by": check.trusted_by, "key_sha256": check.key_sha256}
