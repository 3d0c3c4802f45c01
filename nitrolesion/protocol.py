"""The client's and the enclave's side of the protocol, sans-I/O: frames in, events out.

This is the one place that knows the flow (docs/HANDSHAKE.md draws it). Like h11's
connection object, each class holds one connection's state and does no I/O: the caller
reads a frame from its transport, hands it to ``receive()`` and acts on the event it gets
back; methods such as ``hello()`` or ``classify()`` return the frame to write. There is no
clock, and randomness is a parameter, so tests drive a client and an enclave against each
other in memory, byte for byte.

    client                                   enclave
    hello()              HELLO  --------->   receive() -> AttestationRequested(nonce, user_data)
                                             attestation(document)   (the caller asked the NSM)
    receive() -> AttestationReceived  <----  ATTESTATION
    attestation_verified(result)             (the caller verified the document)
    open_session()       SESSION_OPEN --->   receive() -> SessionOpened(reply=SESSION_READY)
    receive() -> SessionEstablished   <----  SESSION_READY
    classify(image)      SESSION_CLASSIFY -> receive() -> ImageReceived(request, image)
    receive() -> ResultReceived       <----  result(ResultPayload(...))
    or, after attestation_verified:
    one_shot(image, parent_key) SEALED_REQUEST -> receive() -> OneShotReceived
    receive() -> OneShotAccepted      <----  accepted(request_id)

Any violation (a malformed or unexpected message, a message that does not authenticate, a
replayed or reordered counter) raises a NitroLesionError subclass and closes the state
machine for good (``State.CLOSED``): after that nothing on the connection is trusted, and
the caller answers with ``error_frame(error_code(exc), str(exc))`` and closes.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from Crypto.PublicKey.RSA import RsaKey
from Crypto.Random import get_random_bytes

from nitrolesion.attestation.errors import PublicKeyMismatch
from nitrolesion.crypto.envelope import (
    Envelope, load_public_key, new_request_id, open_envelope, request_aad, seal,
    sealed_request_aad)
from nitrolesion.crypto.keywrap import unwrap_session_secret, wrap_session_secret
from nitrolesion.crypto.result_signature import sign_result
from nitrolesion.crypto.session import (
    MAX_MESSAGES, SessionCipher, SessionKeys, Transcript,
    derive_session_keys, key_confirmation, new_session_id, new_session_secret)
from nitrolesion.errors import (
    CryptoError, LocalProtocolError, NitroLesionError, ProtocolError, ReorderError, ReplayError,
    UnexpectedMessage)
from nitrolesion.limits import CLIENT_NONCE_SIZE, ENCLAVE_RANDOM_SIZE
from nitrolesion.wire.frames import MAX_BODY, Frame, MessageType
from nitrolesion.wire.messages import (
    Accepted, Attestation, ErrorCode, ErrorMessage, Goodbye, Hello, ImagePayload, Message,
    ResultPayload, SealedRequest, SealedResult, SessionClassify, SessionOpen, SessionReady,
    SessionResult, decode_message, printable)

__all__ = [
    "AttestationReceived",
    "AttestationRequested",
    "BadRequest",
    "ClientSession",
    "Closed",
    "EnclaveSession",
    "ImageReceived",
    "OneShotAccepted",
    "OneShotReceived",
    "PeerError",
    "ResultReceived",
    "SessionEstablished",
    "SessionOpened",
    "State",
    "error_code",
    "error_frame",
]

RandomBytes = Callable[[int], bytes]

#: The largest frame a client may send before it is attested or after its one-shot
#: request: HELLO, SESSION_OPEN (an RSA-8192 wrapped secret is 1 KiB) and GOODBYE all fit
#: with room to spare. Only image-carrying frames may be larger.
HANDSHAKE_FRAME_LIMIT = 4096


class State(enum.Enum):
    """Where one side of one connection stands."""

    IDLE = "idle"              # nothing exchanged yet
    ATTESTING = "attesting"    # HELLO sent/received; the document is not yet verified/sent
    ATTESTED = "attested"      # client: document verified; enclave: ATTESTATION sent
    OPENING = "opening"        # client: SESSION_OPEN sent, waiting for SESSION_READY
    OPEN = "open"              # session keys in place: images and results flow
    DONE = "done"              # the one one-shot request of this connection was sent
    CLOSED = "closed"          # GOODBYE, ERROR or a violation; sticky


# -- events --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttestationRequested:
    """Enclave: ask the NSM for a document over (public key, ``nonce``, ``user_data``),
    then call ``attestation(document)``."""

    nonce: bytes
    user_data: bytes


@dataclass(frozen=True)
class AttestationReceived:
    """Client: verify ``document`` for ``nonce``, then call ``attestation_verified``."""

    public_key: bytes
    document: bytes
    nonce: bytes


@dataclass(frozen=True)
class SessionOpened:
    """Enclave: the session keys are in place; write ``reply`` (SESSION_READY)."""

    session_id: bytes
    reply: Frame


@dataclass(frozen=True)
class SessionEstablished:
    """Client: the enclave proved it holds the same session keys."""

    session_id: bytes


@dataclass(frozen=True)
class ImageReceived:
    """Enclave: classify ``image``; answer with ``result(ResultPayload(request, ...))``."""

    request: int
    image: bytes


@dataclass(frozen=True)
class BadRequest:
    """Enclave: an authentic request whose payload is not an image request; answer it
    with a sealed per-image error (the session stays open)."""

    request: int
    message: str


@dataclass(frozen=True)
class ResultReceived:
    """Client: the answer to request ``payload.request``."""

    payload: ResultPayload


@dataclass(frozen=True)
class OneShotReceived:
    """Enclave: classify ``image`` and deliver the result sealed to ``parent_public_key``."""

    request_id: bytes
    image: bytes
    parent_public_key: bytes


@dataclass(frozen=True)
class OneShotAccepted:
    """Client: the enclave classified the one-shot image and delivered the result."""

    request_id: bytes


@dataclass(frozen=True)
class PeerError:
    """Either side: the peer answered with ERROR; ``message`` is safe to print."""

    code: str
    message: str


@dataclass(frozen=True)
class Closed:
    """Either side: the peer said GOODBYE."""


def error_code(exc: BaseException) -> str:
    """The ERROR code that answers a violation raised by ``receive``."""
    if isinstance(exc, UnexpectedMessage):
        return ErrorCode.UNEXPECTED
    if isinstance(exc, ProtocolError):
        return ErrorCode.BAD_MESSAGE
    if isinstance(exc, (ReplayError, ReorderError)):
        return ErrorCode.REPLAY
    if isinstance(exc, CryptoError):
        return ErrorCode.DECRYPT_FAILED
    return ErrorCode.INTERNAL


def error_frame(code: str, text: str) -> Frame:
    """An ERROR frame (text cut to what the peer accepts)."""
    message = ErrorMessage.bounded(code, text)
    return Frame(message.TYPE, message.to_body())


def _frame(message: Message) -> Frame:
    return Frame(message.TYPE, message.to_body())


class _Side:
    """What both sides share: state, transcript, the sticky CLOSED on any violation."""

    def __init__(self, random_bytes: RandomBytes, max_messages: int) -> None:
        self.state = State.IDLE
        self._random = random_bytes
        self._max_messages = max_messages
        self._transcript = Transcript()
        self._cipher: SessionCipher | None = None

    def _require(self, *states: State) -> None:
        if self.state not in states:
            raise LocalProtocolError(
                f"not allowed in state {self.state.value} (needs {', '.join(s.value for s in states)})")

    def _decode(self, frame: Frame) -> Message:
        if self.state is State.CLOSED:
            raise UnexpectedMessage("the connection is closed")
        try:
            return decode_message(frame)
        except ProtocolError:
            self.state = State.CLOSED
            raise

    def _violation(self, exc: NitroLesionError) -> NitroLesionError:
        self.state = State.CLOSED
        return exc

    def _unexpected(self, message: Message) -> UnexpectedMessage:
        return self._violation(UnexpectedMessage(
            f"{message.TYPE.name} is not expected in state {self.state.value}"))

    def _common(self, message: Message):
        """ERROR and GOODBYE mean the same on both sides at any point."""
        if isinstance(message, ErrorMessage):
            self.state = State.CLOSED
            return PeerError(printable(message.code), printable(message.message))
        if isinstance(message, Goodbye):
            self.state = State.CLOSED
            return Closed()
        return None

    def goodbye(self) -> Frame:
        """A polite GOODBYE; the state machine closes."""
        self.state = State.CLOSED
        return _frame(Goodbye())


class ClientSession(_Side):
    """The client's side of one connection to the enclave."""

    def __init__(self, *, random_bytes: RandomBytes = get_random_bytes,
                 max_messages: int = MAX_MESSAGES) -> None:
        super().__init__(random_bytes, max_messages)
        self._nonce = b""
        self._offered: Attestation | None = None
        self._enclave_key: RsaKey | None = None
        self._enclave_random = b""
        self._binding = b""
        self._keys: tuple[bytes, SessionKeys] | None = None  # until SESSION_READY
        self._confirmation = b""  # what SESSION_READY must carry
        self._outstanding: set[int] = set()
        self._one_shot_id = b""

    @property
    def outstanding(self) -> int:
        """Requests sent over the session and not yet answered."""
        return len(self._outstanding)

    @property
    def enclave_key(self) -> RsaKey | None:
        """The attested enclave key, once ``attestation_verified`` accepted it."""
        return self._enclave_key

    @property
    def binding(self) -> bytes:
        """SHA-256 over this connection's HELLO and ATTESTATION frames: what a one-shot
        request is bound to (empty before the ATTESTATION arrived)."""
        return self._binding

    def hello(self) -> Frame:
        """HELLO with a fresh nonce: the first frame of a connection."""
        self._require(State.IDLE)
        self._nonce = self._random(CLIENT_NONCE_SIZE)
        frame = _frame(Hello(self._nonce))
        self._transcript.add(frame.type, frame.body)
        self.state = State.ATTESTING
        return frame

    def receive(self, frame: Frame):
        """The event for one frame from the enclave; raises on any violation (see module doc)."""
        message = self._decode(frame)
        if (event := self._common(message)) is not None:
            return event
        if isinstance(message, Attestation) and self.state is State.ATTESTING and self._offered is None:
            self._offered = message
            self._transcript.add(frame.type, frame.body)
            self._binding = self._transcript.digest()
            return AttestationReceived(message.public_key, message.document, self._nonce)
        if isinstance(message, SessionReady) and self.state is State.OPENING:
            return self._ready(message)
        if isinstance(message, SessionResult) and self.state is State.OPEN:
            return self._result(message)
        if isinstance(message, Accepted) and self.state is State.DONE:
            if not hmac.compare_digest(message.request_id, self._one_shot_id):
                raise self._violation(ProtocolError("the enclave acknowledged a different request id"))
            self._one_shot_id = b""
            return OneShotAccepted(message.request_id)
        raise self._unexpected(message)

    def attestation_verified(self, result) -> None:
        """Record the verified document (an AttestationResult for this connection's nonce).

        Raises PublicKeyMismatch if the key offered beside the document is not the attested
        one, ProtocolError if the document carries no enclave random value (an enclave of
        an older protocol), and LocalProtocolError if ``result`` is for another nonce.
        """
        self._require(State.ATTESTING)
        if self._offered is None:
            raise LocalProtocolError("no ATTESTATION received yet")
        if result.nonce is None or not hmac.compare_digest(result.nonce, self._nonce):
            raise LocalProtocolError("the verified document is not for this connection's nonce")
        if result.public_key is None or not hmac.compare_digest(result.public_key, self._offered.public_key):
            raise self._violation(PublicKeyMismatch(
                "the key offered beside the document is not the attested key; refusing to send"))
        if result.user_data is None or len(result.user_data) != ENCLAVE_RANDOM_SIZE:
            raise self._violation(ProtocolError(
                f"the attestation carries no {ENCLAVE_RANDOM_SIZE}-byte enclave random value "
                "in user_data: the enclave speaks an older protocol"))
        self._enclave_key = load_public_key(result.public_key)
        self._enclave_random = bytes(result.user_data)
        self.state = State.ATTESTED

    def open_session(self) -> Frame:
        """SESSION_OPEN: a fresh secret wrapped to the attested key, bound to a new session id."""
        self._require(State.ATTESTED)
        secret, session_id = new_session_secret(random_bytes=self._random), new_session_id(random_bytes=self._random)
        frame = _frame(SessionOpen(session_id, wrap_session_secret(self._enclave_key, secret, session_id)))
        self._transcript.add(frame.type, frame.body)
        transcript = self._transcript.digest()
        self._keys = (session_id, derive_session_keys(secret, self._nonce, self._enclave_random,
                                                      session_id, transcript))
        self._confirmation = key_confirmation(self._keys[1], transcript)
        self.state = State.OPENING
        return frame

    def _ready(self, message: SessionReady) -> SessionEstablished:
        session_id, keys = self._keys
        if not hmac.compare_digest(message.session_id, session_id):
            raise self._violation(ProtocolError("the enclave confirmed a different session id"))
        if not hmac.compare_digest(message.confirmation, self._confirmation):
            raise self._violation(CryptoError(
                "the enclave's key confirmation is wrong: it did not derive this session's keys"))
        self._cipher = SessionCipher(keys, session_id, "client", max_messages=self._max_messages)
        self._keys = None
        self.state = State.OPEN
        return SessionEstablished(session_id)

    def classify(self, image: bytes) -> tuple[int, Frame]:
        """SESSION_CLASSIFY for ``image``: ``(request counter, frame)``. Raises CryptoError
        once the session's counter is exhausted (open a new connection)."""
        return self._seal_request(MessageType.SESSION_CLASSIFY, ImagePayload(image).encode())

    def seal_arbitrary_for_testing(self, plaintext: bytes, *,
                                   msg_type: int = MessageType.SESSION_CLASSIFY) -> tuple[int, Frame]:
        """FOR HOSTILE-PEER TESTS ONLY; a client never calls it (use ``classify``).

        A SESSION_CLASSIFY frame whose ciphertext seals ``plaintext`` exactly as given (no
        image payload around it), under this session's next counter, with ``msg_type`` in
        its associated data. Tests send with it what a correct client never would (a payload
        that is not an image request, a CBOR bomb, a ciphertext bound to another message
        type) and still read the enclave's answer with ``receive()``: the counter counts as
        outstanding. Returns ``(request counter, frame)`` like ``classify``.
        """
        return self._seal_request(msg_type, plaintext)

    def _seal_request(self, msg_type: int, plaintext: bytes) -> tuple[int, Frame]:
        self._require(State.OPEN)
        counter, ciphertext = self._cipher.seal(msg_type, plaintext)
        self._outstanding.add(counter)
        return counter, _frame(SessionClassify(counter, ciphertext))

    def _result(self, message: SessionResult) -> ResultReceived:
        try:
            plaintext = self._cipher.open(MessageType.SESSION_RESULT, message.counter, message.ciphertext)
            payload = ResultPayload.decode(plaintext)
        except NitroLesionError as exc:
            raise self._violation(exc) from None
        if payload.request not in self._outstanding:
            raise self._violation(ProtocolError(
                f"the enclave answered request {payload.request}, which is not outstanding"))
        self._outstanding.discard(payload.request)
        return ResultReceived(payload)

    def one_shot(self, image: bytes, parent_public_key: bytes) -> tuple[bytes, Frame]:
        """SEALED_REQUEST: ``image`` sealed to the attested key, bound to this connection's
        attestation; the result will be sealed to ``parent_public_key``. One per connection."""
        self._require(State.ATTESTED)
        request_id = new_request_id(random_bytes=self._random)
        aad = sealed_request_aad(request_id, parent_public_key, self._binding)
        sealed = seal(self._enclave_key, image, aad, random_bytes=self._random)
        self._one_shot_id = request_id
        self.state = State.DONE
        return request_id, _frame(SealedRequest(request_id, bytes(parent_public_key),
                                                sealed.wrapped_key, sealed.nonce, sealed.ciphertext))


