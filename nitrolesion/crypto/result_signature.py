"""The enclave's signature on a one-shot result, so the parent server believes only it.

Anyone can seal bytes to the parent's public key (it travels in clear), so the AES-GCM tag
of a SEALED_RESULT proves nothing about who made it. The enclave therefore signs every
SEALED_RESULT with its attested RSA key (RSA-PSS, SHA-256, MGF1-SHA-256, salt of the hash
length; RFC 8017 section 8.1), and the parent server checks the signature with the key
whose attestation it verified on that connection before it decrypts or prints anything.

The same RSA key also unwraps OAEP ciphertexts. RSA-OAEP and RSA-PSS under one key are
known to be jointly secure in the random-oracle model (Haber and Pinkas, CCS 2001), and the
signed bytes start with a label no OAEP plaintext of ours has, so neither use can be turned
into the other.
"""

from __future__ import annotations

import struct

from Crypto.Hash import SHA256
from Crypto.PublicKey.RSA import RsaKey
from Crypto.Signature import pss

from nitrolesion.crypto.envelope import Envelope
from nitrolesion.errors import CryptoError
from nitrolesion.limits import REQUEST_ID_SIZE

__all__ = ["RESULT_SIGNATURE_LABEL", "sign_result", "verify_result"]

RESULT_SIGNATURE_LABEL = b"nitrolesion-result-signature/2"


def _signed_bytes(request_id: bytes, issued_at_ms: int, envelope: Envelope) -> SHA256.SHA256Hash:
    if len(request_id) != REQUEST_ID_SIZE:
        raise CryptoError(f"request id must be {REQUEST_ID_SIZE} bytes")
    if isinstance(issued_at_ms, bool) or not isinstance(issued_at_ms, int) or not 0 <= issued_at_ms < 2**63:
        raise CryptoError("issued_at_ms must be a non-negative 63-bit integer")
    # Fixed-size fields, and a length before the only variable one that is not last, so
    # two different results never sign the same bytes.
    digest = SHA256.new(RESULT_SIGNATURE_LABEL)
    digest.update(bytes(request_id) + struct.pack(">Q", issued_at_ms))
    digest.update(struct.pack(">H", len(envelope.wrapped_key)) + bytes(envelope.wrapped_key))
    digest.update(bytes(envelope.nonce))
    digest.update(bytes(envelope.ciphertext))
    return digest


def sign_result(private_key: RsaKey, request_id: bytes, issued_at_ms: int,
                envelope: Envelope) -> bytes:
    """RSA-PSS signature by the enclave key over a sealed result and the enclave's time
    (ms since the epoch), which lets the parent refuse replays outside a short window
    without remembering every request id forever. Raises CryptoError."""
    try:
        return pss.new(private_key).sign(_signed_bytes(request_id, issued_at_ms, envelope))
    except (TypeError, ValueError) as exc:
        raise CryptoError(f"cannot sign the result: {exc}") from exc


def verify_result(public_key: RsaKey, request_id: bytes, issued_at_ms: int, envelope: Envelope,
                  signature: bytes) -> None:
    """Raises CryptoError unless ``signature`` is the enclave's over this very result."""
    try:
        pss.new(public_key).verify(_signed_bytes(request_id, issued_at_ms, envelope), bytes(signature))
    except (TypeError, ValueError) as exc:
        raise CryptoError("the result is not signed by the attested enclave key") from exc
