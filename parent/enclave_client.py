"""Talking to the enclave from the parent: attest first, then send only to the attested key.

``EnclaveClient.attest`` sends a fresh nonce and verifies the returned document (chain to a
trusted root, signature, PCR policy, nonce, age) before anything else is sent. The public
key used for encryption is the one inside the verified document, never one taken from the
host on trust.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cbor2
from cryptography import x509

from nitrolesion.attestation.dev_authority import ROOT_CERT_FILE, dev_pcrs, measure_files
from nitrolesion.attestation.errors import PublicKeyMismatch
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.trust import aws_nitro_root, load_pem_roots
from nitrolesion.attestation.verifier import AttestationResult, check_public_key, verify_attestation
from nitrolesion.crypto.envelope import (
    load_public_key, new_request_id, public_key_der, seal, sealed_request_aad)
from nitrolesion.crypto.keywrap import wrap_session_key
from nitrolesion.crypto.session import SessionCipher, new_session_id, new_session_key
from nitrolesion.enclave_image import PROJECT_ROOT, image_files
from nitrolesion.errors import ProtocolError, RemoteError
from nitrolesion.transport import Endpoint, FramedConnection, connect
from nitrolesion.wire.frames import MessageType
from nitrolesion.wire.messages import (
    Accepted, Attestation, ErrorMessage, Goodbye, Hello, Message, SealedRequest, SessionClassify,
    SessionOpen, SessionReady, SessionResult, decode_message)

#: Bytes of the client's attestation nonce: 256 bits, never repeated in practice.
NONCE_SIZE = 32
#: Seconds to wait for any single answer from the enclave (a classification takes ~20 ms;
#: the slack covers a busy enclave and a 20 MiB upload).
DEFAULT_TIMEOUT = 60.0
#: Requests kept in flight over one session: enough to keep every enclave worker busy
#: while the next image is read, encrypted and sent.
DEFAULT_WINDOW = 4
#: Times one image is re-sent after a BUSY answer before it is reported as failed.
BUSY_RETRIES = 8


@dataclass
class Trust:
    """What the parent trusts: a PCR policy and roots (AWS pinned, plus any given explicitly)."""

    policy: AttestationPolicy
    extra_roots: list[x509.Certificate] = field(default_factory=list)
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)

    @classmethod
    def for_dev_enclave(cls, dev_state_dir: Path, project_root: Path = PROJECT_ROOT) -> "Trust":
        """Trust a local enclave run from ``project_root`` with the development attestation
        authority in ``dev_state_dir``: its PCRs measured here from the same files, and its
        development root (the demo, tests and benchmarks; never the default)."""
        pcrs = dev_pcrs(measure_files(image_files(project_root), project_root))
        return cls(AttestationPolicy.for_dev_pcrs(pcrs),
                   load_pem_roots(Path(dev_state_dir) / ROOT_CERT_FILE))

    def verify(self, message: Attestation, nonce: bytes, expected_key: bytes | None = None) -> AttestationResult:
        """Verify an ATTESTATION answer; raises an AttestationError subclass on any failure.

        Checks the document, then that the key offered in the message is the attested one,
        then (if given) that it is also the key the caller was handed by the host.
        """
        result = verify_attestation(message.document, now=self.clock(), policy=self.policy,
                                    expected_nonce=nonce,
                                    trusted_roots=[aws_nitro_root(), *self.extra_roots])
        check_public_key(result, message.public_key)
        if expected_key is not None and expected_key != result.public_key:
            raise PublicKeyMismatch(
                "the enclave key handed over by the host is not the attested key: "
                "expected the attested key, got a different one; refusing to send")
        return result


def _expect(connection: FramedConnection, kind: type, timeout: float) -> Message:
    message = decode_message(connection.receive(timeout=timeout))
    if isinstance(message, ErrorMessage):
        raise RemoteError(message.code, message.message)
    if not isinstance(message, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {type(message).__name__}")
    return message


@dataclass
class ImageOutcome:
    """The answer for one image of a session: ``result`` dict or ``error`` (code, message)."""

    index: int
    result: dict | None = None
    error: tuple[str, str] | None = None


class EnclaveClient:
    """One connection to the enclave's client port."""

    def __init__(self, endpoint: Endpoint, trust: Trust, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoint = endpoint
        self.trust = trust
        self.timeout = timeout
        self.connection: FramedConnection | None = None
        self.attestation: AttestationResult | None = None

    def __enter__(self) -> "EnclaveClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.send(Goodbye.TYPE, Goodbye().to_body(), timeout=1.0)
            except Exception:
                pass
            self.connection.close()
            self.connection = None

    def attest(self, expected_key: bytes | None = None) -> AttestationResult:
        """Connect, send HELLO with a fresh nonce and verify the ATTESTATION answer."""
        self.connection = connect(self.endpoint, timeout=self.timeout)
        nonce = os.urandom(NONCE_SIZE)
        self.connection.send(MessageType.HELLO, Hello(nonce).to_body())
        message = _expect(self.connection, Attestation, self.timeout)
        self.attestation = self.trust.verify(message, nonce, expected_key)
        return self.attestation

    # -- one-shot: the result goes to the parent server ----------------------------------
    def send_one_shot(self, image: bytes, parent_public_key_der: bytes) -> tuple[bytes, int]:
        """Seal ``image`` to the attested key; the enclave delivers the result to the parent.

        Returns (request_id, ciphertext bytes sent). Raises RemoteError if the enclave
        answers with an ERROR frame (e.g. BAD_IMAGE).
        """
        assert self.connection is not None and self.attestation is not None, "attest() first"
        enclave_key = load_public_key(self.attestation.public_key)
        request_id = new_request_id()
        sealed = seal(enclave_key, image, sealed_request_aad(request_id, parent_public_key_der))
        request = SealedRequest(request_id, parent_public_key_der, sealed.wrapped_key,
                                sealed.nonce, sealed.ciphertext)
        self.connection.send(request.TYPE, request.to_body())
        accepted = _expect(self.connection, Accepted, self.timeout)
        if accepted.request_id != request_id:
            raise ProtocolError("the enclave acknowledged a different request id")
        return request_id, len(sealed.ciphertext) + len(sealed.wrapped_key) + len(sealed.nonce)

    # -- sessions: many images, results on this connection -------------------------------
    def open_session(self) -> SessionCipher:
        """Send a fresh session key wrapped to the attested key; returns the client cipher."""
        assert self.connection is not None and self.attestation is not None, "attest() first"
        key, session_id = new_session_key(), new_session_id()
        wrapped = wrap_session_key(load_public_key(self.attestation.public_key), key, session_id)
        self.connection.send(MessageType.SESSION_OPEN, SessionOpen(session_id, wrapped).to_body())
        ready = _expect(self.connection, SessionReady, self.timeout)
        if ready.session_id != session_id:
            raise ProtocolError("the enclave confirmed a different session id")
        self.cipher = SessionCipher(key, session_id, "client")
        return self.cipher

    def classify_many(self, images: Iterable[bytes | Exception],
                      window: int = DEFAULT_WINDOW) -> Iterator[ImageOutcome]:
        """Classify images over the session, keeping up to ``window`` requests in flight.

        ``images`` may contain exceptions (e.g. an unreadable file): they come back as
        errors for that index without being sent, with the exception's ``code`` attribute
        (default ``UNREADABLE``). Outcomes are yielded as they arrive.
        """
        connection, cipher = self.connection, self.cipher
        pending: dict[int, tuple[int, bytes, int]] = {}  # counter -> (index, image, attempt)
        ready: deque = deque()
        iterator = enumerate(images)
        exhausted = False

        def send(index: int, image: bytes, attempt: int) -> None:
            counter, ciphertext = cipher.seal(MessageType.SESSION_CLASSIFY,
                                              cbor2.dumps({"image": image}))
            connection.send(MessageType.SESSION_CLASSIFY,
                            SessionClassify(counter, ciphertext).to_body())
            pending[counter] = (index, image, attempt)

        while True:
            while not exhausted and len(pending) < window:
                try:
                    index, image = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                if isinstance(image, Exception):
                    code = getattr(image, "code", "UNREADABLE")
                    ready.append(ImageOutcome(index, error=(code, str(image))))
                else:
                    send(index, image, 0)
            while ready:
                yield ready.popleft()
            if not pending:
                if exhausted:
                    return
                continue
            message = _expect(connection, SessionResult, self.timeout)
            payload = cbor2.loads(cipher.open(MessageType.SESSION_RESULT, message.counter,
                                              message.ciphertext))
            index, image, attempt = pending.pop(payload["request"])
            if "result" in payload:
                yield ImageOutcome(index, result=payload["result"])
                continue
            code, text = payload["error"]["code"], payload["error"]["message"]
            if code == "BUSY" and attempt < BUSY_RETRIES:
                time.sleep(min(0.05 * 2 ** attempt, 2.0))  # back off, then try again
                send(index, image, attempt + 1)
            else:
                yield ImageOutcome(index, error=(code, text))


def own_public_key_der(private_key) -> bytes:
    """SubjectPublicKeyInfo DER of the parent's key (what the enclave seals results to)."""
    return public_key_der(private_key)
