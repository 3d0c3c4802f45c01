"""Wrapping a session key to the enclave's attested RSA key (RSA-OAEP with a label).

The OAEP label (RFC 8017 section 7.1, "L") is the session id with a domain prefix, so a
wrapped key captured from one SESSION_OPEN cannot be replayed under another session id.
"""

from __future__ import annotations

from Crypto.Cipher import PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey.RSA import RsaKey
from Crypto.Signature.pss import MGF1

from nitrolesion.crypto.session import SESSION_ID_SIZE, SESSION_KEY_SIZE
from nitrolesion.errors import CryptoError

SESSION_WRAP_LABEL = b"nitrolesion-session-key/1"


def _oaep(key: RsaKey, session_id: bytes):
    if len(session_id) != SESSION_ID_SIZE:
        raise CryptoError(f"session id must be {SESSION_ID_SIZE} bytes, got {len(session_id)}")
    return PKCS1_OAEP.new(key, hashAlgo=SHA256,
                          mgfunc=lambda seed, length: MGF1(seed, length, SHA256),
                          label=SESSION_WRAP_LABEL + session_id)


def wrap_session_key(recipient_public_key: RsaKey, session_key: bytes, session_id: bytes) -> bytes:
    """RSA-OAEP(SHA-256) encryption of ``session_key``, bound to ``session_id``."""
    if len(session_key) != SESSION_KEY_SIZE:
        raise CryptoError(f"session key must be {SESSION_KEY_SIZE} bytes")
    return _oaep(recipient_public_key.public_key(), session_id).encrypt(session_key)


def unwrap_session_key(private_key: RsaKey, wrapped: bytes, session_id: bytes) -> bytes:
    """Recover the session key; raises :class:`CryptoError` for a wrong key, label or bytes."""
    try:
        key = _oaep(private_key, session_id).decrypt(wrapped)
    except (ValueError, TypeError) as exc:
        raise CryptoError("session key did not unwrap (wrong key or session id)") from exc
    if len(key) != SESSION_KEY_SIZE:
        raise CryptoError("session key did not unwrap (wrong length)")
    return key
