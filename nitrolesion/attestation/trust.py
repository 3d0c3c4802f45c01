"""The pinned trust anchor: AWS Nitro Enclaves Root-G1, committed in ``roots/``.

AWS publishes the root at https://aws-nitro-enclaves.amazonaws.com/AWS_NitroEnclaves_Root-G1.zip
and documents its SHA-256 fingerprint ("Verifying the root of trust" in the Nitro Enclaves
user guide). The PEM file is committed next to this module and its DER's SHA-256 is checked
against the constant below every time it is loaded, so an edited file fails loudly instead
of silently trusting another root.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from nitrolesion.attestation.errors import PinnedRootError

AWS_NITRO_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
AWS_NITRO_ROOT_G1_FILE = "aws_nitro_root_g1.pem"

#: What cryptography raises for bytes it will not take as a certificate. InvalidVersion
#: (an X.509 version other than v1 or v3) is not a ValueError.
CERTIFICATE_PARSE_ERRORS = (ValueError, x509.InvalidVersion)


def certificate_sha256(certificate: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's DER encoding (its usual fingerprint)."""
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def load_pinned_root(pem: bytes, expected_sha256: str = AWS_NITRO_ROOT_G1_SHA256) -> x509.Certificate:
    """Parse ``pem`` and check its DER's SHA-256 against ``expected_sha256``.

    Raises:
        PinnedRootError: the PEM does not parse, or its fingerprint differs from the pin.
    """
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except CERTIFICATE_PARSE_ERRORS as exc:
        raise PinnedRootError(f"expected a PEM certificate for the pinned root, got unparsable data: {exc}") from exc
    actual = certificate_sha256(certificate)
    if actual != expected_sha256:
        raise PinnedRootError(f"pinned root: expected SHA-256 {expected_sha256}, got {actual}")
    return certificate


def load_pem_roots(path: str | Path) -> list[x509.Certificate]:
    """Certificates from a PEM file given as an extra root (e.g. the development
    authority's dev_root.pem); nothing is pinned.

    Raises OSError if the file cannot be read, ValueError if it holds no valid certificates.
    """
    data = Path(path).read_bytes()
    try:
        return x509.load_pem_x509_certificates(data)
    except x509.InvalidVersion as exc:  # the one parse error that is not a ValueError
        raise ValueError(f"{path}: certificate with an invalid X.509 version") from exc


@functools.lru_cache(maxsize=1)
def aws_nitro_root() -> x509.Certificate:
    """The AWS Nitro Enclaves Root-G1 certificate, verified against its pinned SHA-256.

    Raises:
        PinnedRootError: the committed file is missing or does not match the pin.
    """
    try:
        pem = resources.files("nitrolesion.attestation").joinpath("roots", AWS_NITRO_ROOT_G1_FILE).read_bytes()
    except OSError as exc:
        raise PinnedRootError(f"pinned root: expected roots/{AWS_NITRO_ROOT_G1_FILE} in the package, got {exc}") from exc
    return load_pinned_root(pem)
