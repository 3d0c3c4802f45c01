"""The enclave service: one RSA key in memory, one model, a bounded pool of workers.

Threads:
- the parent link announces the public key (with an attestation document) to the parent
  server and carries one-shot results to it, reconnecting with backoff;
- the accept loop takes client connections, at most ``max_connections`` at once;
- one handler thread per connection runs the protocol state machine
  (HELLO -> ATTESTATION -> SEALED_REQUEST | SESSION_OPEN -> SESSION_CLASSIFY...);
- ``workers`` classifier threads, each with its own TFLite interpreter, take jobs from a
  bounded queue; a full queue answers BUSY instead of growing.

Nothing here logs an image, a label or a key: log lines name requests by counter/size only.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import cbor2

from nitrolesion.crypto.envelope import (
    Envelope, generate_keypair, load_public_key, open_envelope, public_key_der, request_aad, seal,
    sealed_request_aad)
from nitrolesion.crypto.keywrap import unwrap_session_key
from nitrolesion.crypto.session import SessionCipher
from nitrolesion.errors import (
    ConnectionClosed, CryptoError, ImageError, NitroLesionError, ProtocolError, ReorderError,
    ReplayError, TransportError, TransportTimeout)
from nitrolesion.model.classifier import LesionModel, Prediction
from nitrolesion.model.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from nitrolesion.transport import Endpoint, FramedConnection, accept, connect, listen
from nitrolesion.wire.frames import MessageType
from nitrolesion.wire.messages import (
    Accepted, AnnounceAck, Attestation, EnclaveAnnounce, ErrorCode, ErrorMessage,
    Goodbye, Hello, Message, SealedRequest, SealedResult, SessionClassify, SessionOpen,
    SessionReady, SessionResult, decode_message, loads_plain)

log = logging.getLogger("enclave")

#: Seconds a client may take to deliver one whole frame, and to say anything at all after
#: connecting or between images. Long enough for a 20 MiB image over a slow vsock
#: (~1 MB/s worst case seen on small instances), short enough that a silent or
#: trickling peer frees its slot quickly.
IO_TIMEOUT = 30.0
#: Seconds a new connection has to deliver its first frame (HELLO, under 100 bytes). A
#: real client sends it right after connecting; 5 s tolerates a loaded parent, and is
#: much shorter than IO_TIMEOUT so silent connections cannot hold the
#: MAX_CONNECTIONS slots for long.
HANDSHAKE_TIMEOUT = 5.0
#: Seconds to hand one answer (an error, attestation or sealed result: at most ~20 KiB) to
#: the kernel. Results are sent from classifier workers, so a client that does not read
#: may hold a worker at most this long per answer; 5 s is ample for a reading client.
SEND_TIMEOUT = 5.0
#: Concurrent client connections; each costs one thread and at most one 24 MiB frame.
MAX_CONNECTIONS = 64
#: Requests one session may have queued or running at once. The reader stops reading
#: beyond this, so TCP backpressure reaches the client instead of our memory growing.
SESSION_WINDOW = 8
#: Request ids remembered to refuse replayed one-shot requests (16 bytes each).
REPLAY_CACHE_SIZE = 65536
#: Backoff for reconnecting to the parent server: first delay, cap.
PARENT_BACKOFF = (0.2, 5.0)
#: A parent link that stayed up this long was healthy: the next reconnect starts the
#: backoff afresh. A link the parent drops sooner (a flapping or hostile host that acks
#: and closes at once) keeps backing off, so it cannot make us re-attest in a tight loop.
STABLE_LINK_SECONDS = 10.0
#: Listening binds every local CID (the endpoint's cid is ignored for listening).
VMADDR_CID_ANY = 0xFFFFFFFF


@dataclass
class ServiceConfig:
    """Everything the service needs to know, from app.py's command line."""

    transport: str
    host: str
    parent_cid: int
    client_port: int
    parent_port: int
    workers: int = 2
    queue_size: int = 16
    max_connections: int = MAX_CONNECTIONS
    io_timeout: float = IO_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    once: bool = False


class Busy(NitroLesionError):
    """The job queue is full."""


