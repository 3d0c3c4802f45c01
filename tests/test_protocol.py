"""The session protocol's two state machines driven against each other in memory.

No sockets: frames go from one ``receive`` to the other, and a test plays the host in the
middle by recording, replaying, reordering, reflecting or moving frames. Attestation is
real: documents come from the development authority and are checked by the real verifier.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from datetime import datetime, timezone

import cbor2
import pytest

from nitrolesion.attestation.dev_authority import DevAttestationAuthority
from nitrolesion.attestation.errors import PublicKeyMismatch
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.verifier import verify_attestation
from nitrolesion.crypto.envelope import generate_keypair, load_public_key, open_envelope, public_key_der, Envelope, request_aad
from nitrolesion.crypto.result_signature import verify_result
from nitrolesion.crypto.session import (
    KEY_INFO_LABEL, SESSION_AAD_LABEL, TRANSCRIPT_LABEL, derive_session_keys)
from nitrolesion.errors import (
    CryptoError, LocalProtocolError, ProtocolError, ReorderError, ReplayError, UnexpectedMessage)
from nitrolesion.protocol import (
    AttestationRequested, BadRequest, ClientSession, Closed, EnclaveSession, ImageReceived,
    OneShotAccepted, OneShotReceived, PeerError, ResultReceived, SessionEstablished,
    SessionOpened, State, error_code, error_frame)
from nitrolesion.wire.frames import Frame, MessageType
from nitrolesion.wire.messages import (
    ErrorCode, ResultPayload, SealedRequest, SessionReady, SessionResult, decode_message)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
PREDICTION = {"code": "mel", "name": "Melanoma", "confidence": 0.9,
              "probabilities": {"mel": 0.9, "nv": 0.1}, "malignant": 0.9, "refer": True,
              "refer_reason": "malignant"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One enclave key and one development authority, as one enclave boot has."""
    state = tmp_path_factory.mktemp("dev-authority")
    measured = state / "app.py"
    measured.write_bytes(b"print('enclave')\n")
    authority = DevAttestationAuthority.create(state / "authority", [measured], now=NOW)
    key = generate_keypair()
    return {"authority": authority, "key": key, "public": public_key_der(key),
            "policy": AttestationPolicy.for_dev_pcrs(authority.pcrs),
            "roots": [authority.root_certificate]}


def new_enclave(world, **options) -> EnclaveSession:
    return EnclaveSession(world["key"], world["public"], **options)


def attest(world, client: ClientSession, enclave: EnclaveSession, *, user_data=None,
           offered_key=None) -> list[Frame]:
    """HELLO / ATTESTATION, with the document verified for real. Returns the client's frames."""
    hello = client.hello()
    requested = enclave.receive(hello)
    assert isinstance(requested, AttestationRequested)
    document = world["authority"].attest(
        public_key=world["public"], nonce=requested.nonce,
        user_data=requested.user_data if user_data is None else user_data, now=NOW)
    frame = enclave.attestation(document)
    if offered_key is not None:  # the host swaps the key offered beside the document
        message = decode_message(frame)
        frame = Frame(frame.type, cbor2.dumps({"public_key": offered_key, "document": message.document}))
    received = client.receive(frame)
    result = verify_attestation(received.document, now=NOW, policy=world["policy"],
                                expected_nonce=received.nonce, trusted_roots=world["roots"])
    client.attestation_verified(result)
    return [hello]


def open_session(world, client: ClientSession, enclave: EnclaveSession) -> list[Frame]:
    """Attest and open a session; returns every frame the client sent."""
    sent = attest(world, client, enclave)
    session_open = client.open_session()
    sent.append(session_open)
    opened = enclave.receive(session_open)
    assert isinstance(opened, SessionOpened)
    assert isinstance(client.receive(opened.reply), SessionEstablished)
    return sent


def answer(enclave: EnclaveSession, event: ImageReceived) -> Frame:
    return enclave.result(ResultPayload(event.request, prediction=PREDICTION))


def test_session_round_trip(world):
    client, enclave = ClientSession(), new_enclave(world)
    open_session(world, client, enclave)
    assert client.state is enclave.state is State.OPEN
    for index in range(3):
        counter, frame = client.classify(b"image %d" % index)
        event = enclave.receive(frame)
        assert event == ImageReceived(counter, b"image %d" % index)
        got = client.receive(answer(enclave, event))
        assert got == ResultReceived(ResultPayload(counter, prediction=PREDICTION))
    assert client.outstanding == 0
    assert isinstance(enclave.receive(client.goodbye()), Closed)
    assert client.state is enclave.state is State.CLOSED


