"""EnclaveClient over the in-memory transport: the whole client flow (attestation, the
session, classifying with a window, errors per image) against an enclave side driven by
the protocol's own EnclaveSession, with no socket, process or model.

The same flow over real sockets and the real enclave is in test_pipeline.py; here what is
tested is the client's handling of the protocol, fast and deterministic.
"""

from __future__ import annotations

import threading

import pytest

from nitrolesion.attestation.dev_authority import DevAttestationAuthority
from nitrolesion.attestation.errors import PublicKeyMismatch
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.crypto.envelope import generate_keypair, public_key_der
from nitrolesion.errors import ConnectionClosed
from nitrolesion.parent.enclave_client import EnclaveClient, Trust
from nitrolesion.protocol import AttestationRequested, EnclaveSession, ImageReceived, SessionOpened
from nitrolesion.transport import MemoryTransport
from nitrolesion.wire.messages import ResultPayload

#: What the fake enclave answers for an image: its first byte picks the class.
CODES = ("nv", "mel", "bkl")


def prediction_for(image: bytes) -> dict:
    code = CODES[image[0] % len(CODES)]
    return {"code": code, "name": code.upper(), "confidence": 0.8,
            "probabilities": {c: (0.8 if c == code else 0.1) for c in CODES},
            "malignant": 0.1, "refer": False, "refer_reason": None}


@pytest.fixture(scope="module")
def enclave_key():
    return generate_keypair()


@pytest.fixture
def enclave(tmp_path, enclave_key):
    """An enclave side on a MemoryTransport: one connection, driven by EnclaveSession;
    an image starting with b"!" gets a BAD_IMAGE answer."""
    measured = tmp_path / "app.py"
    measured.write_bytes(b"enclave code\n")
    authority = DevAttestationAuthority.create(tmp_path / "dev", [measured])
    memory = MemoryTransport()
    endpoint = memory.endpoint()
    listener = memory.listen(endpoint)
    public = public_key_der(enclave_key)

    def serve() -> None:
        with listener.accept(timeout=10) as connection:
            session = EnclaveSession(enclave_key, public)
            while True:
                try:
                    frame = connection.receive(timeout=10)
                except ConnectionClosed:
                    return
                event = session.receive(frame)
                if isinstance(event, AttestationRequested):
                    document = authority.attest(public_key=public, nonce=event.nonce,
                                                user_data=event.user_data)
                    connection.send_frame(session.attestation(document))
                elif isinstance(event, ImageReceived):
                    payload = (ResultPayload(event.request, error=("BAD_IMAGE", "not an image"))
                               if event.image.startswith(b"!")
                               else ResultPayload(event.request, prediction=prediction_for(event.image)))
                    connection.send_frame(session.result(payload))
                elif isinstance(event, SessionOpened):
                    connection.send_frame(event.reply)
                else:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    trust = Trust(AttestationPolicy.for_dev_pcrs(authority.pcrs), [authority.root_certificate])
    yield {"transport": memory, "endpoint": endpoint, "trust": trust, "public": public}
    listener.close()
    thread.join(timeout=10)


def test_client_attests_opens_a_session_and_classifies_in_memory(enclave):
    images = [bytes([i]) + b"image" for i in range(7)] + [b"!broken"]
    with EnclaveClient(enclave["endpoint"], enclave["trust"], timeout=10,
                       transport=enclave["transport"]) as client:
        result = client.attest(expected_key=enclave["public"])
        assert result.public_key == enclave["public"]
        client.open_session()
        outcomes = sorted(client.classify_many(images, window=3), key=lambda o: o.index)
    assert [o.index for o in outcomes] == list(range(8))
    for outcome, image in zip(outcomes[:7], images[:7]):
        assert outcome.error is None and outcome.result.code == prediction_for(image)["code"]
    assert outcomes[7].error[0] == "BAD_IMAGE"


def test_client_refuses_an_enclave_key_other_than_the_announced_one(enclave):
    with EnclaveClient(enclave["endpoint"], enclave["trust"], timeout=10,
                       transport=enclave["transport"]) as client:
        with pytest.raises(PublicKeyMismatch):
            client.attest(expected_key=public_key_der(generate_keypair()))
