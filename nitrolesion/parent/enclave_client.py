"""Talking to the enclave from the parent: attest first, then send only to the attested key.

``EnclaveClient.attest`` sends a fresh nonce and verifies the returned document (chain to a
trusted root, signature, PCR policy, nonce, age) before anything else is sent. The public
key used for encryption is the one inside the verified document, never one taken from the
host on trust.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

from cryptography import x509

from nitrolesion.attestation.dev_authority import ROOT_CERT_FILE, dev_pcrs, measure_files
from nitrolesion.attestation.errors import PublicKeyMismatch
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.trust import aws_nitro_root, load_pem_roots
from nitrolesion.attestation.verifier import AttestationResult, check_public_key, verify_attestation
from nitrolesion.enclave_image import image_files
from nitrolesion.limits import PROJECT_ROOT
from nitrolesion.errors import ConnectionClosed, ProtocolError, RemoteError
from nitrolesion.protocol import (
    AttestationReceived, ClientSession, Closed, OneShotAccepted, PeerError, ResultReceived,
    SessionEstablished, State)
from nitrolesion.transport import SOCKETS, AnyEndpoint, FramedConnection, Transport
from nitrolesion.wire.frames import Frame
from nitrolesion.wire.messages import Attestation, EnclaveAnnounce, ErrorCode, Prediction
#: Seconds to wait for any single answer from the enclave (a classification takes ~20 ms;
#: the slack covers a busy enclave and a 20 MiB upload).
DEFAULT_TIMEOUT = 60.0
#: Requests kept in flight over one session: enough to keep every enclave worker busy
#: while the next image is read, encrypted and sent.
DEFAULT_WINDOW = 4
#: Times one image is re-sent after a BUSY answer before it is reported as failed.
BUSY_RETRIES = 8
#: An enclave announces right after it attested at connect time; an older announcement is
#: a replay of a recorded one, refused even when the policy sets no max_age.
ANNOUNCE_MAX_AGE = timedelta(minutes=5)


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

    def verify_announcement(self, message: EnclaveAnnounce) -> AttestationResult:
        """Verify an ENCLAVE_ANNOUNCE (no nonce: it is the enclave's boot message) and that
        the announced key is the attested one; its age is bounded by the policy's max_age or
        ANNOUNCE_MAX_AGE. Raises an AttestationError subclass on any failure."""
        policy = self.policy
        if policy.max_age is None or policy.max_age > ANNOUNCE_MAX_AGE:
            policy = dataclasses.replace(policy, max_age=ANNOUNCE_MAX_AGE)
        result = verify_attestation(message.attestation, now=self.clock(), policy=policy,
                                    expected_nonce=None,
                                    trusted_roots=[aws_nitro_root(), *self.extra_roots])
        check_public_key(result, message.public_key)
        return result

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


@dataclass
class ImageOutcome:
    """The answer for one image of a session: ``result`` (the enclave's prediction) or
    ``error`` ``(code, message)``."""

    index: int
    result: Prediction | None = None
    error: tuple[str, str] | None = None


class EnclaveClient:
    """One connection to the enclave's client port: moves frames between the socket and
    the protocol state machine (nitrolesion.protocol.ClientSession), verifies attestation."""

    def __init__(self, endpoint: AnyEndpoint, trust: Trust, timeout: float = DEFAULT_TIMEOUT,
                 transport: Transport = SOCKETS) -> None:
        """``transport`` connects to ``endpoint`` (vsock or TCP; in memory in tests)."""
        self.endpoint = endpoint
        self.transport = transport
        self.trust = trust
        self.timeout = timeout
        self.connection: FramedConnection | None = None
        self.session: ClientSession | None = None
        self.attestation: AttestationResult | None = None

    def __enter__(self) -> "EnclaveClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.connection is not None:
            if self.session is not None and self.session.state is not State.CLOSED:
                try:
                    self._send(self.session.goodbye(), timeout=1.0)
                except Exception:
                    pass
            self.connection.close()
            self.connection = None

    def _send(self, frame: Frame, timeout: float | None = None) -> None:
        self.connection.send_frame(frame, timeout=self.timeout if timeout is None else timeout)

    def _next_event(self, kind: type):
        """The protocol event for the next frame; an ERROR becomes RemoteError."""
        event = self.session.receive(self.connection.receive(timeout=self.timeout))
        if isinstance(event, PeerError):
            raise RemoteError(event.code, event.message)
        if isinstance(event, Closed):
            raise ConnectionClosed("the enclave closed the session")
        if not isinstance(event, kind):  # cannot happen: the state machine allows one kind
            raise ProtocolError(f"expected {kind.__name__}, got {type(event).__name__}")
        return event

    def attest(self, expected_key: bytes | None = None) -> AttestationResult:
        """Connect, send HELLO with a fresh nonce and verify the ATTESTATION answer."""
        self.connection = self.transport.connect(self.endpoint, timeout=self.timeout)
        self.session = ClientSession()
        self._send(self.session.hello())
        offered = self._next_event(AttestationReceived)
        result = self.trust.verify(Attestation(offered.public_key, offered.document), offered.nonce,
                                   expected_key)
        self.session.attestation_verified(result)
        self.attestation = result
        return result

    # -- one-shot: the result goes to the parent server ----------------------------------
    def send_one_shot(self, image: bytes, parent_public_key_der: bytes) -> tuple[bytes, int]:
        """Seal ``image`` to the attested key; the enclave delivers the result to the parent.

        Returns (request_id, bytes sent). Raises RemoteError if the enclave answers with an
        ERROR frame (e.g. BAD_IMAGE).
        """
        request_id, frame = self.session.one_shot(image, parent_public_key_der)
        self._send(frame)
        self._next_event(OneShotAccepted)
        return request_id, len(frame.body)

    # -- sessions: many images, results on this connection -------------------------------
    def open_session(self) -> None:
        """SESSION_OPEN to the attested key; returns once the enclave confirmed the keys."""
        self._send(self.session.open_session())
        self._next_event(SessionEstablished)

    def classify_many(self, images: Iterable[bytes | Exception],
                      window: int = DEFAULT_WINDOW) -> Iterator[ImageOutcome]:
        """Classify images over the session, keeping up to ``window`` requests in flight.

        ``images`` may contain exceptions (e.g. an unreadable file): they come back as
        errors for that index without being sent, with the exception's ``code`` attribute
        (default ``UNREADABLE``). Outcomes are yielded as they arrive.
        """
        pending: dict[int, tuple[int, bytes, int]] = {}  # counter -> (index, image, attempt)
        ready: deque = deque()
        iterator = enumerate(images)
        exhausted = False

        def send(index: int, image: bytes, attempt: int) -> None:
            counter, frame = self.session.classify(image)
            self._send(frame)
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
            payload = self._next_event(ResultReceived).payload
            index, image, attempt = pending.pop(payload.request)
            if payload.prediction is not None:
                yield ImageOutcome(index, result=payload.prediction)
                continue
            code, text = payload.error
            if code == ErrorCode.BUSY and attempt < BUSY_RETRIES:
                time.sleep(min(0.05 * 2 ** attempt, 2.0))  # back off, then try again
                send(index, image, attempt + 1)
            else:
                yield ImageOutcome(index, error=(code, text))