def test_key_schedule_matches_the_documented_derivation(world):
    # Recompute the keys with hashlib/hmac from docs/HANDSHAKE.md, independently of
    # pycryptodome's HKDF.
    secret, nonce, enclave_random, session_id = b"s" * 32, b"n" * 32, b"e" * 32, b"i" * 16
    transcript = hashlib.sha256(b"transcript").digest()
    keys = derive_session_keys(secret, nonce, enclave_random, session_id, transcript)
    salt = bytes([len(nonce)]) + nonce + enclave_random
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    info = KEY_INFO_LABEL + session_id + transcript
    okm, block = b"", b""
    for counter in (1, 2, 3):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    assert (keys.client_to_enclave, keys.enclave_to_client, keys.confirmation) == (
        okm[:32], okm[32:64], okm[64:])
    assert len({keys.client_to_enclave, keys.enclave_to_client, keys.confirmation}) == 3
    assert TRANSCRIPT_LABEL == b"nitrolesion-transcript/2"
    assert SESSION_AAD_LABEL == b"nitrolesion-session/2"


def test_replayed_session_open_yields_keys_nobody_had(world):
    # The attack from the review: the host records a victim's whole byte stream and
    # replays it to the same enclave on a new connection.
    victim, enclave = ClientSession(), new_enclave(world)
    recorded = open_session(world, victim, enclave)
    first_request = []
    for image in (b"melanoma photo", b"second photo"):
        counter, frame = victim.classify(image)
        recorded.append(frame)
        first_request.append(enclave.receive(frame))
    victim_answers = [answer(enclave, event) for event in first_request]

    replayed = new_enclave(world)  # same enclave key, new connection
    requested = replayed.receive(recorded[0])
    assert isinstance(requested, AttestationRequested)
    replayed.attestation(world["authority"].attest(public_key=world["public"], nonce=requested.nonce,
                                                   user_data=requested.user_data, now=NOW))
    opened = replayed.receive(recorded[1])  # the enclave can unwrap the secret ...
    assert isinstance(opened, SessionOpened)
    # ... but its keys differ: the confirmation and every sealed answer are new bytes.
    assert decode_message(opened.reply).confirmation != decode_message(
        Frame(MessageType.SESSION_READY, _ready_body(world, recorded))).confirmation
    busy = replayed.result(ResultPayload(0, error=(ErrorCode.BUSY, "queue full")))
    assert decode_message(busy).ciphertext != decode_message(victim_answers[0]).ciphertext
    # The victim's requests do not authenticate under the new keys: nothing is classified.
    with pytest.raises(CryptoError, match="did not authenticate"):
        replayed.receive(recorded[2])
    assert replayed.state is State.CLOSED
    # And what the replayed enclave sealed does not open for the victim either.
    with pytest.raises(CryptoError):
        victim.receive(busy)


def _ready_body(world, recorded) -> bytes:
    """The SESSION_READY a fresh enclave would send for a replay (helper for comparison)."""
    other = new_enclave(world)
    requested = other.receive(recorded[0])
    other.attestation(world["authority"].attest(public_key=world["public"], nonce=requested.nonce,
                                                user_data=requested.user_data, now=NOW))
    return other.receive(recorded[1]).reply.body


def test_enclave_random_values_differ_per_connection(world):
    hello = ClientSession().hello()
    values = {new_enclave(world).receive(hello).user_data for _ in range(20)}
    assert len(values) == 20 and all(len(value) == 32 for value in values)


def test_replayed_classify_in_the_same_session_is_refused_and_closes(world):
    client, enclave = ClientSession(), new_enclave(world)
    open_session(world, client, enclave)
    _, frame = client.classify(b"x")
    enclave.receive(frame)
    with pytest.raises(ReplayError, match="expected counter 1, got 0"):
        enclave.receive(frame)
    assert error_code(ReplayError("x")) == ErrorCode.REPLAY
    assert enclave.state is State.CLOSED
    _, later = client.classify(b"y")
    with pytest.raises(UnexpectedMessage, match="closed"):
        enclave.receive(later)


