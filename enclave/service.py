"""The enclave service: one RSA key in memory, one model, a bounded pool of workers.

Threads:
- the parent link announces the public key (with an attestation document) to the parent
  server and carries one-shot results to it, reconnecting with backoff;
- the accept loop takes client connections, at most ``max_connections`` at once;
- one handler thread per connection moves frames between the socket and that
  connection's protocol state machine (nitrolesion.protocol.EnclaveSession);
- ``workers`` threads take jobs from a bounded queue (a full queue answers BUSY instead of
  growing), decode them and deliver the answers around one TFLite interpreter that runs on
  every CPU in its own inference thread.

Nothing here logs an image, a label or a key: log lines name requests by counter/size only.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import cbor2

from nitrolesion.crypto.envelope import generate_keypair, public_key_der
from nitrolesion.errors import (
    Busy, ConnectionClosed, ImageError, NitroLesionError, ProtocolError, TransportError,
    TransportTimeout)
from nitrolesion.limits import ANY_CID
from nitrolesion.memory_budget import (
    FRAME_COPIES, MIB, MemoryBudget, Reservation, budget_for_enclave_memory)
from nitrolesion.model.classifier import LesionModel, Prediction, usable_cpus
from nitrolesion.model.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decoded_bytes_estimate
from nitrolesion.transport import (
    FramedConnection, VsockUnavailable, accept, connect, endpoint_for, listen)
from nitrolesion.protocol import (
    AttestationRequested, BadRequest, EnclaveSession, ImageReceived, OneShotReceived,
    SessionOpened, State, error_code, error_frame)
from nitrolesion.wire.frames import Frame
from nitrolesion.wire.messages import (
    AnnounceAck, EnclaveAnnounce, ErrorCode, ErrorMessage, ResultPayload, SealedResult,
    decode_message)

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
#: Backoff for reconnecting to the parent server: first delay, cap.
PARENT_BACKOFF = (0.2, 5.0)
#: A parent link that stayed up this long was healthy: the next reconnect starts the
#: backoff afresh. A link the parent drops sooner (a flapping or hostile host that acks
#: and closes at once) keeps backing off, so it cannot make us re-attest in a tight loop.
STABLE_LINK_SECONDS = 10.0
#: When every connection slot is taken, a connection that has waited this long for its
#: next frame with nothing in flight is closed to make room (TIMEOUT). A real client sends
#: its next frame within milliseconds; one second spares a slow one, and 64 silent
#: connections can no longer lock legitimate clients out for IO_TIMEOUT.
IDLE_EVICTION_GRACE = 1.0
#: Seconds the accept loop waits for an evicted connection to give its slot back.
EVICTION_WAIT = 2.0


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
    memory_budget: int = field(default_factory=budget_for_enclave_memory)
    once: bool = False


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


class WorkerPool:
    """``workers`` threads fed by one bounded queue, and one interpreter on its own thread.

    A job goes: the bounded job queue (full: BUSY) -> a worker decodes and preprocesses it,
    under a memory reservation for its decoded pixels -> the inference thread runs the
    pool's one TFLite interpreter on it, on ``inference_threads`` threads (default: every CPU
    this process may use) -> the same worker turns the output into a prediction and calls
    ``done`` (seal and send). While the interpreter runs one image, the other workers
    decode the next ones and deliver earlier answers, so it never waits for decoding, and a
    client slow to read its answers holds one worker, not the interpreter.

    Why this layout (measured by bench/pipeline.py and bench/worker_memory.py):
    - one interpreter: each holds ~29 MiB (its activation arena for the four mirror views,
      the float16 weights expanded to float32), so one per worker made every worker beyond
      the first cost ~31 MiB; a worker is now a thread and one preprocessed image (~2.5 MiB);
    - one thread owns it: workers that took turns on the interpreter under a lock were
      15-25 % slower in-process than one thread invoking while another decodes ahead.
    """

    def __init__(self, model: LesionModel, workers: int, queue_size: int,
                 max_bytes: int, max_pixels: int, budget: MemoryBudget,
                 inference_threads: int | None = None) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._max = (max_bytes, max_pixels)
        self._budget = budget
        self._input_size = model.input_size
        self._classifier = model.new_classifier(num_threads=inference_threads or usable_cpus())
        # (pixels, where to answer): at most one per worker, so it needs no bound of its own.
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._inference = threading.Thread(target=self._infer, name="inference", daemon=True)
        self._inference.start()
        self._threads = []
        for index in range(workers):
            thread = threading.Thread(target=self._run, name=f"worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, image: bytes, done: Callable[[Prediction | None, NitroLesionError | None], None]) -> None:
        """Queue one image; ``done(prediction, error)`` runs on a worker. Raises :class:`Busy`."""
        try:
            self._queue.put_nowait((image, done))
        except queue.Full:
            raise Busy("the enclave's queue is full; try again shortly") from None

    def _infer(self) -> None:
        """The inference thread: the only user of the interpreter."""
        while True:
            item = self._ready.get()
            if item is None:
                return
            pixels, answer = item
            try:
                answer.put(self._classifier.predict_array(pixels))
            except Exception as exc:  # handed to the worker, which logs it and answers
                answer.put(exc)

    def _run(self) -> None:
        answer: queue.SimpleQueue = queue.SimpleQueue()  # this worker's inference results
        while True:
            job = self._queue.get()
            if job is None:
                return
            image, done = job
            try:
                # The decoded picture lives only inside preprocess: its reservation ends
                # there, before the wait for the interpreter.
                with self._reserve_decode(image):
                    pixels = self._classifier.preprocess(image, max_bytes=self._max[0],
                                                         max_pixels=self._max[1])
                self._ready.put((pixels, answer))
                del pixels
                output = answer.get()
                if isinstance(output, Exception):
                    raise output
                prediction, error = self._classifier.prediction_from(output), None
            except (ImageError, Busy) as exc:
                prediction, error = None, exc
            except Exception as exc:  # a bug must not kill the worker; details stay here
                log.exception("worker failed on a job")
                prediction, error = None, NitroLesionError("internal error while classifying")
            try:
                done(prediction, error)
            except Exception:
                log.exception("result delivery failed")

    def _reserve_decode(self, image: bytes) -> Reservation:
        """Memory for the pixels ``image`` decodes to, from its header, before decoding.

        Raises ImageError when the image is not one we accept or could never fit
        (BAD_IMAGE), Busy when it would fit but the budget is in use right now."""
        need = decoded_bytes_estimate(image, self._input_size, max_bytes=self._max[0],
                                      max_pixels=self._max[1])
        if need > self._budget.limit:
            raise ImageError(f"the image would decode to {need / MIB:.0f} MiB, more than the "
                             f"enclave's {self._budget.limit / MIB:.0f} MiB budget")
        reservation = self._budget.try_reserve(need)
        if reservation is None:
            raise Busy(f"no memory to decode a {need / MIB:.0f} MiB image right now; try again shortly")
        return reservation

    def close(self) -> None:
        """Finish queued jobs, then stop the workers and the inference thread."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._ready.put(None)
        self._inference.join()


