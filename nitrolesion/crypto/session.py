"""AES-256-GCM for an established session, with counter nonces and strict ordering.

After SESSION_OPEN both ends hold the same fresh 32-byte key and a 16-byte session id.
Each direction keeps its own message counter, starting at 0:

* nonce = direction (1) | 3 zero bytes | counter (8, big-endian). Deterministic nonces
  are allowed by NIST SP 800-38D section 8.2.1 as long as a (key, nonce) pair is never
  reused; the direction byte keeps the two senders apart and the counter only increases.
* AAD = SESSION_AAD_LABEL | session_id (16) | direction (1) | msg_type (1) | counter (8).
  So a message from another session, from the other direction, of another message type
  or with another counter does not authenticate.

The receiver accepts only the next expected counter: lower is a replay (ReplayError),
higher means a message was dropped or reordered (ReorderError). A failed open leaves the
counter where it was, so garbage injected by an attacker cannot desynchronise the session.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from Crypto.Cipher import AES
from Crypto.Random import get_random_bytes

from nitrolesion.errors import CryptoError, LocalProtocolError, ReorderError, ReplayError

__all__ = [
    "DIRECTION_CLIENT_TO_ENCLAVE",
    "DIRECTION_ENCLAVE_TO_CLIENT",
    "ROLES",
    "SESSION_ID_SIZE",
    "SESSION_KEY_SIZE",
    "SessionCipher",
    "new_session_id",
    "new_session_key",
]

RandomBytes = Callable[[int], bytes]

# AES-256, as for the one-shot envelopes.
SESSION_KEY_SIZE = 32
# 128 random bits: distinct sessions never share an id in practice (birthday bound 2**64).
SESSION_ID_SIZE = 16
# Full-length GCM tag (NIST SP 800-38D appendix C discourages truncation).
TAG_SIZE = 16
# Domain-separation label; differs from the one-shot request_aad label.
SESSION_AAD_LABEL = b"nitrolesion-session/1"
# Direction bytes; distinct and non-zero so a nonce can never be all zeros.
DIRECTION_CLIENT_TO_ENCLAVE = 0x01
DIRECTION_ENCLAVE_TO_CLIENT = 0x02
ROLES = ("client", "enclave")
# The 8-byte counter field caps a session at 2**64 messages per direction.
MAX_COUNTER = 2**64 - 1

_OPEN_FAILED = "session message did not authenticate (tampered, or wrong session/type)"


def new_session_key(*, random_bytes: RandomBytes = get_random_bytes) -> bytes:
    """Return a fresh 32-byte session key. Raises nothing."""
    return random_bytes(SESSION_KEY_SIZE)


def new_session_id(*, random_bytes: RandomBytes = get_random_bytes) -> bytes:
    """Return a fresh 16-byte session id. Raises nothing."""
    return random_bytes(SESSION_ID_SIZE)


def _check_msg_type(msg_type: int) -> int:
    if isinstance(msg_type, bool) or not isinstance(msg_type, int) or not 0 <= msg_type <= 255:
        raise LocalProtocolError(f"message type must be an int in 0..255, got {msg_type!r}")
    return int(msg_type)


class SessionCipher:
    """One end of a session: seals outgoing and opens incoming messages in order."""

    def __init__(self, key: bytes, session_id: bytes, role: str) -> None:
        """Raises LocalProtocolError (a ValueError) if ``key`` is not 32 bytes,
        ``session_id`` is not 16 bytes, or ``role`` is not "client" or "enclave"."""
        if not isinstance(key, (bytes, bytearray)) or len(key) != SESSION_KEY_SIZE:
            raise LocalProtocolError(f"session key must be {SESSION_KEY_SIZE} bytes")
        if not isinstance(session_id, (bytes, bytearray)) or len(session_id) != SESSION_ID_SIZE:
            raise LocalProtocolError(f"session id must be {SESSION_ID_SIZE} bytes")
        if role not in ROLES:
            raise LocalProtocolError(f"role must be one of {ROLES}, got {role!r}")
        self._key = bytes(key)
        self._session_id = bytes(session_id)
        self._role = role
        if role == "client":
            self._send_dir, self._recv_dir = (
                DIRECTION_CLIENT_TO_ENCLAVE,
                DIRECTION_ENCLAVE_TO_CLIENT,
            )
        else:
            self._send_dir, self._recv_dir = (
                DIRECTION_ENCLAVE_TO_CLIENT,
                DIRECTION_CLIENT_TO_ENCLAVE,
            )
        self._send_counter = 0
        self._recv_counter = 0

    def __repr__(self) -> str:
        # Never include the key.
        return (
            f"SessionCipher(session_id={self._session_id.hex()}, role={self._role!r}, "
            f"send={self._send_counter}, receive={self._recv_counter})"
        )

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

    def _cipher(self, direction: int, msg_type: int, counter: int):
        nonce = struct.pack(">B3xQ", direction, counter)
        fields = struct.pack(">BBQ", direction, msg_type, counter)
        aad = SESSION_AAD_LABEL + self._session_id + fields
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_SIZE)
        cipher.update(aad)
        return cipher

    def seal(self, msg_type: int, plaintext: bytes) -> tuple[int, bytes]:
        """Encrypt ``plaintext`` as the next message of type ``msg_type`` we send.

        Returns ``(counter, ciphertext_with_tag)``; the counter must travel with the
        message. Raises LocalProtocolError for a bad msg_type or non-bytes plaintext, and
        CryptoError once 2**64 messages have been sent (open a new session).
        """
        msg_type = _check_msg_type(msg_type)
        if not isinstance(plaintext, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(f"plaintext must be bytes, got {type(plaintext).__name__}")
        counter = self._send_counter
        if counter > MAX_COUNTER:
            raise CryptoError("session send counter exhausted; open a new session")
        body, tag = self._cipher(self._send_dir, msg_type, counter).encrypt_and_digest(
            bytes(plaintext)
        )
        self._send_counter = counter + 1
        return counter, body + tag

    def open(self, msg_type: int, counter: int, ciphertext: bytes) -> bytes:
        """Authenticate and decrypt the peer's next message.

        Raises ReplayError if ``counter`` is below the expected one, ReorderError if it is
        above, CryptoError if the message does not authenticate (tampered, other session,
        other direction, other msg_type) or is shorter than the tag, and
        LocalProtocolError for a bad msg_type/counter type. The receive counter advances
        only on success.
        """
        msg_type = _check_msg_type(msg_type)
        if isinstance(counter, bool) or not isinstance(counter, int):
            raise LocalProtocolError(f"counter must be an int, got {type(counter).__name__}")
        expected = self._recv_counter
        if counter < expected:
            raise ReplayError(
                f"replayed session message: expected counter {expected}, got {counter}"
            )
        if counter > expected:
            raise ReorderError(
                f"session message out of order: expected counter {expected}, got {counter}"
            )
        if expected > MAX_COUNTER:
            raise CryptoError("session receive counter exhausted; open a new session")
        if not isinstance(ciphertext, (bytes, bytearray, memoryview)) or len(ciphertext) < TAG_SIZE:
            raise CryptoError(f"session ciphertext shorter than the {TAG_SIZE}-byte tag")
        data = bytes(ciphertext)
        try:
            plaintext = self._cipher(self._recv_dir, msg_type, counter).decrypt_and_verify(
                data[:-TAG_SIZE], data[-TAG_SIZE:]
            )
        except (ValueError, KeyError) as exc:
            raise CryptoError(_OPEN_FAILED) from exc
        self._recv_counter = expected + 1
        return plaintext
