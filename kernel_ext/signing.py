"""Model signatures with the OpenSSF ``model-signing`` library, verified offline.

A signature is a Sigstore bundle written by ``model_signing`` (its CLI: ``model_signing sign
key|certificate|sigstore MODEL --signature FILE``; Python: ``model_signing.signing.Config()``).
Two kinds are checked, both without any network access:

- **Key and certificate signatures** (``sign key``, ``sign certificate``) against the trusted
  material in ``%config KernelExt.signature_trusted_keys``: PEM public keys (elliptic curve) or
  PEM certificate chains (the signing certificate must chain to one of them).
- **Keyless Sigstore signatures** (``sign sigstore``: a short-lived Fulcio certificate naming
  the signer's identity and OIDC issuer, and a Rekor transparency-log entry, all inside the
  bundle) against ``signature_identities`` (identity -> OIDC issuer). The certificate chain,
  the log entry's signed promise and inclusion proof and the DSSE signature are checked by
  ``sigstore`` against a trust root read from disk: ``signature_trust_config`` when set, else
  Sigstore's production trust root shipped inside the installed ``sigstore`` package (TUF is
  never consulted, so a key rotated or revoked after that release is unknown until sigstore
  is updated or a newer trust root is configured).

On top of the library's own check (it re-hashes the model by its path), the SHA-256 the signed
manifest records for a single file must equal the digest of the bytes the loader parsed
(:meth:`GGUFFile.sha256`), so the signature covers exactly what is loaded. A directory model
(``digest=None``) is checked file by file by the library alone, honouring the manifest's
ignored paths.

Policy (``signature_policy``): ``optional`` verifies a signature when there is one (given with
``--signature`` or found beside the model as ``MODEL.gguf.sig``) and refuses the load when it
does not verify; ``require`` also refuses unsigned models. Every decision is an audit record
of kind ``model.signature``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SignatureError

__all__ = ["SignatureCheck", "find_signature", "trust_config_document", "verify_model_signature"]

POLICIES = ("optional", "require")

# Sigstore's production TUF repository, as the sigstore package names its embedded copy
_PRODUCTION_STORE = "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"
_CLIENT_TRUST_CONFIG = "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json"
# Fulcio's certificate extensions naming the OIDC issuer (v2: DER UTF8String; v1: raw string)
_OID_ISSUER_V2 = "1.3.6.1.4.1.57264.1.8"
_OID_ISSUER_V1 = "1.3.6.1.4.1.57264.1.1"
_IDENTITIES_HINT = "%config KernelExt.signature_identities = {'IDENTITY': 'OIDC_ISSUER_URL'}"


@dataclass(frozen=True)
class SignatureCheck:
    """What was decided about a model's signature."""

    outcome: str  # "verified" | "unsigned"
    signature: str | None = None
    # the key or certificate file, or for keyless signatures "IDENTITY (ISSUER)", that verified it
    trusted_by: str | None = None
    key_sha256: str | None = None  # fingerprint of that material (keyless: of the trust root)
    identity: str | None = None  # keyless only: the signer and its OIDC issuer, as trusted
    issuer: str | None = None
    trust_root: str | None = None  # keyless only: the trust root the chain was checked against


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
    digest: str | None,
    *,
    signature: str | os.PathLike[str] | None,
    trusted: list[str],
    policy: str,
    identities: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    trust_config: str | os.PathLike[str] | None = None,
) -> SignatureCheck:
    """Check ``model`` (a file whose parsed bytes have SHA-256 ``digest``, or a directory with
    ``digest=None``) under ``policy``, offline.

    Key and certificate signatures are checked against ``trusted`` (PEM files); keyless
    Sigstore signatures against ``identities`` (identity -> OIDC issuer) and ``trust_config``
    (a ClientTrustConfig or trusted-root file; default: the production root shipped with
    sigstore). Returns the decision; raises :class:`SignatureError` when the load must be
    refused."""
    if policy not in POLICIES:
        raise SignatureError(f"signature_policy must be one of {', '.join(POLICIES)}, "
                             f"not {policy!r}")
    model = Path(model)
    sig = find_signature(model, signature)
    if sig is None:
        if policy == "require":
            raise SignatureError(
                f"{model.name} is not signed and signature_policy is 'require': sign it "
                "(`model_signing sign key MODEL --private_key KEY --signature MODEL.sig`, or "
                "keyless: `model_signing sign sigstore MODEL --signature MODEL.sig`) and pass "
                "--signature FILE, or put MODEL.gguf.sig beside it")
        return SignatureCheck("unsigned")
    raw = sig.read_bytes()
    bundle = _read_bundle(raw, sig)
    if _is_keyless(bundle):
        check = _verify_keyless(model, raw, sig, bundle, _pairs(identities), trust_config)
    else:
        check = _verify_keyed(model, raw, sig, trusted)
    signed_digest = _signed_file_digest(bundle)
    if digest is not None and signed_digest is not None and signed_digest != digest:
        raise SignatureError(
            f"{model.name}: the signature in {sig.name} is valid for a file with SHA-256 "
            f"{signed_digest}, but the bytes loaded have {digest}: the file changed while "
            "it was being loaded")
    return check


