"""Transport over real loopback TCP sockets: framing, timeouts, EOF handling, vsock errors."""

from __future__ import annotations

import errno
import os
import re
import socket
import threading
import time

import pytest

from nitrolesion import transport
from nitrolesion.errors import BadMagic, ConnectionClosed, ProtocolError, TransportError, UsageError
from nitrolesion.transport import (
    FramedConnection,
    TcpEndpoint,
    VsockEndpoint,
    accept,
    connect,
    default_transport,
    endpoint_for,
    free_tcp_port,
    listen,
)
from nitrolesion.wire.frames import Frame, MessageType, encode_frame

TIMEOUT = 5.0  # generous: a loaded CI box must not make the happy path flaky
SHORT = 0.2  # how long the "silent peer" tests wait


@pytest.fixture
def listener():
    sock = listen(TcpEndpoint(0))
    yield sock
    sock.close()


@pytest.fixture
def pair(listener):
    """A connected (client, server) pair of FramedConnections over loopback TCP."""
    port = listener.getsockname()[1]
    client = connect(TcpEndpoint(port), timeout=TIMEOUT)
    server = accept(listener, timeout=TIMEOUT)
    yield client, server
    client.close()
    server.close()


@pytest.fixture
def raw_pair(listener):
    """A raw client socket and a FramedConnection server, to send arbitrary bytes."""
    port = listener.getsockname()[1]
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    server = accept(listener, timeout=TIMEOUT)
    yield raw, server
    raw.close()
    server.close()


def test_frames_cross_a_real_connection(pair):
    client, server = pair
    assert client.peer.startswith("tcp:127.0.0.1:") and server.peer.startswith("tcp:127.0.0.1:")
    client.send(MessageType.HELLO, b"nonce")
    client.send(MessageType.GOODBYE, b"")
    assert server.receive() == Frame(MessageType.HELLO, b"nonce")
    assert server.receive() == Frame(MessageType.GOODBYE, b"")
    server.send(MessageType.ATTESTATION, b"doc")
    assert client.receive() == Frame(MessageType.ATTESTATION, b"doc")


def test_large_frame_while_peer_reads_concurrently(pair):
    # 6 MiB exceeds loopback socket buffers, so send() and recv() both loop.
    client, server = pair
    body = bytes(range(256)) * (6 * 4096)
    received = []
    reader = threading.Thread(target=lambda: received.append(server.receive()))
    reader.start()
    client.send(MessageType.SEALED_REQUEST, body)
    reader.join(timeout=30)
    assert received == [Frame(MessageType.SEALED_REQUEST, body)]


def test_frame_split_across_writes(raw_pair):
    raw, server = raw_pair
    data = encode_frame(MessageType.SEALED_RESULT, b"x" * 1000)
    raw.sendall(data[:5])  # partial header
    with pytest.raises(TransportError, match=r"no complete frame .* within 0.2 s"):
        server.receive(timeout=SHORT)
    raw.sendall(data[5:])  # bytes kept from the timed-out call complete the frame
    assert server.receive() == Frame(MessageType.SEALED_RESULT, b"x" * 1000)


def test_timeout_on_silent_peer(pair):
    _, server = pair
    with pytest.raises(TransportError, match="no complete frame"):
        server.receive(timeout=SHORT)


def test_default_timeout_from_constructor(listener):
    port = listener.getsockname()[1]
    client = connect(TcpEndpoint(port), timeout=SHORT)
    server = accept(listener, timeout=TIMEOUT)
    with client, server:
        with pytest.raises(TransportError, match=f"within {SHORT} s"):
            client.receive()


def test_eof_mid_frame(raw_pair):
    raw, server = raw_pair
    raw.sendall(encode_frame(MessageType.HELLO, b"0123456789")[:-3])
    raw.close()
    with pytest.raises(TransportError, match="peer closed the connection mid-frame") as info:
        server.receive()
    assert not isinstance(info.value, ConnectionClosed)


def test_clean_eof_at_frame_boundary(raw_pair):
    raw, server = raw_pair
    raw.sendall(encode_frame(MessageType.GOODBYE, b""))
    raw.close()
    assert server.receive().type is MessageType.GOODBYE
    with pytest.raises(ConnectionClosed):
        server.receive()


def test_garbage_from_peer_is_protocol_error_and_sticky(raw_pair):
    raw, server = raw_pair
    raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(BadMagic):
        server.receive()
    with pytest.raises(ProtocolError):
        server.receive()


def test_send_timeout_when_peer_never_reads(pair):
    client, server = pair
    # Shrink both buffers so the body cannot fit in flight whatever the kernel's autotuning.
    client._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    server._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    with pytest.raises(TransportError, match="could not send a frame"):
        client.send(MessageType.SEALED_REQUEST, bytes(16 * 1024 * 1024), timeout=SHORT)
    with pytest.raises(TransportError, match="broken by an earlier incomplete send"):
        client.send(MessageType.GOODBYE, b"")


