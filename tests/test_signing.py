"""Model signatures (OpenSSF model-signing), verified offline: tiny GGUF files signed in the test
with keys made in the test, under each signature policy, through a real Session and magics."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tinymodels import write_tiny_llama

from kernel_ext.config import KernelExtConfig
from kernel_ext.errors import SignatureError
from kernel_ext.session import Session

model_signing = pytest.importorskip("model_signing")


def _keypair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = tmp_path / f"{name}.key.pem", tmp_path / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _sign(model: Path, private_key: Path, signature: Path | None = None) -> Path:
    sig = signature or model.with_name(model.name + ".sig")
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key).sign(model, sig)
    return sig


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    priv, pub = _keypair(tmp_path, "publisher")
    other_priv, other_pub = _keypair(tmp_path, "stranger")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


def _session(tmp_path: Path, policy: str, trusted: list[Path]) -> Session:
    cfg = KernelExtConfig(cache_dir=str(tmp_path / "kcache"), signature_policy=policy,
                          signature_trusted_keys=[str(p) for p in trusted])
    return Session(cfg, None, state_dir=tmp_path / "state")


def _model(tmp_path: Path, kind: str, keys: dict[str, Path]) -> tuple[Path, Path | None]:
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    if kind == "unsigned":
        return model, None
    if kind == "signed":
        return model, _sign(model, keys["priv"], tmp_path / "release.sig")
    if kind == "wrongly_signed":
        return model, _sign(model, keys["other_priv"], tmp_path / "release.sig")
    assert kind == "tampered"
    sig = _sign(model, keys["priv"], tmp_path / "release.sig")
    data = bytearray(model.read_bytes())
    data[-100] ^= 0x01  # one bit of tensor data, after signing: still a valid GGUF file
    model.write_bytes(bytes(data))
    return model, sig


EXPECTED = {  # (kind, policy) -> loads?
    ("signed", "optional"): True, ("signed", "require"): True,
    ("unsigned", "optional"): True, ("unsigned", "require"): False,
    ("wrongly_signed", "optional"): False, ("wrongly_signed", "require"): False,
    ("tampered", "optional"): False, ("tampered", "require"): False,
}
MESSAGES = {"unsigned": "is not signed", "wrongly_signed": "does not verify against any trusted",
            "tampered": "modified after it was signed"}


@pytest.mark.parametrize(("kind", "policy"), sorted(EXPECTED))
def test_signature_policy(tmp_path: Path, keys: dict[str, Path], kind: str, policy: str) -> None:
    model, sig = _model(tmp_path, kind, keys)
    session = _session(tmp_path, policy, [keys["pub"]])
    load = lambda: session.models.load(str(model), name="m", progress=False,
                                       signature=str(sig) if sig else None)
    if EXPECTED[(kind, policy)]:
        load()
        [rec] = session.audit.read("model.signature")
        assert rec["outcome"] == ("verified" if sig else "unsigned")
        if sig:
            assert rec["trusted_by"] == str(keys["pub"]) and rec["signature"] == str(sig)
        assert "m" in session.models.names()
    else:
        with pytest.raises(SignatureError, match=MESSAGES[kind]):
            load()
        [rec] = session.audit.read("model.signature")
        assert rec["outcome"] == "refused" and rec["policy"] == policy
        assert "m" not in session.models.names()
        assert session.audit.read("model.load_failed")
        assert not session.audit.read("model.plan")  # refused before any weights were touched


def test_signature_beside_the_model_is_found(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    _sign(model, keys["priv"])  # tiny.gguf.sig
    session = _session(tmp_path, "require", [keys["other_pub"], keys["pub"]])
    session.models.load(str(model), name="m", progress=False)
    [rec] = session.audit.read("model.signature")
    assert rec["outcome"] == "verified" and rec["trusted_by"] == str(keys["pub"])


def test_a_signature_without_trusted_keys_is_refused_clearly(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    sig = _sign(model, keys["priv"])
    session = _session(tmp_path, "optional", [])
    with pytest.raises(SignatureError, match="signature_trusted_keys"):
        session.models.load(str(model), name="m", progress=False, signature=str(sig))


def _certificate_chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a code-signing leaf certificate made here: (leaf key, leaf cert, CA cert)."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(
                 digital_signature=not ca, content_commitment=False, key_encipherment=False,
                 data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                 encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 issuer_key.public_key()), critical=False))
        if not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
                                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("kernel_ext test CA", ca_key, "kernel_ext test CA", ca_key, True)
    leaf = cert("model publisher", leaf_key, "kernel_ext test CA", ca_key, False)
    paths = (tmp_path / "leaf.key.pem", tmp_path / "leaf.pem", tmp_path / "ca.pem")
    paths[0].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


def test_certificate_signatures_verify_against_a_trusted_ca(tmp_path: Path) -> None:
    leaf_key, leaf, ca = _certificate_chain(tmp_path)
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    sig = model.with_name(model.name + ".sig")
    model_signing.signing.Config().use_certificate_signer(
        private_key=leaf_key, signing_certificate=leaf, certificate_chain=[ca]).sign(model, sig)
    session = _session(tmp_path, "require", [ca])
    session.models.load(str(model), name="m", progress=False)
    assert session.audit.read("model.signature")[-1]["outcome"] == "verified"
    (tmp_path / "other").mkdir()
    other_ca = _certificate_chain(tmp_path / "other")[2]
    strict = _session(tmp_path / "s2", "require", [other_ca])
    with pytest.raises(SignatureError, match="does not verify"):
        strict.models.load(str(model), name="m", progress=False)


def test_magic_refusal_is_one_clear_line(tmp_path: Path, keys: dict[str, Path], ip: Any) -> None:
    from IPython.core.error import UsageError

    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    sig = _sign(model, keys["other_priv"], tmp_path / "x.sig")
    ip.run_line_magic("config", f"KernelExt.signature_trusted_keys = [{str(keys['pub'])!r}]")
    with pytest.raises(UsageError, match="SignatureError: the signature x.sig"):
        ip.run_line_magic("model", f"load {model} --name m --no-progress --signature {sig}")
    ip.run_line_magic("config", "KernelExt.signature_policy = 'require'")
    unsigned = write_tiny_llama(tmp_path / "plain.gguf", seed=2)
    with pytest.raises(UsageError, match="is not signed and signature_policy is 'require'"):
        ip.run_line_magic("model", f"load {unsigned} --name p --no-progress")
