"""Session keys and the session cipher: HKDF over both sides' randomness, AES-256-GCM.

Key schedule (protocol 2; docs/HANDSHAKE.md has the whole message sequence):

* the client draws ``secret`` (32 bytes) and wraps it to the attested enclave key;
* the enclave drew ``enclave_random`` (32 bytes) for this connection and the NSM signed it
  into the attestation document (``user_data``); the client chose ``client_nonce``;
* ``transcript`` is SHA-256 over the HELLO, ATTESTATION and SESSION_OPEN frames as sent;
* ``PRK = HKDF-Extract(salt = client_nonce | enclave_random, IKM = secret)`` and
  ``HKDF-Expand(PRK, info = KEY_INFO_LABEL | session_id | transcript, 96)`` gives, in order,
  the client->enclave key, the enclave->client key and the key-confirmation key.

A replayed SESSION_OPEN meets a new ``enclave_random`` and a new document, so it yields keys
nobody has used before and that the host cannot compute (it never sees ``secret``).

The cipher (one per end): each direction has its own key and message counter from 0:

* nonce = direction (1) | 3 zero bytes | counter (8, big-endian). Deterministic nonces are
  allowed by NIST SP 800-38D section 8.2.1 as long as a (key, nonce) pair is never reused:
  keys are fresh per session and per direction, and the counter only increases.
* AAD = SESSION_AAD_LABEL | session_id (16) | direction (1) | msg_type (1) | counter (8).

The receiver accepts only the next expected counter: lower is a replay (ReplayError),
higher means a message was dropped or reordered (ReorderError). A failed open leaves the
counter where it was, so garbage injected by an attacker cannot desynchronise the session.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
from Crypto.Random import get_random_bytes

from nitrolesion.errors import CryptoError, LocalProtocolError, ReorderError, ReplayError
from nitrolesion.limits import ENCLAVE_RANDOM_SIZE, SESSION_ID_SIZE, SESSION_SECRET_SIZE

__all__ = [
    "CONFIRMATION_SIZE",
    "DIRECTION_CLIENT_TO_ENCLAVE",
    "DIRECTION_ENCLAVE_TO_CLIENT",
    "MAX_MESSAGES",
    "ROLES",
    "SessionCipher",
    "SessionKeys",
    "Transcript",
    "derive_session_keys",
    "key_confirmation",
]

RandomBytes = Callable[[int], bytes]

# 256-bit keys: AES-256, as for the one-shot envelopes.
KEY_SIZE = 32
# Full-length GCM tag (NIST SP 800-38D appendix C discourages truncation).
TAG_SIZE = 16
# HMAC-SHA256 output.
CONFIRMATION_SIZE = 32
# Domain-separation labels; "/2" is the protocol version they belong to.
SESSION_AAD_LABEL = b"nitrolesion-session/2"
KEY_INFO_LABEL = b"nitrolesion-session-keys/2"
TRANSCRIPT_LABEL = b"nitrolesion-transcript/2"
CONFIRMATION_LABEL = b"nitrolesion-enclave-confirms/2"
# Direction bytes; distinct and non-zero so a nonce can never be all zeros.
DIRECTION_CLIENT_TO_ENCLAVE = 0x01
DIRECTION_ENCLAVE_TO_CLIENT = 0x02
ROLES = ("client", "enclave")
# The 8-byte counter field caps a session at 2**64 messages per direction.
MAX_MESSAGES = 2**64

_OPEN_FAILED = "session message did not authenticate (tampered, or wrong session/type)"


class Transcript:
    """A running SHA-256 over the handshake frames, each as type | length | body.

    Both ends add the same frames in the same order (what one sent is what the other
    received), so their digests agree exactly when nobody changed a byte on the way.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256(TRANSCRIPT_LABEL)

    def add(self, msg_type: int, body: bytes) -> None:
        """Append one frame (its type byte and body)."""
        self._hash.update(struct.pack(">BQ", int(msg_type), len(body)))
        self._hash.update(bytes(body))

    def digest(self) -> bytes:
        """The hash of everything added so far (32 bytes); adding more stays possible."""
        return self._hash.copy().digest()