def _verify_keyed(model: Path, raw: bytes, sig: Path, trusted: list[str]) -> SignatureCheck:
    """A ``sign key`` / ``sign certificate`` bundle against each trusted PEM file in turn."""
    if not trusted:
        raise SignatureError(
            f"{model.name} has a signature ({sig}) but no trusted key or certificate is "
            "configured: %config KernelExt.signature_trusted_keys = ['/path/to/key.pub.pem']")
    errors: list[str] = []
    for entry in trusted:
        material = Path(entry).expanduser()
        try:
            text = material.read_bytes()
        except OSError as e:
            errors.append(f"{material}: cannot read it: {e.strerror or e}")
            continue
        setup: dict[str, dict[str, Any]]
        if b"BEGIN CERTIFICATE" in text:
            setup = {"use_certificate_verifier": {"certificate_chain": [material]}}
        elif b"PUBLIC KEY" in text:
            setup = {"use_elliptic_key_verifier": {"public_key": material}}
        else:
            errors.append(f"{material.name}: not a PEM public key or certificate")
            continue
        try:
            _library_verify(model, raw, setup)
        except SignatureError as e:
            errors.append(f"{material.name}: {e}")
            continue
        return SignatureCheck("verified", str(sig), str(material),
                              hashlib.sha256(text).hexdigest())
    _refuse_if_tampered(model, sig, errors)
    raise SignatureError(
        f"the signature {sig.name} of {model.name} does not verify against any trusted key or "
        f"certificate ({'; '.join(errors)}); refusing to load it")


def _verify_keyless(model: Path, raw: bytes, sig: Path, bundle: dict[str, Any],
                    identities: list[tuple[str, str]],
                    trust_config: str | os.PathLike[str] | None) -> SignatureCheck:
    """A ``sign sigstore`` bundle against each trusted (identity, issuer), offline."""
    claimed = _claimed_signer(bundle)
    signer = (f"{claimed[0]} (issuer {claimed[1]})" if claimed
              else "a signer its certificate does not name readably")
    hint = (f"%config KernelExt.signature_identities = {{{claimed[0]!r}: {claimed[1]!r}}}"
            if claimed else _IDENTITIES_HINT)
    if not identities:
        raise SignatureError(
            f"{model.name} has a keyless Sigstore signature ({sig.name}) by {signer}, but no "
            f"signer is trusted for keyless signatures. Only if you trust that signer: {hint} "
            "(keys in signature_trusted_keys do not apply to keyless signatures)")
    document, source = trust_config_document(trust_config)
    errors: list[str] = []
    for identity, issuer in identities:
        setup = {"use_sigstore_verifier": {"identity": identity, "oidc_issuer": issuer}}
        try:
            _library_verify(model, raw, setup, trust_document=document)
        except SignatureError as e:
            errors.append(f"{identity} ({issuer}): {e}")
            continue
        return SignatureCheck("verified", str(sig), f"{identity} ({issuer})",
                              hashlib.sha256(document).hexdigest(), identity, issuer, source)
    _refuse_if_tampered(model, sig, errors)
    if claimed is None or claimed not in identities:
        raise SignatureError(
            f"the keyless signature {sig.name} of {model.name} was made by {signer}, which is "
            "not one of the trusted signers in signature_identities "
            f"({', '.join(f'{i} ({o})' for i, o in identities)}); refusing to load it. Only "
            f"if you trust that signer: {hint}")
    raise SignatureError(
        f"the keyless signature {sig.name} of {model.name} by {signer} does not verify against "
        f"the trust root ({source}): {'; '.join(errors)}; refusing to load it. A signature "
        "made with keys newer than that trust root needs a newer one: update sigstore "
        "(pip install -U sigstore) or set %config KernelExt.signature_trust_config (for a "
        "private Sigstore instance: its trusted_root.json)")