def prediction_payload(prediction: Prediction) -> dict:
    """The plaintext result sent back (sealed) to the client or the parent: the
    prediction's wire map, triage included."""
    return prediction.to_wire()


class ParentLink:
    """The enclave's connection to the parent server: announce the key, carry results.

    One thread (``watch``) owns (re)connecting, with backoff; everyone else only asks
    whether the link is up (``up``, ``wait_up``) and sends on it, so a request never waits
    behind the watcher's retries. A request that finds the link down is told at once
    (TransportError with ``unreachable_text``), and ``wait_up`` cuts the watcher's retry backoff short
    so a server that has just started is found without waiting out the backoff.
    """

    #: Seconds a one-shot request waits for a link that is down: enough for a watcher woken
    #: from its backoff to reach a parent server that has just started, short enough that
    #: the client hears at once when there is none.
    REQUEST_WAIT = 1.0

    def __init__(self, config: ServiceConfig, announce: Callable[[], EnclaveAnnounce],
                 stopping: threading.Event) -> None:
        self._endpoint = endpoint_for(config.transport, config.parent_cid, config.parent_port,
                                  config.host)
        self._announce = announce
        self._stopping = stopping
        self._timeout = config.io_timeout
        self._lock = threading.Lock()  # guards _connection and serialises sends on it
        self._connection: FramedConnection | None = None
        self._up = threading.Event()  # set while an announced connection is open
        self._wake = threading.Event()  # ends the watcher's retry backoff early
        self.announced = threading.Event()
        #: Set when the link can never come up here (vsock unusable); the watcher stops
        #: and the owner (app.py) says why and exits.
        self.fatal: VsockUnavailable | None = None
        #: What a one-shot client is told while the link is down (it travels in clear:
        #: it names the command to run, nothing about any image).
        self.unreachable_text = ("the enclave cannot reach the parent server (start "
                                 f"`parent.py server {config.parent_port}`)")

    @property
    def up(self) -> bool:
        """True while the key is announced on an open connection to the parent server."""
        return self._up.is_set()

    def wait_up(self, timeout: float) -> bool:
        """True if the link is up now or comes up within ``timeout`` seconds.

        Wakes a watcher that is backing off between connection attempts, so it tries now.
        """
        if self._up.is_set():
            return True
        if self.fatal is not None or self._stopping.is_set():
            return False
        self._wake.set()
        return self._up.wait(timeout)

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

    def _connect_with_backoff(self) -> FramedConnection | None:
        """Connect and announce, retrying with exponential backoff until it works.

        None when shutting down, or when vsock cannot work here (``fatal`` is then set).
        """
        delay = PARENT_BACKOFF[0]
        while not self._stopping.is_set():
            try:
                return self._connect_and_announce()
            except VsockUnavailable as exc:  # no retry can help; app.py reports it and exits
                self.fatal = exc
                return None
            except (NitroLesionError, OSError) as exc:
                log.info("parent not reachable (%s); retrying in %.1f s", exc, delay)
            self._wake.wait(delay)  # a request waiting for the link cuts this short
            self._wake.clear()
            delay = min(delay * 2, PARENT_BACKOFF[1])
        return None

    def send_result(self, result: SealedResult, wait: float) -> None:
        """Deliver a sealed result on the link, waiting at most ``wait`` seconds for it to
        be up; if the link breaks during the send, once more on the next one.

        Raises TransportError: ``unreachable_text`` if the link is not up in time, the
        send's own error if the second send fails too.
        """
        for attempt in range(2):
            if not self.wait_up(wait):
                raise TransportError(self.unreachable_text)
            with self._lock:
                connection = self._connection
                if connection is None or connection.closed:
                    continue  # lost between wait_up and here: wait for the next one
                try:
                    connection.send(result.TYPE, result.to_body())
                    return
                except TransportError:
                    # Wake the watcher's read with EOF: it drops the link and reconnects.
                    self._up.clear()
                    connection.shutdown_read()
                    if attempt:
                        raise
        raise TransportError(self.unreachable_text)

    def watch(self) -> None:
        """Keep the link up: announce at boot, and again whenever the parent goes away."""
        delay = PARENT_BACKOFF[0]
        while not self._stopping.is_set():
            connection = self._connect_with_backoff()
            if connection is None:
                return
            with self._lock:
                self._connection = connection
            self._up.set()
            self.announced.set()
            log.info("announced public key to parent at %s", self._endpoint)
            up_since = time.monotonic()
            # The parent never sends on this link after the ack; a read returns only when
            # it closes (restart), and then we reconnect and announce again.
            try:
                connection.receive(timeout=None)
                reason = "the parent sent an unexpected frame"
            except (NitroLesionError, OSError) as exc:
                reason = str(exc)
            self._up.clear()
            with self._lock:
                connection.close()
                self._connection = None
            if time.monotonic() - up_since >= STABLE_LINK_SECONDS:
                delay = PARENT_BACKOFF[0]
                log.info("parent link lost (%s); announcing again", reason)
                continue
            # A link the parent dropped soon after the ack keeps backing off (no early
            # wake here), so a flapping host cannot make us re-attest in a tight loop.
            log.info("parent link lost after %.1f s (%s); announcing again in %.1f s",
                     time.monotonic() - up_since, reason, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, PARENT_BACKOFF[1])

    def close(self) -> None:
        self._up.clear()
        self._wake.set()  # a watcher in its backoff sees the stop flag now
        with self._lock:
            if self._connection is not None:
                self._connection.shutdown_read()  # a blocked read in watch() ends too
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
        self.budget = MemoryBudget(config.memory_budget)
        self.pool = WorkerPool(model, config.workers, config.queue_size,
                               config.max_image_bytes, config.max_image_pixels, self.budget)
        self._stopping = threading.Event()
        self.parent = ParentLink(config, self._announcement, self._stopping)
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._handlers: set[threading.Thread] = set()
        self._connections: set[FramedConnection] = set()
        self._live: set[ConnectionHandler] = set()
        self._conn_lock = threading.Lock()
        self._listener: object | None = None
        self._served = itertools.count(1)
        self.served = 0
        self.ready = threading.Event()

    # -- attestation -------------------------------------------------------------------
    def _announcement(self) -> EnclaveAnnounce:
        return EnclaveAnnounce(self.public_key, self._attestor.attest(public_key=self.public_key))

    def attest(self, nonce: bytes, user_data: bytes) -> bytes:
        """An attestation document over our public key, the client's nonce and our random value."""
        return self._attestor.attest(public_key=self.public_key, nonce=nonce, user_data=user_data)

    def new_protocol_session(self) -> EnclaveSession:
        """The protocol state machine for one new client connection (holds our key)."""
        return EnclaveSession(self._private_key, self.public_key)

    # -- lifecycle ---------------------------------------------------------------------
    def bind(self) -> None:
        """Open the client port; raises TransportError (e.g. port in use, no AF_VSOCK)."""
        # Listening binds every local CID.
        endpoint = endpoint_for(self.config.transport, ANY_CID, self.config.client_port, self.config.host)
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
            if not self._slots.acquire(blocking=False) and not (
                    self._evict_idle() and self._slots.acquire(timeout=EVICTION_WAIT)):
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

    def _evict_idle(self) -> bool:
        """All slots are taken: close the connection idle longest (past the grace), if any."""
        now = time.monotonic()
        with self._conn_lock:
            idle = [(h.idle_since, h) for h in self._live
                    if h.idle_since is not None and now - h.idle_since >= IDLE_EVICTION_GRACE]
        if not idle:
            return False
        _, handler = min(idle, key=lambda item: item[0])
        handler.evict(len(self._live))
        return True

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

    def finished_one(self) -> None:
        """One request is done; with --once that ends the service."""
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
        with self._conn_lock:
            self._live.add(handler)
        try:
            handler.run()
        finally:
            handler.wait_idle()
            connection.close()
            with self._conn_lock:
                self._live.discard(handler)
                self._connections.discard(connection)
                self._handlers.discard(threading.current_thread())
            self._slots.release()

    def count_served(self) -> None:
        """Thread-safe: workers of several connections finish requests at once."""
        self.served = next(self._served)


