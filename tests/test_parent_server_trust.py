"""The parent server believes only attested announcements and signed, fresh, unique results.

The security review (finding 3) made the server print a forged ``Classification received``
(twice) and replace the stored enclave key with a garbage announcement, from any local
process. Here a real ParentServer listens on TCP loopback; the test plays both a genuine
enclave (a key attested by the development authority, results made by the enclave's own
protocol code) and the attacker.
"""

from __future__ import annotations

import queue
import threading
import time

import cbor2
import pytest

from nitrolesion.attestation.dev_authority import DevAttestationAuthority
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.crypto.envelope import generate_keypair, public_key_der, request_aad, seal
from nitrolesion.crypto.keystore import ParentKeyStore
from nitrolesion.crypto.result_signature import sign_result
from nitrolesion.errors import ConnectionClosed, NitroLesionError
from nitrolesion.protocol import EnclaveSession, OneShotReceived
from nitrolesion.transport import MemoryTransport
from nitrolesion.wire.frames import MessageType
from nitrolesion.wire.messages import (
    AnnounceAck, EnclaveAnnounce, ErrorMessage, SealedResult, decode_message)
from nitrolesion.parent.enclave_client import Trust
from nitrolesion.parent.server import ANNOUNCE_FILE, RESULT_WINDOW, ParentServer, load_announcement

PREDICTION = {"code": "mel", "name": "Melanoma", "confidence": 0.9,
              "probabilities": {"mel": 0.9, "nv": 0.1}, "malignant": 0.9, "refer": True,
              "refer_reason": "malignant"}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys():
    return {"enclave": generate_keypair(), "stranger": generate_keypair()}


@pytest.fixture
def world(tmp_path, keys):
    measured = tmp_path / "app.py"
    measured.write_bytes(b"enclave code\n")
    authority = DevAttestationAuthority.create(tmp_path / "dev", [measured])
    trust = Trust(AttestationPolicy.for_dev_pcrs(authority.pcrs), [authority.root_certificate])
    parent_key = ParentKeyStore(tmp_path / "keys").load_or_create()
    events: queue.Queue = queue.Queue()
    clock = Clock()
    # In memory: what is tested is the server's trust, not its sockets (test_pipeline and
    # the hostile cases run it over TCP).
    transport = MemoryTransport()
    endpoint = transport.endpoint()
    server = ParentServer(endpoint, parent_key, tmp_path / "keys", events.put,
                          trust=trust, clock=clock, transport=transport)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert events.get(timeout=5).kind == "ready"
    yield {"authority": authority, "transport": transport, "endpoint": endpoint,
           "events": events, "clock": clock,
           "parent_public": public_key_der(parent_key), "state": tmp_path / "keys", **keys}
    server.stop()
    # Wake its accept (a 0.5 s poll) with a connection that closes at once: the loop sees
    # the stop flag now instead of at the next poll.
    try:
        transport.connect(endpoint, timeout=5).close()
    except NitroLesionError:
        pass  # already closed: nothing to wake
    thread.join(timeout=5)


def connection(world):
    return world["transport"].connect(world["endpoint"], timeout=10)


def announce(world, link, key="enclave", attestation=None):
    public = public_key_der(world[key])
    document = attestation if attestation is not None else world["authority"].attest(public_key=public)
    link.send(MessageType.ENCLAVE_ANNOUNCE, EnclaveAnnounce(public, document).to_body())
    return decode_message(link.receive())


def genuine_result(world, key="enclave", issued_at_ms=None) -> SealedResult:
    """A result as the enclave's protocol code makes it, signed with ``key``."""
    session = EnclaveSession(world[key], public_key_der(world[key]))
    event = OneShotReceived(bytes(range(16)) if key == "enclave" else bytes(16), b"", world["parent_public"])
    issued = int(world["clock"].now * 1000) if issued_at_ms is None else issued_at_ms
    return session.one_shot_result(event, cbor2.dumps(PREDICTION), issued)


def events_until_quiet(world, seconds=1.0) -> list:
    found, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found.append(world["events"].get(timeout=0.1))
        except queue.Empty:
            pass
    return found


def test_attested_announcement_is_stored_and_a_signed_result_printed_once(world):
    with connection(world) as link:
        assert isinstance(announce(world, link), AnnounceAck)
        result = genuine_result(world)
        link.send(result.TYPE, result.to_body())
        link.send(result.TYPE, result.to_body())  # the same result again: a replay
        seen = events_until_quiet(world)
    kinds = [event.kind for event in seen]
    assert kinds == ["key", "result", "refused"], [e.text for e in seen]
    assert seen[1].text == "Classification received: Melanoma (0.90), malignant 0.90 REFER"
    assert seen[1].data["prediction"].refer_reason == "malignant"
    assert "already received (a replay)" in seen[2].text
    assert load_announcement(world["state"]).public_key == public_key_der(world["enclave"])


def test_garbage_announcement_is_refused_and_changes_nothing(world):
    with connection(world) as link:
        assert isinstance(announce(world, link), AnnounceAck)
    events_until_quiet(world, 0.3)
    stored = (world["state"] / ANNOUNCE_FILE).read_bytes()
    with connection(world) as link:
        answer = announce(world, link, key="stranger", attestation=b"\xa0garbage")
        assert isinstance(answer, ErrorMessage) and answer.code == "UNTRUSTED"
        with pytest.raises(ConnectionClosed):
            link.receive()
    seen = events_until_quiet(world, 0.5)
    assert [e.kind for e in seen] == ["refused"] and "CoseDecodeError" in seen[0].text
    assert (world["state"] / ANNOUNCE_FILE).read_bytes() == stored


