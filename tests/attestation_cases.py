"""Real Nitro attestation documents, and the synthetic bad cases derived from them.

The real documents are committed in ``tests/fixtures/attestation-docs/`` (its README says
where each comes from and under which licence), so these tests run on every clone;
``$ATTESTATION_DOCS_DIR`` reads them from another folder instead. Every negative case is
built here, in memory, from a real document: one edit per case, as in nitrite's tests. Run
this file to print the derived cases' sizes as a sanity check.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from nitrolesion.limits import PROJECT_ROOT

DOCS_ENV = "ATTESTATION_DOCS_DIR"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Expected:
    """Facts about each fixture, pinned from the fixtures' README (not read from the files)."""

    timestamp_ms: int
    debug: bool
    pcr0_prefix: str
    public_key_length: int | None
    nonce: bytes | None
    user_data_length: int | None
    leaf_valid_until: datetime


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


EXPECTED: dict[str, Expected] = {
    "anjuna_prod_2021.bin": Expected(
        1616018515685, False, "2d151586641b790f", None, None, None, _utc("2021-03-18T01:01:55")
    ),
    "anjuna_prod_rsa_pubkey_2021.bin": Expected(
        1616602241734, False, "672cd3c91b7ac756", 294, None, None, _utc("2021-03-24T19:06:22")
    ),
    "anjuna_debug_rsa_pubkey_nonce_2024.bin": Expected(
        1706120065635, True, "0000000000000000", 294, b"Nonce\n", 13, _utc("2024-01-24T21:14:17")
    ),
    "blocky_prod_maxfields_2024.bin": Expected(
        1725719859545, False, "e72a46ca80a260fb", 1024, b"\x01" * 1024, 1024, _utc("2024-09-07T17:37:39")
    ),
    "blocky_debug_2024.bin": Expected(
        1725719886508, True, "0000000000000000", 1024, b"\x01" * 1024, 1024, _utc("2024-09-07T17:38:06")
    ),
}


@dataclass(frozen=True)
class RealDocument:
    name: str
    data: bytes
    expected: Expected

    @property
    def time(self) -> datetime:
        """The document's own timestamp, the time it verifies at."""
        return EPOCH + timedelta(milliseconds=self.expected.timestamp_ms)

    @property
    def payload(self) -> dict[str, Any]:
        return cbor2.loads(cbor2.loads(self.data)[2])


#: The committed copies (tests/fixtures/attestation-docs/README.md).
FIXTURES_DIR = PROJECT_ROOT / "tests" / "fixtures" / "attestation-docs"


def docs_dir() -> Path:
    """``$ATTESTATION_DOCS_DIR`` if set, else the committed fixtures."""
    configured = os.environ.get(DOCS_ENV)
    return Path(configured).expanduser() if configured else FIXTURES_DIR


@functools.lru_cache(maxsize=1)
def real_documents() -> tuple[RealDocument, ...]:
    """All known fixtures present in ``docs_dir()``.

    From the committed folder all five must be there: a missing one is a broken checkout and
    fails loudly instead of quietly skipping the attestation tests. A folder named in
    ``$ATTESTATION_DOCS_DIR`` may hold fewer (none: the tests that need them skip).
    """
    folder = docs_dir()
    found = []
    for name, expected in sorted(EXPECTED.items()):
        path = folder / name
        if path.is_file():
            found.append(RealDocument(name, path.read_bytes(), expected))
        elif folder == FIXTURES_DIR:
            raise FileNotFoundError(f"committed attestation fixture {path} is missing")
    return tuple(found)


SKIP_REASON = (
    f"real Nitro attestation documents not found in {docs_dir()} "
    f"(set {DOCS_ENV} to the folder holding the *.bin fixtures described in its README)"
)


def document(name: str) -> RealDocument:
    for doc in real_documents():
        if doc.name == name:
            return doc
    raise LookupError(name)


# -- one-edit mutations -------------------------------------------------------------------


def split(data: bytes) -> list[Any]:
    """[protected, unprotected, payload, signature] of an untagged COSE_Sign1."""
    return list(cbor2.loads(data))


def join(parts: list[Any], *, tagged: bool = False) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(18, parts) if tagged else parts)