class EnclaveSession(_Side):
    """The enclave's side of one client connection.

    ``result()`` may be called from worker threads while the reader calls ``receive()``:
    they touch separate state (the send and the receive half of the cipher). The caller
    must hold one lock around ``result()`` and writing its frame, so frames leave in the
    order of their counters.
    """

    def __init__(self, private_key: RsaKey, public_key: bytes, *,
                 random_bytes: RandomBytes = get_random_bytes,
                 max_messages: int = MAX_MESSAGES) -> None:
        super().__init__(random_bytes, max_messages)
        self._private_key = private_key
        self._public_key = bytes(public_key)
        self._nonce = b""
        self._enclave_random = b""
        self._binding = b""

    def largest_frame(self) -> int:
        """The largest frame body the client may send now: image-sized only once attested
        (SEALED_REQUEST) or in a session, so a peer that has not even said HELLO cannot make
        the enclave reserve memory for an image."""
        return MAX_BODY if self.state in (State.ATTESTED, State.OPEN) else HANDSHAKE_FRAME_LIMIT

    @property
    def session_open(self) -> bool:
        """True once a session's keys exist (results may still be sealed after CLOSED)."""
        return self._cipher is not None

    def receive(self, frame: Frame):
        """The event for one frame from the client; raises on any violation (see module doc)."""
        message = self._decode(frame)
        if (event := self._common(message)) is not None:
            return event
        if isinstance(message, Hello) and self.state is State.IDLE:
            self._nonce = message.nonce
            self._enclave_random = self._random(ENCLAVE_RANDOM_SIZE)
            self._transcript.add(frame.type, frame.body)
            self.state = State.ATTESTING
            return AttestationRequested(message.nonce, self._enclave_random)
        if isinstance(message, SessionOpen) and self.state is State.ATTESTED:
            return self._open(frame, message)
        if isinstance(message, SealedRequest) and self.state is State.ATTESTED:
            return self._one_shot(message)
        if isinstance(message, SessionClassify) and self.state is State.OPEN:
            try:
                plaintext = self._cipher.open(MessageType.SESSION_CLASSIFY, message.counter,
                                              message.ciphertext)
            except NitroLesionError as exc:
                raise self._violation(exc) from None
            try:
                return ImageReceived(message.counter, ImagePayload.decode(plaintext).image)
            except ProtocolError as exc:  # authentic, but any attested client can send this
                return BadRequest(message.counter, str(exc))
        raise self._unexpected(message)

    def attestation(self, document: bytes) -> Frame:
        """ATTESTATION with the NSM's ``document`` for the requested nonce and user_data."""
        self._require(State.ATTESTING)
        frame = _frame(Attestation(self._public_key, bytes(document)))
        self._transcript.add(frame.type, frame.body)
        self._binding = self._transcript.digest()
        self.state = State.ATTESTED
        return frame

    def _open(self, frame: Frame, message: SessionOpen) -> SessionOpened:
        try:
            secret = unwrap_session_secret(self._private_key, message.wrapped_secret, message.session_id)
        except CryptoError as exc:
            raise self._violation(exc) from None
        self._transcript.add(frame.type, frame.body)
        transcript = self._transcript.digest()
        keys = derive_session_keys(secret, self._nonce, self._enclave_random, message.session_id,
                                   transcript)
        self._cipher = SessionCipher(keys, message.session_id, "enclave",
                                     max_messages=self._max_messages)
        self.state = State.OPEN
        return SessionOpened(message.session_id,
                             _frame(SessionReady(message.session_id, key_confirmation(keys, transcript))))

    def _one_shot(self, message: SealedRequest) -> OneShotReceived:
        try:
            load_public_key(message.parent_public_key)
            aad = sealed_request_aad(message.request_id, message.parent_public_key, self._binding)
            image = open_envelope(self._private_key, Envelope(message.wrapped_key, message.nonce,
                                                              message.ciphertext), aad)
        except CryptoError as exc:
            raise self._violation(exc) from None
        self.state = State.DONE
        return OneShotReceived(message.request_id, image, message.parent_public_key)

    def result(self, payload: ResultPayload) -> Frame:
        """SESSION_RESULT sealing ``payload`` (see the class doc about the send lock)."""
        if self._cipher is None:
            raise LocalProtocolError("no session is open")
        counter, ciphertext = self._cipher.seal(MessageType.SESSION_RESULT, payload.encode())
        return _frame(SessionResult(counter, ciphertext))

    def one_shot_result(self, event: OneShotReceived, prediction_bytes: bytes,
                        issued_at_ms: int) -> SealedResult:
        """The SEALED_RESULT for the parent server: sealed to the parent key given in the
        request, signed with the enclave key together with ``issued_at_ms`` (the caller's
        clock; crypto/result_signature.py)."""
        envelope = seal(load_public_key(event.parent_public_key), prediction_bytes,
                        request_aad(MessageType.SEALED_RESULT, event.request_id),
                        random_bytes=self._random)
        signature = sign_result(self._private_key, event.request_id, issued_at_ms, envelope)
        return SealedResult(event.request_id, issued_at_ms, envelope.wrapped_key, envelope.nonce,
                            envelope.ciphertext, signature)

    @staticmethod
    def accepted(request_id: bytes) -> Frame:
        """ACCEPTED: the one-shot result was delivered to the parent."""
        return _frame(Accepted(request_id))
