"""open_attestation_provider: NSM if present, else the dev authority if asked, else refuse."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from nitrolesion.attestation.dev_authority import measure_files
from nitrolesion.attestation.errors import AttestationUnavailable
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.provider import (
    DevAttestationProvider,
    NsmAttestationProvider,
    open_attestation_provider,
)
from nitrolesion.attestation.verifier import verify_attestation


@pytest.fixture
def measured(tmp_path):
    model = tmp_path / "models" / "model.npz"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    return [model]


def test_without_nsm_and_without_dev_flag_refuses_to_start(tmp_path, measured):
    with pytest.raises(AttestationUnavailable, match="run inside a Nitro Enclave, or start with the development flag"):
        open_attestation_provider(None, measured, nsm_path=tmp_path / "no-nsm")


def test_without_nsm_with_dev_flag_uses_the_dev_authority(tmp_path, measured):
    provider = open_attestation_provider(tmp_path / "dev", measured, nsm_path=tmp_path / "no-nsm")
    assert isinstance(provider, DevAttestationProvider) and provider.is_development
    now = datetime.now(timezone.utc)
    doc = provider.attest(b"spki", nonce=b"n", now=now)
    root = provider.authority.root_certificate
    result = verify_attestation(
        doc, now=now, policy=AttestationPolicy.for_dev_pcrs(provider.authority.pcrs),
        expected_nonce=b"n", trusted_roots=[root],
    )
    assert result.public_key == b"spki"
    assert provider.authority.pcrs[0] == measure_files(measured, measured[0].parent)
    # A second start reuses the same development root (the one the parent was told to trust).
    again = open_attestation_provider(tmp_path / "dev", measured, nsm_path=tmp_path / "no-nsm")
    assert again.authority.root_certificate == root


def test_measurement_base_is_passed_through(tmp_path, measured):
    provider = open_attestation_provider(tmp_path / "dev", measured, base=tmp_path, nsm_path=tmp_path / "no-nsm")
    assert provider.authority.pcrs[0] == measure_files(measured, tmp_path)
    assert provider.authority.pcrs[0] != measure_files(measured, measured[0].parent)  # names differ


def test_nsm_wins_when_present(tmp_path, measured):
    nsm = tmp_path / "nsm"
    nsm.write_bytes(b"")
    provider = open_attestation_provider(tmp_path / "dev", measured, nsm_path=nsm)
    try:
        assert isinstance(provider, NsmAttestationProvider) and not provider.is_development
    finally:
        provider.close()
    assert not (tmp_path / "dev").exists()
