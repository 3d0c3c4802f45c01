"""The development attestation authority: Nitro-format documents, never trusted by default."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from attestation_cases import SKIP_REASON, real_documents
from nitrolesion.attestation.dev_authority import (
    DEV_PCR1_LABEL,
    DEV_PCR2_LABEL,
    INTERMEDIATE_KEY_FILE,
    LEAF_LIFETIME,
    ROOT_CERT_FILE,
    ROOT_KEY_FILE,
    STATE_FILE,
    DevAttestationAuthority,
    file_mode,
    measure_files,
)
from nitrolesion.attestation.errors import (
    CertificateExpired,
    DevAuthorityError,
    DocumentFromFuture,
    NsmError,
    PcrMismatch,
    UntrustedRoot,
)
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.trust import aws_nitro_root
from nitrolesion.attestation.verifier import check_public_key, verify_attestation

T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
ANY = AttestationPolicy.any_enclave()


@pytest.fixture
def app(tmp_path):
    """A stand-in enclave tree: code and a model file."""
    root = tmp_path / "app"
    (root / "enclave").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "enclave" / "server.py").write_text("print('serve')\n")
    (root / "models" / "model.npz").write_bytes(b"weights-v1")
    (root / "enclave" / "__pycache__").mkdir()
    (root / "enclave" / "__pycache__" / "server.cpython-311.pyc").write_bytes(b"noise")
    return root


@pytest.fixture
def authority(tmp_path, app):
    return DevAttestationAuthority.create(tmp_path / "state", [app / "enclave", app / "models"], now=T0)


def _spki() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def test_document_has_exactly_the_nitro_format(authority):
    doc = authority.attest(public_key=b"K" * 294, nonce=b"N", user_data=None, now=T0)
    envelope = cbor2.loads(doc)
    assert isinstance(envelope, list) and len(envelope) == 4  # untagged, like the NSM
    assert envelope[0] == b'\xa1\x018"' and envelope[1] == {} and len(envelope[3]) == 96
    payload = cbor2.loads(envelope[2])
    assert list(payload) == [
        "module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce"
    ]
    assert payload["module_id"].startswith("i-dev") and "-enc" in payload["module_id"]
    assert payload["digest"] == "SHA384"
    assert payload["timestamp"] == int(T0.timestamp() * 1000)
    assert sorted(payload["pcrs"]) == list(range(16)) and all(len(v) == 48 for v in payload["pcrs"].values())
    assert payload["user_data"] is None and payload["nonce"] == b"N"
    root = x509.load_der_x509_certificate(payload["cabundle"][0])
    assert root == authority.root_certificate
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    for cert in [leaf] + [x509.load_der_x509_certificate(c) for c in payload["cabundle"]]:
        assert isinstance(cert.public_key().curve, ec.SECP384R1)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= LEAF_LIFETIME + timedelta(seconds=3)


@pytest.mark.skipif(not real_documents(), reason=SKIP_REASON)
def test_payload_keys_and_envelope_match_a_real_nsm_document(authority):
    real = cbor2.loads(real_documents()[0].data)
    ours = cbor2.loads(authority.attest(now=T0))
    assert ours[0] == real[0] and ours[1] == real[1]
    assert list(cbor2.loads(ours[2])) == list(cbor2.loads(real[2]))


def test_pcrs(authority, app):
    pcrs = authority.pcrs
    assert pcrs[0] == measure_files([app / "enclave", app / "models"], app)
    assert pcrs[1] == hashlib.sha384(DEV_PCR1_LABEL).digest() and any(pcrs[1])
    assert pcrs[2] == hashlib.sha384(DEV_PCR2_LABEL).digest() and any(pcrs[2])
    assert pcrs[8] == bytes(48)


def test_dev_document_rejected_without_dev_root_and_accepted_with_it(authority):
    key = _spki()
    doc = authority.attest(public_key=key, nonce=b"nonce-1", now=T0)
    with pytest.raises(UntrustedRoot):
        verify_attestation(doc, now=T0, policy=ANY)
    with pytest.raises(UntrustedRoot):
        verify_attestation(doc, now=T0, policy=ANY, trusted_roots=[aws_nitro_root()])
    result = verify_attestation(
        doc, now=T0 + timedelta(seconds=2), policy=AttestationPolicy.for_dev_pcrs(authority.pcrs),
        expected_nonce=b"nonce-1", trusted_roots=[aws_nitro_root(), authority.root_certificate],
    )
    assert not result.root_is_aws and not result.debug
    assert result.pcrs == authority.pcrs and result.module_id == authority.module_id
    check_public_key(result, key)


def test_changed_model_changes_pcr0(tmp_path, app, authority):
    policy = AttestationPolicy.for_dev_pcrs(authority.pcrs)
    (app / "models" / "model.npz").write_bytes(b"weights-v2")
    reloaded = DevAttestationAuthority.load(tmp_path / "state", [app / "enclave", app / "models"])
    assert reloaded.pcrs[0] != authority.pcrs[0]
    assert {i: v for i, v in reloaded.pcrs.items() if i} == {i: v for i, v in authority.pcrs.items() if i}
    assert reloaded.module_id == authority.module_id
    assert reloaded.root_certificate == authority.root_certificate
    doc = reloaded.attest(now=T0)
    with pytest.raises(PcrMismatch, match="expected PCR0"):
        verify_attestation(doc, now=T0, policy=policy, trusted_roots=[reloaded.root_certificate])


def test_measure_files_is_order_independent_and_sensitive_to_names_and_contents(app):
    files = [app / "enclave" / "server.py", app / "models" / "model.npz"]
    base = measure_files(files, app)
    assert measure_files(list(reversed(files)), app) == base
    assert measure_files([app / "enclave", app / "models"], app) == base  # __pycache__ skipped
    (app / "models" / "model.npz").rename(app / "models" / "model2.npz")
    assert measure_files([app / "enclave", app / "models"], app) != base
    with pytest.raises(DevAuthorityError, match="expected a path under"):
        measure_files(files[:1], app / "models")
    with pytest.raises(DevAuthorityError, match="expected an existing file"):
        measure_files([app / "nope"], app)


def test_state_dir_files_and_modes(tmp_path, authority):
    state = tmp_path / "state"
    assert authority.root_pem_path == state / ROOT_CERT_FILE
    assert x509.load_pem_x509_certificate((state / ROOT_CERT_FILE).read_bytes()) == authority.root_certificate
    assert file_mode(state) == 0o700
    assert file_mode(state / ROOT_KEY_FILE) == 0o600
    assert file_mode(state / INTERMEDIATE_KEY_FILE) == 0o600


def test_create_refuses_existing_state_and_load_refuses_missing(tmp_path, app, authority):
    with pytest.raises(DevAuthorityError, match="use load"):
        DevAttestationAuthority.create(tmp_path / "state", [app / "models"])
    with pytest.raises(DevAuthorityError, match="expected a development authority"):
        DevAttestationAuthority.load(tmp_path / "empty", [app / "models"])


def test_load_detects_a_key_that_does_not_match(tmp_path, app, authority):
    other = DevAttestationAuthority.create(tmp_path / "other", [app / "models"], now=T0)
    (tmp_path / "state" / ROOT_KEY_FILE).write_bytes((tmp_path / "other" / ROOT_KEY_FILE).read_bytes())
    assert other.module_id != authority.module_id
    with pytest.raises(DevAuthorityError, match="root: expected the key to match"):
        DevAttestationAuthority.load(tmp_path / "state", [app / "models"])


def test_load_refuses_a_state_file_nested_too_deep(tmp_path, app, authority):
    (tmp_path / "state" / STATE_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DevAuthorityError, match="expected a development authority"):
        DevAttestationAuthority.load(tmp_path / "state", [app / "models"])


def test_leaf_lives_three_hours_and_is_renewed(authority):
    doc = authority.attest(now=T0)
    leaf_end = verify_attestation(doc, now=T0, policy=ANY, trusted_roots=[authority.root_certificate]).certificate.not_valid_after_utc
    assert leaf_end == T0 + LEAF_LIFETIME
    verify_attestation(doc, now=leaf_end, policy=ANY, trusted_roots=[authority.root_certificate])
    with pytest.raises(CertificateExpired):
        verify_attestation(doc, now=leaf_end + timedelta(seconds=1), policy=ANY, trusted_roots=[authority.root_certificate])
    later = T0 + timedelta(hours=5)
    verify_attestation(authority.attest(now=later), now=later, policy=ANY, trusted_roots=[authority.root_certificate])


def test_document_from_the_future_with_max_age(authority):
    authority.attest(now=T0)  # issues the leaf, valid from T0; reused for the next document
    doc = authority.attest(now=T0 + timedelta(minutes=10))
    policy = AttestationPolicy.any_enclave(max_age=timedelta(minutes=10))
    with pytest.raises(DocumentFromFuture):
        verify_attestation(doc, now=T0 + timedelta(minutes=4), policy=policy, trusted_roots=[authority.root_certificate])


def test_inputs_over_1024_bytes_refused_like_the_nsm(authority):
    with pytest.raises(NsmError, match="InputTooLarge"):
        authority.attest(nonce=b"n" * 1025, now=T0)
