"""Sockets: the only module in the package that does network I/O.

Three transports carry the same frames behind one interface (``Transport``: connect,
listen, accept, each giving a ``FramedConnection``):

* ``vsock``: AF_VSOCK between the parent instance and the enclave (the production path;
  the enclave has no other network).
* ``tcp``: loopback TCP for development and tests on machines without Nitro Enclaves.
  Enclave CIDs are ignored and the endpoint's ``host`` (default 127.0.0.1) is used.
* ``MemoryTransport``: connections inside one process (tests), over socket pairs.

Socket exceptions are translated here into TransportError (with ``from exc``), and frame
parsing is delegated to the sans-I/O nitrolesion.wire.frames.FrameDecoder. When AF_VSOCK
cannot work on this machine at all (no vsock transport, not permitted), the error is
:class:`VsockUnavailable` and its message names ``--transport tcp``, so every command says
so at once instead of waiting for a peer that can never answer.
"""

from __future__ import annotations

import enum
import errno
import os
import queue
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol, Union

from nitrolesion.errors import (
    ConnectionClosed,
    LocalProtocolError,
    TransportError,
    TransportTimeout,
    UsageError,
)
from nitrolesion.limits import ANY_CID, DEFAULT_TCP_HOST
from nitrolesion.wire.frames import MAX_BODY, Frame, FrameDecoder, encode_frame

__all__ = [
    "DEFAULT_BACKLOG",
    "MAX_PORT",
    "MIN_ENCLAVE_CID",
    "TRANSPORTS",
    "TRANSPORT_ENV",
    "SOCKETS",
    "AnyEndpoint",
    "FramedConnection",
    "MemoryEndpoint",
    "TcpEndpoint",
    "VsockEndpoint",
    "endpoint_for",
    "Listener",
    "MemoryTransport",
    "SocketTransport",
    "Transport",
    "VsockUnavailable",
    "accept",
    "check_cid",
    "check_port",
    "connect",
    "default_transport",
    "listen",
    "local_vsock_cid",
    "no_enclave_here",
]

TRANSPORTS = ("vsock", "tcp")
TRANSPORT_ENV = "ENCLAVE_TRANSPORT"
# One enclave serves a handful of parent-side connections; 16 pending is ample and small.
DEFAULT_BACKLOG = 16
# Bytes asked of recv() per call: large enough that a 20 MiB image takes ~80 calls, small
# enough not to matter next to the frame limit.
RECV_CHUNK = 256 * 1024
# vsock ports are 32-bit (struct sockaddr_vm.svm_port); TCP ports are 16-bit.
MAX_VSOCK_PORT = 2**32 - 1
MAX_TCP_PORT = 2**16 - 1
# CIDs are 32-bit as well (struct sockaddr_vm.svm_cid).
MAX_VSOCK_CID = 2**32 - 1
# Linux's VMADDR_CID_ANY, used when the running Python lacks the constant.
_VSOCK_HINT = "off Nitro, use --transport tcp (or ENCLAVE_TRANSPORT=tcp)"
#: Ports the commands accept, for both transports: the same command line must work over
#: vsock on Nitro and over TCP off it, and TCP ports are 16-bit (0 would mean "any").
MIN_PORT, MAX_PORT = 1, MAX_TCP_PORT
#: nitro-cli run-enclave --enclave-cid takes 4 and up: 0-2 are reserved, 3 is the parent.
MIN_ENCLAVE_CID = 4
#: <linux/vm_sockets.h> IOCTL_VM_SOCKETS_GET_LOCAL_CID, i.e. _IO(7, 0xb9), on /dev/vsock.
_IOCTL_GET_LOCAL_CID = 0x7B9
VSOCK_DEVICE = "/dev/vsock"
_LOOPBACK_MODULE = "/sys/module/vsock_loopback"
#: The Nitro Enclaves driver's device on a parent instance (nitro-cli needs it).
NITRO_ENCLAVES_DEVICE = "/dev/nitro_enclaves"
#: errno values that mean vsock itself cannot work here (no transport for the address,
#: family missing, not permitted), as opposed to nothing listening at the other end.
_VSOCK_UNUSABLE = frozenset({
    errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EOPNOTSUPP,
    errno.ENODEV, errno.ENXIO, errno.ENOENT, errno.ENETUNREACH, errno.EHOSTUNREACH,
    errno.EPERM,
})
#: Seconds a vsock connect may take. The local kernel answers a vsock connect at once
#: (accepted, reset, or its own 2 s connect timeout); waiting longer only delays the error.
VSOCK_CONNECT_TIMEOUT = 10.0


