"""Hybrid envelopes: round trip, wrong key, every bit position, wrong context, bad keys."""

from __future__ import annotations

import dataclasses

import pytest
from Crypto.Util.asn1 import DerSequence

from nitrolesion.crypto.envelope import (
    GCM_NONCE_SIZE,
    GCM_TAG_SIZE,
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
from nitrolesion.errors import CryptoError, LocalProtocolError
from nitrolesion.wire.frames import PROTOCOL_VERSION, MessageType

PLAINTEXT = b"\xff\xd8\xff\xe0 pretend this is a JPEG of a mole" * 10
REQUEST_ID = bytes(range(16))
AAD = request_aad(MessageType.SEALED_REQUEST, REQUEST_ID)


@pytest.fixture(scope="module")
def key():
    return generate_keypair()


@pytest.fixture(scope="module")
def other_key():
    return generate_keypair()


@pytest.fixture(scope="module")
def envelope(key):
    return seal(key.public_key(), PLAINTEXT, AAD)


def fails_like_tampering(private_key, env, aad=AAD):
    with pytest.raises(CryptoError) as info:
        open_envelope(private_key, env, aad)
    return str(info.value)


def test_round_trip(key, envelope):
    assert key.size_in_bits() == RSA_BITS
    assert len(envelope.wrapped_key) == 384
    assert len(envelope.nonce) == GCM_NONCE_SIZE
    assert len(envelope.ciphertext) == len(PLAINTEXT) + GCM_TAG_SIZE
    assert open_envelope(key, envelope, AAD) == PLAINTEXT


def test_empty_plaintext_round_trip(key):
    env = seal(key.public_key(), b"", AAD)
    assert open_envelope(key, env, AAD) == b""


def test_fresh_key_and_nonce_per_message(key):
    a, b = seal(key, PLAINTEXT, AAD), seal(key, PLAINTEXT, AAD)
    assert a.nonce != b.nonce and a.wrapped_key != b.wrapped_key
    assert a.ciphertext != b.ciphertext


def test_injected_randomness_is_used(key):
    # A counting source shows seal draws its AES key and nonce from random_bytes.
    calls = []

    def rng(n):
        calls.append(n)
        return b"\x07" * n

    env = seal(key.public_key(), PLAINTEXT, AAD, random_bytes=rng)
    assert calls[:2] == [32, 12]
    assert env.nonce == b"\x07" * 12
    assert open_envelope(key, env, AAD) == PLAINTEXT


def test_wrong_key_and_tampering_give_the_same_message(key, other_key, envelope):
    wrong_key = fails_like_tampering(other_key, envelope)
    flipped = bytearray(envelope.ciphertext)
    flipped[0] ^= 1
    tampered = fails_like_tampering(key, dataclasses.replace(envelope, ciphertext=bytes(flipped)))
    assert wrong_key == tampered


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x80
    return bytes(out)


@pytest.mark.parametrize(
    ("field", "index"),
    [
        ("wrapped_key", 0),
        ("wrapped_key", 200),
        ("wrapped_key", -1),
        ("nonce", 0),
        ("nonce", -1),
        ("ciphertext", 0),  # body
        ("ciphertext", -GCM_TAG_SIZE - 1),  # last body byte
        ("ciphertext", -GCM_TAG_SIZE),  # first tag byte
        ("ciphertext", -1),  # last tag byte
    ],
)
def test_flipped_bit_is_rejected(key, envelope, field, index):
    tampered = dataclasses.replace(envelope, **{field: _flip(getattr(envelope, field), index)})
    message = fails_like_tampering(key, tampered)
    assert "did not authenticate" in message


@pytest.mark.parametrize(
    "aad",
    [
        request_aad(MessageType.SESSION_CLASSIFY, REQUEST_ID),  # other message type
        request_aad(MessageType.SEALED_RESULT, REQUEST_ID),
        request_aad(MessageType.SEALED_REQUEST, bytes(16)),  # other request id
        b"",
    ],
)
def test_other_context_is_rejected(key, envelope, aad):
    assert aad != AAD
    fails_like_tampering(key, envelope, aad)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("wrapped_key", b"\x00" * 383, "wrapped key is 383 bytes, expected 384"),
        ("nonce", b"\x00" * 16, "nonce is 16 bytes, expected 12"),
        ("ciphertext", b"\x00" * 15, "shorter than the 16-byte tag"),
    ],
)
def test_bad_sizes_are_crypto_errors(key, envelope, field, value, message):
    with pytest.raises(CryptoError, match=message):
        open_envelope(key, dataclasses.replace(envelope, **{field: value}), AAD)


def test_open_needs_private_key(key, envelope):
    with pytest.raises(CryptoError, match="private key"):
        open_envelope(key.public_key(), envelope, AAD)


def test_envelope_is_plain_data():
    env = Envelope(wrapped_key=b"k", nonce=b"n", ciphertext=b"c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.nonce = b"x"  # type: ignore[misc]


def test_request_aad_layout_and_checks():
    aad = request_aad(MessageType.SEALED_REQUEST, REQUEST_ID)
    assert aad.endswith(bytes([PROTOCOL_VERSION, 5]) + REQUEST_ID)
    assert len(new_request_id()) == 16
    with pytest.raises(LocalProtocolError, match="16 bytes"):
        request_aad(MessageType.SEALED_REQUEST, b"short")
    with pytest.raises(LocalProtocolError, match="0..255"):
        request_aad(256, REQUEST_ID)


def test_public_key_der_round_trip_and_fingerprint(key):
    der = public_key_der(key)
    assert der == public_key_der(key.public_key())
    loaded = load_public_key(der)
    assert loaded.n == key.n and not loaded.has_private()
    assert fingerprint(der) == fingerprint(public_key_der(loaded))
    assert len(fingerprint(der)) == 64


@pytest.fixture(scope="module")
def small_key(rsa_key):
    return rsa_key(2048)


def test_small_rsa_key_refused(small_key):
    der = small_key.public_key().export_key(format="DER")
    with pytest.raises(CryptoError, match="RSA-2048; at least RSA-3072"):
        load_public_key(der)
    with pytest.raises(CryptoError, match="RSA-2048"):
        seal(small_key.public_key(), b"x", AAD)


@pytest.mark.parametrize(
    "junk",
    [b"", b"\x30", b"\x30\x82\xff\xff", b"not a key at all", b"\x00" * 400, b"\x30" * 5000],
)
def test_junk_public_key_refused(junk):
    with pytest.raises(CryptoError):
        load_public_key(junk)


def test_non_canonical_encodings_refused(key):
    with pytest.raises(CryptoError, match="not DER"):
        load_public_key(key.public_key().export_key(format="PEM"))
    with pytest.raises(CryptoError, match="private key"):
        load_public_key(key.export_key(format="DER"))
    with pytest.raises(CryptoError):  # trailing bytes
        load_public_key(public_key_der(key) + b"\x00")
    # PKCS#1 RSAPublicKey (a bare SEQUENCE {n, e}) parses but is not SubjectPublicKeyInfo.
    pkcs1 = DerSequence([key.n, key.e]).encode()
    with pytest.raises(CryptoError, match="canonical SubjectPublicKeyInfo"):
        load_public_key(pkcs1)
