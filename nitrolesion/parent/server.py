"""The parent server: receives the enclave's key at boot and the sealed results later.

It listens on the parent port (5006). The enclave connects, sends ENCLAVE_ANNOUNCE (public
key + attestation document) and keeps the connection for SEALED_RESULT frames.

The port is reachable by any process on this host, and the parent public key travels in
clear, so the server believes nothing on its word:

* an announcement is verified against the same trust as the client (pinned roots, PCR
  policy, age) before it is stored or printed; a failed one is refused and logged;
* a result is accepted only on a connection whose announcement verified, only if it is
  signed by that attested enclave key (RSA-PSS over the sealed result and the enclave's
  time; crypto/result_signature.py), only within RESULT_WINDOW of our clock, and only
  once per request id. Anything else is logged as refused, never printed as a diagnosis.

Accepted results are decrypted with the parent's private key, which never leaves this
host's 0600 key file. The stored announcement serves ``parent.py client``, which still
verifies it against a fresh attestation before sending.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cbor2

from nitrolesion.attestation.errors import AttestationError
from nitrolesion.crypto.envelope import (
    Envelope, fingerprint, load_public_key, open_envelope, request_aad)
from nitrolesion.crypto.keystore import ensure_private_folder, write_private_file
from nitrolesion.crypto.result_signature import verify_result
from nitrolesion.errors import (
    ConnectionClosed, CryptoError, NitroLesionError, ProtocolError, TransportError,
    TransportTimeout)
from nitrolesion.transport import SOCKETS, AnyEndpoint, FramedConnection, Transport
from nitrolesion.wire.frames import MessageType
from nitrolesion.wire.messages import (
    AnnounceAck, EnclaveAnnounce, ErrorCode, ErrorMessage, SealedResult,
    check_prediction, decode_message, loads_plain, printable)
from nitrolesion.parent.enclave_client import Trust

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
#: A result whose signed enclave time is further than this from our clock is refused.
#: The enclave signs a result the moment it is made and sends it at once; 5 minutes
#: covers clock drift between enclave and parent. Request ids are remembered for the
#: window only: a replay after it fails the time check, so the memory cannot be flushed.
RESULT_WINDOW = 300.0


@dataclass(frozen=True)
class ServerEvent:
    """Something the server saw, for printing (CLI) or waiting on (demo, tests)."""

    kind: str  # "ready", "key", "result", "refused" (a forged/duplicate message), "error"
    text: str
    data: dict | None = None


def save_announcement(state_dir: Path, announce: EnclaveAnnounce) -> Path:
    """Write the announcement atomically (O_EXCL temp file in the checked private folder,
    then rename), so a reader never sees half and nothing planted is written through."""
    ensure_private_folder(state_dir)
    return write_private_file(state_dir, ANNOUNCE_FILE, cbor2.dumps(
        {"public_key": announce.public_key, "attestation": announce.attestation,
         "received_at": time.time()}))


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

    def __init__(self, endpoint: AnyEndpoint, private_key, state_dir: Path,
                 on_event: Callable[[ServerEvent], None], *, trust: Trust,
                 max_connections: int = MAX_CONNECTIONS, io_timeout: float = IO_TIMEOUT,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 clock: Callable[[], float] = time.time, transport: Transport = SOCKETS) -> None:
        """``trust`` decides which announcements are believed (the client's trust);
        ``clock`` (seconds since the epoch) is compared with the enclave's signed time;
        ``transport`` listens on ``endpoint`` (vsock or TCP; in memory in tests)."""
        self.endpoint = endpoint
        self.transport = transport
        self.trust = trust
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # request id -> enclave time
        self._seen_lock = threading.Lock()
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
        self._listener = self.transport.listen(self.endpoint)

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        self.on_event(ServerEvent("ready", "Server ready!"))
        while not self._stopping.is_set():
            try:
                connection = self._listener.accept(timeout=0.5)
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
            enclave_key = None  # set once this connection's announcement verified
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
                    try:
                        attested = self.trust.verify_announcement(message)
                    except AttestationError as exc:
                        text = f"{type(exc).__name__}: {exc}"
                        self.on_event(ServerEvent("refused", f"Refused an enclave announcement from "
                                                             f"{connection.peer}: {text}"))
                        self._send_error(connection, ErrorCode.UNTRUSTED, text)
                        return
                    enclave_key = load_public_key(attested.public_key)
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
                    self._result(message, enclave_key, connection.peer)
                else:
                    self.on_event(ServerEvent("error", f"Unexpected {message.TYPE.name} from {connection.peer}"))
                    self._send_error(connection, ErrorCode.UNEXPECTED,
                                     f"{message.TYPE.name} is not expected on the parent port")
                    return

    def _refuse(self, message: SealedResult, peer: str, reason: str) -> None:
        self.on_event(ServerEvent("refused", f"Refused a result from {peer} (request "
                                             f"{message.request_id.hex()[:8]}...): {reason}"))

    def _result(self, message: SealedResult, enclave_key, peer: str) -> None:
        if enclave_key is None:
            return self._refuse(message, peer, "this connection announced no attested enclave key")
        now = self._clock()
        if abs(now - message.issued_at_ms / 1000) > RESULT_WINDOW:
            return self._refuse(message, peer, f"signed {message.issued_at_ms / 1000 - now:+.0f} s "
                                               f"from now, outside the {RESULT_WINDOW:g} s window")
        envelope = Envelope(message.wrapped_key, message.nonce, message.ciphertext)
        try:
            verify_result(enclave_key, message.request_id, message.issued_at_ms, envelope,
                          message.signature)
        except CryptoError as exc:
            return self._refuse(message, peer, str(exc))
        with self._seen_lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * RESULT_WINDOW:
                self._seen.popitem(last=False)  # ids older than the window can never pass again
            if message.request_id in self._seen:
                return self._refuse(message, peer, "this request id was already received (a replay)")
            self._seen[message.request_id] = message.issued_at_ms / 1000
        aad = request_aad(MessageType.SEALED_RESULT, message.request_id)
        try:
            plaintext = open_envelope(self._private_key, envelope, aad)
            result = check_prediction(loads_plain(plaintext))
        except NitroLesionError as exc:
            self.on_event(ServerEvent("error", f"A signed result could not be decrypted or decoded: {exc}"))
            return
        self.on_event(ServerEvent(
            "result", f"Classification received: {printable(result.name)} "
                      f"({result.confidence:.2f}), {result.triage_text()}",
            {"request_id": message.request_id.hex(), "prediction": result}))
