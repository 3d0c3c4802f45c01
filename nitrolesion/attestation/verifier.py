"""Verify an AWS Nitro Enclaves attestation document, top to bottom.

The checks follow the AWS Nitro Enclaves user guide, "Verifying the root of trust" /
"Attestation document validation", in this order; each one is tagged ``# Step N`` in
the code and fails with its own exception type:

1. Decode the COSE_Sign1 (RFC 8152 s4.2), tagged (18) or untagged.   CoseDecodeError
2. The protected header's ``alg`` is ES384 (-35).                    UnsupportedAlgorithm
3. The payload is a CBOR map with the mandatory fields and types:    MalformedDocument
   module_id (text), digest == "SHA384", timestamp (ms), pcrs (index -> 48 bytes),
   certificate (DER), cabundle (list of DER); optional public_key / user_data / nonce
   (null or at most 1024 bytes each: real NSMs emit 1024, above the spec's 512).
4. The chain ``certificate <- cabundle[-1] <- ... <- cabundle[0]`` links up
   (issuer names, CA flags, path lengths, signatures), cabundle[0] is byte-for-byte
   one of the trusted roots (default: the pinned AWS Nitro Enclaves Root-G1), and every
   certificate is valid at ``now``.          CertificateChainError, UntrustedRoot,
                                             CertificateExpired, CertificateNotYetValid
5. The COSE signature (raw r||s, 96 bytes) verifies over the Sig_structure
   (RFC 8152 s4.4) with the leaf certificate's P-384 key.            SignatureInvalid
6. Policy (nitrolesion.attestation.policy):
   a. debug mode (all-zero PCR0/1/2) only if the policy allows it;   DebugModeRejected
   b. PCRs match one of the allowed sets (if any are given);         PcrMismatch
   c. nonce equals the one sent (if the caller sent one);            NonceMismatch
   d. timestamp no older than ``policy.max_age`` (if set), and not
      more than MAX_CLOCK_SKEW after ``now``.        DocumentTooOld, DocumentFromFuture
7. Separately, :func:`check_public_key`: the key the parent is about to wrap secrets
   for is the one in the document.                                   PublicKeyMismatch

Nothing here reads the clock: ``now`` is a required parameter, so a stored document can
be verified at its own time and tests need no monkeypatching. For any input bytes the
verifier returns a result or raises an :class:`AttestationError` subclass, nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as CryptoUnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from nitrolesion.attestation.cose import ALG_ES384, HEADER_ALG, decode_cbor, decode_cose_sign1
from nitrolesion.attestation.errors import (
    AttestationError,
    CertificateChainError,
    CertificateExpired,
    CertificateNotYetValid,
    CoseDecodeError,
    DebugModeRejected,
    DocumentFromFuture,
    DocumentTooOld,
    MalformedDocument,
    NonceMismatch,
    PcrMismatch,
    PublicKeyMismatch,
    SignatureInvalid,
    UnsupportedAlgorithm,
    UntrustedRoot,
)
from nitrolesion.attestation.policy import MAX_CLOCK_SKEW, MAX_PCR_INDEX, PCR_LENGTH, AttestationPolicy
from nitrolesion.attestation.trust import AWS_NITRO_ROOT_G1_SHA256, CERTIFICATE_PARSE_ERRORS, aws_nitro_root

HEADER_CRIT = 2  # RFC 8152 s3.1
# Field limits from the AWS "Attestation document specification"; user_data and nonce are
# raised from 512 to 1024 because real NSMs emit 1024-byte values.
MAX_OPTIONAL_FIELD = 1024
MAX_CERTIFICATE_SIZE = 1024
MAX_CABUNDLE_LENGTH = 16  # AWS chains have 4 entries; a bound keeps hostile input cheap.
MAX_MODULE_ID_LENGTH = 256
DIGEST_SHA384 = "SHA384"
# Debug-mode enclaves report these PCRs as all zeros (Nitro Enclaves user guide, "debug mode").
DEBUG_PCRS = (0, 1, 2)
ES384_SIGNATURE_LENGTH = 96  # raw r||s, 48 bytes each (RFC 8152 s8.1)
# Largest timestamp datetime can represent (9999-12-31T23:59:59.999Z), in ms.
_MAX_TIMESTAMP_MS = 253_402_300_799_999
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class AttestationResult:
    """The verified content of an attestation document.

    ``root`` is the trusted root the chain ended at; ``root_is_aws`` says whether it is
    the pinned AWS Nitro Enclaves root (False for a development root given explicitly).
    ``matched_pcr_set`` is the index of the policy's PCR set that matched (-1: the policy
    pins no PCRs).
    """

    module_id: str
    timestamp: datetime
    timestamp_ms: int
    digest: str
    pcrs: dict[int, bytes]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    certificate: x509.Certificate
    cabundle: tuple[x509.Certificate, ...]
    debug: bool
    root: x509.Certificate
    root_is_aws: bool
    matched_pcr_set: int

    @property
    def public_key_sha256(self) -> str | None:
        """Hex SHA-256 of the attested public key (SubjectPublicKeyInfo DER), or None."""
        return None if self.public_key is None else hashlib.sha256(self.public_key).hexdigest()


def verify_attestation(
    document: bytes,
    *,
    now: datetime,
    policy: AttestationPolicy,
    expected_nonce: bytes | None = None,
    trusted_roots: Sequence[x509.Certificate] | None = None,
) -> AttestationResult:
    """Verify ``document`` at time ``now`` against ``policy`` (steps 1-6 above).

    Args:
        document: the raw attestation document as the NSM returned it.
        now: timezone-aware verification time; certificates must be valid at it.
        policy: allowed PCR sets, debug mode, maximum age.
        expected_nonce: the nonce sent to the enclave; None skips the nonce check.
        trusted_roots: roots the chain may end at; None = the pinned AWS root only.

    Raises:
        CoseDecodeError, UnsupportedAlgorithm, MalformedDocument, CertificateChainError,
        CertificateExpired, CertificateNotYetValid, UntrustedRoot, SignatureInvalid,
        DebugModeRejected, PcrMismatch, NonceMismatch, DocumentTooOld, DocumentFromFuture:
        the check of that name failed (all subclasses of AttestationError).
        ValueError: ``now`` is naive or ``trusted_roots`` is empty (API misuse, not input).
    """
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    roots = [aws_nitro_root()] if trusted_roots is None else list(trusted_roots)
    if not roots:
        raise ValueError("trusted_roots must not be empty (pass None for the pinned AWS root)")

    # Step 1: decode the COSE_Sign1 envelope.
    message = decode_cose_sign1(document)

    # Step 2: the protected header must say ES384; the unprotected one is not trusted.
    header = message.protected_header()
    alg = header.get(HEADER_ALG)
    if type(alg) is not int or alg != ALG_ES384:  # not bool, not -35.0
        raise UnsupportedAlgorithm(f"protected header alg: expected {ALG_ES384} (ES384), got {alg!r:.40}")
    # RFC 8152 s3.1: parameters listed in "crit" must be understood; we understand none.
    if HEADER_CRIT in header:
        raise UnsupportedAlgorithm(f"protected header crit: expected none, got {header[HEADER_CRIT]!r:.40}")

    # Step 3: payload fields and types.
    fields = _parse_payload(message.payload)

    # Step 4: certificate chain to a trusted root, every certificate valid at `now`.
    leaf, bundle, root = _verify_chain(fields["certificate"], fields["cabundle"], now, roots)

    # Step 5: COSE signature with the leaf key.
    _verify_signature(leaf, message.sig_structure(), message.signature)

    pcrs: dict[int, bytes] = fields["pcrs"]
    debug = any(not any(pcrs[i]) for i in DEBUG_PCRS)

    # Step 6a: debug mode.
    if debug and not policy.allow_debug:
        zero = ", ".join(f"PCR{i}" for i in DEBUG_PCRS if not any(pcrs[i]))
        raise DebugModeRejected(
            f"expected a production enclave (non-zero PCR0/1/2), got all-zero {zero} (debug mode); "
            "allow it only for development"
        )

    # Step 6b: PCRs against the allowed sets.
    matched = policy.matching_pcr_set(pcrs)
    if matched is None:
        raise PcrMismatch(_describe_pcr_mismatch(policy, pcrs))

    # Step 6c: nonce.
    nonce: bytes | None = fields["nonce"]
    if expected_nonce is not None:
        if nonce is None:
            raise NonceMismatch(f"expected nonce {_short(expected_nonce)}, got no nonce")
        if not hmac.compare_digest(nonce, expected_nonce):
            raise NonceMismatch(f"expected nonce {_short(expected_nonce)}, got {_short(nonce)}")

    # Step 6d: freshness.
    timestamp: datetime = fields["timestamp"]
    if policy.max_age is not None:
        age = now - timestamp
        if age > policy.max_age:
            raise DocumentTooOld(f"expected age at most {policy.max_age}, got {age} (timestamp {_iso(timestamp)})")
        if -age > MAX_CLOCK_SKEW:
            raise DocumentFromFuture(
                f"expected timestamp at most {MAX_CLOCK_SKEW} after {_iso(now)}, got {_iso(timestamp)}"
            )

    return AttestationResult(
        module_id=fields["module_id"],
        timestamp=timestamp,
        timestamp_ms=fields["timestamp_ms"],
        digest=fields["digest"],
        pcrs=dict(pcrs),
        public_key=fields["public_key"],
        user_data=fields["user_data"],
        nonce=nonce,
        certificate=leaf,
        cabundle=tuple(bundle),
        debug=debug,
        root=root,
        root_is_aws=_sha256(root.public_bytes(Encoding.DER)) == AWS_NITRO_ROOT_G1_SHA256,
        matched_pcr_set=matched,
    )


def check_public_key(result: AttestationResult, public_key_der: bytes) -> None:
    """Step 7: the key about to be used for wrapping must be the attested one.

    Compares SubjectPublicKeyInfo DER bytes exactly.

    Raises:
        PublicKeyMismatch: the document has no public_key, or a different one.
    """
    expected = hashlib.sha256(public_key_der).hexdigest()
    if result.public_key is None:
        raise PublicKeyMismatch(f"expected attested public key sha256:{expected}, got a document without public_key")
    if not hmac.compare_digest(result.public_key, public_key_der):
        raise PublicKeyMismatch(f"expected public key sha256:{result.public_key_sha256}, got sha256:{expected}")


# -- step 3 --------------------------------------------------------------------------------


def _parse_payload(payload: bytes) -> dict[str, Any]:
    try:
        doc = decode_cbor(payload, "payload")
    except CoseDecodeError as exc:
        raise MalformedDocument(str(exc)) from exc
    if not isinstance(doc, dict):
        raise MalformedDocument(f"payload: expected a CBOR map, got {type(doc).__name__}")

    def required(key: str, kind: type) -> Any:
        if key not in doc:
            raise MalformedDocument(f"{key}: expected a {kind.__name__} field, got none")
        value = doc[key]
        # bool is an int subclass; a CBOR true is not a timestamp.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MalformedDocument(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
        return value

    def optional_bytes(key: str, minimum: int) -> bytes | None:
        value = doc.get(key)
        if value is None:
            return None
        if not isinstance(value, bytes):
            raise MalformedDocument(f"{key}: expected bytes or null, got {type(value).__name__}")
        if not minimum <= len(value) <= MAX_OPTIONAL_FIELD:
            raise MalformedDocument(f"{key}: expected {minimum}..{MAX_OPTIONAL_FIELD} bytes, got {len(value)}")
        return value

    module_id = required("module_id", str)
    if not 1 <= len(module_id) <= MAX_MODULE_ID_LENGTH:
        raise MalformedDocument(f"module_id: expected 1..{MAX_MODULE_ID_LENGTH} characters, got {len(module_id)}")
    digest = required("digest", str)
    if digest != DIGEST_SHA384:
        raise MalformedDocument(f"digest: expected {DIGEST_SHA384!r}, got {digest[:32]!r}")
    timestamp_ms = required("timestamp", int)
    if not 0 < timestamp_ms <= _MAX_TIMESTAMP_MS:
        raise MalformedDocument(f"timestamp: expected milliseconds in 1..{_MAX_TIMESTAMP_MS}, got {timestamp_ms}")

    raw_pcrs = required("pcrs", dict)
    if not 1 <= len(raw_pcrs) <= MAX_PCR_INDEX + 1:
        raise MalformedDocument(f"pcrs: expected 1..{MAX_PCR_INDEX + 1} entries, got {len(raw_pcrs)}")
    pcrs: dict[int, bytes] = {}
    for index, value in raw_pcrs.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_PCR_INDEX:
            raise MalformedDocument(f"pcrs: expected index 0..{MAX_PCR_INDEX}, got {index!r:.40}")
        if not isinstance(value, bytes) or len(value) != PCR_LENGTH:
            got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
            raise MalformedDocument(f"pcrs[{index}]: expected {PCR_LENGTH} bytes (SHA-384), got {got}")
        pcrs[index] = value
    missing = [i for i in DEBUG_PCRS if i not in pcrs]
    if missing:
        raise MalformedDocument(f"pcrs: expected PCR0, PCR1 and PCR2, got no {', '.join(f'PCR{i}' for i in missing)}")

    certificate = required("certificate", bytes)
    if not 1 <= len(certificate) <= MAX_CERTIFICATE_SIZE:
        raise MalformedDocument(f"certificate: expected 1..{MAX_CERTIFICATE_SIZE} bytes, got {len(certificate)}")
    cabundle = required("cabundle", list)
    if not 1 <= len(cabundle) <= MAX_CABUNDLE_LENGTH:
        raise MalformedDocument(f"cabundle: expected 1..{MAX_CABUNDLE_LENGTH} certificates, got {len(cabundle)}")
    for n, entry in enumerate(cabundle):
        if not isinstance(entry, bytes) or not 1 <= len(entry) <= MAX_CERTIFICATE_SIZE:
            got = f"{len(entry)} bytes" if isinstance(entry, bytes) else type(entry).__name__
            raise MalformedDocument(f"cabundle[{n}]: expected 1..{MAX_CERTIFICATE_SIZE} bytes, got {got}")

    return {
        "module_id": module_id,
        "digest": digest,
        "timestamp_ms": timestamp_ms,
        "timestamp": _EPOCH + timedelta(milliseconds=timestamp_ms),
        "pcrs": pcrs,
        "certificate": certificate,
        "cabundle": cabundle,
        "public_key": optional_bytes("public_key", 1),
        "user_data": optional_bytes("user_data", 0),
        "nonce": optional_bytes("nonce", 0),
    }


# -- step 4 --------------------------------------------------------------------------------

# What cryptography raises on hostile certificates: parse errors, duplicate or malformed
# extensions, unsupported key/signature types.
_CERT_ERRORS = (
    *CERTIFICATE_PARSE_ERRORS,
    TypeError,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    CryptoUnsupportedAlgorithm,
)


def _verify_chain(
    leaf_der: bytes, bundle_ders: list[bytes], now: datetime, roots: list[x509.Certificate]
) -> tuple[x509.Certificate, list[x509.Certificate], x509.Certificate]:
    # 4a: the anchor. cabundle[0] must be byte-identical to a trusted root, so a
    # self-signed look-alike (same subject, other key) is refused before anything else.
    trusted = {_sha256(r.public_bytes(Encoding.DER)): r for r in roots}
    anchor = _sha256(bundle_ders[0])
    if anchor not in trusted:
        names = ", ".join(sorted(f"sha256:{fp}" for fp in trusted))
        raise UntrustedRoot(f"cabundle[0]: expected a trusted root ({names}), got sha256:{anchor}")
    root = trusted[anchor]

    try:
        # Chain order from the leaf up: certificate, cabundle[-1], ..., cabundle[1], root.
        leaf = _load_der(leaf_der, "certificate")
        bundle = [_load_der(der, f"cabundle[{n}]") for n, der in enumerate(bundle_ders)]
        chain = [("certificate", leaf)] + [(f"cabundle[{n}]", bundle[n]) for n in range(len(bundle) - 1, -1, -1)]
        chain[-1] = ("cabundle[0]", root)

        # 4b: every certificate valid at `now` (RFC 5280 s4.1.2.5: both bounds inclusive).
        for name, cert in chain:
            not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
            if now > not_after:
                raise CertificateExpired(
                    f"{name} ({_cn(cert)}): expected valid at {_iso(now)}, got notAfter {_iso(not_after)}"
                )
            if now < not_before:
                raise CertificateNotYetValid(
                    f"{name} ({_cn(cert)}): expected valid at {_iso(now)}, got notBefore {_iso(not_before)}"
                )

        # 4c: the leaf is an end-entity certificate.
        leaf_bc = _basic_constraints(leaf)
        if leaf_bc is not None and leaf_bc.ca:
            raise CertificateChainError("certificate: expected an end-entity certificate, got a CA certificate")

        # 4d: each link: issuer is a CA allowed to sign at this depth, names chain, signature.
        for depth in range(1, len(chain)):
            child_name, child = chain[depth - 1]
            parent_name, parent = chain[depth]
            bc = _basic_constraints(parent)
            if bc is None or not bc.ca:
                raise CertificateChainError(f"{parent_name}: expected a CA certificate (basicConstraints cA), got none")
            # Intermediates below this parent, not counting the leaf (RFC 5280 s4.2.1.9).
            below = depth - 1
            if bc.path_length is not None and below > bc.path_length:
                raise CertificateChainError(
                    f"{parent_name}: expected at most {bc.path_length} CA certificates below it, got {below}"
                )
            usage = _key_usage(parent)
            if usage is not None and not usage.key_cert_sign:
                raise CertificateChainError(f"{parent_name}: expected keyUsage keyCertSign, got {usage}")
            if child.issuer != parent.subject:
                raise CertificateChainError(
                    f"{child_name}: expected issuer {parent.subject.rfc4514_string()}, got {child.issuer.rfc4514_string()}"
                )
            try:
                child.verify_directly_issued_by(parent)
            except InvalidSignature as exc:
                raise CertificateChainError(
                    f"{child_name}: expected a valid signature by {parent_name}, got an invalid one"
                ) from exc
    except AttestationError:
        raise
    except _CERT_ERRORS as exc:
        raise CertificateChainError(f"expected well-formed certificates, got {type(exc).__name__}: {exc}") from exc
    return leaf, bundle, root


def _load_der(der: bytes, name: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except CERTIFICATE_PARSE_ERRORS as exc:
        raise CertificateChainError(f"{name}: expected a DER X.509 certificate, got unparsable bytes ({exc})") from exc


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


# -- step 5 --------------------------------------------------------------------------------


def _verify_signature(leaf: x509.Certificate, signed: bytes, signature: bytes) -> None:
    try:
        key = leaf.public_key()
    except _CERT_ERRORS as exc:
        raise UnsupportedAlgorithm(f"certificate: expected an EC P-384 key, got an unusable key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        got = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise UnsupportedAlgorithm(f"certificate: expected an EC P-384 key for ES384, got {got}")
    if len(signature) != ES384_SIGNATURE_LENGTH:
        raise SignatureInvalid(f"expected a {ES384_SIGNATURE_LENGTH}-byte r||s signature, got {len(signature)} bytes")
    half = ES384_SIGNATURE_LENGTH // 2
    r = int.from_bytes(signature[:half], "big")
    s = int.from_bytes(signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise SignatureInvalid(
            f"expected a signature by the leaf key ({_cn(leaf)}) over the COSE Sig_structure, got an invalid one"
        ) from exc


# -- helpers -------------------------------------------------------------------------------


def _describe_pcr_mismatch(policy: AttestationPolicy, pcrs: dict[int, bytes]) -> str:
    # Report the first differing PCR of each allowed set: that is what an operator must fix.
    parts = []
    for number, pcr_set in enumerate(policy.allowed_pcr_sets):
        for index, value in sorted(pcr_set.items()):
            got = pcrs.get(index)
            if got != value:
                shown = "none" if got is None else got.hex()
                parts.append(f"set #{number}: expected PCR{index} {value.hex()}, got {shown}")
                break
    return "; ".join(parts)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _short(data: bytes) -> str:
    text = data.hex()
    return f"{len(data)} bytes {text[:32]}{'...' if len(text) > 32 else ''}"


def _cn(cert: x509.Certificate) -> str:
    try:
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(names[0].value) if names else cert.subject.rfc4514_string()
    except _CERT_ERRORS:
        return "unreadable subject"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
