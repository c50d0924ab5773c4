"""Model signatures (OpenSSF model-signing), verified offline: tiny GGUF files signed in the test
with keys made in the test, under each signature policy, through a real Session and magics."""

from __future__ import annotations

import datetime
import errno
import hashlib
import shutil
import socket
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
    _tamper(model)
    return model, sig


def _tamper(model: Path) -> None:
    data = bytearray(model.read_bytes())
    data[-100] ^= 0x01  # one bit of tensor data, after signing: still a valid GGUF file
    model.write_bytes(bytes(data))


EXPECTED = {  # (kind, policy) -> loads?
    ("signed", "optional"): True, ("signed", "require"): True,
    ("unsigned", "optional"): True, ("unsigned", "require"): False,
    ("wrongly_signed", "optional"): False, ("wrongly_signed", "require"): False,
    ("tampered", "optional"): False, ("tampered", "require"): False,
}
MESSAGES = {"unsigned": "is not signed", "wrongly_signed": "does not verify against any trusted",
            "tampered": "modified after it was signed"}


def _load_under_policy(session: Session, model: Path, sig: Path | None, kind: str, policy: str,
                       messages: dict[str, str]) -> dict[str, Any]:
    """Load ``model`` and check the decision EXPECTED says, with its audit records; the
    ``model.signature`` record back."""
    load = lambda: session.models.load(str(model), name="m", progress=False,
                                       signature=str(sig) if sig else None)
    if EXPECTED[(kind, policy)]:
        load()
        [rec] = session.audit.read("model.signature")
        assert rec["outcome"] == ("verified" if sig else "unsigned")
        assert rec["signature"] == (str(sig) if sig else None)
        assert "m" in session.models.names()
    else:
        with pytest.raises(SignatureError, match=messages[kind]):
            load()
        [rec] = session.audit.read("model.signature")
        assert rec["outcome"] == "refused" and rec["policy"] == policy
        assert "m" not in session.models.names()
        assert session.audit.read("model.load_failed")
        assert not session.audit.read("model.plan")  # refused before any weights were touched
    return rec


@pytest.mark.parametrize(("kind", "policy"), sorted(EXPECTED))
def test_signature_policy(tmp_path: Path, keys: dict[str, Path], kind: str, policy: str) -> None:
    model, sig = _model(tmp_path, kind, keys)
    session = _session(tmp_path, policy, [keys["pub"]])
    rec = _load_under_policy(session, model, sig, kind, policy, MESSAGES)
    if rec["outcome"] == "verified":
        assert rec["trusted_by"] == str(keys["pub"])


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


# --- keyless Sigstore signatures, verified offline ----------------------------------------------
# A real keyless bundle made on Sigstore's public-good instance (Fulcio certificate, Rekor entry)
# over a small directory model: OpenSSF model-transparency's test asset (see its README.txt).
KEYLESS = Path(__file__).resolve().parent / "data" / "model-transparency-v1.1.0-sigstore"
SIGNER = ("stefanb@us.ibm.com", "https://sigstore.verify.ibm.com/oauth2")


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """No network: every connection or name lookup fails, and is recorded for the test to check;
    proxies point nowhere; sigstore's TUF cache lives in a fresh folder the test can inspect."""
    tried: list[tuple[str, Any]] = []

    def refuse(what: str) -> Any:
        def attempt(*args: Any, **kwargs: Any) -> Any:
            tried.append((what, args[1:] if what == "connect" else args))
            raise OSError(errno.ENETUNREACH, "the network is off in this test")
        return attempt

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    return tried


def _nothing_fetched(tmp_path: Path, tried: list[tuple[str, Any]]) -> None:
    assert tried == []  # not one connection or DNS lookup was attempted
    for xdg in ("xdg-cache", "xdg-data"):  # and sigstore's TUF client never started
        assert not (tmp_path / xdg).exists() or not any((tmp_path / xdg).rglob("*.json"))


def _keyless_model(tmp_path: Path) -> tuple[Path, Path]:
    """The signed directory model, copied (without README.txt, which is not part of it)."""
    model = tmp_path / "v1.1.0-sigstore"
    model.mkdir()
    for name in ("signme-1", "signme-2", "ignore-me"):
        shutil.copy(KEYLESS / name, model / name)
    return model, KEYLESS / "model.sig"


def _verify_dir(model: Path, sig: Path, identities: dict[str, str], **kw: Any) -> Any:
    from kernel_ext.signing import verify_model_signature

    return verify_model_signature(model, None, signature=sig, trusted=[], policy="require",
                                  identities=identities, **kw)


def _shipped(store: str, name: str = "trusted_root.json") -> str:
    from importlib import resources

    return resources.files("sigstore._store").joinpath(store, name).read_text()


