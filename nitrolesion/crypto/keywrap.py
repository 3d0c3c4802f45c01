"""Wrapping the client's session secret to the enclave's attested RSA key (RSA-OAEP, label).

The OAEP label (RFC 8017 section 7.1, "L") is the session id with a domain prefix, so a
wrapped secret captured from one SESSION_OPEN cannot be moved under another session id.
The secret alone never becomes a key: it is one input of the HKDF in crypto/session.py.
"""

from __future__ import annotations

from Crypto.PublicKey.RSA import RsaKey

from nitrolesion.crypto.envelope import rsa_oaep
from nitrolesion.errors import CryptoError
from nitrolesion.limits import SESSION_ID_SIZE, SESSION_SECRET_SIZE

SESSION_WRAP_LABEL = b"nitrolesion-session-secret/2"


def _oaep_for_session(key: RsaKey, session_id: bytes):
    """RSA-OAEP whose label binds the session id, so a wrapped secret opens only for it."""
    if len(session_id) != SESSION_ID_SIZE:
        raise CryptoError(f"session id must be {SESSION_ID_SIZE} bytes, got {len(session_id)}")
    return rsa_oaep(key, label=SESSION_WRAP_LABEL + session_id)


def wrap_session_secret(recipient_public_key: RsaKey, secret: bytes, session_id: bytes) -> bytes:
    """RSA-OAEP(SHA-256) encryption of ``secret``, bound to ``session_id``."""
    if len(secret) != SESSION_SECRET_SIZE:
        raise CryptoError(f"session secret must be {SESSION_SECRET_SIZE} bytes")
    return _oaep_for_session(recipient_public_key.public_key(), session_id).encrypt(secret)


def unwrap_session_secret(private_key: RsaKey, wrapped: bytes, session_id: bytes) -> bytes:
    """Recover the session secret; raises :class:`CryptoError` for a wrong key, label or bytes."""
    try:
        key = _oaep_for_session(private_key, session_id).decrypt(wrapped)
    except (ValueError, TypeError) as exc:
        raise CryptoError("session secret did not unwrap (wrong key or session id)") from exc
    if len(key) != SESSION_SECRET_SIZE:
        raise CryptoError("session secret did not unwrap (wrong length)")
    return key
