"""The parent server: receives the enclave's key at boot and the sealed results later.

It listens on the parent port (5006). The enclave connects, sends ENCLAVE_ANNOUNCE (public
key + attestation document) and keeps the connection for SEALED_RESULT frames. The server
stores the announcement in its state folder for ``parent.py client`` (which still verifies
it against a fresh attestation before sending) and decrypts each result with the parent's
private key, which never leaves this host's 0600 key file.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cbor2

from nitrolesion.crypto.envelope import Envelope, fingerprint, open_envelope, request_aad
from nitrolesion.errors import (
    ConnectionClosed, NitroLesionError, ProtocolError, TransportError, TransportTimeout)
from nitrolesion.transport import Endpoint, FramedConnection, accept, listen
from nitrolesion.wire.frames import MessageType
from nitrolesion.wire.messages import (
    AnnounceAck, EnclaveAnnounce, ErrorCode, ErrorMessage, SealedResult,
    decode_message, loads_plain)

#: File in the state folder holding the last announced enclave key and its document.
ANNOUNCE_FILE = "enclave_announce.cbor"
#: Connections served at once. One enclave needs one (two while a restarted enclave
#: replaces its old link); the port may be reachable from an untrusted network, so
#: anything beyond a few is refused with BUSY instead of costing a thread each.
MAX_CONNECTIONS = 8
#: Seconds a new connection has to deliver its first frame. The enclave sends
#: ENCLAVE_ANNOUNCE (~10 KiB) right after connecting; 10 s tolerates a slow enclave boot
#: while a silent connection frees its slot quickly.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds one frame may take once its first byte arrived. Results are a few KiB; an
#: announced link may then stay idle for any time between frames (results are rare).
IO_TIMEOUT = 30.0
#: Seconds to hand an answer (ack or error, a few bytes) to the kernel.
SEND_TIMEOUT = 5.0


@dataclass(frozen=True)
class ServerEvent:
    """Something the server saw, for printing (CLI) or waiting on (demo, tests)."""

    kind: str  # "ready", "key", "result", "error"
    text: str
    data: dict | None = None


def save_announcement(state_dir: Path, announce: EnclaveAnnounce) -> Path:
    """Write the announcement atomically (temp file + rename) so a reader never sees half."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / ANNOUNCE_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(cbor2.dumps({"public_key": announce.public_key,
                                 "attestation": announce.attestation,
                                 "received_at": time.time()}))
    os.replace(tmp, path)
    return path


def load_announcement(state_dir: Path) -> EnclaveAnnounce | None:
    """The last announcement the server stored, or None if there is none (yet)."""
    path = state_dir / ANNOUNCE_FILE
    try:
        data = cbor2.loads(path.read_bytes())
        return EnclaveAnnounce(data["public_key"], data["attestation"])
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise NitroLesionError(f"{path} is unreadable; restart the server and the enclave") from exc