def test_keyless_signature_verifies_offline(tmp_path: Path, offline: list[Any]) -> None:
    model, sig = _keyless_model(tmp_path)
    check = _verify_dir(model, sig, {"someone@example.org": SIGNER[1], SIGNER[0]: SIGNER[1]})
    assert check.outcome == "verified" and (check.identity, check.issuer) == SIGNER
    assert check.trusted_by == f"{SIGNER[0]} ({SIGNER[1]})"
    assert "production trust root shipped with sigstore" in check.trust_root
    # ignored by the signature's manifest: changing it changes nothing
    (model / "ignore-me").write_text("not signed, not checked")
    assert _verify_dir(model, sig, dict([SIGNER])).outcome == "verified"
    # the trust root given explicitly (signature_trust_config): a bare trusted_root.json works
    root = tmp_path / "trusted_root.json"
    root.write_text(_shipped("https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"))
    given = _verify_dir(model, sig, dict([SIGNER]), trust_config=root)
    assert given.outcome == "verified" and given.trust_root == str(root)
    assert given.key_sha256 == check.key_sha256  # the same root, fingerprinted the same way
    _nothing_fetched(tmp_path, offline)


def test_keyless_signature_is_checked_against_the_trust_root(tmp_path: Path,
                                                               offline: list[Any]) -> None:
    """Sigstore's staging instance does not vouch for production certificates: refused."""
    model, sig = _keyless_model(tmp_path)
    staging = tmp_path / "staging_root.json"
    staging.write_text(_shipped("https%3A%2F%2Ftuf-repo-cdn.sigstage.dev"))
    with pytest.raises(SignatureError, match=r"does not verify against the trust root .*"
                       r"staging_root.json.*update sigstore"):
        _verify_dir(model, sig, dict([SIGNER]), trust_config=staging)
    not_json = tmp_path / "junk.json"
    not_json.write_text('{"mediaType": "something/else"}')
    with pytest.raises(SignatureError, match="neither a Sigstore ClientTrustConfig nor a trusted"):
        _verify_dir(model, sig, dict([SIGNER]), trust_config=not_json)
    _nothing_fetched(tmp_path, offline)


KEYLESS_REFUSALS = {
    "wrong_identity": ({"mallory@example.org": SIGNER[1]},
                       (r"made by stefanb@us.ibm.com \(issuer https://sigstore.verify.ibm.com/"
                       r"oauth2\), which is not one of the trusted signers.*signature_identities")),
    "wrong_issuer": ({SIGNER[0]: "https://accounts.google.com"},
                     "which is not one of the trusted signers"),
    "not_configured": ({}, (r"no signer is trusted for keyless signatures. Only if you trust "
                            r"that signer: %config KernelExt.signature_identities = "
                            r"\{'stefanb@us.ibm.com': 'https://sigstore.verify.ibm.com/oauth2'\}")),
    "tampered": (dict([SIGNER]), r"modified after it was signed.*\(changed: signme-1\)"),
    "extra_file": (dict([SIGNER]), r"modified after it was signed.*\(not signed: smuggled.bin\)"),
}


@pytest.mark.parametrize("case", sorted(KEYLESS_REFUSALS))
def test_keyless_signature_refusals(tmp_path: Path, offline: list[Any], case: str) -> None:
    model, sig = _keyless_model(tmp_path)
    identities, message = KEYLESS_REFUSALS[case]
    if case == "tampered":
        (model / "signme-1").write_bytes(b"signme-X")  # after signing, same length
    elif case == "extra_file":
        (model / "smuggled.bin").write_bytes(b"\0")
    with pytest.raises(SignatureError, match=message):
        _verify_dir(model, sig, identities)
    _nothing_fetched(tmp_path, offline)