def test_oversize_send_rejected_before_writing(listener):
    port = listener.getsockname()[1]
    client = FramedConnection(
        socket.create_connection(("127.0.0.1", port)), max_body=10, timeout=TIMEOUT
    )
    with client, accept(listener, timeout=TIMEOUT) as server:
        with pytest.raises(ValueError):
            client.send(MessageType.HELLO, b"x" * 11)
        client.send(MessageType.HELLO, b"ok")  # connection still usable
        assert server.receive().body == b"ok"


def test_closed_connection_refuses_io(pair):
    client, _ = pair
    client.close()
    client.close()  # idempotent
    with pytest.raises(TransportError, match="closed"):
        client.send(MessageType.HELLO, b"")
    with pytest.raises(TransportError, match="closed"):
        client.receive()


def test_connect_refused_is_transport_error(listener):
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(TransportError, match="cannot connect to tcp:127.0.0.1"):
        connect(TcpEndpoint(port), timeout=TIMEOUT)


def test_accept_timeout(listener):
    with pytest.raises(TransportError, match="no connection within"):
        accept(listener, timeout=0.05)


def test_each_transport_has_its_own_endpoint():
    assert TcpEndpoint(5005).address == ("127.0.0.1", 5005)
    assert TcpEndpoint(5005, "10.0.0.2").address == ("10.0.0.2", 5005)
    assert VsockEndpoint(16, 5005).address == (16, 5005)
    assert str(VsockEndpoint(16, 5005)) == "vsock:16:5005"
    # A command line's CID and port: with tcp the CID maps to the host.
    assert endpoint_for("tcp", 16, 5005, "10.0.0.2") == TcpEndpoint(5005, "10.0.0.2")
    assert endpoint_for("vsock", 16, 5005) == VsockEndpoint(16, 5005)
    with pytest.raises(TransportError, match="unknown transport"):
        endpoint_for("udp", 0, 1)
    with pytest.raises(TransportError, match="port"):
        TcpEndpoint(70000)
    with pytest.raises(TransportError, match="cid"):
        VsockEndpoint(-1, 5005)


def test_default_transport():
    assert default_transport({}) == "vsock"
    assert default_transport({"ENCLAVE_TRANSPORT": "tcp"}) == "tcp"
    with pytest.raises(TransportError, match="must be one of vsock, tcp"):
        default_transport({"ENCLAVE_TRANSPORT": "carrier-pigeon"})


def test_port_and_cid_checks():
    assert transport.check_port(1) == 1 and transport.check_port(65535) == 65535
    for bad in (0, -1, 65536, 99999, True):
        with pytest.raises(UsageError, match=f"port must be between 1 and 65535, got {bad}"):
            transport.check_port(bad)
    assert transport.check_cid(16, minimum=transport.MIN_ENCLAVE_CID) == 16
    for bad in (3, 2**32 - 1, 2**32, -1):
        with pytest.raises(UsageError, match="enclave CID must be between 4 and 4294967294"):
            transport.check_cid(bad, "enclave CID", transport.MIN_ENCLAVE_CID)


VSOCK_HINT = r"off Nitro, use --transport tcp \(or ENCLAVE_TRANSPORT=tcp\)"


def test_vsock_off_nitro_fails_at_once_genuine():
    """Whatever this machine's vsock is (none, a kernel without transport, a VM without
    enclaves), connecting to an enclave fails within seconds and names --transport tcp.
    The kernel answers a vsock connect at once or after its own 2 s timeout."""
    started = time.monotonic()
    with pytest.raises(TransportError, match=VSOCK_HINT):
        connect(VsockEndpoint(16, free_tcp_port()), timeout=60)
    assert time.monotonic() - started < transport.VSOCK_CONNECT_TIMEOUT + 2


class FakeVsock:
    """A vsock socket whose bind/connect fail with a chosen errno, as kernels do."""

    def __init__(self, error: int) -> None:
        self.error = error

    def settimeout(self, _timeout) -> None:
        pass

    def close(self) -> None:
        pass

    def _fail(self, *_args) -> None:
        raise OSError(self.error, os.strerror(self.error))

    connect = bind = _fail


@pytest.fixture
def fake_vsock(monkeypatch):
    """Make AF_VSOCK sockets FakeVsock(errno) and pretend the kernel has a vsock CID."""
    real_socket = socket.socket
    state = {"error": errno.ENODEV, "create": None}

    def fake_socket(family=-1, *args, **kwargs):
        if family == getattr(socket, "AF_VSOCK", object()):
            if state["create"] is not None:
                raise OSError(state["create"], os.strerror(state["create"]))
            return FakeVsock(state["error"])
        return real_socket(family, *args, **kwargs)

    monkeypatch.setattr(socket, "AF_VSOCK", getattr(socket, "AF_VSOCK", 40), raising=False)
    monkeypatch.setattr(transport.socket, "socket", fake_socket)
    monkeypatch.setattr(transport, "local_vsock_cid", lambda: 3)
    return state


