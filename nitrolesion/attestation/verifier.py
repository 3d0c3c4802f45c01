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
4. The chain ``certificate <- cabundle[-1] <- ... <- cabundle[0]``:
   a. cabundle[0] is byte-for-byte one of the trusted roots (default: the pinned AWS
      Nitro Enclaves Root-G1);                                       UntrustedRoot
   b. every certificate is valid at ``now``;  CertificateExpired, CertificateNotYetValid
   c. the cabundle is in the NSM's order (each issuer name is the next one's subject);
                                                                     CertificateChainError
   d. RFC 5280 path validation by ``cryptography.x509.verification`` from the leaf to
      the trusted roots: signatures, CA flags, path lengths, keyCertSign, no unknown
      critical extensions (WebPKI defaults for CAs, a leaf profile fitted to Nitro leaf
      certificates), and the validated path is exactly the cabundle. CertificateChainError
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
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

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
from nitrolesion.attestation.policy import MAX_CLOCK_SKEW, MAX_PCR_INDEX, AttestationPolicy
from nitrolesion.attestation.trust import AWS_NITRO_ROOT_G1_SHA256, CERTIFICATE_PARSE_ERRORS, aws_nitro_root
from nitrolesion.limits import PCR_LENGTH

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
    was built by :meth:`AttestationPolicy.any_enclave` and PCRs were not checked).
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


# The subject common name DevAttestationAuthority.create gives its root; it lets an
# UntrustedRoot error say how to trust a development document on purpose.
DEV_ROOT_COMMON_NAME = "nitrolesion development root (NOT AWS)"
DEV_ROOT_HINT = "pass --dev-root DIR/dev_root.pem (DIR: the development authority's state directory)"


def _leaf_basic_constraints(_policy: Any, _cert: x509.Certificate, value: x509.BasicConstraints) -> None:
    if value.ca:
        raise ValueError("expected basicConstraints cA false on the leaf, got cA true")


def _leaf_key_usage(_policy: Any, _cert: x509.Certificate, value: x509.KeyUsage) -> None:
    if not value.digital_signature:
        raise ValueError("expected keyUsage digitalSignature on the leaf (it signs the document), got a keyUsage without it")


# Nitro leaf certificates carry basicConstraints (cA false) and keyUsage (digitalSignature,
# contentCommitment, non-critical) and nothing else: no authorityKeyIdentifier or
# subjectAltName, which the WebPKI end-entity defaults demand. So: those two required;
# nameConstraints refused (RFC 5280 s4.2.1.10: CA certificates only); other known
# extensions tolerated as they are harmless here. Unknown critical extensions are refused
# by the library whatever the policy says.
_LEAF_EXTENSIONS = (
    ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, _leaf_basic_constraints)
    .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _leaf_key_usage)
    .require_not_present(x509.NameConstraints)
)
# The AWS root and intermediates satisfy the WebPKI CA profile as they are (basicConstraints
# critical, keyUsage keyCertSign, no authorityCertIssuer), and so does the dev authority.
_CA_EXTENSIONS = ExtensionPolicy.webpki_defaults_ca()