class ConnectionHandler:
    """Moves one client connection's frames between the socket and its EnclaveSession.

    The protocol (what may come when, keys, counters) lives in nitrolesion.protocol; this
    class only reads frames, hands images to the worker pool and writes answers.
    """

    def __init__(self, service: EnclaveService, connection: FramedConnection) -> None:
        self.service = service
        self.connection = connection
        self.session = service.new_protocol_session()
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
        reservation = self.service.budget.try_reserve(FRAME_COPIES * length)
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
        config = self.service.config
        while True:
            # The first frame (HELLO) is tiny and due at once; later frames may carry images.
            timeout = config.handshake_timeout if self.session.state is State.IDLE else config.io_timeout
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
            self.send(self.session.attestation(self.service.attest(event.nonce, event.user_data)))
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
        link = self.service.parent
        if not link.wait_up(link.REQUEST_WAIT):
            self.send_error(ErrorCode.UNAVAILABLE, link.unreachable_text)
            return True
        finished = threading.Event()
        outcome: dict = {}

        def done(prediction, error):
            outcome.update(prediction=prediction, error=error)
            finished.set()

        try:
            self.service.pool.submit(request.image, done)
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
        plaintext = cbor2.dumps(prediction_payload(outcome["prediction"]))
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
        self.service.finished_one()
        return True

    # -- sessions (parent.py classify) -------------------------------------------------
    def session_request(self, request: ImageReceived, reservation: Reservation | None) -> bool:
        self._window.acquire()  # backpressure: stop reading while SESSION_WINDOW are queued
        with self._idle:
            self._in_flight += 1

        def done(prediction, error):
            _release(reservation)
            try:
                if error is None:
                    payload = ResultPayload(request.request, prediction=prediction_payload(prediction))
                else:
                    payload = ResultPayload(request.request, error=(_code_for(error), str(error)))
                self.send_result(payload)
            finally:
                self._release()

        try:
            self.service.pool.submit(request.image, done)
        except Busy as exc:
            _release(reservation)
            self._release()
            self.send_result(ResultPayload(request.request, error=(ErrorCode.BUSY, str(exc))))
        return True

    def send_result(self, payload: ResultPayload) -> None:
        """Seal a per-image result (or per-image error) under the session key and send it."""
        try:
            with self._send_lock:
                frame = self.session.result(payload)
                self.connection.send_frame(frame, timeout=SEND_TIMEOUT)
        except NitroLesionError:
            pass  # the client went away; the worker is free again either way
        if payload.prediction is not None:
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
        if self.session.session_open and self.service.config.once:
            self.service.finished_one()
