"""Frame encoding and decoding, sans-I/O.

Every message between the parent, the client and the enclave travels as one frame::

    offset  size  field
    0       2     magic b"NL"
    2       1     protocol version (PROTOCOL_VERSION)
    3       1     message type (MessageType)
    4       8     body length, unsigned big-endian
    12      n     body

The length field is 64 bits wide on purpose: a hostile peer can *declare* 2**63 bytes, and
the decoder must refuse that from the 12 header bytes alone, before allocating anything.

This module never touches sockets (see nitrolesion.transport for that). The decoder is
driven with ``feed(bytes)`` and ``next_frame()``, in the style of h11.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NoReturn

from nitrolesion.errors import (
    BadMagic,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    UnknownMessageType,
    UnsupportedVersion,
)

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_BODY",
    "MAX_LENGTH_FIELD",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "MessageType",
    "encode_frame",
]

MAGIC = b"NL"
# Bumped on any incompatible change to the header or to a message body; peers refuse
# other versions instead of guessing. 2: session keys from both sides' randomness, the
# enclave's random value in the attestation, key confirmation, signed one-shot results.
PROTOCOL_VERSION = 2
# magic(2) | version(1) | type(1) | length(8, big-endian)
HEADER = struct.Struct(">2sBBQ")
HEADER_SIZE = HEADER.size  # 12
# Largest value the 8-byte length field can hold.
MAX_LENGTH_FIELD = 2**64 - 1
# Largest image we accept is 20 MiB; 4 MiB more leaves room for the envelope (wrapped
# key, nonce, GCM tag) and the CBOR map around it, while still bounding memory per frame.
MAX_BODY = 24 * 1024 * 1024
# How many frames' worth of bytes a decoder will hold before it refuses more input. One
# full frame plus one read's worth would do for a caller that drains after every feed;
# two full frames leaves slack for callers that feed a little ahead, and is still bounded.
BUFFER_FRAMES = 2
# Floor for that bound, so a decoder with a tiny max_body (control channels, tests) still
# accepts one ordinary socket read full of small pipelined frames.
MIN_BUFFER_LIMIT = 64 * 1024


class MessageType(enum.IntEnum):
    """The message type byte of a frame header."""

    ENCLAVE_ANNOUNCE = 1  # enclave -> parent server: its public key + attestation
    ANNOUNCE_ACK = 2  # parent server -> enclave
    HELLO = 3  # client -> enclave: nonce, asks for attestation
    ATTESTATION = 4  # enclave -> client: attestation document
    SEALED_REQUEST = 5  # client -> enclave: one-shot hybrid-encrypted image
    SEALED_RESULT = 6  # enclave -> client: encrypted classification
    ACCEPTED = 7  # acknowledgement that a request was queued
    SESSION_OPEN = 8  # client -> enclave: wrapped session key
    SESSION_READY = 9  # enclave -> client: session established
    SESSION_CLASSIFY = 10  # client -> enclave: image under the session key
    SESSION_RESULT = 11  # enclave -> client: result under the session key
    ERROR = 12  # either direction: error code + message
    GOODBYE = 13  # either direction: orderly close


_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: its message type and its raw body bytes."""

    type: MessageType
    body: bytes


def _check_max_body(max_body: int) -> int:
    if isinstance(max_body, bool) or not isinstance(max_body, int):
        raise LocalProtocolError(f"max_body must be an int, got {type(max_body).__name__}")
    if not 0 <= max_body <= MAX_LENGTH_FIELD:
        raise LocalProtocolError(
            f"max_body must be between 0 and {MAX_LENGTH_FIELD}, got {max_body}"
        )
    return max_body


def encode_frame(msg_type: int, body: bytes, *, max_body: int = MAX_BODY) -> bytes:
    """Return the header followed by ``body``, ready to write to a stream.

    Raises LocalProtocolError (a ValueError) if ``msg_type`` is not a MessageType value,
    ``body`` is not bytes-like, or ``len(body)`` exceeds ``max_body``: the same limit the
    peer's decoder enforces, so we fail here instead of having the peer drop us.
    """
    _check_max_body(max_body)
    if isinstance(msg_type, bool) or not isinstance(msg_type, int):
        raise LocalProtocolError(f"message type must be an int, got {type(msg_type).__name__}")
    if msg_type not in _KNOWN_TYPES:
        raise LocalProtocolError(f"unknown message type {msg_type}")
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"body must be bytes, got {type(body).__name__}")
    body = bytes(body)
    if len(body) > max_body:
        raise LocalProtocolError(f"body is {len(body)} bytes, limit is {max_body}")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, msg_type, len(body)) + body


class DecoderState(enum.Enum):
    """OK while frames parse; ERROR (sticky) once the peer has sent something invalid."""

    OK = "ok"
    ERROR = "error"