def test_reordered_classify_is_refused(world):
    client, enclave = ClientSession(), new_enclave(world)
    open_session(world, client, enclave)
    _, first = client.classify(b"a")
    _, second = client.classify(b"b")
    with pytest.raises(ReorderError, match="expected counter 0, got 1"):
        enclave.receive(second)


@pytest.mark.parametrize("direction", ["to the client", "to the enclave"])
def test_reflected_messages_do_not_authenticate(world, direction):
    client, enclave = ClientSession(), new_enclave(world)
    open_session(world, client, enclave)
    counter, classify = client.classify(b"a")
    if direction == "to the client":
        # The client's own request, relabelled as a result and sent back to it.
        with pytest.raises(CryptoError, match="did not authenticate"):
            client.receive(Frame(MessageType.SESSION_RESULT, classify.body))
    else:
        event = enclave.receive(classify)
        result = answer(enclave, event)
        _, _ = client.classify(b"b")
        with pytest.raises(CryptoError, match="did not authenticate"):
            enclave.receive(Frame(MessageType.SESSION_CLASSIFY, _recount(result.body, 1)))


def _recount(body: bytes, counter: int) -> bytes:
    fields = cbor2.loads(body)
    fields["counter"] = counter
    return cbor2.dumps(fields)


def test_result_moved_between_sessions_does_not_authenticate(world):
    client_a, enclave_a = ClientSession(), new_enclave(world)
    client_b, enclave_b = ClientSession(), new_enclave(world)
    open_session(world, client_a, enclave_a)
    open_session(world, client_b, enclave_b)
    result_a = answer(enclave_a, enclave_a.receive(client_a.classify(b"a")[1]))
    client_b.classify(b"b")
    with pytest.raises(CryptoError, match="did not authenticate"):
        client_b.receive(result_a)
    assert client_b.state is State.CLOSED


def test_answer_to_a_request_never_sent_is_refused(world):
    client, enclave = ClientSession(), new_enclave(world)
    open_session(world, client, enclave)
    forged = enclave.result(ResultPayload(7, prediction=PREDICTION))
    with pytest.raises(ProtocolError, match="request 7, which is not outstanding"):
        client.receive(forged)


def test_counter_exhaustion_ends_the_session(world):
    client, enclave = ClientSession(max_messages=3), new_enclave(world, max_messages=2)
    open_session(world, client, enclave)
    for image in (b"a", b"b"):
        enclave.receive(client.classify(image)[1])
    _, third = client.classify(b"c")
    with pytest.raises(CryptoError, match="receive counter exhausted"):
        enclave.receive(third)
    with pytest.raises(CryptoError, match="send counter exhausted"):
        client.classify(b"d")


def test_tampered_key_confirmation_is_refused(world):
    client, enclave = ClientSession(), new_enclave(world)
    attest(world, client, enclave)
    opened = enclave.receive(client.open_session())
    ready = decode_message(opened.reply)
    forged = SessionReady(ready.session_id, bytes(32))
    with pytest.raises(CryptoError, match="key confirmation"):
        client.receive(Frame(forged.TYPE, forged.to_body()))
    with pytest.raises(LocalProtocolError):
        client.classify(b"never sent")


def test_attestation_without_enclave_random_is_refused(world):
    client, enclave = ClientSession(), new_enclave(world)
    with pytest.raises(ProtocolError, match="older protocol"):
        attest(world, client, enclave, user_data=b"")
    with pytest.raises(LocalProtocolError):
        client.open_session()


def test_key_offered_beside_the_document_must_be_the_attested_one(world):
    other = public_key_der(generate_keypair())
    with pytest.raises(PublicKeyMismatch):
        attest(world, ClientSession(), new_enclave(world), offered_key=other)


def test_nothing_before_hello_and_no_second_hello(world):
    client, enclave = ClientSession(), new_enclave(world)
    with pytest.raises(UnexpectedMessage, match="SESSION_OPEN is not expected in state idle"):
        other_client = ClientSession()
        attest(world, other_client, new_enclave(world))
        enclave.receive(other_client.open_session())
    enclave = new_enclave(world)
    hello = client.hello()
    enclave.receive(hello)
    with pytest.raises(UnexpectedMessage):
        enclave.receive(hello)
    assert error_code(UnexpectedMessage("x")) == ErrorCode.UNEXPECTED