@dataclass(frozen=True, repr=False)
class SessionKeys:
    """The three keys one session derives; never printed."""

    client_to_enclave: bytes
    enclave_to_client: bytes
    confirmation: bytes

    def __repr__(self) -> str:
        return "SessionKeys(<secret>)"


def _check_size(name: str, value, size: int) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise LocalProtocolError(f"{name} must be {size} bytes")
    return bytes(value)


def derive_session_keys(secret: bytes, client_nonce: bytes, enclave_random: bytes,
                        session_id: bytes, transcript: bytes) -> SessionKeys:
    """HKDF-SHA256 (RFC 5869) of the session keys, as in the module docstring.

    Raises LocalProtocolError if a fixed-size input has the wrong size.
    """
    _check_size("secret", secret, SESSION_SECRET_SIZE)
    _check_size("enclave random", enclave_random, ENCLAVE_RANDOM_SIZE)
    _check_size("session id", session_id, SESSION_ID_SIZE)
    _check_size("transcript hash", transcript, 32)
    if not isinstance(client_nonce, (bytes, bytearray)) or not client_nonce:
        raise LocalProtocolError("client nonce must be non-empty bytes")
    # The nonce has a variable length (16..64): prefix it so salt fields cannot shift.
    salt = struct.pack(">B", len(client_nonce)) + bytes(client_nonce) + bytes(enclave_random)
    info = KEY_INFO_LABEL + bytes(session_id) + bytes(transcript)
    c2e, e2c, confirm = HKDF(bytes(secret), KEY_SIZE, salt, SHA256, num_keys=3, context=info)
    return SessionKeys(c2e, e2c, confirm)


def key_confirmation(keys: SessionKeys, transcript: bytes) -> bytes:
    """The enclave's proof that it derived the same keys: HMAC-SHA256 over the transcript."""
    return hmac.new(keys.confirmation, CONFIRMATION_LABEL + bytes(transcript),
                    hashlib.sha256).digest()


def new_session_secret(*, random_bytes: RandomBytes = get_random_bytes) -> bytes:
    """A fresh 32-byte client secret. Raises nothing."""
    return random_bytes(SESSION_SECRET_SIZE)


def new_session_id(*, random_bytes: RandomBytes = get_random_bytes) -> bytes:
    """A fresh 16-byte session id. Raises nothing."""
    return random_bytes(SESSION_ID_SIZE)


def _check_msg_type(msg_type: int) -> int:
    if isinstance(msg_type, bool) or not isinstance(msg_type, int) or not 0 <= msg_type <= 255:
        raise LocalProtocolError(f"message type must be an int in 0..255, got {msg_type!r}")
    return int(msg_type)


