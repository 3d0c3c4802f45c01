"""``parent.py relay`` as a real process: blind, byte for byte, capped, timed out, half-close.

The blindness test puts a recording tap on each side of the relay (client -> tap -> relay
-> tap -> enclave), runs a real attested session of the seven sample images through it and
compares what each side saw, byte for byte; then it looks for the images and the diagnoses
in everything that crossed and in the relay's log.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness import PARENT_CLI, Proc, free_port, tcp_env
from nitrolesion.enclave_image import image_files
from nitrolesion.limits import PROJECT_ROOT
from nitrolesion.model.labels import load_labels
from nitrolesion.parent.enclave_client import EnclaveClient
from nitrolesion.transport import TcpEndpoint

#: Every line the relay logs per connection: numbers and how it ended, nothing else.
CONNECTION_LINE = re.compile(
    r"relay INFO connection \d+: \d+ bytes to the enclave, \d+ bytes back, [\d.]+ s, "
    r"(both sides closed|idle timeout \([\d.]+ s\)|total timeout \([\d.]+ s\)|"
    r"the (client|enclave) (reset the connection|stopped receiving))$")


class Tap:
    """A one-connection TCP pass-through that records each direction (the test's eyes)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = bytearray()    # towards the enclave
        self.down = bytearray()  # back to the client
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.target_port))
        copies = [threading.Thread(target=self._copy, args=(client, server, self.up)),
                  threading.Thread(target=self._copy, args=(server, client, self.down))]
        for copy in copies:
            copy.start()
        for copy in copies:
            copy.join()
        client.close()
        server.close()
        self.listener.close()
        self.done.set()

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        while data := source.recv(65536):
            record.extend(data)
            sink.sendall(data)
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def start_relay(enclave_port: int, *extra: str) -> tuple[Proc, int]:
    port = free_port()
    relay = Proc([str(PARENT_CLI), "relay", "--listen", f"127.0.0.1:{port}", "--cid", "16",
                  "--port", str(enclave_port), "--transport", "tcp", *extra], tcp_env())
    relay.wait_for(r"^Relay ready: tcp:127\.0\.0\.1:\d+ -> tcp:127\.0\.0\.1:%d" % enclave_port)
    return relay, port


@pytest.fixture(scope="module")
def enclave(tmp_path_factory, model_present):
    from harness import EnclaveStack

    running = EnclaveStack(tmp_path_factory.mktemp("relay"), enclave_args=("--workers", "1"),
                           start_server=False)
    yield running
    running.stop(wait=False)


