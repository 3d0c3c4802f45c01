"""Cryptography: one-shot hybrid envelopes, session ciphers and the parent's key store.

* ``envelope``: RSA-3072-OAEP-wrapped AES-256-GCM for single requests (``seal`` /
  ``open_envelope``), key loading and fingerprints, ``request_aad``, the one ``rsa_oaep``.
* ``session``: the session key schedule (HKDF over both sides' randomness) and
  ``SessionCipher``, AES-256-GCM with per-direction keys, counter nonces, strict ordering.
* ``keywrap``: the session secret wrapped to the attested key (OAEP label = session id).
* ``result_signature``: the enclave's RSA-PSS signature on one-shot results.
* ``keystore``: ``ParentKeyStore``, the parent's private key file (0600 in a 0700 dir);
  parent side only, so not in the enclave image.

Import the submodules themselves: this package imports none of them, so the enclave image
can leave out what only the parent uses. Every failure surfaces as
nitrolesion.errors.CryptoError (or a subclass), never as a pycryptodome exception.
"""