def _refuse_if_tampered(model: Path, sig: Path, errors: list[str]) -> None:
    """The signature verified but the model's files do not hash to its manifest."""
    mismatched = " ".join(e for e in errors if "Signature mismatch" in e or "Hash mismatch" in e)
    if mismatched:
        found = [("changed", re.findall(r"Hash mismatch for '([^']+)'", mismatched)),
                 ("not signed", re.findall(r"Extra files found in model '[^']*': ([^\"\]]+)",
                                           mismatched)),
                 ("missing", re.findall(r"Missing files in model '[^']*': ([^\"\]]+)",
                                        mismatched))]
        what = "; ".join(f"{k}: {', '.join(v)}" for k, v in found if v) or mismatched[:300]
        raise SignatureError(
            f"{model.name} does not match its signature {sig.name}: the "
            f"{'model' if model.is_dir() else 'file'} was modified after it was signed (or the "
            "signature belongs to another model); refusing to load it. Get it again from its "
            f"publisher. ({what})")


def _pairs(identities: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    items = identities.items() if isinstance(identities, Mapping) else identities
    return [(str(i), str(o)) for i, o in items]


def _read_bundle(raw: bytes, sig: Path) -> dict[str, Any]:
    try:
        bundle = json.loads(raw)
        payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        if not isinstance(payload["predicate"]["resources"], list):
            raise TypeError("the manifest lists no resources")
    except (ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"{sig} is not a model-signing signature (a Sigstore bundle with "
                             f"a DSSE envelope): {type(e).__name__}: {e}") from e
    bundle["_payload"] = payload
    return bundle


def _is_keyless(bundle: dict[str, Any]) -> bool:
    """A Sigstore (Fulcio + Rekor) bundle: it carries transparency-log entries, which
    model-signing's key and certificate signers never write."""
    material = bundle.get("verificationMaterial") or {}
    return bool(material.get("tlogEntries")) and "publicKey" not in material


def _signed_file_digest(bundle: dict[str, Any]) -> str | None:
    """The SHA-256 the signed manifest records for a single-file model, if it says so plainly
    (``files`` serialization, one resource); None for sharded or directory manifests."""
    predicate = bundle["_payload"]["predicate"]
    resources = predicate["resources"]
    serialization = predicate.get("serialization") or {}
    if (serialization.get("method") == "files" and len(resources) == 1
            and resources[0].get("algorithm") == "sha256"):
        return str(resources[0].get("digest"))
    return None


def _claimed_signer(bundle: dict[str, Any]) -> tuple[str, str] | None:
    """(identity, OIDC issuer) the bundle's leaf certificate names, unverified: for messages."""
    from cryptography import x509

    material: dict[str, Any] = bundle.get("verificationMaterial") or {}
    chain: list[dict[str, Any]] = (material.get("x509CertificateChain") or {}).get(
        "certificates") or [{}]
    leaf = (material.get("certificate") or {}).get("rawBytes") or chain[0].get("rawBytes")
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(leaf or b""))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = (san.get_values_for_type(x509.RFC822Name)
                 + san.get_values_for_type(x509.UniformResourceIdentifier))
        issuer = None
        for ext in cert.extensions:
            value = getattr(ext.value, "value", b"")
            if ext.oid.dotted_string == _OID_ISSUER_V2 and value[:1] == b"\x0c":
                issuer = _der_utf8(value)
            elif ext.oid.dotted_string == _OID_ISSUER_V1 and issuer is None:
                issuer = value.decode()
        if names and issuer:
            return str(names[0]), issuer
    except (ValueError, TypeError, LookupError, UnicodeDecodeError):
        pass
    return None


def _der_utf8(value: bytes) -> str:
    """The text of a DER UTF8String (tag 0x0c, short or long length form)."""
    n, at = value[1], 2
    if n & 0x80:
        size = n & 0x7F
        n, at = int.from_bytes(value[2:2 + size], "big"), 2 + size
    return value[at:at + n].decode()