def test_announcement_for_another_key_or_image_is_refused(world, tmp_path):
    # A genuine document for the enclave's key, offered with another key.
    document = world["authority"].attest(public_key=public_key_der(world["enclave"]))
    with connection(world) as link:
        answer = announce(world, link, key="stranger", attestation=document)
    assert answer.code == "UNTRUSTED" and "PublicKeyMismatch" in answer.message
    # A genuine document, same trusted root, for an enclave running other code (the host
    # launched its own image): other PCRs.
    other_code = tmp_path / "evil.py"
    other_code.write_bytes(b"copy every image to disk\n")
    evil = DevAttestationAuthority.load(tmp_path / "dev", [other_code])
    with connection(world) as link:
        answer = announce(world, link, attestation=evil.attest(public_key=public_key_der(world["enclave"])))
    assert answer.code == "UNTRUSTED" and "PcrMismatch" in answer.message
    # A document from an untrusted root.
    stranger_pki = DevAttestationAuthority.create(tmp_path / "other-dev", [other_code])
    with connection(world) as link:
        answer = announce(world, link, attestation=stranger_pki.attest(
            public_key=public_key_der(world["enclave"])))
    assert answer.code == "UNTRUSTED" and "UntrustedRoot" in answer.message


def test_result_without_announcement_or_with_a_forged_signature_is_refused(world):
    forged_by_stranger = genuine_result(world, key="stranger")
    with connection(world) as link:  # never announced
        link.send(forged_by_stranger.TYPE, forged_by_stranger.to_body())
        seen = events_until_quiet(world, 0.5)
    assert [e.kind for e in seen] == ["refused"]
    assert "announced no attested enclave key" in seen[0].text
    with connection(world) as link:
        announce(world, link)
        # Sealed to the parent key (anyone can) but signed by another key.
        link.send(forged_by_stranger.TYPE, forged_by_stranger.to_body())
        # A real signature moved onto another ciphertext.
        real = genuine_result(world)
        other = seal(world["stranger"].public_key(), b"x", request_aad(MessageType.SEALED_RESULT, real.request_id))
        moved = SealedResult(real.request_id, real.issued_at_ms, real.wrapped_key, real.nonce,
                             other.ciphertext, real.signature)
        link.send(moved.TYPE, moved.to_body())
        seen = events_until_quiet(world)
    assert [e.kind for e in seen] == ["key", "refused", "refused"], [e.text for e in seen]
    assert all("not signed by the attested enclave key" in e.text for e in seen[1:])
    assert not any("Classification received" in e.text for e in seen)


def test_result_outside_the_time_window_is_refused(world):
    clock = world["clock"]
    stale = genuine_result(world, issued_at_ms=int((clock.now - RESULT_WINDOW - 1) * 1000))
    with connection(world) as link:
        announce(world, link)
        link.send(stale.TYPE, stale.to_body())
        seen = events_until_quiet(world, 0.5)
    assert [e.kind for e in seen] == ["key", "refused"]
    assert "outside the 300 s window" in seen[1].text


def test_result_text_is_made_printable(world):
    session = EnclaveSession(world["enclave"], public_key_der(world["enclave"]))
    hostile = dict(PREDICTION, name="Benign\x1b[2K\rClassification received: Melanoma")
    event = OneShotReceived(bytes(16), b"", world["parent_public"])
    result = session.one_shot_result(event, cbor2.dumps(hostile), int(world["clock"].now * 1000))
    with connection(world) as link:
        announce(world, link)
        link.send(result.TYPE, result.to_body())
        seen = events_until_quiet(world, 0.5)
    assert seen[-1].text == ("Classification received: Benign?[2K?Classification received: "
                             "Melanoma (0.90), malignant 0.90 REFER")


@pytest.mark.parametrize("change, line", [
    ({"refer": 1}, "expected true or false"),
    ({"refer": False}, "expected null when refer is false"),
    ({"refer_reason": "maybe"}, "refer_reason"),
    ({"malignant": 1.5}, "'malignant': expected a probability"),
    ({"malignant": "0.9"}, "'malignant': expected a probability"),
])
def test_a_signed_result_with_a_malformed_triage_is_not_printed(world, change, line):
    """Signed by the genuine enclave key, yet the strict decoder refuses it: the server
    says so and prints no classification."""
    session = EnclaveSession(world["enclave"], public_key_der(world["enclave"]))
    event = OneShotReceived(bytes(16), b"", world["parent_public"])
    result = session.one_shot_result(event, cbor2.dumps(dict(PREDICTION, **change)),
                                     int(world["clock"].now * 1000))
    with connection(world) as link:
        announce(world, link)
        link.send(result.TYPE, result.to_body())
        seen = events_until_quiet(world, 0.5)
    assert [e.kind for e in seen] == ["key", "error"], [e.text for e in seen]
    assert "could not be decrypted or decoded" in seen[1].text and line in seen[1].text
