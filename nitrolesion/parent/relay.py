"""``parent.py relay``: a blind TCP-to-enclave byte relay on the parent instance.

    clinic client --TCP--> relay (parent, pod) --vsock--> enclave port 5005

An enclave has no network but vsock; a Kubernetes Service or a load balancer speaks TCP.
The relay joins the two: every TCP connection it accepts gets its own connection to the
enclave (vsock on Nitro; TCP off Nitro, as ``--transport tcp`` does for the other
commands), and bytes are copied both ways unchanged until both directions have ended.

It is blind on purpose: it does not parse frames or know the protocol, so it holds nothing
that could be plaintext (images and diagnoses cross it sealed under session keys only the
client and the attested enclave derive). It logs only sizes and timings (one line per
connection: bytes each way, seconds, how it ended), never addresses or content.

Limits, so a flood or a stuck peer cannot exhaust the parent: at most ``max_connections``
at once (more are accepted and closed at once, counted as refused), an idle timeout (no
byte either way), a total lifetime per connection, and a connect timeout towards the
enclave. A half-close (one side shuts its writing half) is passed on as a half-close, so a
client that sends GOODBYE and shuts down still receives what the enclave sends after.

This module moves bytes, not frames, so it uses sockets directly rather than
``nitrolesion.transport.FramedConnection``; the listening socket and the endpoints still
come from ``nitrolesion.transport``. It is parent-only: never part of the enclave image.
"""

from __future__ import annotations

import http.server
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass

from nitrolesion.errors import TransportError, UsageError
from nitrolesion.transport import (
    TcpEndpoint, VsockEndpoint, VsockUnavailable, check_port, listen)

log = logging.getLogger("nitrolesion.relay")

#: Connections relayed at once: as many as the enclave serves by default
#: (enclave/service.py MAX_CONNECTIONS); more would only be refused BUSY by the enclave.
MAX_CONNECTIONS = 64
#: Seconds a connection may stay silent both ways (the enclave's own io-timeout is 30 s).
IDLE_TIMEOUT = 120.0
#: Seconds one connection may last in all (a 10,000-image session: 2-5 min measured rates).
TOTAL_TIMEOUT = 3600.0
#: Seconds to reach the enclave before the client's connection is closed.
CONNECT_TIMEOUT = 5.0
#: Bytes per recv: large enough for a 20 MiB image in ~80 calls.
CHUNK = 256 * 1024
#: How often the accept loop looks whether it was told to stop.
_ACCEPT_POLL = 0.5


def parse_host_port(text: str, what: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); UsageError if it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"{what} must be HOST:PORT (e.g. 0.0.0.0:8443), got {text!r}")
    return host.strip("[]"), check_port(int(port), f"{what} port")


@dataclass(frozen=True)
class RelayConfig:
    """Where to listen, where the enclave is, and the limits (see the module doc)."""

    listen: TcpEndpoint
    enclave: VsockEndpoint | TcpEndpoint
    max_connections: int = MAX_CONNECTIONS
    idle_timeout: float = IDLE_TIMEOUT
    total_timeout: float = TOTAL_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT


