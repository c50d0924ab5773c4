"""A private Sigstore instance made in the test, as an organisation runs its own: a Fulcio-style
certificate authority, a certificate-transparency log key and a Rekor log key, its
``trusted_root.json``, and keyless bundles for models in the format ``model_signing sign
sigstore`` writes (bundle v0.3: a short-lived certificate naming the signer's identity and OIDC
issuer with an embedded SCT, a DSSE envelope, and a dsse/0.0.1 Rekor entry with its signed
entry timestamp and an inclusion proof under a signed checkpoint).

All of it is real cryptography that ``sigstore`` verifies exactly as it verifies the public-good
instance's bundles; only the network services (Fulcio, the CT log, Rekor) are absent: the
signatures they would make are made here, with keys the test holds. The DSSE envelope itself is
``model_signing``'s own (its key signer, run with the certificate's key).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["SigstoreInstance"]

_OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
_OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
_OID_SCT_LIST = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
_ECDSA = ec.ECDSA(hashes.SHA256())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    size = (n.bit_length() + 7) // 8
    return bytes([0x80 | size]) + n.to_bytes(size, "big")


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@dataclass
class SigstoreInstance:
    """Keys of a private Sigstore instance; :meth:`trusted_root` and :meth:`sign`."""

    name: str = "kernel-ext-test-sigstore"
    ca_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    ct_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    rekor_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def __post_init__(self) -> None:
        now = _now()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.name),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"{self.name} CA")])
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()),
                           critical=False)
            .sign(self.ca_key, hashes.SHA256()))

    # --- the instance's trust root ------------------------------------------------------------
    def trusted_root(self, path: Path) -> Path:
        """Write the instance's ``trusted_root.json`` (what its TUF repository would serve)."""
        start = (_now() - datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

        def log(url: str, key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
            return {"baseUrl": url, "hashAlgorithm": "SHA2_256",
                    "publicKey": {"rawBytes": _b64(_spki(key)),
                                  "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                                  "validFor": {"start": start}},
                    "logId": {"keyId": _b64(hashlib.sha256(_spki(key)).digest())}}

        root = {
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [log(f"https://rekor.{self.name}.invalid", self.rekor_key)],
            "certificateAuthorities": [{
                "subject": {"organization": self.name, "commonName": f"{self.name} CA"},
                "uri": f"https://fulcio.{self.name}.invalid",
                "certChain": {"certificates": [
                    {"rawBytes": _b64(self.ca_cert.public_bytes(serialization.Encoding.DER))}]},
                "validFor": {"start": start}}],
            "ctlogs": [log(f"https://ctfe.{self.name}.invalid", self.ct_key)],
            "timestampAuthorities": [],
        }
        path.write_text(json.dumps(root, indent=1))
        return path

    # --- keyless signing ----------------------------------------------------------------------
    def sign(self, model: Path, signature: Path, *, identity: str, issuer: str) -> Path:
        """Sign ``model`` as ``identity`` (vouched for by ``issuer``): Fulcio's certificate,
        model_signing's DSSE envelope, Rekor's entry, in one bundle at ``signature``."""
        from model_signing import signing

        leaf_key = ec.generate_private_key(ec.SECP256R1())
        cert = self._certificate(leaf_key, identity, issuer)
        with tempfile.TemporaryDirectory() as tmp:
            key_file, keyed = Path(tmp) / "leaf.key.pem", Path(tmp) / "keyed.sig"
            key_file.write_bytes(leaf_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            signing.Config().use_elliptic_key_signer(private_key=key_file).sign(model, keyed)
            envelope = json.loads(keyed.read_text())["dsseEnvelope"]
        bundle = {
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": {
                "certificate": {"rawBytes": _b64(cert.public_bytes(serialization.Encoding.DER))},
                "tlogEntries": [self._log_entry(envelope, cert)],
                "timestampVerificationData": {},
            },
            "dsseEnvelope": envelope,
        }
        signature.write_text(json.dumps(bundle))
        return signature

    def _certificate(self, leaf_key: ec.EllipticCurvePrivateKey, identity: str,
                     issuer: str) -> x509.Certificate:
        """A Fulcio-style code-signing certificate, valid 10 minutes, with its embedded SCT."""
        now = _now()
        name: x509.GeneralName = (x509.RFC822Name(identity) if "@" in identity
                                  else x509.UniformResourceIdentifier(identity))
        issuer_der = issuer.encode()
        base = (
            x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(self.ca_cert.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(minutes=10))
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([name]), critical=True)
            .add_extension(x509.UnrecognizedExtension(_OID_ISSUER_V1, issuer_der),
                           critical=False)
            .add_extension(x509.UnrecognizedExtension(
                _OID_ISSUER_V2, b"\x0c" + _der_length(len(issuer_der)) + issuer_der),
                critical=False))
        # The CT log signs the precertificate: the certificate without its SCT extension.
        precert_tbs = base.sign(self.ca_key, hashes.SHA256()).tbs_certificate_bytes
        ts_ms = int(now.timestamp() * 1000)
        issuer_key_hash = hashlib.sha256(_spki(self.ca_key)).digest()
        signed = (struct.pack("!BBQH", 0, 0, ts_ms, 1) + issuer_key_hash
                  + len(precert_tbs).to_bytes(3, "big") + precert_tbs + struct.pack("!H", 0))
        sig = self.ct_key.sign(signed, _ECDSA)
        sct = (struct.pack("!B32sQH", 0, hashlib.sha256(_spki(self.ct_key)).digest(), ts_ms, 0)
               + struct.pack("!BBH", 4, 3, len(sig)) + sig)  # sha256, ecdsa
        sct_list = struct.pack("!HH", len(sct) + 2, len(sct)) + sct
        cert = base.add_extension(x509.UnrecognizedExtension(
            _OID_SCT_LIST, b"\x04" + _der_length(len(sct_list)) + sct_list),
            critical=False).sign(self.ca_key, hashes.SHA256())
        assert cert.tbs_precertificate_bytes == precert_tbs
        return cert

    def _log_entry(self, envelope: dict[str, Any], cert: x509.Certificate) -> dict[str, Any]:
        """Rekor's dsse/0.0.1 entry for ``envelope``: the first entry of a fresh log."""
        pem = cert.public_bytes(serialization.Encoding.PEM)
        body = rfc8785.dumps({
            "apiVersion": "0.0.1", "kind": "dsse",
            "spec": {
                "envelopeHash": {"algorithm": "sha256", "value": hashlib.sha256(
                    rfc8785.dumps(envelope)).hexdigest()},
                "payloadHash": {"algorithm": "sha256", "value": hashlib.sha256(
                    base64.b64decode(envelope["payload"])).hexdigest()},
                "signatures": [{"signature": s["sig"], "verifier": _b64(pem)}
                               for s in envelope["signatures"]],
            },
        })
        log_id = hashlib.sha256(_spki(self.rekor_key)).digest()
        integrated = int(_now().timestamp())
        promise = self.rekor_key.sign(rfc8785.dumps({
            "body": _b64(body), "integratedTime": integrated, "logID": log_id.hex(),
            "logIndex": 0}), _ECDSA)
        root = hashlib.sha256(b"\x00" + body).digest()  # a tree of one leaf
        note = f"rekor.{self.name}.invalid - 1\n1\n{_b64(root)}\n"
        note_sig = _b64(log_id[:4] + self.rekor_key.sign(note.encode(), _ECDSA))
        return {
            "logIndex": "0", "logId": {"keyId": _b64(log_id)},
            "kindVersion": {"kind": "dsse", "version": "0.0.1"},
            "integratedTime": str(integrated),
            "inclusionPromise": {"signedEntryTimestamp": _b64(promise)},
            "inclusionProof": {
                "logIndex": "0", "rootHash": _b64(root), "treeSize": "1", "hashes": [],
                "checkpoint": {"envelope": f"{note}\n\u2014 rekor.{self.name}.invalid "
                                           f"{note_sig}\n"}},
            "canonicalizedBody": _b64(body),
        }
