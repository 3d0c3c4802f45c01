"""Where the enclave gets its attestation documents: the NSM, or the development authority.

The enclave calls :func:`open_attestation_provider` once at start-up:

- ``/dev/nsm`` exists: the real Nitro Secure Module is used (even if a development state
  directory was also given: real hardware always wins);
- otherwise, with ``dev_state_dir`` (the enclave's development flag): the local
  :class:`~nitrolesion.attestation.dev_authority.DevAttestationAuthority`;
- otherwise :class:`AttestationUnavailable`: the enclave must refuse to start rather than
  serve without attestation.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from nitrolesion.attestation.errors import AttestationUnavailable
from nitrolesion.attestation.nsm import NSM_DEVICE_PATH, NsmClient

if TYPE_CHECKING:  # imported when used: the enclave image holds it only for development
    from nitrolesion.attestation.dev_authority import DevAttestationAuthority


class AttestationProvider(Protocol):
    """Issues attestation documents binding a public key, nonce and user data."""

    #: True when documents come from the development authority (not trusted by default).
    is_development: bool

    def attest(self, public_key: bytes, nonce: bytes | None = None, user_data: bytes | None = None) -> bytes: ...


class NsmAttestationProvider:
    """Documents from the Nitro Secure Module."""

    is_development = False

    def __init__(self, client: NsmClient) -> None:
        self._client = client

    def attest(self, public_key: bytes, nonce: bytes | None = None, user_data: bytes | None = None) -> bytes:
        """Raises: NsmError if the NSM refuses or the device call fails."""
        return self._client.attest(public_key=public_key, nonce=nonce, user_data=user_data)

    def close(self) -> None:
        self._client.close()


class DevAttestationProvider:
    """Documents from the local development authority (demo and tests only)."""

    is_development = True

    def __init__(self, authority: "DevAttestationAuthority") -> None:
        self.authority = authority

    def attest(
        self,
        public_key: bytes,
        nonce: bytes | None = None,
        user_data: bytes | None = None,
        now: datetime | None = None,
    ) -> bytes:
        """Raises: NsmError (InputTooLarge) like the NSM would, DevAuthorityError."""
        return self.authority.attest(public_key=public_key, nonce=nonce, user_data=user_data, now=now)

    def close(self) -> None:
        pass


def open_attestation_provider(
    dev_state_dir: Path | None,
    measured_files: Sequence[Path],
    *,
    base: Path | None = None,
    nsm_path: Path = NSM_DEVICE_PATH,
) -> NsmAttestationProvider | DevAttestationProvider:
    """Choose the attestation source for this enclave (see the module docstring).

    ``measured_files`` (the enclave's code and model) feed the development PCR0; they are
    ignored on real hardware, where the EIF measurement is the NSM's business. ``base`` is
    what their measured names are relative to; pass the project root so the parent can
    recompute PCR0 with ``measure_files(files, root)`` (default: the common parent of the
    files' parents, see ``default_measurement_base``).

    Raises:
        AttestationUnavailable: no ``/dev/nsm`` and no development state directory.
        DevAuthorityError: the development state directory is unusable.
    """
    if Path(nsm_path).exists():
        return NsmAttestationProvider(NsmClient.open(Path(nsm_path)))
    if dev_state_dir is not None:
        from nitrolesion.attestation.dev_authority import DevAttestationAuthority

        return DevAttestationProvider(DevAttestationAuthority.load_or_create(Path(dev_state_dir), measured_files, base=base))
    raise AttestationUnavailable(
        f"expected a Nitro Secure Module at {nsm_path}, got none: run inside a Nitro Enclave, "
        "or start with the development flag to use the local development attestation authority"
    )
