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
from nitrolesion.errors import ConnectionClosed, NitroLesionError
from nitrolesion.transport import Endpoint, FramedConnection, accept, listen
from nitrolesion.wire.frames import MessageType
from nitrolesion.wire.messages import (
    AnnounceAck, EnclaveAnnounce, ErrorCode, ErrorMessage, SealedResult, decode_message)

#: File in the state folder holding the last announced enclave key and its document.
ANNOUNCE_FILE = "enclave_announce.cbor"


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
                 on_event: Callable[[ServerEvent], None]) -> None:
        self.endpoint = endpoint
        self._private_key = private_key
        self.state_dir = state_dir
        self.on_event = on_event
        self._stopping = threading.Event()
        self._listener = None

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
            threading.Thread(target=self._handle, args=(connection,), daemon=True,
                             name=f"enclave-{connection.peer}").start()
        self._listener.close()

    def stop(self) -> None:
        self._stopping.set()

    def _handle(self, connection: FramedConnection) -> None:
        with connection:
            while not self._stopping.is_set():
                try:
                    frame = connection.receive(timeout=None)
                    message = decode_message(frame)
                except ConnectionClosed:
                    return
                except NitroLesionError as exc:
                    self.on_event(ServerEvent("error", f"Bad data from {connection.peer}: {exc}"))
                    try:
                        error = ErrorMessage(ErrorCode.BAD_FRAME, str(exc)[:200])
                        connection.send(error.TYPE, error.to_body(), timeout=1.0)
                    except NitroLesionError:
                        pass
                    return
                if isinstance(message, EnclaveAnnounce):
                    save_announcement(self.state_dir, message)
                    connection.send(AnnounceAck.TYPE, AnnounceAck().to_body())
                    self.on_event(ServerEvent(
                        "key", f"Enclave public key received (sha256 {fingerprint(message.public_key)[:16]}...)",
                        {"public_key": message.public_key, "attestation": message.attestation}))
                elif isinstance(message, SealedResult):
                    self._result(message)
                else:
                    self.on_event(ServerEvent("error", f"Unexpected {message.TYPE.name} from {connection.peer}"))

    def _result(self, message: SealedResult) -> None:
        aad = request_aad(MessageType.SEALED_RESULT, message.request_id)
        try:
            plaintext = open_envelope(self._private_key, Envelope(message.wrapped_key, message.nonce,
                                                                 message.ciphertext), aad)
            result = cbor2.loads(plaintext)
            label, confidence = str(result["name"]), float(result["confidence"])
        except Exception as exc:  # noqa: BLE001 - anything undecryptable is reported the same way
            self.on_event(ServerEvent("error", f"A result could not be decrypted: {exc}"))
            return
        self.on_event(ServerEvent("result", f"Classification received: {label} ({confidence:.2f})",
                                  {"request_id": message.request_id.hex(), **result}))
