"""Transport over real loopback TCP sockets: framing, timeouts, EOF handling, vsock errors."""

from __future__ import annotations

import socket
import threading

import pytest

from nitrolesion import transport
from nitrolesion.errors import BadMagic, ConnectionClosed, ProtocolError, TransportError
from nitrolesion.transport import (
    Endpoint,
    FramedConnection,
    accept,
    connect,
    default_transport,
    listen,
)
from nitrolesion.wire.frames import Frame, MessageType, encode_frame

TIMEOUT = 5.0  # generous: a loaded CI box must not make the happy path flaky
SHORT = 0.2  # how long the "silent peer" tests wait


@pytest.fixture
def listener():
    sock = listen(Endpoint("tcp", cid=16, port=0))
    yield sock
    sock.close()


@pytest.fixture
def pair(listener):
    """A connected (client, server) pair of FramedConnections over loopback TCP."""
    port = listener.getsockname()[1]
    client = connect(Endpoint("tcp", cid=16, port=port), timeout=TIMEOUT)
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
    client = connect(Endpoint("tcp", cid=0, port=port), timeout=SHORT)
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
        connect(Endpoint("tcp", cid=16, port=port), timeout=TIMEOUT)


def test_accept_timeout(listener):
    with pytest.raises(TransportError, match="no connection within"):
        accept(listener, timeout=0.05)


def test_endpoint_tcp_ignores_cid_and_validates():
    assert Endpoint("tcp", cid=16, port=5005).address == ("127.0.0.1", 5005)
    assert Endpoint("tcp", cid=16, port=5005, host="10.0.0.2").address == ("10.0.0.2", 5005)
    assert Endpoint("vsock", cid=16, port=5005).address == (16, 5005)
    assert str(Endpoint("vsock", cid=16, port=5005)) == "vsock:16:5005"
    with pytest.raises(TransportError, match="unknown transport"):
        Endpoint("udp", cid=0, port=1)
    with pytest.raises(TransportError, match="port"):
        Endpoint("tcp", cid=0, port=70000)


def test_default_transport():
    assert default_transport({}) == "vsock"
    assert default_transport({"ENCLAVE_TRANSPORT": "tcp"}) == "tcp"
    with pytest.raises(TransportError, match="must be one of vsock, tcp"):
        default_transport({"ENCLAVE_TRANSPORT": "carrier-pigeon"})


def _vsock_works() -> bool:
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except (AttributeError, OSError):
        return False
    return True


@pytest.mark.skipif(_vsock_works(), reason="AF_VSOCK sockets can be created on this kernel")
def test_vsock_unavailable_message_genuine():
    with pytest.raises(TransportError, match="use --transport tcp or ENCLAVE_TRANSPORT=tcp"):
        connect(Endpoint("vsock", cid=16, port=5005), timeout=1)


def test_vsock_unavailable_message_simulated(monkeypatch):
    # Simulates a kernel without the vsock module (socket() fails with EAFNOSUPPORT), so
    # the message is checked even where vsock works.
    real_socket = socket.socket

    def fake_socket(family=-1, *args, **kwargs):
        if family == getattr(socket, "AF_VSOCK", object()):
            raise OSError(97, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    monkeypatch.setattr(transport.socket, "socket", fake_socket)
    for call in (
        lambda: connect(Endpoint("vsock", cid=16, port=5005), timeout=1),
        lambda: listen(Endpoint("vsock", cid=16, port=5005)),
    ):
        with pytest.raises(TransportError, match="AF_VSOCK is not available on this kernel.*"
                           "use --transport tcp or ENCLAVE_TRANSPORT=tcp"):
            call()
