"""Cryptography: one-shot hybrid envelopes, session ciphers and the parent's key store.

* ``envelope``: RSA-3072-OAEP-wrapped AES-256-GCM for single requests (``seal`` /
  ``open_envelope``), key loading and fingerprints, ``request_aad``.
* ``session``: the session key schedule (HKDF over both sides' randomness) and
  ``SessionCipher``, AES-256-GCM with per-direction keys, counter nonces, strict ordering.
* ``result_signature``: the enclave's RSA-PSS signature on one-shot results.
* ``keystore``: ``ParentKeyStore``, the parent's private key file (0600 in a 0700 dir).

Every failure surfaces as nitrolesion.errors.CryptoError (or a subclass), never as a
pycryptodome exception.
"""

from nitrolesion.crypto.envelope import (
    RSA_BITS,
    Envelope,
    fingerprint,
    generate_keypair,
    load_public_key,
    new_request_id,
    open_envelope,
    public_key_der,
    request_aad,
    seal,
)
from nitrolesion.crypto.keystore import ParentKeyStore, default_key_dir
from nitrolesion.crypto.session import SessionCipher, new_session_id, new_session_secret

__all__ = [
    "RSA_BITS",
    "Envelope",
    "ParentKeyStore",
    "SessionCipher",
    "default_key_dir",
    "fingerprint",
    "generate_keypair",
    "load_public_key",
    "new_request_id",
    "new_session_id",
    "new_session_secret",
    "open_envelope",
    "public_key_der",
    "request_aad",
    "seal",
]