class WorkerPool:
    """``workers`` threads, each with its own interpreter, fed by one bounded queue."""

    def __init__(self, model: LesionModel, workers: int, queue_size: int,
                 max_bytes: int, max_pixels: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._max = (max_bytes, max_pixels)
        self._threads = []
        for index in range(workers):
            classifier = model.new_classifier(num_threads=1)
            thread = threading.Thread(target=self._run, args=(classifier,),
                                      name=f"worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, image: bytes, done: Callable[[Prediction | None, NitroLesionError | None], None]) -> None:
        """Queue one image; ``done(prediction, error)`` runs on a worker. Raises :class:`Busy`."""
        try:
            self._queue.put_nowait((image, done))
        except queue.Full:
            raise Busy("the enclave's queue is full; try again shortly") from None

    def _run(self, classifier) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            image, done = job
            try:
                prediction = classifier.classify(image, max_bytes=self._max[0],
                                                 max_pixels=self._max[1])
                error = None
            except ImageError as exc:
                prediction, error = None, exc
            except Exception as exc:  # a bug must not kill the worker; details stay here
                log.exception("worker failed on a job")
                prediction, error = None, NitroLesionError("internal error while classifying")
            try:
                done(prediction, error)
            except Exception:
                log.exception("result delivery failed")

    def close(self) -> None:
        """Finish queued jobs, then stop the workers."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()


def prediction_payload(prediction: Prediction) -> dict:
    """The plaintext result sent back (sealed) to the client or the parent."""
    return {"code": prediction.code, "name": prediction.name,
            "confidence": prediction.confidence, "probabilities": prediction.probabilities}


class ParentLink:
    """The enclave's connection to the parent server: announce the key, carry results."""

    def __init__(self, config: ServiceConfig, announce: Callable[[], EnclaveAnnounce],
                 stopping: threading.Event) -> None:
        self._endpoint = Endpoint(config.transport, config.parent_cid, config.parent_port,
                                  config.host)
        self._announce = announce
        self._stopping = stopping
        self._timeout = config.io_timeout
        self._lock = threading.Lock()
        self._connection: FramedConnection | None = None
        self.announced = threading.Event()

    def _connect_and_announce(self) -> FramedConnection:
        connection = connect(self._endpoint, timeout=self._timeout)
        try:
            message = self._announce()
            connection.send(message.TYPE, message.to_body())
            reply = decode_message(connection.receive())
        except (NitroLesionError, OSError):
            connection.close()
            raise
        if not isinstance(reply, AnnounceAck):
            connection.close()
            raise ProtocolError(f"parent answered {type(reply).__name__}, expected AnnounceAck")
        return connection

    def ensure_connected(self, attempts: int | None = None) -> FramedConnection:
        """Connect and announce, retrying with exponential backoff (forever if attempts is None)."""
        with self._lock:
            if self._connection is not None and not self._connection.closed:
                return self._connection
            delay, tries = PARENT_BACKOFF[0], 0
            while not self._stopping.is_set():
                try:
                    self._connection = self._connect_and_announce()
                    log.info("announced public key to parent at %s", self._endpoint)
                    self.announced.set()
                    return self._connection
                except (NitroLesionError, OSError) as exc:
                    tries += 1
                    if attempts is not None and tries >= attempts:
                        raise TransportError(f"parent server unreachable: {exc}") from exc
                    log.info("parent not reachable (%s); retrying in %.1f s", exc, delay)
                    self._stopping.wait(delay)
                    delay = min(delay * 2, PARENT_BACKOFF[1])
            raise TransportError("shutting down")

    def send_result(self, result: SealedResult) -> None:
        """Deliver a sealed result; reconnects once if the link was lost."""
        for attempt in range(2):
            connection = self.ensure_connected(attempts=3)
            try:
                with self._lock:
                    connection.send(result.TYPE, result.to_body())
                return
            except TransportError:
                connection.close()
                if attempt:
                    raise

    def watch(self) -> None:
        """Keep the link up: announce at boot, and again whenever the parent goes away."""
        delay = PARENT_BACKOFF[0]
        while not self._stopping.is_set():
            try:
                connection = self.ensure_connected()
            except TransportError:
                return
            up_since = time.monotonic()
            # The parent never sends on this link after the ack; a read returns only when
            # it closes (restart), and then we reconnect and announce again.
            try:
                connection.receive(timeout=None)
                reason = "the parent sent an unexpected frame"
            except (NitroLesionError, OSError) as exc:
                reason = str(exc)
            connection.close()
            if time.monotonic() - up_since >= STABLE_LINK_SECONDS:
                delay = PARENT_BACKOFF[0]
                log.info("parent link lost (%s); announcing again", reason)
                continue
            log.info("parent link lost after %.1f s (%s); announcing again in %.1f s",
                     time.monotonic() - up_since, reason, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, PARENT_BACKOFF[1])

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()


class EnclaveService:
    """The whole enclave application; ``serve()`` blocks until ``shutdown()``."""

    def __init__(self, config: ServiceConfig, model: LesionModel, attestor) -> None:
        self.config = config
        self.model = model
        self._attestor = attestor
        started = time.perf_counter()
        self._private_key = generate_keypair()
        self.keygen_seconds = time.perf_counter() - started
        self.public_key = public_key_der(self._private_key)
        self.pool = WorkerPool(model, config.workers, config.queue_size,
                               config.max_image_bytes, config.max_image_pixels)
        self._stopping = threading.Event()
        self.parent = ParentLink(config, self._announcement, self._stopping)
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._seen_requests: OrderedDict[bytes, None] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._handlers: set[threading.Thread] = set()
        self._connections: set[FramedConnection] = set()
        self._conn_lock = threading.Lock()
        self._listener: object | None = None
        self._served = itertools.count(1)
        self.served = 0
        self.ready = threading.Event()

    # -- attestation -------------------------------------------------------------------
    def _announcement(self) -> EnclaveAnnounce:
        return EnclaveAnnounce(self.public_key, self._attestor.attest(public_key=self.public_key))

    # -- lifecycle ---------------------------------------------------------------------
    def bind(self) -> None:
        """Open the client port; raises TransportError (e.g. port in use, no AF_VSOCK)."""
        endpoint = Endpoint(self.config.transport, VMADDR_CID_ANY, self.config.client_port, self.config.host)
        self._listener = listen(endpoint, backlog=128)
        log.info("listening for clients on %s", endpoint)

    def serve(self) -> None:
        """Announce to the parent and serve clients; returns after shutdown."""
        if self._listener is None:
            self.bind()
        threading.Thread(target=self.parent.watch, name="parent-link", daemon=True).start()
        self.ready.set()
        while not self._stopping.is_set():
            try:
                connection = accept(self._listener, timeout=0.5)
            except TransportError:
                continue  # accept timeout: re-check the stop flag
            if not self._slots.acquire(blocking=False):
                self._refuse(connection)
                continue
            thread = threading.Thread(target=self._handle, args=(connection,), daemon=True,
                                      name=f"conn-{connection.peer}")
            with self._conn_lock:
                self._handlers.add(thread)
            thread.start()
        self._drain()

    def shutdown(self) -> None:
        """Stop accepting; connections finish their in-flight requests, then close."""
        if self._stopping.is_set():
            return
        log.info("shutting down: finishing requests in flight")
        self._stopping.set()
        with self._conn_lock:
            for connection in self._connections:
                connection.shutdown_read()  # reader sees EOF; answers can still be sent

    def _drain(self) -> None:
        if self._listener is not None:
            self._listener.close()
        with self._conn_lock:
            handlers = list(self._handlers)
        for thread in handlers:
            thread.join(timeout=self.config.io_timeout)
        self.pool.close()
        self.parent.close()
        log.info("stopped after serving %d request(s)", self.served)

    def _refuse(self, connection: FramedConnection) -> None:
        try:
            busy = ErrorMessage(ErrorCode.BUSY, "too many connections; try again shortly")
            connection.send(busy.TYPE, busy.to_body(), timeout=1.0)
        except NitroLesionError:
            pass
        connection.close()

    def _finished_one(self) -> None:
        self.count_served()
        if self.config.once:
            self.shutdown()

    # -- one connection ----------------------------------------------------------------
    def _handle(self, connection: FramedConnection) -> None:
        with self._conn_lock:
            self._connections.add(connection)
        if self._stopping.is_set():  # accepted just as shutdown began: serve nothing new
            connection.shutdown_read()
        handler = ConnectionHandler(self, connection)
        try:
            handler.run()
        finally:
            handler.wait_idle()
            connection.close()
            with self._conn_lock:
                self._connections.discard(connection)
                self._handlers.discard(threading.current_thread())
            self._slots.release()

    def count_served(self) -> None:
        """Thread-safe: workers of several connections finish requests at once."""
        self.served = next(self._served)

    def remember_request(self, request_id: bytes) -> bool:
        """False if this request id was seen before (a replay)."""
        with self._seen_lock:
            if request_id in self._seen_requests:
                return False
            self._seen_requests[request_id] = None
            if len(self._seen_requests) > REPLAY_CACHE_SIZE:
                self._seen_requests.popitem(last=False)
            return True


class ConnectionHandler:
    """The protocol state machine for one client connection."""

    def __init__(self, service: EnclaveService, connection: FramedConnection) -> None:
        self.service = service
        self.connection = connection
        self.state = "new"
        self.cipher: SessionCipher | None = None
        self._send_lock = threading.Lock()
        self._window = threading.BoundedSemaphore(SESSION_WINDOW)
        self._in_flight = 0
        self._idle = threading.Condition()

    def send(self, message: Message) -> None:
        with self._send_lock:
            self.connection.send(message.TYPE, message.to_body(), timeout=SEND_TIMEOUT)

    def send_error(self, code: str, text: str) -> None:
        try:
            self.send(ErrorMessage.bounded(code, text))
        except NitroLesionError:
            pass

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # a bug must not leave the client waiting; details stay in our log
            log.exception("connection handler failed")
            self.send_error(ErrorCode.INTERNAL, "internal error; the connection is closed")

    def _run(self) -> None:
        config = self.service.config
        while True:
            # The first frame (HELLO) is tiny and due at once; later frames may carry images.
            timeout = config.handshake_timeout if self.state == "new" else config.io_timeout
            try:
                frame = self.connection.receive(timeout=timeout)
            except ConnectionClosed:
                return
            except ProtocolError as exc:
                self.send_error(ErrorCode.BAD_FRAME, str(exc))
                return
            except TransportTimeout:
                self.send_error(ErrorCode.TIMEOUT, f"no complete frame within {timeout:g} s")
                return
            except TransportError:
                return  # reset or closed mid-frame: nobody to answer
            try:
                message = decode_message(frame)
            except ProtocolError as exc:
                self.send_error(ErrorCode.BAD_MESSAGE, str(exc))
                return
            try:
                if not self.dispatch(message):
                    return
            except TransportError:
                return
            except Exception:  # a bug or an NSM failure: answer, log (no secrets), end
                log.exception("request handling failed")
                self.send_error(ErrorCode.INTERNAL, "internal error; see the enclave log")
                return

    def dispatch(self, message: Message) -> bool:
        """Handle one message; False ends the connection."""
        if isinstance(message, Goodbye):
            return False
        if isinstance(message, Hello) and self.state == "new":
            document = self.service._attestor.attest(public_key=self.service.public_key,
                                                     nonce=message.nonce)
            self.send(Attestation(self.service.public_key, document))
            self.state = "attested"
            return True
        if isinstance(message, SealedRequest) and self.state == "attested":
            return self.one_shot(message)
        if isinstance(message, SessionOpen) and self.state == "attested":
            try:
                key = unwrap_session_key(self.service._private_key, message.wrapped_key,
                                         message.session_id)
            except CryptoError as exc:
                self.send_error(ErrorCode.DECRYPT_FAILED, str(exc))
                return False
            self.cipher = SessionCipher(key, message.session_id, "enclave")
            self.state = "session"
            self.send(SessionReady(message.session_id))
            return True
        if isinstance(message, SessionClassify) and self.state == "session":
            return self.session_request(message)
        self.send_error(ErrorCode.UNEXPECTED,
                        f"{message.TYPE.name} is not expected in state {self.state}")
        return False

    # -- one-shot requests (parent.py client) ------------------------------------------
    def one_shot(self, request: SealedRequest) -> bool:
        aad = sealed_request_aad(request.request_id, request.parent_public_key)
        try:
            parent_key = load_public_key(request.parent_public_key)
            image = open_envelope(self.service._private_key,
                                  Envelope(request.wrapped_key, request.nonce, request.ciphertext), aad)
        except CryptoError as exc:
            self.send_error(ErrorCode.DECRYPT_FAILED, str(exc))
            return True
        if not self.service.remember_request(request.request_id):
            self.send_error(ErrorCode.REPLAY, "this request id was already used")
            return True
        finished = threading.Event()
        outcome: dict = {}

        def done(prediction, error):
            outcome.update(prediction=prediction, error=error)
            finished.set()

        try:
            self.service.pool.submit(image, done)
        except Busy as exc:
            self.send_error(ErrorCode.BUSY, str(exc))
            return True
        finished.wait()
        if outcome["error"] is not None:
            code = ErrorCode.BAD_IMAGE if isinstance(outcome["error"], ImageError) else ErrorCode.INTERNAL
            self.send_error(code, str(outcome["error"]))
            return True
        plaintext = cbor2.dumps(prediction_payload(outcome["prediction"]))
        sealed = seal(parent_key, plaintext, request_aad(MessageType.SEALED_RESULT, request.request_id))
        try:
            self.service.parent.send_result(SealedResult(request.request_id, sealed.wrapped_key,
                                                         sealed.nonce, sealed.ciphertext))
        except NitroLesionError as exc:
            self.send_error(ErrorCode.UNAVAILABLE, f"could not deliver the result to the parent: {exc}")
            return True
        log.info("one-shot request classified and delivered (%d bytes in)", len(image))
        self.send(Accepted(request.request_id))
        self.service._finished_one()
        return True

    # -- sessions (parent.py classify) -------------------------------------------------
    def session_request(self, request: SessionClassify) -> bool:
        try:
            plaintext = self.cipher.open(MessageType.SESSION_CLASSIFY, request.counter,
                                         request.ciphertext)
        except (ReplayError, ReorderError) as exc:
            self.send_error(ErrorCode.REPLAY, str(exc))
            return False  # the stream can no longer be trusted
        except CryptoError as exc:
            self.send_error(ErrorCode.DECRYPT_FAILED, str(exc))
            return False
        try:
            body = loads_plain(plaintext)  # authenticated, but any client can open a session
            image = body["image"]
            if not isinstance(image, bytes):
                raise TypeError
        except Exception:
            self.send_sealed(request.counter, {"error": {"code": ErrorCode.BAD_MESSAGE,
                                                         "message": "expected {'image': bytes}"}})
            return True
        self._window.acquire()  # backpressure: stop reading while SESSION_WINDOW are queued
        with self._idle:
            self._in_flight += 1

        def done(prediction, error):
            try:
                if error is None:
                    result = {"result": prediction_payload(prediction)}
                else:
                    code = ErrorCode.BAD_IMAGE if isinstance(error, ImageError) else ErrorCode.INTERNAL
                    result = {"error": {"code": code, "message": str(error)}}
                self.send_sealed(request.counter, result)
            finally:
                self._release()

        try:
            self.service.pool.submit(image, done)
        except Busy as exc:
            self._release()
            self.send_sealed(request.counter, {"error": {"code": ErrorCode.BUSY, "message": str(exc)}})
        return True

    def send_sealed(self, request_counter: int, payload: dict) -> None:
        """Seal a per-image result (or per-image error) under the session key and send it."""
        payload = {"request": request_counter, **payload}
        try:
            with self._send_lock:
                counter, ciphertext = self.cipher.seal(MessageType.SESSION_RESULT, cbor2.dumps(payload))
                self.connection.send(MessageType.SESSION_RESULT,
                                     SessionResult(counter, ciphertext).to_body(),
                                     timeout=SEND_TIMEOUT)
        except NitroLesionError:
            pass  # the client went away; the worker is free again either way
        if "result" in payload:
            self.service.count_served()

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
        if self.state == "session" and self.service.config.once:
            self.service._finished_one()