@dataclass
class RelayStats:
    """Counters over the relay's life (read by tests and the health endpoint)."""

    accepted: int = 0
    refused: int = 0
    active: int = 0
    unreachable: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def open_enclave_stream(endpoint: VsockEndpoint | TcpEndpoint, timeout: float) -> socket.socket:
    """A connected stream socket to the enclave (vsock or TCP). Raises VsockUnavailable
    when this machine has no vsock, TransportError when nothing answers."""
    try:
        if endpoint.transport == "tcp":
            sock = socket.create_connection(endpoint.address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise VsockUnavailable("vsock is not available on this machine (this Python has no "
                                   "AF_VSOCK): off Nitro, use --transport tcp")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(endpoint.address)
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as exc:
        raise TransportError(f"cannot reach the enclave at {endpoint}: "
                             f"{exc.strerror or exc}") from exc


class _Pair:
    """One relayed connection: client socket, enclave socket, counters, why it ended."""

    def __init__(self, number: int, client: socket.socket, enclave: socket.socket) -> None:
        self.number = number
        self.sockets = {"up": (client, enclave), "down": (enclave, client)}
        self.open = {"up": True, "down": True}  # direction still carrying bytes
        self.bytes = {"up": 0, "down": 0}
        self.ended = "both sides closed"

    def close(self) -> None:
        for sock in self.sockets["up"]:
            try:
                sock.close()
            except OSError:
                pass


class Relay:
    """Accepts TCP connections and relays each, blind, to the enclave (see module doc)."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.stats = RelayStats()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: set[threading.Thread] = set()
        self._number = 0

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), after ``bind()`` (port 0 becomes the real port)."""
        return self._listener.getsockname()[:2]

    def bind(self) -> None:
        """Listen on the configured address. Raises TransportError if it cannot."""
        self._listener = listen(self.config.listen, backlog=min(self.config.max_connections, 128))

    def enclave_reachable(self) -> bool:
        """True if a connection to the enclave can be opened now (readiness)."""
        try:
            open_enclave_stream(self.config.enclave, min(self.config.connect_timeout, 2.0)).close()
        except TransportError:
            return False
        return True

    def serve_forever(self) -> None:
        """Accept and relay until ``stop()``; then wait for the relayed connections."""
        if self._listener is None:
            self.bind()
        listener = self._listener
        listener.settimeout(_ACCEPT_POLL)
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                time.sleep(0.05)  # EMFILE and the like: do not spin
                continue
            self._admit(client)
        for thread in list(self._threads):
            thread.join(timeout=self.config.idle_timeout)

    def stop(self) -> None:
        """Stop accepting; connections in progress run to their end or timeout."""
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass

    def _admit(self, client: socket.socket) -> None:
        with self._lock:
            self._number += 1
            number = self._number
            if self.stats.active >= self.config.max_connections:
                self.stats.refused += 1
                full = True
            else:
                self.stats.active += 1
                self.stats.accepted += 1
                full = False
        if full:
            log.warning("connection %d refused: %d connections relayed already (the cap)",
                        number, self.config.max_connections)
            client.close()
            return
        thread = threading.Thread(target=self._relay, args=(number, client),
                                  name=f"relay-{number}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _relay(self, number: int, client: socket.socket) -> None:
        started = time.monotonic()
        try:
            try:
                enclave = open_enclave_stream(self.config.enclave, self.config.connect_timeout)
            except TransportError:
                with self._lock:
                    self.stats.unreachable += 1
                log.warning("connection %d: the enclave did not accept within %.1f s; closed",
                            number, self.config.connect_timeout)
                client.close()
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(number, client, enclave)
            try:
                self._pump(pair, started)
            finally:
                pair.close()
            with self._lock:
                self.stats.bytes_up += pair.bytes["up"]
                self.stats.bytes_down += pair.bytes["down"]
            log.info("connection %d: %d bytes to the enclave, %d bytes back, %.3f s, %s",
                     number, pair.bytes["up"], pair.bytes["down"], time.monotonic() - started,
                     pair.ended)
        finally:
            with self._lock:
                self.stats.active -= 1
                self._threads.discard(threading.current_thread())

    def _pump(self, pair: _Pair, started: float) -> None:
        """Copy bytes both ways until both directions ended, a side failed, or a timeout."""
        config = self.config
        last = time.monotonic()
        poller = select.poll()
        readers = {pair.sockets[d][0].fileno(): d for d in ("up", "down")}
        for fd in readers:
            poller.register(fd, select.POLLIN | select.POLLPRI)
        while pair.open["up"] or pair.open["down"]:
            now = time.monotonic()
            if now - started >= config.total_timeout:
                pair.ended = f"total timeout ({config.total_timeout:g} s)"
                return
            if now - last >= config.idle_timeout:
                pair.ended = f"idle timeout ({config.idle_timeout:g} s)"
                return
            wait = min(config.total_timeout - (now - started), config.idle_timeout - (now - last))
            events = poller.poll(max(wait, 0.0) * 1000.0)
            for fd, _ in events:
                direction = readers[fd]
                source, sink = pair.sockets[direction]
                try:
                    data = source.recv(CHUNK)
                except OSError:
                    pair.ended = ("the client" if direction == "up" else "the enclave") + \
                        " reset the connection"
                    return
                if not data:  # a half-close: pass it on, keep the other direction going
                    pair.open[direction] = False
                    poller.unregister(fd)
                    try:
                        sink.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                try:
                    sink.settimeout(config.idle_timeout)
                    sink.sendall(data)
                except OSError:
                    pair.ended = ("the enclave" if direction == "up" else "the client") + \
                        " stopped receiving"
                    return
                pair.bytes[direction] += len(data)
                last = time.monotonic()


# -- readiness ------------------------------------------------------------------------------
def serve_health(relay: Relay, endpoint: TcpEndpoint) -> http.server.ThreadingHTTPServer:
    """An HTTP endpoint for Kubernetes probes, served on a thread: ``GET /ready`` answers
    200 when the enclave accepts a connection now (else 503), ``GET /live`` 200 while the
    relay runs. Returns the server (``shutdown()`` to stop it)."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            if self.path == "/live":
                status, text = 200, "live\n"
            elif self.path == "/ready":
                ready = relay.enclave_reachable()
                status, text = (200, "ready\n") if ready else (503, "enclave not reachable\n")
            else:
                status, text = 404, "GET /ready or /live\n"
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds: not worth a line
            pass

    try:
        server = http.server.ThreadingHTTPServer(endpoint.address, Health)
    except OSError as exc:
        raise TransportError(f"cannot listen on {endpoint} for health checks: "
                             f"{exc.strerror or exc}") from exc
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="relay-health", daemon=True).start()
    return server