def flip_payload_byte(data: bytes, offset: int) -> bytes:
    parts = split(data)
    payload = bytearray(parts[2])
    payload[offset % len(payload)] ^= 0x01
    parts[2] = bytes(payload)
    return join(parts)


def flip_signature_byte(data: bytes, index: int) -> bytes:
    parts = split(data)
    signature = bytearray(parts[3])
    signature[index] ^= 0x80
    parts[3] = bytes(signature)
    return join(parts)


def pcr_value_offset(data: bytes, index: int) -> int:
    """Offset inside the payload of PCR ``index``'s value (must be unique in the payload)."""
    payload = split(data)[2]
    value = cbor2.loads(payload)["pcrs"][index]
    offset = payload.find(value)
    assert offset >= 0 and payload.find(value, offset + 1) == -1, "PCR value not unique in payload"
    return offset


DELETE = object()  # sentinel for with_payload: remove the field


def with_payload(data: bytes, **changes: Any) -> bytes:
    """Re-encode the payload with fields replaced (``None`` values kept; use DELETE to drop)."""
    parts = split(data)
    payload = cbor2.loads(parts[2])
    for key, value in changes.items():
        if value is DELETE:
            payload.pop(key, None)
        else:
            payload[key] = value
    parts[2] = cbor2.dumps(payload)
    return join(parts)


def with_protected(data: bytes, protected: bytes, unprotected: dict[Any, Any] | None = None) -> bytes:
    parts = split(data)
    parts[0] = protected
    if unprotected is not None:
        parts[1] = unprotected
    return join(parts)


@functools.lru_cache(maxsize=1)
def lookalike_root() -> x509.Certificate:
    """A self-signed P-384 CA with the AWS root's subject, but our own key."""
    from nitrolesion.attestation.trust import aws_nitro_root

    aws = aws_nitro_root()
    key = ec.generate_private_key(ec.SECP384R1())
    return (
        x509.CertificateBuilder()
        .subject_name(aws.subject)
        .issuer_name(aws.subject)
        .public_key(key.public_key())
        .serial_number(aws.serial_number)
        .not_valid_before(aws.not_valid_before_utc)
        .not_valid_after(aws.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )


def with_x509_version(der: bytes, version: int) -> bytes:
    """A DER certificate with its version field set to ``version`` (0 = v1, 1 = v2, 2 = v3).

    cryptography accepts v1 and v3 only, and refuses others with ``InvalidVersion``, which
    is not a ValueError (a fuzzer found a verifier that let it escape)."""
    v3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2, first thing in tbsCertificate
    assert 0 <= der.find(v3) < 16, "expected a v3 certificate"
    return der.replace(v3, v3[:-1] + bytes([version]), 1)


def substitute_root(data: bytes) -> bytes:
    """Replace cabundle[0] (the AWS root) with a self-signed look-alike."""
    payload = cbor2.loads(split(data)[2])
    cabundle = list(payload["cabundle"])
    cabundle[0] = lookalike_root().public_bytes(Encoding.DER)
    return with_payload(data, cabundle=cabundle)


def swap_intermediates(data: bytes) -> bytes:
    """Swap cabundle[1] and cabundle[2]: every certificate genuine, the order broken."""
    payload = cbor2.loads(split(data)[2])
    cabundle = list(payload["cabundle"])
    cabundle[1], cabundle[2] = cabundle[2], cabundle[1]
    return with_payload(data, cabundle=cabundle)


def forge_leaf_and_resign(data: bytes) -> bytes:
    """Replace the leaf by a look-alike (same names and validity, our key, signed by a
    stranger) and re-sign the COSE envelope with it, so the COSE signature itself is valid:
    only the chain's signature check can catch this."""
    parts = split(data)
    payload = cbor2.loads(parts[2])
    real_leaf = x509.load_der_x509_certificate(payload["certificate"])
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    stranger = ec.generate_private_key(ec.SECP384R1())
    forged = (
        x509.CertificateBuilder()
        .subject_name(real_leaf.subject)
        .issuer_name(real_leaf.issuer)
        .public_key(leaf_key.public_key())
        .serial_number(real_leaf.serial_number)
        .not_valid_before(real_leaf.not_valid_before_utc)
        .not_valid_after(real_leaf.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(stranger, hashes.SHA384())
    )
    payload["certificate"] = forged.public_bytes(Encoding.DER)
    parts[2] = cbor2.dumps(payload)
    to_sign = cbor2.dumps(["Signature1", parts[0], b"", parts[2]])
    r, s = decode_dss_signature(leaf_key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    parts[3] = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    return join(parts)


# -- synthetic chains: a Nitro-shaped PKI built here, for X.509 defects no real document has --

def key_usage(*granted: str) -> x509.KeyUsage:
    """A KeyUsage extension granting exactly the named usages (x509.KeyUsage's argument names)."""
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{name: name in granted for name in names})


CA_KEY_USAGE = key_usage("digital_signature", "key_cert_sign", "crl_sign")
# What Nitro leaf certificates carry (non-critical): digitalSignature and contentCommitment.
LEAF_KEY_USAGE = key_usage("digital_signature", "content_commitment")
# An extension no verifier can know: an OID under the documentation-only arc 2.999 (X.660).
UNKNOWN_EXTENSION = x509.UnrecognizedExtension(x509.ObjectIdentifier("2.999.1.1"), b"\x05\x00")

Extensions = list[tuple[x509.ExtensionType, bool]]  # (extension, critical)


def nitro_ca_extensions(path_length: int | None, key_usage: x509.KeyUsage = CA_KEY_USAGE) -> Extensions:
    """The extensions of an AWS Nitro CA certificate (basicConstraints and keyUsage, critical)."""
    return [(x509.BasicConstraints(ca=True, path_length=path_length), True), (key_usage, True)]


def nitro_leaf_extensions(key_usage: x509.KeyUsage = LEAF_KEY_USAGE) -> Extensions:
    """The extensions of an AWS Nitro leaf certificate, criticality as AWS sets it."""
    return [(x509.BasicConstraints(ca=False, path_length=None), True), (key_usage, False)]


@dataclass(frozen=True)
class SyntheticDocument:
    data: bytes
    root: x509.Certificate  # pass as trusted_roots=[root]
    time: datetime


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
    now: datetime, extensions: Extensions,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=3))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA384())