class VsockUnavailable(TransportError):
    """AF_VSOCK cannot be used on this machine (not a Nitro parent or enclave): use tcp."""


def _unavailable(reason: str) -> str:
    return f"vsock is not available on this machine ({reason}): {_VSOCK_HINT}"



class _Default(enum.Enum):
    """Sentinel type for "use the connection's default timeout"."""

    TOKEN = 0


_DEFAULT = _Default.TOKEN


def _is_uint(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def default_transport(environ: Mapping[str, str] | None = None) -> str:
    """Return $ENCLAVE_TRANSPORT, or "vsock" when unset or empty.

    ``environ`` defaults to os.environ. Raises TransportError if the variable names an
    unknown transport.
    """
    env = os.environ if environ is None else environ
    value = env.get(TRANSPORT_ENV) or "vsock"
    if value not in TRANSPORTS:
        raise TransportError(
            f"{TRANSPORT_ENV} must be one of {', '.join(TRANSPORTS)}; got {value!r}"
        )
    return value


def check_port(value: int, what: str = "port") -> int:
    """Return ``value`` if it is a port the commands accept (1..65535).

    Raises UsageError with a one-line message naming ``what`` otherwise.
    """
    if not _is_uint(value, MAX_PORT) or value < MIN_PORT:
        raise UsageError(f"{what} must be between {MIN_PORT} and {MAX_PORT}, got {value}")
    return value


def check_cid(value: int, what: str = "CID", minimum: int = 0) -> int:
    """Return ``value`` if it can be a vsock CID, at least ``minimum`` (MIN_ENCLAVE_CID for
    an enclave). VMADDR_CID_ANY (4294967295) means "any" and is nobody's address.

    Raises UsageError with a one-line message naming ``what`` otherwise.
    """
    if not _is_uint(value, MAX_VSOCK_CID - 1) or value < minimum:
        raise UsageError(f"{what} must be between {minimum} and {MAX_VSOCK_CID - 1}, got {value}")
    return value


def local_vsock_cid(device: str = VSOCK_DEVICE) -> int | None:
    """This machine's vsock CID as the kernel reports it, or None if it cannot be asked
    (no device node, e.g. in a container, or no permission to open it).

    VMADDR_CID_ANY (4294967295) means the kernel has no vsock transport at all.
    """
    try:
        fd = os.open(device, os.O_RDONLY)
    except OSError:
        return None
    try:
        import fcntl

        raw = fcntl.ioctl(fd, _IOCTL_GET_LOCAL_CID, bytes(4))
        return int.from_bytes(raw[:4], sys.byteorder)
    except (OSError, ImportError):
        return None
    finally:
        os.close(fd)


def no_enclave_here(device: str = NITRO_ENCLAVES_DEVICE) -> bool:
    """True if this machine has no Nitro Enclaves driver, so no enclave can run beside it.

    Only a hint: a container on a parent instance may lack the device node, so nothing
    is refused on this alone.
    """
    return not os.path.exists(device)


@dataclass(frozen=True, slots=True)
class VsockEndpoint:
    """A vsock address: an enclave's (or the parent's) CID and a port.

    Raises TransportError from the constructor for an out-of-range cid or port.
    """

    cid: int
    port: int
    transport: ClassVar[str] = "vsock"

    def __post_init__(self) -> None:
        if not _is_uint(self.port, MAX_VSOCK_PORT):
            raise TransportError(f"vsock port must be in 0..{MAX_VSOCK_PORT}, got {self.port!r}")
        if not _is_uint(self.cid, MAX_VSOCK_CID):
            raise TransportError(f"vsock cid must be in 0..{MAX_VSOCK_CID}, got {self.cid!r}")

    @property
    def address(self) -> tuple[int, int]:
        return (self.cid, self.port)

    def __str__(self) -> str:
        return f"vsock:{self.cid}:{self.port}"


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    """A TCP address (development and tests off Nitro). Raises TransportError from the
    constructor for an out-of-range port."""

    port: int
    host: str = DEFAULT_TCP_HOST
    transport: ClassVar[str] = "tcp"

    def __post_init__(self) -> None:
        if not _is_uint(self.port, MAX_TCP_PORT):
            raise TransportError(f"tcp port must be in 0..{MAX_TCP_PORT}, got {self.port!r}")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MemoryEndpoint:
    """A port of a MemoryTransport (inside one process)."""

    port: int
    transport: ClassVar[str] = "memory"

    def __str__(self) -> str:
        return f"memory:{self.port}"


#: Where to connect or listen; each transport has its own kind, with only its own fields.
AnyEndpoint = Union[VsockEndpoint, TcpEndpoint, MemoryEndpoint]


def endpoint_for(transport: str, cid: int, port: int, host: str = DEFAULT_TCP_HOST
                 ) -> VsockEndpoint | TcpEndpoint:
    """The endpoint a command line names: with ``vsock`` the CID and port; with ``tcp``
    (off Nitro) CIDs map to ``host``. Raises TransportError for an unknown transport or an
    out-of-range cid or port."""
    if transport == "vsock":
        return VsockEndpoint(cid, port)
    if transport == "tcp":
        return TcpEndpoint(port, host)
    raise TransportError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")


def _new_socket(transport: str) -> socket.socket:
    if transport == "tcp":
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            raise TransportError(f"cannot create a TCP socket: {exc}") from exc
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise VsockUnavailable(_unavailable("this Python has no AF_VSOCK"))
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise VsockUnavailable(_unavailable(exc.strerror or str(exc))) from exc
    # A kernel with the vsock module but no transport (a laptop, most CI) creates, binds
    # and listens on vsock sockets happily, and nothing can ever connect: say so now.
    # (vsock_loopback alone also reports no CID, yet serves CID 1: leave that one be.)
    if local_vsock_cid() == ANY_CID and not os.path.isdir(_LOOPBACK_MODULE):
        sock.close()
        raise VsockUnavailable(_unavailable("the kernel has no vsock transport"))
    return sock


def _vsock_connect_error(endpoint: VsockEndpoint, exc: OSError) -> TransportError:
    """The error for a failed vsock connect: VsockUnavailable when vsock cannot work here,
    otherwise "nothing answered" with the hint that fits this machine."""
    reason = exc.strerror or str(exc)
    if exc.errno in _VSOCK_UNUSABLE:
        return VsockUnavailable(_unavailable(f"{reason} connecting to {endpoint}"))
    if endpoint.cid >= MIN_ENCLAVE_CID and no_enclave_here():
        return TransportError(f"cannot connect to {endpoint}: {reason}; this machine has no "
                              f"{NITRO_ENCLAVES_DEVICE}, so no enclave runs beside it: {_VSOCK_HINT}")
    return TransportError(f"cannot connect to {endpoint}: {reason} (is it running and "
                          f"listening there?); {_VSOCK_HINT}")


def connect(endpoint: VsockEndpoint | TcpEndpoint, timeout: float | None) -> FramedConnection:
    """Open a connection to ``endpoint`` and wrap it in a FramedConnection.

    ``timeout`` (seconds, None = block) bounds the connect (a vsock connect at most
    VSOCK_CONNECT_TIMEOUT) and becomes the connection's default per-operation timeout.
    Raises VsockUnavailable if vsock cannot work here, TransportError if the connection is
    refused or reset, TransportTimeout if it does not complete in time.
    """
    if endpoint.transport == "tcp":
        try:
            sock = socket.create_connection(endpoint.address, timeout=timeout)
        except TimeoutError as exc:
            raise TransportTimeout(
                f"connecting to {endpoint} timed out after {timeout} s") from exc
        except OSError as exc:
            raise TransportError(f"cannot connect to {endpoint}: {exc.strerror or exc}") from exc
        # Frames are written whole; do not let Nagle hold back the tail of a small one.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = _new_socket("vsock")
        wait = VSOCK_CONNECT_TIMEOUT if timeout is None else min(timeout, VSOCK_CONNECT_TIMEOUT)
        try:
            sock.settimeout(wait)
            sock.connect(endpoint.address)
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError) and exc.errno is None:  # our timer, not the kernel's ETIMEDOUT
                raise TransportTimeout(f"connecting to {endpoint} timed out after {wait:g} s; "
                                       f"{_VSOCK_HINT}") from exc
            raise _vsock_connect_error(endpoint, exc) from exc
    return FramedConnection(sock, timeout=timeout)


