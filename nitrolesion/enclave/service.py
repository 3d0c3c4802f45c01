"""The enclave service: one RSA key in memory, the accept loop, and the parts it owns.

Threads:
- the parent link (parent_link.py) announces the public key (with an attestation
  document) to the parent server and carries one-shot results to it, reconnecting with
  backoff;
- the accept loop (here) takes client connections, at most ``max_connections`` at once,
  closing the connection idle longest when every slot is taken;
- one handler thread per connection (connection.py) moves frames between the socket and
  that connection's protocol state machine (nitrolesion.protocol.EnclaveSession);
- the worker pool (worker_pool.py): ``workers`` threads take jobs from a bounded queue (a
  full queue answers BUSY instead of growing), decode them and deliver the answers around
  one TFLite interpreter that runs on every CPU in its own inference thread.

Nothing here logs an image, a label or a key: log lines name requests by counter/size only.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from nitrolesion.crypto.envelope import generate_keypair, public_key_der
from nitrolesion.errors import NitroLesionError, TransportError
from nitrolesion.limits import ANY_CID
from nitrolesion.memory_budget import MemoryBudget, budget_for_enclave_memory
from nitrolesion.model.classifier import LesionModel, usable_cpus
from nitrolesion.model.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from nitrolesion.protocol import EnclaveSession
from nitrolesion.transport import FramedConnection, accept, endpoint_for, listen
from nitrolesion.wire.messages import EnclaveAnnounce, ErrorCode, ErrorMessage

from nitrolesion.enclave.connection import ConnectionHandler
from nitrolesion.enclave.parent_link import ParentLink
from nitrolesion.enclave.worker_pool import WorkerPool

__all__ = ["DEFAULT_INTERPRETERS", "DEFAULT_WORKERS", "default_interpreters", "HANDSHAKE_TIMEOUT", "IO_TIMEOUT", "MAX_CONNECTIONS", "EnclaveService",
           "ServiceConfig"]

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
#: Concurrent client connections; each costs one thread and at most one 24 MiB frame.
MAX_CONNECTIONS = 64
#: Worker threads (decode, deliver) around the interpreters. 3, not the CPU count: a worker holds its image from decoding until its answer is sent, so
#: with 2 the image after next waits for a delivery before it can be decoded; the third
#: decodes it ahead. 3 measured fastest of 1-4 with one interpreter and tied with 4 with two
#: (bench/worker_count.py, docs/PERFORMANCE.md); each worker costs ~1.5-2.4 MiB.
DEFAULT_WORKERS = 3
#: TFLite interpreters the workers share, at most (fewer on fewer CPUs: default_interpreters).
#: On 2 CPUs, two single-threaded interpreters classified 11-17 % more images/s in-process
#: than one on both CPUs, which waits for both at every layer; through the enclave they
#: reach 0.96-1.03x of the best in-process configuration, one 0.87-0.94x (bench/pipeline.py,
#: docs/PERFORMANCE.md). The second costs ~29 MiB, once, whatever --workers is (its own activations,
#: ~19 MiB, and its own packed weights: sharing those, XNNPACK's weight cache, comes only
#: with LiteRT's CompiledModel, whose run holds the GIL, bench/weight_cache.py).
DEFAULT_INTERPRETERS = 2


def default_interpreters() -> int:
    """``DEFAULT_INTERPRETERS``, but no more than the CPUs this process may use: a second
    interpreter on one CPU would cost its memory and buy nothing."""
    return max(1, min(DEFAULT_INTERPRETERS, usable_cpus()))


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
    workers: int = DEFAULT_WORKERS
    interpreters: int = field(default_factory=default_interpreters)
    queue_size: int = 16
    max_connections: int = MAX_CONNECTIONS
    io_timeout: float = IO_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    memory_budget: int = field(default_factory=budget_for_enclave_memory)
    once: bool = False



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
                               config.max_image_bytes, config.max_image_pixels, self.budget,
                               interpreters=config.interpreters)
        self._stopping = threading.Event()
        self.parent = ParentLink(
            endpoint_for(config.transport, config.parent_cid, config.parent_port, config.host),
            self._announcement, self._stopping, timeout=config.io_timeout)
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
        handler = ConnectionHandler(self, connection,
                                    handshake_timeout=self.config.handshake_timeout,
                                    io_timeout=self.config.io_timeout)
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

    def finished_session(self) -> None:
        """A connection that opened a session has ended; with --once that ends the service."""
        if self.config.once:
            self.finished_one()

    def count_served(self) -> None:
        """Thread-safe: workers of several connections finish requests at once."""
        self.served = next(self._served)
