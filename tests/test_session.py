"""Session cipher: ordering, replay, and binding to session, direction and message type."""

from __future__ import annotations

import struct

import pytest
from Crypto.Cipher import AES

from nitrolesion.crypto.session import (
    SESSION_AAD_LABEL,
    SessionCipher,
    SessionKeys,
    new_session_id,
    new_session_secret,
)
from nitrolesion.errors import CryptoError, LocalProtocolError, ReorderError, ReplayError
from nitrolesion.wire.frames import MessageType

CLASSIFY = MessageType.SESSION_CLASSIFY
RESULT = MessageType.SESSION_RESULT
C2E, E2C = bytes(range(32)), bytes(range(32, 64))
KEYS = SessionKeys(C2E, E2C, bytes(range(64, 96)))
SID = bytes(range(100, 116))


def pair(keys=KEYS, sid=SID):
    return SessionCipher(keys, sid, "client"), SessionCipher(keys, sid, "enclave")


def test_round_trip_both_directions_counters_start_at_zero():
    client, enclave = pair()
    for i in range(3):
        counter, ct = client.seal(CLASSIFY, b"image %d" % i)
        assert counter == i
        assert enclave.open(CLASSIFY, counter, ct) == b"image %d" % i
        counter, ct = enclave.seal(RESULT, b"result %d" % i)
        assert counter == i
        assert client.open(RESULT, counter, ct) == b"result %d" % i
    assert client.send_counter == client.receive_counter == 3


def test_wire_format_matches_spec():
    # Recompute nonce and AAD independently from the documented layout.
    client, _ = pair()
    client.seal(CLASSIFY, b"first")
    counter, ct = client.seal(CLASSIFY, b"second")
    nonce = bytes([0x01, 0, 0, 0]) + struct.pack(">Q", counter)
    aad = SESSION_AAD_LABEL + SID + bytes([0x01, CLASSIFY]) + struct.pack(">Q", counter)
    assert SESSION_AAD_LABEL == b"nitrolesion-session/2"
    cipher = AES.new(C2E, AES.MODE_GCM, nonce=nonce)  # the client->enclave key
    cipher.update(aad)
    assert cipher.decrypt_and_verify(ct[:-16], ct[-16:]) == b"second"


def test_replay_rejected():
    client, enclave = pair()
    counter, ct = client.seal(CLASSIFY, b"once")
    enclave.open(CLASSIFY, counter, ct)
    with pytest.raises(ReplayError, match="expected counter 1, got 0"):
        enclave.open(CLASSIFY, counter, ct)


def test_reorder_rejected():
    client, enclave = pair()
    first = client.seal(CLASSIFY, b"a")
    second = client.seal(CLASSIFY, b"b")
    with pytest.raises(ReorderError, match="expected counter 0, got 1"):
        enclave.open(CLASSIFY, *second)
    assert enclave.open(CLASSIFY, *first) == b"a"
    assert enclave.open(CLASSIFY, *second) == b"b"


def test_counter_is_authenticated_not_just_checked():
    # A message sealed at counter 1 presented as counter 0 passes the order check but
    # must fail authentication.
    client, enclave = pair()
    client.seal(CLASSIFY, b"a")
    _, ct = client.seal(CLASSIFY, b"b")
    with pytest.raises(CryptoError, match="did not authenticate"):
        enclave.open(CLASSIFY, 0, ct)


def test_cross_session_rejected():
    client, _ = pair(sid=SID)
    _, other_enclave = pair(sid=bytes(16))
    counter, ct = client.seal(CLASSIFY, b"x")
    with pytest.raises(CryptoError, match="did not authenticate"):
        other_enclave.open(CLASSIFY, counter, ct)


def test_cross_direction_rejected():
    # The client's own message reflected back to it (same session and counter; the other
    # direction has its own key and direction byte).
    client, _ = pair()
    counter, ct = client.seal(CLASSIFY, b"x")
    with pytest.raises(CryptoError, match="did not authenticate"):
        client.open(CLASSIFY, counter, ct)


def test_cross_type_rejected():
    client, enclave = pair()
    counter, ct = client.seal(CLASSIFY, b"x")
    with pytest.raises(CryptoError, match="did not authenticate"):
        enclave.open(RESULT, counter, ct)


def test_failed_open_does_not_advance_counter():
    client, enclave = pair()
    counter, ct = client.seal(CLASSIFY, b"real")
    forged = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(CryptoError):
        enclave.open(CLASSIFY, counter, forged)
    with pytest.raises(CryptoError):
        enclave.open(CLASSIFY, counter, b"short")
    assert enclave.receive_counter == 0
    assert enclave.open(CLASSIFY, counter, ct) == b"real"
    assert enclave.receive_counter == 1


def test_replay_and_reorder_are_crypto_errors():
    assert issubclass(ReplayError, CryptoError) and issubclass(ReorderError, CryptoError)


def test_helpers_and_argument_checks():
    assert len(new_session_secret()) == 32 and len(new_session_id()) == 16
    assert new_session_secret() != new_session_secret()
    assert new_session_id(random_bytes=lambda n: b"\x01" * n) == b"\x01" * 16
    with pytest.raises(LocalProtocolError):
        SessionCipher(SessionKeys(b"short", E2C, C2E), SID, "client")
    with pytest.raises(LocalProtocolError):
        SessionCipher(KEYS, b"short", "client")
    with pytest.raises(LocalProtocolError, match="role"):
        SessionCipher(KEYS, SID, "parent")
    with pytest.raises(LocalProtocolError):
        pair()[0].seal(256, b"x")
    with pytest.raises(LocalProtocolError):
        SessionCipher(KEYS, SID, "client", max_messages=0)
    assert C2E.hex() not in repr(pair()[0]) and C2E.hex() not in repr(KEYS)


def test_directions_use_different_keys():
    # Same plaintext, same counter, both directions: different ciphertexts.
    client, enclave = pair()
    assert client.seal(CLASSIFY, b"same")[1] != enclave.seal(CLASSIFY, b"same")[1]