def test_one_shot_flow_and_signed_result(world):
    client, enclave = ClientSession(), new_enclave(world)
    attest(world, client, enclave)
    parent_key = generate_keypair()
    request_id, frame = client.one_shot(b"photo", public_key_der(parent_key))
    event = enclave.receive(frame)
    assert event == OneShotReceived(request_id, b"photo", public_key_der(parent_key))
    sealed = enclave.one_shot_result(event, b"prediction", 1_700_000_000_000)
    assert sealed.issued_at_ms == 1_700_000_000_000
    envelope = Envelope(sealed.wrapped_key, sealed.nonce, sealed.ciphertext)
    verify_result(load_public_key(world["public"]), request_id, sealed.issued_at_ms, envelope,
                  sealed.signature)
    assert open_envelope(parent_key, envelope,
                         request_aad(MessageType.SEALED_RESULT, request_id)) == b"prediction"
    # Flip a bit: replacing the last byte with a constant is no forgery when it was that byte.
    forged = Envelope(sealed.wrapped_key, sealed.nonce,
                      sealed.ciphertext[:-1] + bytes([sealed.ciphertext[-1] ^ 1]))
    with pytest.raises(CryptoError, match="not signed by the attested enclave key"):
        verify_result(load_public_key(world["public"]), request_id, sealed.issued_at_ms, forged,
                      sealed.signature)
    with pytest.raises(CryptoError, match="not signed by the attested enclave key"):
        verify_result(load_public_key(world["public"]), request_id, sealed.issued_at_ms + 1,
                      envelope, sealed.signature)
    assert client.receive(enclave.accepted(request_id)) == OneShotAccepted(request_id)
    # One request per connection: a second one (a replay on the same link) is refused.
    with pytest.raises(UnexpectedMessage, match="SEALED_REQUEST is not expected in state done"):
        enclave.receive(frame)


def test_one_shot_replayed_on_a_new_connection_does_not_decrypt(world):
    client, enclave = ClientSession(), new_enclave(world)
    recorded = attest(world, client, enclave)
    _, request = client.one_shot(b"photo", public_key_der(generate_keypair()))
    enclave.receive(request)
    # However many requests pass in between, the recorded one is bound to its connection.
    replayed = new_enclave(world)
    requested = replayed.receive(recorded[0])
    replayed.attestation(world["authority"].attest(public_key=world["public"], nonce=requested.nonce,
                                                   user_data=requested.user_data, now=NOW))
    with pytest.raises(CryptoError, match="did not authenticate"):
        replayed.receive(request)
    assert error_code(CryptoError("x")) == ErrorCode.DECRYPT_FAILED


def test_authentic_request_without_an_image_gets_a_sealed_error(world):
    client, enclave = ClientSession(), new_enclave(world)
    open_session(world, client, enclave)
    _, request = client.seal_arbitrary_for_testing(cbor2.dumps({"img": 1}))
    event = enclave.receive(request)
    assert isinstance(event, BadRequest) and "expected {'image': bytes}" in event.message
    reply = enclave.result(ResultPayload(event.request, error=(ErrorCode.BAD_MESSAGE, event.message)))
    got = client.receive(reply)
    assert got.payload.error[0] == ErrorCode.BAD_MESSAGE
    assert enclave.state is State.OPEN


def test_peer_error_text_is_made_printable(world):
    client = ClientSession()
    client.hello()
    event = client.receive(error_frame("BUSY", "try \x1b[2J again\u202e\r\n"))
    assert event == PeerError("BUSY", "try ?[2J again???")
    assert client.state is State.CLOSED


def test_a_4096_bit_parent_key_gets_its_results(world, rsa_key):
    """Sizes follow the key: a 4096-bit parent key's wrapped key is 512 bytes, and the
    SEALED_RESULT carrying it must decode (protocol 1 fixed it at 384 and every result to
    such a key failed)."""
    parent_key = rsa_key(4096)
    client, enclave = ClientSession(), new_enclave(world)
    attest(world, client, enclave)
    _, frame = client.one_shot(b"photo", public_key_der(parent_key))
    event = enclave.receive(frame)
    sealed = enclave.one_shot_result(event, b"prediction", 1)
    received = decode_message(Frame(sealed.TYPE, sealed.to_body()))
    assert len(received.wrapped_key) == 512
    envelope = Envelope(received.wrapped_key, received.nonce, received.ciphertext)
    assert open_envelope(parent_key, envelope,
                         request_aad(MessageType.SEALED_RESULT, received.request_id)) == b"prediction"