@functools.lru_cache(maxsize=1)
def _shipped_trust_config() -> tuple[str, str]:
    """Sigstore's production trust root and signing config as the installed sigstore package
    ships them (no TUF refresh, no network), as one ClientTrustConfig JSON; and its name."""
    from importlib import metadata, resources

    store = resources.files("sigstore._store").joinpath(_PRODUCTION_STORE)
    try:
        root = json.loads(store.joinpath("trusted_root.json").read_text())
        signing = json.loads(store.joinpath("signing_config.v0.2.json").read_text())
    except (OSError, ValueError) as e:
        raise SignatureError(
            "the installed sigstore package ships no readable production trust root "
            f"({type(e).__name__}: {e}); set %config KernelExt.signature_trust_config to a "
            "Sigstore ClientTrustConfig or trusted_root.json file") from e
    document = {"mediaType": _CLIENT_TRUST_CONFIG, "trustedRoot": root, "signingConfig": signing}
    version = metadata.version("sigstore")
    return (json.dumps(document, sort_keys=True),
            f"Sigstore's production trust root shipped with sigstore {version}")


def trust_config_document(path: str | os.PathLike[str] | None) -> tuple[bytes, str]:
    """The ClientTrustConfig JSON keyless signatures are checked against, and where it comes
    from: the file at ``path`` (a ClientTrustConfig, or a bare ``trusted_root.json``), or the
    production trust root shipped with sigstore. Read from disk only."""
    if not path:
        text, source = _shipped_trust_config()
    else:
        file = Path(path).expanduser()
        try:
            doc = json.loads(file.read_bytes())
        except OSError as e:
            raise SignatureError(f"signature_trust_config: cannot read {file}: "
                                 f"{e.strerror or e}") from e
        except ValueError as e:
            raise SignatureError(f"signature_trust_config: {file} is not JSON: {e}") from e
        media = str(doc.get("mediaType", "")) if isinstance(doc, dict) else ""
        if media.startswith("application/vnd.dev.sigstore.trustedroot"):
            shipped = json.loads(_shipped_trust_config()[0])
            doc = {"mediaType": _CLIENT_TRUST_CONFIG, "trustedRoot": doc,
                   "signingConfig": shipped["signingConfig"]}  # unused when verifying
        elif not media.startswith("application/vnd.dev.sigstore.clienttrustconfig"):
            raise SignatureError(
                f"signature_trust_config: {file} is neither a Sigstore ClientTrustConfig nor a "
                f"trusted root (its mediaType is {media or 'missing'!r}); give the "
                "trusted_root.json of your Sigstore instance, or leave the setting empty for "
                "Sigstore's public-good instance")
        text, source = json.dumps(doc, sort_keys=True), str(file)
    from sigstore.models import ClientTrustConfig

    try:
        ClientTrustConfig.from_json(text)
    except Exception as e:  # any parse failure is a bad trust root
        raise SignatureError(f"the trust root {source} is not a valid Sigstore trust "
                             f"configuration: {type(e).__name__}: {e}") from e
    return text.encode(), source


def _library_verify(model: Path, raw: bytes, setup: dict[str, dict[str, Any]], *,
                    trust_document: bytes | None = None) -> None:
    """model-signing's verification of the bundle ``raw`` with one verifier ``setup``
    (``{Config method: its arguments}``)."""
    from model_signing import verifying

    # verify the very bytes we read the manifest from, not the file again
    with tempfile.TemporaryDirectory(prefix="kernel_ext-sig-") as tmp:
        bundle = Path(tmp) / "model.sig"
        bundle.write_bytes(raw)
        try:
            config = verifying.Config()
            for method, kwargs in setup.items():
                if trust_document is not None:
                    trust = Path(tmp) / "trust_config.json"
                    trust.write_bytes(trust_document)
                    kwargs = {**kwargs, "trust_config": trust}
                getattr(config, method)(**kwargs)
            config.verify(model, bundle)
        except SignatureError:
            raise
        except Exception as e:  # every library failure is a refusal
            raise SignatureError(" ".join(f"{type(e).__name__}: {e}".split())[:600]) from e


def describe(check: SignatureCheck) -> dict[str, Any]:
    out = {"outcome": check.outcome, "signature": check.signature,
           "trusted_by": check.trusted_by, "key_sha256": check.key_sha256}
    if check.identity is not None:
        out.update(identity=check.identity, issuer=check.issuer, trust_root=check.trust_root)
    return out
