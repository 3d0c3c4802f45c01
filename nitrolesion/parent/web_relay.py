"""The blind relay behind ``parent.py web``: one WebSocket, one new enclave connection.

Each binary WebSocket message from the browser must be exactly one frame; it is checked
at the header only (magic, version, type, length: what the frame decoder reads) and
written to the enclave. Each frame from the enclave goes back as one binary message. The
bodies are ciphertext and CBOR this side never decodes; the relay logs sizes and timings
only, never a byte of content.

The enclave side uses the project's transport (vsock, or TCP off Nitro) in blocking mode:
one thread per relayed connection reads the enclave's frames while the event loop carries
the browser's.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
from dataclasses import dataclass, field

from nitrolesion.errors import NitroLesionError, ProtocolError, TransportError
from nitrolesion.transport import SOCKETS, AnyEndpoint, Transport
from nitrolesion.wire.frames import HEADER_SIZE, MAX_BODY, FrameDecoder, encode_frame

#: Seconds to open the enclave connection (a vsock connect is bounded lower by transport).
CONNECT_TIMEOUT = 10.0
#: WebSocket close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL, CLOSE_UNSUPPORTED, CLOSE_POLICY, CLOSE_UNAVAILABLE = 1000, 1003, 1008, 1011
#: The largest WebSocket message: one whole frame.
MAX_MESSAGE = HEADER_SIZE + MAX_BODY


@dataclass
class RelayStats:
    """What one relayed connection moved: frame counts and bytes each way, and its time."""

    number: int
    started: float = field(default_factory=time.monotonic)
    up_frames: int = 0
    up_bytes: int = 0
    down_frames: int = 0
    down_bytes: int = 0

    def line(self, outcome: str) -> str:
        return (f"relay #{self.number}: browser->enclave {self.up_frames} frames {self.up_bytes} B, "
                f"enclave->browser {self.down_frames} frames {self.down_bytes} B, "
                f"{time.monotonic() - self.started:.3f} s, {outcome}")


def one_frame(message: bytes) -> bytes:
    """``message`` if it is exactly one frame whose header is valid; raises ProtocolError."""
    decoder = FrameDecoder()
    decoder.feed(message)
    frame = decoder.next_frame()
    if frame is None or decoder.buffered:
        raise ProtocolError("a WebSocket message must hold exactly one whole frame")
    return message


class Relay:
    """Relays WebSocket connections to new connections to ``endpoint``."""

    def __init__(self, endpoint: AnyEndpoint, transport: Transport = SOCKETS, log=None) -> None:
        self.endpoint = endpoint
        self.transport = transport
        self._numbers = itertools.count(1)
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))

    async def handle(self, websocket) -> None:
        """Relay one WebSocket until either side closes it."""
        stats = RelayStats(next(self._numbers))
        loop = asyncio.get_running_loop()
        try:
            connection = await asyncio.to_thread(self.transport.connect, self.endpoint, CONNECT_TIMEOUT)
        except NitroLesionError as exc:
            self._log(stats.line(f"enclave unreachable ({type(exc).__name__})"))
            await websocket.close(CLOSE_UNAVAILABLE, "the enclave is not reachable")
            return
        down = threading.Thread(target=self._enclave_to_browser, args=(connection, websocket, loop, stats),
                                name=f"relay-{stats.number}", daemon=True)
        down.start()
        outcome = "closed by the browser"
        try:
            async for message in websocket:
                if isinstance(message, str):
                    outcome = "refused a text message"
                    await websocket.close(CLOSE_UNSUPPORTED, "binary frames only")
                    break
                try:
                    frame = one_frame(message)
                except ProtocolError:
                    outcome = "refused a message that is not one frame"
                    await websocket.close(CLOSE_POLICY, "one frame per message")
                    break
                stats.up_frames += 1
                stats.up_bytes += len(frame)
                await asyncio.to_thread(connection.send, frame[3], frame[HEADER_SIZE:], timeout=None)
        except TransportError:
            outcome = "the enclave closed the connection"
        except Exception as exc:  # websockets' ConnectionClosed and the like: the browser left
            outcome = f"browser connection ended ({type(exc).__name__})"
        finally:
            connection.shutdown_read()
            await asyncio.to_thread(down.join, 5.0)
            connection.close()
            self._log(stats.line(outcome))

    def _enclave_to_browser(self, connection, websocket, loop, stats: RelayStats) -> None:
        """Thread: each frame from the enclave becomes one binary WebSocket message."""
        while True:
            try:
                frame = connection.receive(timeout=None)
            except NitroLesionError:
                break  # EOF, reset, or our own shutdown_read
            data = encode_frame(frame.type, frame.body)
            stats.down_frames += 1
            stats.down_bytes += len(data)
            try:
                asyncio.run_coroutine_threadsafe(websocket.send(data), loop).result()
            except Exception:  # the browser is gone
                break
        try:
            asyncio.run_coroutine_threadsafe(websocket.close(CLOSE_NORMAL, "enclave closed"), loop).result(5.0)
        except Exception:
            pass