@pytest.mark.parametrize("error", [errno.ENODEV, errno.EPERM, errno.ENETUNREACH,
                                   errno.EAFNOSUPPORT])
def test_vsock_unusable_errors_say_so(fake_vsock, error):
    fake_vsock["error"] = error
    reason = re.escape(os.strerror(error))
    with pytest.raises(transport.VsockUnavailable,
                       match=f"^vsock is not available on this machine \\({reason} connecting to "
                             f"vsock:16:5005\\): {VSOCK_HINT}$"):
        connect(VsockEndpoint(16, 5005), timeout=60)
    with pytest.raises(transport.VsockUnavailable,
                       match=f"^vsock is not available on this machine \\({reason} listening on "
                             f"port 5005\\): {VSOCK_HINT}$"):
        listen(VsockEndpoint(16, 5005))


def test_vsock_socket_creation_failure_says_so(fake_vsock):
    # A kernel without the vsock module: socket() fails with EAFNOSUPPORT.
    fake_vsock["create"] = errno.EAFNOSUPPORT
    for call in (lambda: connect(VsockEndpoint(16, 5005), timeout=1),
                 lambda: listen(VsockEndpoint(16, 5005))):
        with pytest.raises(transport.VsockUnavailable,
                           match=f"Address family not supported by protocol\\): {VSOCK_HINT}"):
            call()


def test_vsock_without_transport_says_so(fake_vsock, monkeypatch):
    # The module is loaded but no transport is (a laptop): binds would "work", nothing
    # could ever connect. The kernel reports VMADDR_CID_ANY as the local CID.
    monkeypatch.setattr(transport, "local_vsock_cid", lambda: 2**32 - 1)
    monkeypatch.setattr(transport, "_LOOPBACK_MODULE", "/nonexistent")
    with pytest.raises(transport.VsockUnavailable, match="no vsock transport"):
        listen(VsockEndpoint(16, 5005))


@pytest.mark.parametrize("error", [errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED])
def test_vsock_nothing_listening_names_the_hint(fake_vsock, monkeypatch, error):
    # vsock works but nothing answers: not "unavailable", yet the hint is there, and on a
    # machine without the Nitro Enclaves driver it says that no enclave runs here.
    fake_vsock["error"] = error
    monkeypatch.setattr(transport, "no_enclave_here", lambda: True)
    with pytest.raises(TransportError, match="no /dev/nitro_enclaves, so no enclave runs beside "
                                             f"it: {VSOCK_HINT}") as info:
        connect(VsockEndpoint(16, 5005), timeout=60)
    assert not isinstance(info.value, transport.VsockUnavailable)
    monkeypatch.setattr(transport, "no_enclave_here", lambda: False)
    with pytest.raises(TransportError, match=f"is it running and listening there\\?\\); {VSOCK_HINT}"):
        connect(VsockEndpoint(16, 5005), timeout=60)


def test_local_vsock_cid_without_device(tmp_path):
    assert transport.local_vsock_cid(str(tmp_path / "no-such-device")) is None


# -- the in-memory transport ----------------------------------------------------------------
def test_memory_transport_carries_frames_both_ways_without_a_network():
    memory = transport.MemoryTransport()
    endpoint = memory.endpoint()
    listener = memory.listen(endpoint)
    with memory.connect(endpoint, timeout=TIMEOUT) as client, \
            listener.accept(timeout=TIMEOUT) as server:
        client.send(MessageType.HELLO, b"hello")
        assert server.receive().body == b"hello"
        server.send(MessageType.GOODBYE, b"")
        assert client.receive().type == MessageType.GOODBYE
    listener.close()


def test_memory_transport_refuses_like_a_socket():
    memory = transport.MemoryTransport()
    endpoint = memory.endpoint()
    with pytest.raises(TransportError, match="nothing listens"):
        memory.connect(endpoint, timeout=TIMEOUT)
    listener = memory.listen(endpoint)
    with pytest.raises(TransportError, match="in use"):
        memory.listen(endpoint)
    with pytest.raises(transport.TransportTimeout):
        listener.accept(timeout=0.05)
    pending = memory.connect(endpoint, timeout=TIMEOUT)
    listener.close()  # a connection nobody accepted is closed, as a socket's backlog is
    with pytest.raises(ConnectionClosed):
        pending.receive(timeout=TIMEOUT)
    with pytest.raises(TransportError, match="nothing listens"):
        memory.connect(endpoint, timeout=TIMEOUT)
