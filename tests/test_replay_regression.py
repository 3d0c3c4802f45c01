"""Regression for the host-in-the-middle replay (security review, finding 1).

The host records a genuine client's whole byte stream to a real enclave process and
replays it on a new connection. Before protocol 2 the enclave accepted the replayed
SESSION_OPEN, restarted its counters and sealed answers under the victim's key and nonces
(byte-identical ciphertexts; XOR gave the diagnosis away). Now the enclave's fresh random
value makes the replayed session's keys new: no sealed answer repeats, and the victim's
requests do not decrypt, so nothing is classified.
"""

from __future__ import annotations

import socket

import pytest

from nitrolesion.crypto.envelope import generate_keypair, public_key_der
from nitrolesion.protocol import (
    AttestationReceived, ClientSession, OneShotAccepted, ResultReceived, SessionEstablished)
from nitrolesion.wire.frames import Frame, FrameDecoder, MessageType, encode_frame
from nitrolesion.wire.messages import Attestation, ErrorCode, decode_message
from nitrolesion.parent.enclave_client import EnclaveClient

from hostile_cases import encode, lesion_image

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_present):
    """One enclave stack for both replays (not one each, ~1.5 s): each test reads the
    enclave's log from its own mark onwards."""
    from harness import EnclaveStack

    running = EnclaveStack(tmp_path_factory.mktemp("replay"))
    yield running
    running.stop(wait=False)


def lesion_jpeg(seed: int) -> bytes:
    return encode(lesion_image(seed=seed), "JPEG", quality=90)


class RecordedLink:
    """A raw TCP connection that records every byte the client writes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.decoder = FrameDecoder()
        self.sent = bytearray()

    def send(self, frame: Frame) -> None:
        data = encode_frame(frame.type, frame.body)
        self.sent += data
        self.sock.sendall(data)

    def receive(self) -> Frame | None:
        """The next frame, or None once the enclave closed the connection."""
        while (frame := self.decoder.next_frame()) is None:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.decoder.feed(data)
        return frame

    def close(self) -> None:
        self.sock.close()


def victim_session(stack, images: list[bytes]) -> tuple[bytes, list[Frame]]:
    """A genuine attested session classifying ``images``; returns (bytes sent, frames received)."""
    link, session, received = RecordedLink(stack.client_port), ClientSession(), []

    def next_event():
        frame = link.receive()
        received.append(frame)
        return session.receive(frame)

    link.send(session.hello())
    offered = next_event()
    assert isinstance(offered, AttestationReceived)
    session.attestation_verified(stack.trust().verify(
        Attestation(offered.public_key, offered.document), offered.nonce))
    link.send(session.open_session())
    assert isinstance(next_event(), SessionEstablished)
    for image in images:
        link.send(session.classify(image)[1])
    results = [next_event() for _ in images]
    assert all(isinstance(r, ResultReceived) and r.payload.prediction for r in results)
    link.send(session.goodbye())
    link.close()
    return bytes(link.sent), received


def replay(stack, stream: bytes) -> list[Frame]:
    """Send a recorded client byte stream on a new connection; every frame that comes back."""
    sock = socket.create_connection(("127.0.0.1", stack.client_port), timeout=TIMEOUT)
    sock.sendall(stream)
    decoder, frames = FrameDecoder(), []
    try:
        while data := sock.recv(65536):
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    finally:
        sock.close()
    return frames


def test_replayed_session_byte_stream_gets_no_sealed_answer(stack):
    images = [lesion_jpeg(seed=1), lesion_jpeg(seed=2)]
    stream, victim_frames = victim_session(stack, images)
    replayed = replay(stack, stream)

    victim_bodies = {frame.body for frame in victim_frames}
    assert not victim_bodies & {frame.body for frame in replayed}, "an answer repeated"
    kinds = [frame.type for frame in replayed]
    # A new attestation and key confirmation, then the first replayed request fails to
    # authenticate under the new keys and the enclave closes: nothing was classified.
    assert kinds == [MessageType.ATTESTATION, MessageType.SESSION_READY, MessageType.ERROR], kinds
    assert MessageType.SESSION_RESULT not in kinds
    error = decode_message(replayed[-1])
    assert error.code == ErrorCode.DECRYPT_FAILED
    ready = [decode_message(f) for f in victim_frames if f.type == MessageType.SESSION_READY]
    assert decode_message(replayed[1]).confirmation != ready[0].confirmation

    # The enclave keeps serving genuine clients.
    with EnclaveClient(stack.endpoint(), stack.trust(), timeout=TIMEOUT) as client:
        client.attest()
        client.open_session()
        outcomes = list(client.classify_many([images[0]]))
    assert outcomes[0].result is not None


def test_replayed_one_shot_byte_stream_is_not_classified_again(stack):
    mark = len(stack.enclave.lines)
    link, session = RecordedLink(stack.client_port), ClientSession()
    link.send(session.hello())
    offered = session.receive(link.receive())
    session.attestation_verified(stack.trust().verify(
        Attestation(offered.public_key, offered.document), offered.nonce))
    parent_key = public_key_der(generate_keypair())
    _, frame = session.one_shot(lesion_jpeg(seed=3), parent_key)
    link.send(frame)
    assert isinstance(session.receive(link.receive()), OneShotAccepted)
    link.close()

    replayed = replay(stack, bytes(link.sent))
    assert [f.type for f in replayed] == [MessageType.ATTESTATION, MessageType.ERROR]
    assert decode_message(replayed[-1]).code == ErrorCode.DECRYPT_FAILED
    assert sum("one-shot request classified" in line for line in stack.enclave.lines[mark:]) == 1