def synthetic_document(
    now: datetime,
    *,
    root_extensions: Extensions | None = None,
    intermediate_extensions: Extensions | None = None,
    leaf_extensions: Extensions | None = None,
) -> SyntheticDocument:
    """A Nitro-format document (production PCRs) signed through root <- intermediate <- leaf.

    Each ``*_extensions`` replaces that certificate's extensions outright; None keeps the
    AWS-like defaults (:func:`nitro_ca_extensions`, :func:`nitro_leaf_extensions`), with
    which the document verifies at ``now`` against ``trusted_roots=[result.root]``.
    """
    root_key, intermediate_key, leaf_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
    root = _certificate("synthetic root", root_key, "synthetic root", root_key, now,
                        nitro_ca_extensions(None) if root_extensions is None else root_extensions)
    intermediate = _certificate("synthetic intermediate", intermediate_key, "synthetic root", root_key, now,
                                nitro_ca_extensions(0) if intermediate_extensions is None else intermediate_extensions)
    leaf = _certificate("synthetic leaf", leaf_key, "synthetic intermediate", intermediate_key, now,
                        nitro_leaf_extensions() if leaf_extensions is None else leaf_extensions)
    payload = cbor2.dumps(
        {
            "module_id": "i-0synthetic00000000-enc0000000000000000",
            "digest": "SHA384",
            "timestamp": (now - EPOCH) // timedelta(milliseconds=1),
            "pcrs": {i: hashlib.sha384(b"synthetic PCR %d" % i).digest() for i in range(16)},
            "certificate": leaf.public_bytes(Encoding.DER),
            "cabundle": [root.public_bytes(Encoding.DER), intermediate.public_bytes(Encoding.DER)],
            "public_key": None,
            "user_data": None,
            "nonce": None,
        }
    )
    protected = cbor2.dumps({1: -35})
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(leaf_key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    data = join([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])
    return SyntheticDocument(data, root, now)


if __name__ == "__main__":
    for doc in real_documents():
        print(doc.name, len(doc.data), len(substitute_root(doc.data)), len(flip_signature_byte(doc.data, 0)))
    if not real_documents():
        print(SKIP_REASON)