def test_keyless_signature_on_load_is_audited_and_refused_clearly(
    tmp_path: Path, offline: list[Any], ip: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through %model load: the same policy, refusals and audit records as keys. The bundle
    verifies cryptographically but signs another model, so the digest binding refuses it."""
    from IPython.core.error import UsageError

    import kernel_ext

    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    sig = KEYLESS / "model.sig"
    load = f"load {model} --name m --no-progress --signature {sig}"
    with pytest.raises(UsageError, match="keyless Sigstore signature .* by stefanb@us.ibm.com"
                       ".*signature_identities"):
        ip.run_line_magic("model", load)
    ip.run_line_magic("config", f"KernelExt.signature_identities = {{{SIGNER[0]!r}: "
                                f"{SIGNER[1]!r}}}")
    with pytest.raises(UsageError, match="tiny.gguf does not match its signature model.sig"):
        ip.run_line_magic("model", load)
    audit = kernel_ext.current_session().audit
    assert [r["outcome"] for r in audit.read("model.signature")] == ["refused", "refused"]
    assert len(audit.read("model.load_failed")) == 2 and not audit.read("model.plan")
    assert "m" not in kernel_ext.current_session().models.names()
    capsys.readouterr()
    ip.run_line_magic("config", "KernelExt.signature_identities = {'me@x.org': 'github'}")
    assert "OIDC issuer URL" in capsys.readouterr().err  # a typo is refused at once, and kept
    assert kernel_ext.current_session().config.signature_identities == dict([SIGNER])
    _nothing_fetched(tmp_path, offline)


# A private Sigstore instance made here (tests/sigstore_instance.py): keyless bundles for tiny
# GGUF files, verified by sigstore against that instance's trust root (signature_trust_config).
ALICE = ("alice@example.org", "https://login.example.org")


@pytest.fixture
def instance(tmp_path: Path) -> tuple[Any, Path]:
    from sigstore_instance import SigstoreInstance

    inst = SigstoreInstance()
    return inst, inst.trusted_root(tmp_path / "trusted_root.json")


def _keyless_gguf(tmp_path: Path, kind: str, inst: Any) -> tuple[Path, Path | None]:
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    if kind == "unsigned":
        return model, None
    identity = "mallory@example.org" if kind == "wrongly_signed" else ALICE[0]
    sig = inst.sign(model, tmp_path / "release.sig", identity=identity, issuer=ALICE[1])
    if kind == "tampered":
        _tamper(model)
    return model, sig


KEYLESS_MESSAGES = {"unsigned": "is not signed",
                    "wrongly_signed": "made by mallory@example.org .* not one of the trusted",
                    "tampered": "modified after it was signed"}


@pytest.mark.parametrize(("kind", "policy"), sorted(EXPECTED))
def test_keyless_signature_policy_on_load(tmp_path: Path, instance: tuple[Any, Path],
                                          offline: list[Any], kind: str, policy: str) -> None:
    """The key matrix again, with keyless signatures of a private Sigstore instance."""
    inst, root = instance
    model, sig = _keyless_gguf(tmp_path, kind, inst)
    cfg = KernelExtConfig(cache_dir=str(tmp_path / "kcache"), signature_policy=policy,
                          signature_identities=dict([ALICE]), signature_trust_config=str(root))
    session = Session(cfg, None, state_dir=tmp_path / "state")
    rec = _load_under_policy(session, model, sig, kind, policy, KEYLESS_MESSAGES)
    if rec["outcome"] == "verified":
        assert rec["trusted_by"] == f"{ALICE[0]} ({ALICE[1]})"
        assert (rec["identity"], rec["issuer"], rec["trust_root"]) == (*ALICE, str(root))
        assert rec["sha256"] == session.audit.read("model.load")[-1]["sha256"]
    _nothing_fetched(tmp_path, offline)


def test_keyless_signature_needs_the_trust_root_of_its_instance(
    tmp_path: Path, instance: tuple[Any, Path], offline: list[Any], ip: Any
) -> None:
    """%model load with a bundle beside the file: refused against Sigstore's production root
    (the default) and against another instance's root; loaded against its own."""
    from IPython.core.error import UsageError
    from sigstore_instance import SigstoreInstance

    import kernel_ext

    inst, root = instance
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    inst.sign(model, model.with_name("tiny.gguf.sig"), identity=ALICE[0], issuer=ALICE[1])
    other = SigstoreInstance(name="another-instance").trusted_root(tmp_path / "other_root.json")
    ip.run_line_magic("config", f"KernelExt.signature_identities = {dict([ALICE])!r}")
    ip.run_line_magic("config", "KernelExt.signature_policy = 'require'")
    load = f"load {model} --name m --no-progress"
    with pytest.raises(UsageError, match="does not verify against the trust root .*production "
                                         "trust root shipped with sigstore"):
        ip.run_line_magic("model", load)
    ip.run_line_magic("config", f"KernelExt.signature_trust_config = {str(other)!r}")
    with pytest.raises(UsageError, match="does not verify against the trust root .*other_root"):
        ip.run_line_magic("model", load)
    ip.run_line_magic("config", f"KernelExt.signature_trust_config = {str(root)!r}")
    ip.run_line_magic("model", load)
    session = kernel_ext.current_session()
    assert [r["outcome"] for r in session.audit.read("model.signature")] == [
        "refused", "refused", "verified"]
    assert "m" in session.models.names()
    _nothing_fetched(tmp_path, offline)


@pytest.mark.parametrize("kind", ["key", "keyless"])
def test_the_signature_must_cover_the_bytes_the_loader_parsed(
    tmp_path: Path, keys: dict[str, Path], instance: tuple[Any, Path], kind: str
) -> None:
    """The library re-hashes the file by its path; the digest of the bytes the loader parsed
    (another file swapped in between, here: another digest) must be the signed one too."""
    from kernel_ext.signing import verify_model_signature

    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
    inst, root = instance
    if kind == "key":
        sig = _sign(model, keys["priv"])
        kw: dict[str, Any] = {"trusted": [str(keys["pub"])]}
    else:
        sig = inst.sign(model, tmp_path / "tiny.gguf.sig", identity=ALICE[0], issuer=ALICE[1])
        kw = {"trusted": [], "identities": dict([ALICE]), "trust_config": root}
    parsed = hashlib.sha256(model.read_bytes()).hexdigest()
    check = verify_model_signature(model, parsed, signature=sig, policy="require", **kw)
    assert check.outcome == "verified"
    with pytest.raises(SignatureError, match=f"valid for a file with SHA-256 {parsed}, but the "
                                             "bytes loaded have 0{64}: the file changed"):
        verify_model_signature(model, "0" * 64, signature=sig, policy="require", **kw)
