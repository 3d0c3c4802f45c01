"""The wire format: frame header, message types and a sans-I/O frame decoder."""

from nitrolesion.wire.frames import (
    HEADER_SIZE,
    MAGIC,
    MAX_BODY,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
)

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_BODY",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "MessageType",
    "encode_frame",
]