class SessionCipher:
    """One end of a session: seals outgoing and opens incoming messages in order."""

    def __init__(self, keys: SessionKeys, session_id: bytes, role: str, *,
                 max_messages: int = MAX_MESSAGES) -> None:
        """Raises LocalProtocolError (a ValueError) for keys or a session id of the wrong
        size, a role other than "client"/"enclave", or max_messages outside 1..2**64.
        ``max_messages`` (per direction) is lowered only by tests of counter exhaustion."""
        if not isinstance(keys, SessionKeys):
            raise LocalProtocolError("keys must be SessionKeys")
        for key in (keys.client_to_enclave, keys.enclave_to_client):
            _check_size("session key", key, KEY_SIZE)
        _check_size("session id", session_id, SESSION_ID_SIZE)
        if role not in ROLES:
            raise LocalProtocolError(f"role must be one of {ROLES}, got {role!r}")
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) \
                or not 1 <= max_messages <= MAX_MESSAGES:
            raise LocalProtocolError(f"max_messages must be in 1..{MAX_MESSAGES}")
        self._session_id = bytes(session_id)
        self._role = role
        self._limit = max_messages
        # One AESGCM object per direction, key schedule done once: pycryptodome's cipher
        # object per message cost ~55 us, this ~1 us (bench/protocol_cost.py). Same
        # algorithm, key, nonce, associated data and 16-byte tag: the bytes are identical.
        c2e = (AESGCM(keys.client_to_enclave), DIRECTION_CLIENT_TO_ENCLAVE)
        e2c = (AESGCM(keys.enclave_to_client), DIRECTION_ENCLAVE_TO_CLIENT)
        (self._send_aead, self._send_dir), (self._recv_aead, self._recv_dir) = (
            (c2e, e2c) if role == "client" else (e2c, c2e))
        self._send_counter = 0
        self._recv_counter = 0

    def __repr__(self) -> str:
        # Never include a key.
        return (f"SessionCipher(session_id={self._session_id.hex()}, role={self._role!r}, "
                f"send={self._send_counter}, receive={self._recv_counter})")

    @property
    def session_id(self) -> bytes:
        return self._session_id

    @property
    def role(self) -> str:
        return self._role

    @property
    def send_counter(self) -> int:
        """The counter the next ``seal`` will use."""
        return self._send_counter

    @property
    def receive_counter(self) -> int:
        """The only counter the next ``open`` will accept."""
        return self._recv_counter

    def _nonce_and_aad(self, direction: int, msg_type: int, counter: int) -> tuple[bytes, bytes]:
        nonce = struct.pack(">B3xQ", direction, counter)
        aad = SESSION_AAD_LABEL + self._session_id + struct.pack(">BBQ", direction, msg_type, counter)
        return nonce, aad

    def seal(self, msg_type: int, plaintext: bytes) -> tuple[int, bytes]:
        """Encrypt ``plaintext`` as the next message of type ``msg_type`` we send.

        Returns ``(counter, ciphertext_with_tag)``; the counter travels with the message.
        Raises LocalProtocolError for a bad msg_type or non-bytes plaintext, and
        CryptoError once ``max_messages`` have been sent (open a new session).
        """
        msg_type = _check_msg_type(msg_type)
        if not isinstance(plaintext, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(f"plaintext must be bytes, got {type(plaintext).__name__}")
        counter = self._send_counter
        if counter >= self._limit:
            raise CryptoError("session send counter exhausted; open a new session")
        nonce, aad = self._nonce_and_aad(self._send_dir, msg_type, counter)
        sealed = self._send_aead.encrypt(nonce, bytes(plaintext), aad)  # ciphertext | 16-byte tag
        self._send_counter = counter + 1
        return counter, sealed

    def open(self, msg_type: int, counter: int, ciphertext: bytes) -> bytes:
        """Authenticate and decrypt the peer's next message.

        Raises ReplayError if ``counter`` is below the expected one, ReorderError if it is
        above, CryptoError if the message does not authenticate (tampered, other session,
        other direction, other msg_type), is shorter than the tag, or the receive counter
        is exhausted, and LocalProtocolError for a bad msg_type/counter type. The receive
        counter advances only on success.
        """
        msg_type = _check_msg_type(msg_type)
        if isinstance(counter, bool) or not isinstance(counter, int):
            raise LocalProtocolError(f"counter must be an int, got {type(counter).__name__}")
        expected = self._recv_counter
        if counter < expected:
            raise ReplayError(f"replayed session message: expected counter {expected}, got {counter}")
        if counter > expected:
            raise ReorderError(
                f"session message out of order: expected counter {expected}, got {counter}")
        if expected >= self._limit:
            raise CryptoError("session receive counter exhausted; open a new session")
        if not isinstance(ciphertext, (bytes, bytearray, memoryview)) or len(ciphertext) < TAG_SIZE:
            raise CryptoError(f"session ciphertext shorter than the {TAG_SIZE}-byte tag")
        nonce, aad = self._nonce_and_aad(self._recv_dir, msg_type, counter)
        try:
            plaintext = self._recv_aead.decrypt(nonce, bytes(ciphertext), aad)
        except InvalidTag as exc:
            raise CryptoError(_OPEN_FAILED) from exc
        self._recv_counter = expected + 1
        return plaintext