def test_relay_carries_exactly_the_sessions_bytes_and_never_plaintext(enclave, test_image_paths):
    enclave_side = Tap(enclave.client_port)
    relay, relay_port = start_relay(enclave_side.port)
    client_side = Tap(relay_port)
    try:
        images = [path.read_bytes() for path in test_image_paths]
        with EnclaveClient(TcpEndpoint(client_side.port), enclave.trust()) as client:
            client.attest()
            client.open_session()
            results = [o.result for o in client.classify_many(images)]
        assert all(results) and len(results) == 7
        assert client_side.done.wait(10) and enclave_side.done.wait(10)
        # Byte for byte: what the client sent is what reached the enclave, and back.
        assert bytes(client_side.up) == bytes(enclave_side.up)
        assert bytes(client_side.down) == bytes(enclave_side.down)
        assert len(client_side.up) > sum(map(len, images))  # the images did cross, sealed
        relay.wait_for(r"connection 1: %d bytes to the enclave, %d bytes back" % (
            len(client_side.up), len(client_side.down)))
    finally:
        relay.stop()
    crossed = bytes(client_side.up) + bytes(client_side.down)
    log = relay.output.encode()
    for image in images:
        for start in range(0, len(image) - 32, len(image) // 16):
            piece = image[start:start + 32]
            assert piece not in crossed and piece not in log
    # Every diagnosis' name (at least 8 bytes: too long to occur by chance in ciphertext).
    names = {label.name for label in load_labels()} | {result.name for result in results}
    for name in names:
        assert name.encode() not in crossed, name
        assert name.encode().lower() not in log.lower(), name
    for line in relay.output.splitlines()[1:]:
        assert CONNECTION_LINE.search(line), line


def test_fleet_through_one_relay_address_attests_on_every_connection(enclave, tmp_path):
    """As behind a load balancer: the same address twice is two connections, each attested
    (the rows name the enclave behind the relay); the results equal a direct session's."""
    relay, port = start_relay(enclave.client_port)
    try:
        out = tmp_path / "results.json"
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps(enclave.trust().policy.to_dict()))
        done = subprocess.run(
            [sys.executable, str(PARENT_CLI), "classify", str(PROJECT_ROOT / "sample_images"),
             "--enclave", f"tcp:127.0.0.1:{port}", "--enclave", f"tcp:127.0.0.1:{port}",
             "--policy", str(policy), "--dev-root", str(enclave.dev_root), "--out", str(out)],
            env=tcp_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        document = json.loads(out.read_text())
        members = {entry["enclave"]: entry for entry in document["summary"]["fleet"]["enclaves"]}
        assert set(members) == {f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}#2"}
        assert {m["module_id"] for m in members.values()} == {enclave.authority.module_id}
        relay.wait_for(r"connection 2: \d+ bytes to the enclave")  # two relayed sessions
        with EnclaveClient(enclave.endpoint(), enclave.trust()) as client:
            client.attest()
            client.open_session()
            paths = sorted((PROJECT_ROOT / "sample_images").glob("*.jpg"))
            direct = {paths[o.index].name: o.result.code
                      for o in client.classify_many([p.read_bytes() for p in paths])}
        assert {Path(row["file"]).name: row["code"] for row in document["results"]} == direct
    finally:
        relay.stop()


class HalfCloseServer:
    """Reads until the client shuts its writing half, then answers with what it counted:
    only works if the relay passes a half-close on and keeps the way back open."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                received = 0
                while data := conn.recv(65536):
                    received += len(data)
                time.sleep(0.2)  # answer well after the client's half-close
                conn.sendall(f"received {received}".encode())

    def close(self) -> None:
        """Stop listening for good. shutdown() first: a plain close() from this thread
        leaves the socket listening while the serving thread still blocks in accept()."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


@contextlib.contextmanager
def relay_to_stand_in(*extra: str):
    """A relay process (``extra`` options) in front of a HalfCloseServer: (relay, port, server)."""
    server = HalfCloseServer()
    relay, port = start_relay(server.port, *extra)
    try:
        yield relay, port, server
    finally:
        relay.stop()
        server.close()


def test_half_close_reaches_the_enclave_and_the_answer_still_comes_back():
    with relay_to_stand_in() as (_, port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"x" * 100_000)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while data := sock.recv(100):
                answer += data
        assert answer == b"received 100000"


def test_connection_cap_and_idle_timeout():
    with relay_to_stand_in("--max-connections", "1", "--idle-timeout", "1") as (relay, port, _):
        first = socket.create_connection(("127.0.0.1", port), timeout=10)
        time.sleep(0.3)  # let the relay take it
        second = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert second.recv(1) == b""  # closed at once: the cap
        relay.wait_for(r"connection 2 refused: 1 connections relayed already")
        assert first.recv(1) == b""  # silent for a second: closed by the idle timeout
        relay.wait_for(r"connection 1: 0 bytes to the enclave, 0 bytes back, [\d.]+ s, "
                       r"idle timeout \(1 s\)")
        first.close()
        second.close()


def test_total_timeout_ends_even_a_busy_connection():
    with relay_to_stand_in("--total-timeout", "1", "--idle-timeout", "30") as (relay, port, _):
        ended = False
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for _ in range(100):  # a byte every 0.1 s: never idle, for up to 10 s
                try:
                    sock.sendall(b"x")
                    time.sleep(0.1)
                    if select.select([sock], [], [], 0)[0] and sock.recv(1) == b"":
                        ended = True
                except OSError:  # reset: the relay closed it while we were sending
                    ended = True
                if ended:
                    break
        assert ended
        relay.wait_for(r"connection 1: \d+ bytes to the enclave, 0 bytes back, [\d.]+ s, "
                       r"total timeout \(1 s\)")


def test_readiness_follows_the_enclave():
    health = free_port()
    with relay_to_stand_in("--health", f"127.0.0.1:{health}") as (_, _, server):
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=10) as answer:
            assert answer.status == 200
        server.close()  # the "enclave" goes away
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=10)
        assert refused.value.code == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/live", timeout=10) as answer:
            assert answer.status == 200


def test_unreachable_enclave_closes_the_client_connection():
    relay, port = start_relay(free_port(), "--connect-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert sock.recv(1) == b""
        relay.wait_for(r"connection 1: the enclave did not accept")
    finally:
        relay.stop()


@pytest.mark.parametrize("listen", ["8443", "host:", ":8443", "host:0", "host:x"])
def test_bad_listen_address_is_a_usage_error(listen):
    done = subprocess.run([sys.executable, str(PARENT_CLI), "relay", "--listen", listen,
                           "--transport", "tcp"], env=tcp_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "--listen" in done.stderr


def test_relay_is_parent_only_never_in_the_enclave_image():
    relay = PROJECT_ROOT / "nitrolesion" / "parent" / "relay.py"
    assert relay.is_file() and relay not in image_files(PROJECT_ROOT)