def _verify_chain(
    leaf_der: bytes, bundle_ders: list[bytes], now: datetime, roots: list[x509.Certificate]
) -> tuple[x509.Certificate, list[x509.Certificate], x509.Certificate]:
    # 4a: the anchor. cabundle[0] must be byte-identical to a trusted root, so a
    # self-signed look-alike (same subject, other key) is refused before anything else.
    trusted = {_sha256(r.public_bytes(Encoding.DER)): r for r in roots}
    anchor = _sha256(bundle_ders[0])
    if anchor not in trusted:
        raise UntrustedRoot(_describe_untrusted_root(bundle_ders[0], anchor, trusted))
    root = trusted[anchor]

    try:
        # Chain order from the leaf up: certificate, cabundle[-1], ..., cabundle[1], root.
        leaf = _load_der(leaf_der, "certificate")
        bundle = [_load_der(der, f"cabundle[{n}]") for n, der in enumerate(bundle_ders)]
        chain = [("certificate", leaf)] + [(f"cabundle[{n}]", bundle[n]) for n in range(len(bundle) - 1, -1, -1)]
        chain[-1] = ("cabundle[0]", root)

        # 4b: every certificate valid at `now` (RFC 5280 s4.1.2.5: both bounds inclusive).
        # Path validation checks this too; checking first keeps the error's name precise.
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

        # 4c: the NSM's order. Path building would find a path through the intermediates in
        # any order; the document format fixes it, and a reordered bundle is not an NSM's.
        for depth in range(1, len(chain)):
            child_name, child = chain[depth - 1]
            _, parent = chain[depth]
            if child.issuer != parent.subject:
                raise CertificateChainError(
                    f"{child_name}: expected issuer {parent.subject.rfc4514_string()}, got {child.issuer.rfc4514_string()}"
                )

        # 4d: RFC 5280 path validation, and the path it validated must be the cabundle itself.
        verifier = (
            PolicyBuilder()
            .store(Store(roots))
            .time(now.astimezone(timezone.utc))
            .extension_policies(ca_policy=_CA_EXTENSIONS, ee_policy=_LEAF_EXTENSIONS)
            .build_client_verifier()
        )
        try:
            validated = verifier.verify(leaf, bundle[1:]).chain
        except VerificationError as exc:
            raise _describe_invalid_path(chain, exc) from exc
        expected = [cert.public_bytes(Encoding.DER) for _, cert in chain]
        if [cert.public_bytes(Encoding.DER) for cert in validated] != expected:
            raise CertificateChainError(
                f"expected the validated path to be certificate <- cabundle[-1] <- ... <- cabundle[0], "
                f"got another path of {len(validated)} certificates"
            )
    except AttestationError:
        raise
    except _CERT_ERRORS as exc:
        raise CertificateChainError(f"expected well-formed certificates, got {type(exc).__name__}: {exc}") from exc
    return leaf, bundle, root


def _describe_untrusted_root(anchor_der: bytes, anchor: str, trusted: dict[str, x509.Certificate]) -> str:
    names = ", ".join(sorted(f"sha256:{fp}" for fp in trusted))
    message = f"cabundle[0]: expected a trusted root ({names}), got sha256:{anchor}"
    # A development document is the usual cause: say how to trust its root on purpose.
    try:
        anchor_cert = x509.load_der_x509_certificate(anchor_der)
        common_names = anchor_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except _CERT_ERRORS:
        return message
    if any(attribute.value == DEV_ROOT_COMMON_NAME for attribute in common_names):
        message += f", the nitrolesion development authority's root, which is never trusted by default; {DEV_ROOT_HINT}"
    return message


def _describe_invalid_path(chain: list[tuple[str, x509.Certificate]], exc: VerificationError) -> CertificateChainError:
    # The library names the broken rule but not which cabundle entry broke it. A bad
    # signature is the most telling failure, so name the first one from the leaf up.
    for depth in range(1, len(chain)):
        child_name, child = chain[depth - 1]
        parent_name, parent = chain[depth]
        try:
            child.verify_directly_issued_by(parent)
        except InvalidSignature:
            return CertificateChainError(f"{child_name}: expected a valid signature by {parent_name}, got an invalid one")
        except _CERT_ERRORS:
            break  # unusable key or algorithm: the library's own message says more
    return CertificateChainError(f"expected a certification path valid under RFC 5280, got: {exc}")


def _load_der(der: bytes, name: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except CERTIFICATE_PARSE_ERRORS as exc:
        raise CertificateChainError(f"{name}: expected a DER X.509 certificate, got unparsable bytes ({exc})") from exc


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
    if not policy.allowed_pcr_sets:
        # Fail closed: a policy without sets allows no PCRs; "any" must be asked for.
        return (
            "expected PCRs matching an allowed set, got a policy that allows no PCRs (it has no "
            "allowed PCR sets); give a policy with the PCRs from `nitro-cli build-enclave`, or "
            "AttestationPolicy.any_enclave() to accept any enclave (insecure)"
        )
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
