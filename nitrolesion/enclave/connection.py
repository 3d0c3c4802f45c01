"""One client connection inside the enclave: frames between its socket and its
EnclaveSession, images to the worker pool, answers back.

The protocol (what may come when, keys, counters) lives in nitrolesion.protocol; this
module reads frames (reserving memory for each before its body arrives), hands images to
the worker pool and writes the answers. Nothing here logs an image, a label or a key.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

import cbor2

from nitrolesion.errors import (
    Busy, ConnectionClosed, ImageError, NitroLesionError, ProtocolError, TransportError,
    TransportTimeout)
from nitrolesion.memory_budget import FRAME_COPIES, MIB, MemoryBudget, Reservation
from nitrolesion.model.classifier import Prediction
from nitrolesion.protocol import (
    AttestationRequested, BadRequest, EnclaveSession, ImageReceived, OneShotReceived,
    SessionOpened, State, error_code, error_frame)
from nitrolesion.transport import FramedConnection
from nitrolesion.wire.frames import Frame
from nitrolesion.wire.messages import ErrorCode, ResultPayload

from nitrolesion.enclave.parent_link import ParentLink
from nitrolesion.enclave.worker_pool import WorkerPool

__all__ = ["SEND_TIMEOUT", "SESSION_WINDOW", "ConnectionHandler", "ConnectionOwner",
           "FrameRefused", "prediction_payload"]

log = logging.getLogger("enclave")

#: Seconds to hand one answer (an error, attestation or sealed result: at most ~20 KiB) to
#: the kernel. Results are sent from classifier workers, so a client that does not read
#: may hold a worker at most this long per answer; 5 s is ample for a reading client.
SEND_TIMEOUT = 5.0
#: Requests one session may have queued or running at once. The reader stops reading
#: beyond this, so TCP backpressure reaches the client instead of our memory growing.
SESSION_WINDOW = 8


class ConnectionOwner(Protocol):
    """What a connection handler uses of the service that accepted it (EnclaveService)."""

    budget: MemoryBudget
    pool: WorkerPool
    parent: ParentLink

    def attest(self, nonce: bytes, user_data: bytes) -> bytes: ...

    def new_protocol_session(self) -> EnclaveSession: ...

    def count_served(self) -> None: ...

    def finished_one(self) -> None: ...

    def finished_session(self) -> None: ...


class FrameRefused(NitroLesionError):
    """A frame refused from its header (too large for the state, or no memory for it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _code_for(error: NitroLesionError) -> str:
    """The per-image error code for a worker's failure."""
    if isinstance(error, Busy):
        return ErrorCode.BUSY
    return ErrorCode.BAD_IMAGE if isinstance(error, ImageError) else ErrorCode.INTERNAL


def _release(reservation: Reservation | None) -> None:
    if reservation is not None:
        reservation.release()


def prediction_payload(prediction: Prediction) -> dict:
    """The plaintext result of a one-shot request, sealed to the parent: the prediction's
    wire map, triage included."""
    return prediction.to_wire()


class ConnectionHandler:
    """Moves one client connection's frames between the socket and its EnclaveSession.

    The protocol (what may come when, keys, counters) lives in nitrolesion.protocol; this
    class only reads frames, hands images to the worker pool and writes answers.
    """

    def __init__(self, owner: ConnectionOwner, connection: FramedConnection, *,
                 handshake_timeout: float, io_timeout: float) -> None:
        """``handshake_timeout``: seconds for the first frame (HELLO); ``io_timeout``: for
        every later frame and for silence between them."""
        self.owner = owner
        self.connection = connection
        self.session = owner.new_protocol_session()
        self._timeouts = (handshake_timeout, io_timeout)
        self._send_lock = threading.Lock()
        self._window = threading.BoundedSemaphore(SESSION_WINDOW)
        self._in_flight = 0
        self._idle = threading.Condition()
        #: monotonic time since which this connection waits for a frame with nothing in
        #: flight (None while a frame is arriving or requests are being worked on).
        self.idle_since: float | None = None
        self._evicted_among: int | None = None

    def evict(self, connections: int) -> None:
        """Close this idle connection to make room (called from the accept loop)."""
        self._evicted_among = connections
        self.idle_since = None
        self.connection.shutdown_read()

    def _admit(self, length: int) -> Reservation:
        """Memory for a frame of ``length`` bytes, reserved before its body is read."""
        self.idle_since = None
        if length > self.session.largest_frame():
            raise FrameRefused(ErrorCode.BAD_FRAME, f"a frame of {length} bytes is not allowed "
                               f"in state {self.session.state.value} (at most "
                               f"{self.session.largest_frame()}: only an attested connection "
                               "may send an image)")
        reservation = self.owner.budget.try_reserve(FRAME_COPIES * length)
        if reservation is None:
            raise FrameRefused(ErrorCode.BUSY, f"no memory for a {length / MIB:.1f} MiB frame right "
                               "now; try again shortly")
        return reservation

    def send(self, frame: Frame) -> None:
        with self._send_lock:
            self.connection.send_frame(frame, timeout=SEND_TIMEOUT)

    def send_error(self, code: str, text: str) -> None:
        try:
            self.send(error_frame(code, text))
        except NitroLesionError:
            pass

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # a bug must not leave the client waiting; details stay in our log
            log.exception("connection handler failed")
            self.send_error(ErrorCode.INTERNAL, "internal error; the connection is closed")

    def _run(self) -> None:
        while True:
            # The first frame (HELLO) is tiny and due at once; later frames may carry images.
            timeout = self._timeouts[0] if self.session.state is State.IDLE else self._timeouts[1]
            held: list[Reservation] = []
            with self._idle:
                if not self._in_flight:
                    self.idle_since = time.monotonic()
            try:
                try:
                    frame = self.connection.receive(
                        timeout=timeout, admit=lambda length: held.append(self._admit(length)))
                except BaseException:
                    for reservation in held:  # a frame that never completed frees its memory
                        reservation.release()
                    raise
            except FrameRefused as exc:
                self.send_error(exc.code, str(exc))
                return
            except ConnectionClosed:
                if self._evicted_among is not None:
                    self.send_error(ErrorCode.TIMEOUT, "closed after waiting idle while all "
                                    f"{self._evicted_among} connection slots were taken")
                return
            except ProtocolError as exc:
                self.send_error(ErrorCode.BAD_FRAME, str(exc))
                return
            except TransportTimeout:
                self.send_error(ErrorCode.TIMEOUT, f"no complete frame within {timeout:g} s")
                return
            except TransportError:
                return  # reset or closed mid-frame: nobody to answer
            finally:
                self.idle_since = None
            reservation = held[0] if held else None
            try:
                event = self.session.receive(frame)
            except NitroLesionError as exc:  # the session is closed for good: say why, end
                self.send_error(error_code(exc), str(exc))
                _release(reservation)
                return
            del frame  # the body's copy is counted in the reservation; drop it now
            try:
                if not self.dispatch(event, reservation):
                    return
            except TransportError:
                return
            except Exception:  # a bug or an NSM failure: answer, log (no secrets), end
                log.exception("request handling failed")
                self.send_error(ErrorCode.INTERNAL, "internal error; see the enclave log")
                return
            finally:
                if not isinstance(event, (ImageReceived, OneShotReceived)):
                    _release(reservation)

    def dispatch(self, event, reservation: Reservation | None = None) -> bool:
        """Act on one protocol event; False ends the connection. An image request takes
        over ``reservation`` (the memory of its frame) and releases it when answered."""
        if isinstance(event, AttestationRequested):
            self.send(self.session.attestation(self.owner.attest(event.nonce, event.user_data)))
            return True
        if isinstance(event, SessionOpened):
            self.send(event.reply)
            return True
        if isinstance(event, ImageReceived):
            return self.session_request(event, reservation)
        if isinstance(event, BadRequest):
            self.send_result(ResultPayload(event.request, error=(ErrorCode.BAD_MESSAGE, event.message)))
            return True
        if isinstance(event, OneShotReceived):
            try:
                return self.one_shot(event)
            finally:
                _release(reservation)
        return False  # Closed (GOODBYE) or PeerError: the client is done

    # -- one-shot requests (parent.py client) ------------------------------------------
    def one_shot(self, request: OneShotReceived) -> bool:
        """Classify one sealed image and deliver the sealed result to the parent server.

        The result can only go to the parent, so a link that is down is reported first,
        before the image is classified, as UNAVAILABLE naming the command to run."""
        link = self.owner.parent
        if not link.wait_up(link.REQUEST_WAIT):
            self.send_error(ErrorCode.UNAVAILABLE, link.unreachable_text)
            return True
        finished = threading.Event()
        outcome: dict = {}

        def done(payload, error):
            outcome.update(payload=payload, error=error)
            finished.set()

        try:
            self._classify(request.image, done)
        except Busy as exc:
            self.send_error(ErrorCode.BUSY, str(exc))
            return True
        finished.wait()
        if isinstance(outcome["error"], Busy):
            self.send_error(ErrorCode.BUSY, str(outcome["error"]))
            return True
        if outcome["error"] is not None:
            # This answer travels in clear: say what kind of failure, never the image's
            # dimensions or format (the parent server's host reads it).
            if isinstance(outcome["error"], ImageError):
                self.send_error(ErrorCode.BAD_IMAGE, "the enclave could not classify this image "
                                "(not an accepted format, corrupt, or over its size limits)")
            else:
                self.send_error(ErrorCode.INTERNAL, "internal error while classifying")
            return True
        plaintext = cbor2.dumps(prediction_payload(outcome["payload"]))
        try:
            issued_at_ms = int(time.time() * 1000)
            link.send_result(self.session.one_shot_result(request, plaintext, issued_at_ms),
                             wait=link.REQUEST_WAIT)
        except NitroLesionError as exc:
            # Lost while classifying. Transport errors name endpoints, never the image.
            text = str(exc)
            if text != link.unreachable_text:
                text = f"{link.unreachable_text}; the result could not be delivered: {exc}"
            self.send_error(ErrorCode.UNAVAILABLE, text)
            return True
        log.info("one-shot request classified and delivered (%d bytes in)", len(request.image))
        self.send(self.session.accepted(request.request_id))
        self.owner.finished_one()
        return True

    # -- sessions (parent.py classify) -------------------------------------------------
    def session_request(self, request: ImageReceived, reservation: Reservation | None) -> bool:
        self._window.acquire()  # backpressure: stop reading while SESSION_WINDOW are queued
        with self._idle:
            self._in_flight += 1

        def done(prediction: Prediction | None, error: NitroLesionError | None) -> None:
            _release(reservation)
            try:
                if error is None:
                    payload = ResultPayload(request.request, prediction=prediction)
                else:
                    payload = ResultPayload(request.request, error=(_code_for(error), str(error)))
                self.send_result(payload)
            finally:
                self._release()

        try:
            self._classify(request.image, done)
        except Busy as exc:
            _release(reservation)
            self._release()
            self.send_result(ResultPayload(request.request, error=(ErrorCode.BUSY, str(exc))))
        return True

    def _classify(self, image: bytes,
                  answer: Callable[[Prediction | None, NitroLesionError | None], None]) -> None:
        """Queue ``image`` on the worker pool; ``answer(prediction, error)`` runs on a worker
        with the prediction (triage included) or the error. Raises Busy."""
        self.owner.pool.submit(image, answer)

    def send_result(self, payload: ResultPayload) -> None:
        """Seal a per-image result (or per-image error) under the session key and send it."""
        try:
            with self._send_lock:
                frame = self.session.result(payload)
                self.connection.send_frame(frame, timeout=SEND_TIMEOUT)
        except NitroLesionError:
            pass  # the client went away; the worker is free again either way
        if payload.prediction is not None:
            self.owner.count_served()

    def _release(self) -> None:
        self._window.release()
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    def wait_idle(self) -> None:
        """Block until this connection's queued requests have been answered."""
        with self._idle:
            while self._in_flight:
                self._idle.wait()
        if self.session.session_open:
            self.owner.finished_session()