class FrameDecoder:
    """Incremental frame parser: ``feed(data)`` bytes in, ``next_frame()`` frames out.

    Invalid input raises a ProtocolError subclass (BadMagic, UnsupportedVersion,
    UnknownMessageType, FrameTooLarge) as soon as the offending header byte is buffered,
    without waiting for the rest of the frame. After that the decoder is in the ERROR state
    and every later ``feed`` or ``next_frame`` re-raises a ProtocolError immediately: the
    stream has lost framing and nothing after the bad byte can be trusted.

    Memory is bounded: at most ``buffer_limit`` bytes are held, i.e.
    ``max(BUFFER_FRAMES * (HEADER_SIZE + max_body), MIN_BUFFER_LIMIT)``.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        """Raises LocalProtocolError if ``max_body`` is not an int in [0, 2**64 - 1]."""
        self._max_body = _check_max_body(max_body)
        self._max_buffered = max(BUFFER_FRAMES * (HEADER_SIZE + max_body), MIN_BUFFER_LIMIT)
        self._buffer = bytearray()
        self._state = DecoderState.OK
        self._error: ProtocolError | None = None

    @property
    def max_body(self) -> int:
        """The largest body length this decoder accepts."""
        return self._max_body

    @property
    def state(self) -> DecoderState:
        """DecoderState.OK, or DecoderState.ERROR after the peer sent invalid bytes."""
        return self._state

    @property
    def buffer_limit(self) -> int:
        """The most bytes this decoder will hold before ``feed`` refuses more."""
        return self._max_buffered

    @property
    def capacity_left(self) -> int:
        """How many more bytes ``feed`` accepts right now (what a reader should ask for)."""
        return self._max_buffered - len(self._buffer)

    @property
    def buffered(self) -> int:
        """Number of bytes fed but not yet returned as part of a frame."""
        return len(self._buffer)

    @property
    def pending_length(self) -> int | None:
        """The body length the next frame's header declares, once its 12 header bytes are
        buffered; None before that. Lets a reader reserve memory for a body before reading
        it. Raises what ``next_frame`` would for an invalid header."""
        self._raise_if_errored()
        return self._check_header()

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is pending (nothing buffered).

        A transport uses this on EOF: a clean close happens at a boundary, anything else
        means the peer died mid-frame.
        """
        return not self._buffer

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer.

        Raises ProtocolError if the decoder is already in the ERROR state, or if buffering
        ``data`` would exceed the bound (the caller is not draining frames, or the peer is
        pushing far more than any frame could need).
        """
        self._raise_if_errored()
        if len(self._buffer) + len(data) > self._max_buffered:
            self._fail(
                ProtocolError(
                    f"receive buffer limit exceeded: {len(self._buffer) + len(data)} bytes "
                    f"pending, limit {self._max_buffered}"
                )
            )
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed.

        Raises BadMagic, UnsupportedVersion, UnknownMessageType or FrameTooLarge (all
        ProtocolError) for an invalid header, and ProtocolError if the decoder is already
        in the ERROR state.
        """
        self._raise_if_errored()
        length = self._check_header()
        if length is None:
            return None
        end = HEADER_SIZE + length
        buf = self._buffer
        if len(buf) < end:
            return None
        msg_type = buf[3]
        body = bytes(buf[HEADER_SIZE:end])
        del buf[:end]
        return Frame(MessageType(msg_type), body)

    def _check_header(self) -> int | None:
        """Check the buffered header bytes; the declared body length once all 12 are here."""
        buf = self._buffer
        # Check each header field as soon as its bytes are here, so a peer speaking
        # another protocol (HTTP, TLS) is refused at once rather than after 12 bytes.
        if len(buf) >= 1 and buf[0] != MAGIC[0] or len(buf) >= 2 and buf[1] != MAGIC[1]:
            self._fail(BadMagic(f"bad magic: expected {MAGIC!r}, got {bytes(buf[:2])!r}"))
        if len(buf) >= 3 and buf[2] != PROTOCOL_VERSION:
            self._fail(
                UnsupportedVersion(
                    f"unsupported protocol version {buf[2]}: this side speaks version "
                    f"{PROTOCOL_VERSION}; run the same release on both sides"
                )
            )
        if len(buf) >= 4 and buf[3] not in _KNOWN_TYPES:
            self._fail(UnknownMessageType(f"unknown message type {buf[3]}"))
        if len(buf) < HEADER_SIZE:
            return None
        length = HEADER.unpack_from(buf)[3]
        if length > self._max_body:
            self._fail(
                FrameTooLarge(f"frame declared {length} bytes, limit {self._max_body}")
            )
        return length

    def _raise_if_errored(self) -> None:
        if self._state is DecoderState.ERROR:
            raise ProtocolError(f"decoder is in the ERROR state after: {self._error}")

    def _fail(self, error: ProtocolError) -> NoReturn:
        # Drop the buffer: after a framing error none of it can be interpreted.
        self._state = DecoderState.ERROR
        self._error = error
        self._buffer = bytearray()
        raise error