def listen(endpoint: VsockEndpoint | TcpEndpoint, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """Bind and listen on ``endpoint.port``; return the listening socket.

    vsock binds VMADDR_CID_ANY (the endpoint's cid is ignored: an enclave or a parent
    listens on its own CID); tcp binds ``endpoint.host`` with SO_REUSEADDR so a restarted
    server can rebind at once. Port 0 picks a free port (read it with getsockname()).
    Raises VsockUnavailable if vsock cannot work here, TransportError if the bind/listen
    fails otherwise (e.g. the port is in use).
    """
    sock = _new_socket(endpoint.transport)
    try:
        if endpoint.transport == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((endpoint.host, endpoint.port))
        else:
            sock.bind((ANY_CID, endpoint.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if endpoint.transport == "vsock" and exc.errno in _VSOCK_UNUSABLE:
            raise VsockUnavailable(_unavailable(f"{reason} listening on port {endpoint.port}")) from exc
        raise TransportError(f"cannot listen on {endpoint}: {reason}") from exc
    return sock


def accept(
    listener: socket.socket, *, timeout: float | None, max_body: int = MAX_BODY
) -> FramedConnection:
    """Accept one connection from ``listener`` and wrap it in a FramedConnection.

    ``timeout`` bounds the wait for a client and becomes the connection's default
    per-operation timeout. Raises TransportError on timeout or socket error.
    """
    try:
        listener.settimeout(timeout)
        sock, _ = listener.accept()
    except TimeoutError as exc:
        raise TransportTimeout(f"no connection within {timeout} s") from exc
    except OSError as exc:
        raise TransportError(f"accept failed: {exc.strerror or exc}") from exc
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return FramedConnection(sock, max_body=max_body, timeout=timeout)


def _describe_peer(sock: socket.socket) -> str:
    try:
        address = sock.getpeername()
    except OSError:
        return "unknown peer"
    vsock = getattr(socket, "AF_VSOCK", None)
    if vsock is not None and sock.family == vsock:
        return f"vsock:{address[0]}:{address[1]}"
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return f"tcp:{address[0]}:{address[1]}"
    return f"{sock.family.name}:{address!r}"


class FramedConnection:
    """Sends and receives whole frames over a connected stream socket.

    ``timeout`` (seconds, None = block forever) is the default budget for each ``send`` and
    each ``receive`` call as a whole, not per underlying syscall, so a peer that trickles
    one byte at a time cannot hold a call open indefinitely. ``clock`` is the monotonic
    clock used for that budget (injectable for tests).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_body: int = MAX_BODY,
        timeout: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raises LocalProtocolError for a bad max_body or a negative timeout."""
        if timeout is not None and timeout < 0:
            raise LocalProtocolError(f"timeout must be >= 0 or None, got {timeout}")
        self._sock = sock
        self._max_body = max_body
        self._decoder = FrameDecoder(max_body)
        self._timeout = timeout
        self._clock = clock
        self._closed = False
        # Set when a send stopped partway: the stream then holds half a frame and any
        # further frame would be misparsed by the peer.
        self._send_broken = False
        self._peer = _describe_peer(sock)

    @property
    def peer(self) -> str:
        """Human-readable peer address, e.g. "tcp:127.0.0.1:5005" or "vsock:16:5005"."""
        return self._peer

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> FramedConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<FramedConnection {self._peer} {state}>"

    def shutdown_read(self) -> None:
        """Stop reading: a blocked or later ``receive`` sees EOF while sends still work.

        Used for graceful shutdown (answer what is in flight, accept nothing new).
        Raises nothing.
        """
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket. Idempotent; raises nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    def _arm(self, deadline: float | None) -> None:
        """Give the next socket call what is left of the whole call's budget."""
        if deadline is None:
            self._sock.settimeout(None)
            return
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise TimeoutError
        self._sock.settimeout(remaining)

    def _budget(self, timeout: float | None | _Default) -> float | None:
        value = self._timeout if isinstance(timeout, _Default) else timeout
        if value is not None and value < 0:
            raise LocalProtocolError(f"timeout must be >= 0 or None, got {value}")
        return value

    @property
    def pending_bytes(self) -> int:
        """Bytes of a partial frame received but not yet returned by ``receive``."""
        return self._decoder.buffered

    def wait_readable(self, timeout: float | None) -> bool:
        """Block until the peer has sent something (or closed), up to ``timeout`` seconds.

        True if a ``receive`` can make progress now (bytes arrived, EOF, or a partial frame
        is already buffered); False on timeout. Lets a server wait without limit for the
        *start* of a frame on an idle link, then bound the frame itself with ``receive``'s
        whole-call timeout. Raises TransportError if the connection is closed.
        """
        if self._closed:
            raise TransportError(f"connection to {self._peer} is closed")
        if self._decoder.buffered:
            return True
        # poll, not select: select cannot watch descriptors above FD_SETSIZE (1024), which a
        # busy server reaches.
        poller = select.poll()
        try:
            poller.register(self._sock, select.POLLIN | select.POLLPRI)
            events = poller.poll(None if timeout is None else max(timeout, 0.0) * 1000.0)
        except (OSError, ValueError) as exc:
            raise TransportError(f"waiting on {self._peer} failed: {exc}") from exc
        return bool(events)

    def send(
        self, msg_type: int, body: bytes, *, timeout: float | None | _Default = _DEFAULT
    ) -> None:
        """Encode and write one frame.

        Raises LocalProtocolError for an unknown type or a body over max_body (nothing is
        written), and TransportError if the connection is closed or broken, the write
        fails, or it does not finish within the timeout (the connection is then unusable
        for sending, since the peer holds a partial frame).
        """
        if self._closed:
            raise TransportError(f"connection to {self._peer} is closed")
        if self._send_broken:
            raise TransportError(
                f"connection to {self._peer} is broken by an earlier incomplete send"
            )
        data = memoryview(encode_frame(msg_type, body, max_body=self._max_body))
        budget = self._budget(timeout)
        deadline = None if budget is None else self._clock() + budget
        try:
            while data:
                self._arm(deadline)
                data = data[self._sock.send(data) :]
        except TimeoutError as exc:
            self._send_broken = True
            raise TransportTimeout(
                f"could not send a frame to {self._peer} within {budget} s"
            ) from exc
        except OSError as exc:
            self._send_broken = True
            raise TransportError(f"send to {self._peer} failed: {exc.strerror or exc}") from exc

    def send_frame(self, frame: Frame, *, timeout: float | None | _Default = _DEFAULT) -> None:
        """``send(frame.type, frame.body)``: write a frame a protocol state machine made."""
        self.send(frame.type, frame.body, timeout=timeout)

    def receive(self, *, timeout: float | None | _Default = _DEFAULT,
                admit: Callable[[int], None] | None = None) -> Frame:
        """Read until one whole frame has arrived and return it.

        ``admit(length)``, if given, is called once per frame as soon as its header has
        arrived, before more of its body is read than one socket read brought along (at
        most RECV_CHUNK): it may raise to refuse the frame, e.g. when no memory is left for
        it. The exception propagates and the rest of the frame is never read.

        Raises ConnectionClosed (a TransportError) on a clean EOF at a frame boundary;
        TransportError on EOF mid-frame, a socket error, or no complete frame within the
        timeout (bytes already read are kept, so a later receive can still finish the
        frame); ProtocolError (from the decoder) if the peer sent an invalid frame, after
        which every receive raises ProtocolError.
        """
        if self._closed:
            raise TransportError(f"connection to {self._peer} is closed")
        budget = self._budget(timeout)
        deadline = None if budget is None else self._clock() + budget
        decoder = self._decoder
        admitted = admit is None
        while True:
            if not admitted and (length := decoder.pending_length) is not None:
                admit(length)
                admitted = True
            frame = decoder.next_frame()
            if frame is not None:
                return frame
            try:
                self._arm(deadline)
                # Never ask for more than the decoder will accept.
                data = self._sock.recv(min(RECV_CHUNK, decoder.capacity_left))
            except TimeoutError as exc:
                raise TransportTimeout(
                    f"no complete frame from {self._peer} within {budget} s"
                ) from exc
            except OSError as exc:
                raise TransportError(
                    f"receive from {self._peer} failed: {exc.strerror or exc}"
                ) from exc
            if not data:
                if decoder.at_frame_boundary:
                    raise ConnectionClosed(f"{self._peer} closed the connection")
                raise TransportError(
                    f"peer closed the connection mid-frame ({self._peer}; "
                    f"{decoder.buffered} bytes of a partial frame received)"
                )
            decoder.feed(data)


def free_tcp_port(host: str = DEFAULT_TCP_HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (for local demos, tests, benches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# -- the transport interface ---------------------------------------------------------------
# What the server, the client and the enclave service need from a transport, so that
# everything above framing can run over vsock, TCP or in memory alike (httpx's
# BaseTransport / MockTransport are the model).
class Listener(Protocol):
    """A bound, listening endpoint that hands out framed connections."""

    def accept(self, *, timeout: float | None, max_body: int = MAX_BODY) -> FramedConnection:
        """The next connection; TransportTimeout when none came within ``timeout``."""

    def close(self) -> None:
        """Stop listening (idempotent)."""


class Transport(Protocol):
    """Opens framed connections to, and listens on, endpoints."""

    def connect(self, endpoint: AnyEndpoint, timeout: float | None) -> FramedConnection:
        """A connection to ``endpoint``; TransportError when nothing answers."""

    def listen(self, endpoint: AnyEndpoint, backlog: int = DEFAULT_BACKLOG) -> Listener:
        """Listen on ``endpoint``; TransportError when its port cannot be had."""


class SocketListener:
    """A listening vsock or TCP socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def accept(self, *, timeout: float | None, max_body: int = MAX_BODY) -> FramedConnection:
        return accept(self.socket, timeout=timeout, max_body=max_body)

    def close(self) -> None:
        self.socket.close()


class SocketTransport:
    """vsock or TCP, as each endpoint says: the production transport."""

    def connect(self, endpoint: VsockEndpoint | TcpEndpoint, timeout: float | None) -> FramedConnection:
        return connect(endpoint, timeout)

    def listen(self, endpoint: VsockEndpoint | TcpEndpoint, backlog: int = DEFAULT_BACKLOG) -> SocketListener:
        return SocketListener(listen(endpoint, backlog))


#: The transport every caller uses unless it is given another one.
SOCKETS = SocketTransport()


class MemoryListener:
    """The listening side of a MemoryTransport port: a queue of connected stream pairs."""

    def __init__(self, transport: "MemoryTransport", port: int) -> None:
        self._transport = transport
        self.port = port
        self._pending: "queue.Queue[socket.socket]" = queue.Queue()
        self.closed = False

    def _deliver(self, sock: socket.socket) -> None:
        self._pending.put(sock)

    def accept(self, *, timeout: float | None, max_body: int = MAX_BODY) -> FramedConnection:
        try:
            sock = self._pending.get(timeout=timeout)
        except queue.Empty:
            raise TransportTimeout(f"no connection within {timeout} s") from None
        return FramedConnection(sock, max_body=max_body, timeout=timeout)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._transport._forget(self.port)
            while not self._pending.empty():  # connections nobody will accept: refuse them
                self._pending.get_nowait().close()


class MemoryTransport:
    """Connections inside this process, by port only (an endpoint's transport, CID and
    host are not looked at): each connect makes a connected pair of local stream sockets
    (``socket.socketpair``, no network, no address) and queues one end for the listener.

    The real FramedConnection runs over it, so whole-call timeouts, partial frames and a
    peer closing behave as on a socket; nothing leaves the process.
    """

    def __init__(self) -> None:
        self._listeners: dict[int, MemoryListener] = {}
        self._lock = threading.Lock()
        self._next_port = 1

    def endpoint(self) -> MemoryEndpoint:
        """A fresh endpoint no listener of this transport uses yet."""
        with self._lock:
            port, self._next_port = self._next_port, self._next_port + 1
        return MemoryEndpoint(port)

    def listen(self, endpoint: MemoryEndpoint, backlog: int = DEFAULT_BACKLOG) -> MemoryListener:
        with self._lock:
            if endpoint.port in self._listeners:
                raise TransportError(f"cannot listen on memory:{endpoint.port}: in use")
            listener = self._listeners[endpoint.port] = MemoryListener(self, endpoint.port)
        return listener

    def connect(self, endpoint: MemoryEndpoint, timeout: float | None) -> FramedConnection:
        with self._lock:
            listener = self._listeners.get(endpoint.port)
        if listener is None:
            raise TransportError(f"cannot connect to memory:{endpoint.port}: nothing listens")
        ours, theirs = socket.socketpair()
        listener._deliver(theirs)
        return FramedConnection(ours, timeout=timeout)

    def _forget(self, port: int) -> None:
        with self._lock:
            self._listeners.pop(port, None)
