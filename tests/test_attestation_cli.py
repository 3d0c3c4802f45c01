"""parent.py verify-attestation, driven through main(argv): exit codes and output."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from attestation_cases import (
    SKIP_REASON,
    document,
    flip_signature_byte,
    lookalike_root,
    real_documents,
    substitute_root,
    with_x509_version,
)
from nitrolesion.attestation.cli import main
from nitrolesion.attestation.dev_authority import DevAttestationAuthority
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.trust import load_pem_roots

needs_docs = pytest.mark.skipif(not real_documents(), reason=SKIP_REASON)
PROD = "anjuna_prod_rsa_pubkey_2021.bin"
DEBUG = "anjuna_debug_rsa_pubkey_nonce_2024.bin"


@pytest.fixture
def doc_file(tmp_path):
    """Write a real document (or a mutation of it) to a temporary file for the CLI."""

    def write(name: str, data: bytes | None = None):
        doc = document(name)
        path = tmp_path / name
        path.write_bytes(doc.data if data is None else data)
        return doc, path

    return write


def run(capsys, *argv, **kwargs):
    code = main(list(map(str, argv)), **kwargs)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@needs_docs
def test_valid_document_text_output(capsys, doc_file):
    doc, path = doc_file(PROD)
    code, out, err = run(capsys, path, "--at-ms", doc.expected.timestamp_ms)
    assert code == 0, err
    payload = doc.payload
    lines = out.splitlines()
    assert f"module_id: {payload['module_id']}" in lines
    assert "time: 2021-03-24T16:10:41.734Z (1616602241734 ms)" in lines
    for i in (0, 1, 2, 8):
        assert f"PCR{i}: {payload['pcrs'][i].hex()}" in lines
    assert f"public_key: sha256:{hashlib.sha256(payload['public_key']).hexdigest()} (294 bytes)" in lines
    assert "nonce: none" in lines and "user_data: none" in lines
    assert any(line.startswith("root: AWS Nitro Enclaves Root-G1") for line in lines)
    assert err == ""


@needs_docs
def test_valid_document_json_output(capsys, doc_file):
    doc, path = doc_file(DEBUG)
    code, out, _ = run(capsys, path, "--at", "2024-01-24T18:14:25.635Z", "--allow-debug", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["valid"] is True and data["debug"] is True
    assert data["module_id"] == doc.payload["module_id"]
    assert data["timestamp_ms"] == doc.expected.timestamp_ms
    assert data["pcrs"]["PCR0"] == "00" * 48
    assert data["nonce_length"] == 6 and data["user_data_length"] == 13
    assert data["root_is_aws"] is True


@needs_docs
def test_naive_at_is_utc(capsys, doc_file):
    _, path = doc_file(PROD)
    assert run(capsys, path, "--at", "2021-03-24T16:10:42")[0] == 0


@needs_docs
def test_default_time_is_now_so_old_documents_fail(capsys, doc_file):
    _, path = doc_file(PROD)
    code, out, err = run(capsys, path, clock=lambda: datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert code == 1 and out == ""
    assert err.startswith("verification failed: CertificateExpired: certificate (")
    assert "expected valid at 2030-01-01T00:00:00.000Z, got notAfter 2021-03-24T19:06:22.000Z" in err


@needs_docs
def test_debug_rejected_unless_allowed(capsys, doc_file):
    doc, path = doc_file(DEBUG)
    code, _, err = run(capsys, path, "--at-ms", doc.expected.timestamp_ms)
    assert code == 1 and err.startswith("verification failed: DebugModeRejected: expected a production enclave")
    code, out, _ = run(capsys, path, "--at-ms", doc.expected.timestamp_ms, "--json")
    assert code == 1 and json.loads(out) == {
        "valid": False, "check": "DebugModeRejected", "message": json.loads(out)["message"]
    }
    assert run(capsys, path, "--at-ms", doc.expected.timestamp_ms, "--allow-debug")[0] == 0


@needs_docs
def test_flipped_signature(capsys, doc_file):
    doc = document(PROD)
    _, path = doc_file(PROD, flip_signature_byte(doc.data, 10))
    code, _, err = run(capsys, path, "--at-ms", doc.expected.timestamp_ms)
    assert code == 1 and err.startswith("verification failed: SignatureInvalid:")


@needs_docs
def test_policy_file(capsys, doc_file, tmp_path):
    doc, path = doc_file(PROD)
    pcrs = doc.payload["pcrs"]
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"allowed_pcrs": [{f"PCR{i}": pcrs[i].hex() for i in (0, 1, 2)}]}))
    assert run(capsys, path, "--at-ms", doc.expected.timestamp_ms, "--policy", good)[0] == 0
    bad = tmp_path / "bad.json"
    other = {f"PCR{i}": pcrs[i].hex() for i in (0, 1, 2)} | {"PCR0": "ab" * 48}
    bad.write_text(json.dumps({"allowed_pcrs": [other]}))
    code, _, err = run(capsys, path, "--at-ms", doc.expected.timestamp_ms, "--policy", bad)
    assert code == 1 and err.startswith("verification failed: PcrMismatch: set #0: expected PCR0 abab")


def _pcr_policy(tmp_path, doc):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"allowed_pcrs": [{f"PCR{i}": doc.payload["pcrs"][i].hex() for i in (0, 1, 2)}]}))
    return path


@needs_docs
def test_without_policy_text_says_pcrs_not_checked(capsys, doc_file, tmp_path):
    doc, path = doc_file(PROD)
    code, out, err = run(capsys, path, "--at-ms", doc.expected.timestamp_ms)
    assert code == 0, err
    lines = out.splitlines()
    assert "PCRs: NOT checked (no --policy given): any enclave image passes; only the chain and signature were verified" in lines
    assert lines[-1] == "result: valid, but PCRs NOT checked (no --policy given)"
    code, out, err = run(capsys, path, "--at-ms", doc.expected.timestamp_ms, "--policy", _pcr_policy(tmp_path, doc))
    assert code == 0, err
    assert "PCRs: checked, match allowed set #0 of the policy" in out.splitlines()
    assert "NOT checked" not in out and out.splitlines()[-1] == "result: valid"


@needs_docs
def test_without_policy_json_says_pcrs_not_checked(capsys, doc_file, tmp_path):
    doc, path = doc_file(PROD)
    code, out, _ = run(capsys, path, "--at-ms", doc.expected.timestamp_ms, "--json")
    data = json.loads(out)
    assert code == 0 and data["valid"] is True
    assert data["pcrs_checked"] is False and data["matched_pcr_set"] is None
    assert data["pcrs_note"].startswith("PCRs NOT checked (no --policy given)")
    code, out, _ = run(capsys, path, "--at-ms", doc.expected.timestamp_ms, "--json", "--policy", _pcr_policy(tmp_path, doc))
    data = json.loads(out)
    assert code == 0 and data["pcrs_checked"] is True and data["matched_pcr_set"] == 0 and data["pcrs_note"] is None


@needs_docs
def test_without_policy_chain_and_signature_are_still_verified(capsys, doc_file):
    doc = document(PROD)
    at = ("--at-ms", doc.expected.timestamp_ms)
    _, path = doc_file(PROD, substitute_root(doc.data))
    code, _, err = run(capsys, path, *at)
    assert code == 1 and err.startswith("verification failed: UntrustedRoot:")
    _, path = doc_file(PROD, flip_signature_byte(doc.data, 0))
    code, _, err = run(capsys, path, *at)
    assert code == 1 and err.startswith("verification failed: SignatureInvalid:")


def test_policy_file_without_pcrs_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "doc.bin").write_bytes(b"\x84")
    policy = tmp_path / "empty.json"
    policy.write_text(json.dumps({"allowed_pcrs": [], "max_age_seconds": 60}))
    code, out, err = run(capsys, tmp_path / "doc.bin", "--policy", policy)
    assert code == 2 and out == ""
    assert "allowed_pcrs: expected at least one PCR set" in err and "nitro-cli build-enclave" in err


@needs_docs
def test_nonce_option(capsys, doc_file):
    doc, path = doc_file(DEBUG)
    at = ("--at-ms", doc.expected.timestamp_ms, "--allow-debug")
    assert run(capsys, path, *at, "--nonce", b"Nonce\n".hex())[0] == 0
    code, _, err = run(capsys, path, *at, "--nonce", "00")
    assert code == 1 and "NonceMismatch" in err


def test_dev_document_needs_root(capsys, tmp_path):
    model = tmp_path / "model.bin"
    model.write_bytes(b"m")
    now = datetime(2025, 6, 1, tzinfo=timezone.utc)
    authority = DevAttestationAuthority.create(tmp_path / "state", [model], now=now)
    path = tmp_path / "dev.bin"
    path.write_bytes(authority.attest(public_key=b"k", now=now))
    at = ("--at", (now + timedelta(seconds=1)).isoformat())
    code, _, err = run(capsys, path, *at)
    assert code == 1 and err.startswith("verification failed: UntrustedRoot:")
    # The error says how to trust the development root on purpose.
    assert "--dev-root DIR/dev_root.pem" in err
    code, out, err = run(capsys, path, *at, "--root", authority.root_pem_path)
    assert code == 0, err
    assert "NOT the AWS Nitro root" in out and "not the AWS Nitro root" in err
    policy = tmp_path / "dev-policy.json"
    policy.write_text(json.dumps(AttestationPolicy.for_dev_pcrs(authority.pcrs).to_dict()))
    assert run(capsys, path, *at, "--dev-root", authority.root_pem_path, "--policy", policy)[0] == 0


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--at", "2024-01-01T00:00:00Z"],
        ["DOC", "--at", "2024-01-01T00:00:00Z", "--at-ms", "1"],
        ["DOC", "--at", "yesterday"],
        ["DOC", "--at-ms", "soon"],
        ["DOC", "--at-ms", str(10**20)],
        ["DOC", "--policy", "MISSING"],
        ["DOC", "--policy", "BADPOLICY"],
        ["DOC", "--root", "MISSING"],
        ["DOC", "--root", "BADPOLICY"],
        ["DOC", "--root", "BADVERSION"],
        ["DOC", "--nonce", "xyz"],
        ["MISSING"],
        ["DOC", "--frobnicate"],
    ],
)
def test_usage_errors_exit_2(capsys, tmp_path, argv):
    (tmp_path / "doc.bin").write_bytes(b"\x84")
    (tmp_path / "bad.json").write_text('{"allowed_pcr": []}')
    bad_version_pem(tmp_path / "v2.pem")
    names = {"DOC": tmp_path / "doc.bin", "MISSING": tmp_path / "missing", "BADPOLICY": tmp_path / "bad.json",
             "BADVERSION": tmp_path / "v2.pem"}
    code, out, err = run(capsys, *[names.get(a, a) for a in argv])
    assert code == 2
    assert "usage:" in err or "parent.py verify-attestation: error:" in err
    assert out == ""


def bad_version_pem(path):
    """A PEM certificate whose version field says v2, which cryptography refuses."""
    der = with_x509_version(lookalike_root().public_bytes(Encoding.DER), 1)
    path.write_text(pem_armor(der))
    return path


def pem_armor(der: bytes) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"


def test_parent_dev_root_with_invalid_x509_version_is_a_value_error(tmp_path):
    # parent.py turns OSError and ValueError from load_pem_roots into a usage error (exit 2).
    good = tmp_path / "good.pem"
    good.write_text(pem_armor(lookalike_root().public_bytes(Encoding.DER)))
    assert len(load_pem_roots(good)) == 1
    with pytest.raises(ValueError, match="invalid X.509 version"):
        load_pem_roots(bad_version_pem(tmp_path / "v2.pem"))


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and out.startswith("usage: parent.py verify-attestation")


def test_garbage_document_exits_1(capsys, tmp_path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x00garbage")
    code, _, err = run(capsys, path, "--at-ms", 1)
    assert code == 1 and err.startswith("verification failed: CoseDecodeError:")