class ParentServer:
    """Accepts enclave connections on the parent port; one thread per connection."""

    def __init__(self, endpoint: Endpoint, private_key, state_dir: Path,
                 on_event: Callable[[ServerEvent], None], *,
                 max_connections: int = MAX_CONNECTIONS, io_timeout: float = IO_TIMEOUT,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.endpoint = endpoint
        self._private_key = private_key
        self.state_dir = state_dir
        self.on_event = on_event
        self._stopping = threading.Event()
        self._listener = None
        self._slots = threading.BoundedSemaphore(max_connections)
        self.io_timeout = io_timeout
        self.handshake_timeout = handshake_timeout

    def bind(self) -> None:
        """Open the port; raises TransportError (port in use, no AF_VSOCK, ...)."""
        self._listener = listen(self.endpoint)

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        self.on_event(ServerEvent("ready", "Server ready!"))
        while not self._stopping.is_set():
            try:
                connection = accept(self._listener, timeout=0.5)
            except NitroLesionError:
                continue
            if not self._slots.acquire(blocking=False):
                self._send_error(connection, ErrorCode.BUSY, "too many connections")
                connection.close()
                continue
            threading.Thread(target=self._handle_slot, args=(connection,), daemon=True,
                             name=f"enclave-{connection.peer}").start()
        self._listener.close()

    def stop(self) -> None:
        self._stopping.set()

    @staticmethod
    def _send_error(connection: FramedConnection, code: str, text: str) -> None:
        try:
            error = ErrorMessage.bounded(code, text)
            connection.send(error.TYPE, error.to_body(), timeout=SEND_TIMEOUT)
        except NitroLesionError:
            pass

    def _handle_slot(self, connection: FramedConnection) -> None:
        try:
            self._handle(connection)
        except Exception as exc:  # noqa: BLE001 - a bug must not leak the slot
            self.on_event(ServerEvent("error", f"Internal error on {connection.peer}: "
                                               f"{type(exc).__name__}"))
        finally:
            connection.close()
            self._slots.release()

    def _receive(self, connection: FramedConnection, first: bool):
        """The next frame: the first within handshake_timeout; later ones may wait idle
        for any time, but must finish within io_timeout once their first byte arrived."""
        if first:
            return connection.receive(timeout=self.handshake_timeout)
        connection.wait_readable(None)
        return connection.receive(timeout=self.io_timeout)

    def _handle(self, connection: FramedConnection) -> None:
        with connection:
            first = True
            while not self._stopping.is_set():
                try:
                    frame = self._receive(connection, first)
                except ConnectionClosed:
                    return
                except ProtocolError as exc:
                    self.on_event(ServerEvent("error", f"Bad frame from {connection.peer}: {exc}"))
                    self._send_error(connection, ErrorCode.BAD_FRAME, str(exc))
                    return
                except TransportTimeout:
                    limit = self.handshake_timeout if first else self.io_timeout
                    text = f"no complete frame within {limit:g} s"
                    self.on_event(ServerEvent("error", f"Timed out: {connection.peer}: {text}"))
                    self._send_error(connection, ErrorCode.TIMEOUT, text)
                    return
                except TransportError as exc:
                    self.on_event(ServerEvent("error", f"Connection lost: {exc}"))
                    return
                first = False
                try:
                    message = decode_message(frame)
                except ProtocolError as exc:
                    self.on_event(ServerEvent("error", f"Bad message from {connection.peer}: {exc}"))
                    self._send_error(connection, ErrorCode.BAD_MESSAGE, str(exc))
                    return
                if isinstance(message, EnclaveAnnounce):
                    save_announcement(self.state_dir, message)
                    try:
                        connection.send(AnnounceAck.TYPE, AnnounceAck().to_body(),
                                        timeout=SEND_TIMEOUT)
                    except TransportError:
                        return
                    self.on_event(ServerEvent(
                        "key", f"Enclave public key received (sha256 {fingerprint(message.public_key)[:16]}...)",
                        {"public_key": message.public_key, "attestation": message.attestation}))
                elif isinstance(message, SealedResult):
                    self._result(message)
                else:
                    self.on_event(ServerEvent("error", f"Unexpected {message.TYPE.name} from {connection.peer}"))
                    self._send_error(connection, ErrorCode.UNEXPECTED,
                                     f"{message.TYPE.name} is not expected on the parent port")
                    return

    def _result(self, message: SealedResult) -> None:
        aad = request_aad(MessageType.SEALED_RESULT, message.request_id)
        try:
            plaintext = open_envelope(self._private_key, Envelope(message.wrapped_key, message.nonce,
                                                                 message.ciphertext), aad)
            result = loads_plain(plaintext)  # anyone can seal to our public key
            label, confidence = str(result["name"]), float(result["confidence"])
        except Exception as exc:  # noqa: BLE001 - anything undecryptable is reported the same way
            self.on_event(ServerEvent("error", f"A result could not be decrypted: {exc}"))
            return
        self.on_event(ServerEvent("result", f"Classification received: {label} ({confidence:.2f})",
                                  {"request_id": message.request_id.hex(), **result}))
