"""Errors raised by the attestation package, one type per check.

    NitroLesionError                      (nitrolesion.errors)
    └── AttestationError                  base: anything attestation-related went wrong
        ├── CoseDecodeError               step 1: bytes are not a COSE_Sign1 structure
        ├── UnsupportedAlgorithm          step 2: protected header alg is not ES384 (or leaf key unfit)
        ├── MalformedDocument             step 3: payload field missing, wrong type or out of range
        ├── CertificateChainError         step 4: the chain leaf -> cabundle fails RFC 5280 path validation
        │   ├── CertificateExpired        step 4: a certificate's notAfter is before `now`
        │   ├── CertificateNotYetValid    step 4: a certificate's notBefore is after `now`
        │   └── UntrustedRoot             step 4: cabundle[0] is not one of the trusted roots
        │                                         (for a development root: says to pass --dev-root)
        ├── SignatureInvalid              step 5: COSE signature does not verify with the leaf key
        ├── PolicyViolation               step 6: the document is authentic but not acceptable
        │   ├── DebugModeRejected         6a: all-zero PCR0/1/2 (debug enclave) and debug not allowed
        │   ├── PcrMismatch               6b: PCRs match none of the allowed sets (no sets: nothing matches)
        │   ├── NonceMismatch             6c: nonce differs from the one the client sent
        │   ├── DocumentTooOld            6d: timestamp older than the policy's max_age
        │   └── DocumentFromFuture        6d: timestamp too far after `now`
        ├── PublicKeyMismatch             step 7: key offered for wrapping is not the attested one
        ├── InvalidPolicy                 the policy file/dict is not in the documented format (or names no PCRs)
        ├── PinnedRootError               the committed AWS root failed its SHA-256 pin at load
        ├── AttestationUnavailable        no /dev/nsm and no development flag: cannot attest
        ├── NsmError                      the Nitro Secure Module refused or answered garbage
        └── DevAuthorityError             the development authority's state is missing/corrupt

Every verification error message says what was expected and what was found
("expected X, got Y"). Third-party exceptions (cbor2, cryptography, OSError) are
translated at the boundary with ``raise ... from exc`` so callers only ever catch these.
"""

from __future__ import annotations

from nitrolesion.errors import NitroLesionError


class AttestationError(NitroLesionError):
    """Base class for every attestation error.

    ``check`` names the failed check; the CLI prints it as ``verification failed:
    <check>: <message>``.
    """

    @property
    def check(self) -> str:
        return type(self).__name__

    def diagnostic(self) -> str:
        return f"attestation failed, nothing was sent: {self.check}: {self}"


class CoseDecodeError(AttestationError):
    """The bytes are not a (tagged or untagged) COSE_Sign1 structure."""


class UnsupportedAlgorithm(AttestationError):
    """The protected header's algorithm is not ES384, or the leaf key cannot do ES384."""


class MalformedDocument(AttestationError):
    """A payload field is missing, has the wrong type, or is outside its allowed range."""


class CertificateChainError(AttestationError):
    """The certificate chain from the leaf through the cabundle does not verify.

    Raised for unparsable certificates, a cabundle out of the NSM's order, and anything RFC
    5280 path validation refuses (signatures, CA flags, path lengths, key usages, unknown
    critical extensions).
    """


class CertificateExpired(CertificateChainError):
    """A certificate in the chain expired before the verification time."""


class CertificateNotYetValid(CertificateChainError):
    """A certificate in the chain is not yet valid at the verification time."""


class UntrustedRoot(CertificateChainError):
    """The chain does not end at one of the trusted (by default: pinned AWS) roots."""


class SignatureInvalid(AttestationError):
    """The COSE_Sign1 signature does not verify with the leaf certificate's key."""


class PolicyViolation(AttestationError):
    """The document is authentic but the attestation policy does not accept it."""


class DebugModeRejected(PolicyViolation):
    """The enclave runs in debug mode (all-zero PCRs) and the policy does not allow it."""


class PcrMismatch(PolicyViolation):
    """The document's PCRs match none of the policy's allowed PCR sets.

    A policy with no sets allows no PCRs; only ``AttestationPolicy.any_enclave()`` skips
    the check.
    """


class NonceMismatch(PolicyViolation):
    """The document's nonce is not the one the verifier sent."""


class DocumentTooOld(PolicyViolation):
    """The document's timestamp is older than the policy's maximum age."""


class DocumentFromFuture(PolicyViolation):
    """The document's timestamp lies further after the verification time than clock skew allows."""


class PublicKeyMismatch(AttestationError):
    """The public key offered for wrapping is not the one inside the attestation document."""


class InvalidPolicy(AttestationError):
    """An attestation policy (JSON file or dict) is not in the documented format."""


class PinnedRootError(AttestationError):
    """The committed AWS Nitro root certificate does not match its pinned SHA-256."""


class AttestationUnavailable(AttestationError):
    """No Nitro Secure Module is present and the development authority was not enabled."""


class NsmError(AttestationError):
    """The Nitro Secure Module returned an error, or the device call failed.

    ``code`` is the NSM's error name (e.g. ``"InvalidArgument"``, ``"InputTooLarge"``) or
    one of ``"DeviceError"`` / ``"InvalidResponse"`` for failures on our side of the ioctl.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DevAuthorityError(AttestationError):
    """The development attestation authority's state directory is missing or corrupt."""
