"""Frame encoder/decoder: whole buffer, byte at a time, trailing junk, hostile headers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitrolesion.errors import (
    BadMagic,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    UnknownMessageType,
    UnsupportedVersion,
)
from nitrolesion.wire.frames import (
    HEADER_SIZE,
    MAX_BODY,
    MIN_BUFFER_LIMIT,
    PROTOCOL_VERSION,
    DecoderState,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
)

SAMPLE = [
    Frame(MessageType.HELLO, b"nonce-0123456789"),
    Frame(MessageType.GOODBYE, b""),
    Frame(MessageType.SEALED_REQUEST, bytes(range(256)) * 40),
    Frame(MessageType.ERROR, b"\x00NL\x01"),  # body that looks like a header
]


def raw_header(magic=b"NL", version=PROTOCOL_VERSION, msg_type=3, length=0) -> bytes:
    return struct.pack(">2sBBQ", magic, version, msg_type, length)


def drain(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def stream() -> bytes:
    return b"".join(encode_frame(f.type, f.body) for f in SAMPLE)


def test_header_layout():
    data = encode_frame(MessageType.SESSION_RESULT, b"xyz")
    assert data == b"NL\x02\x0b" + (3).to_bytes(8, "big") + b"xyz"
    assert HEADER_SIZE == 12
    assert MAX_BODY == 24 * 1024 * 1024


def test_message_type_values():
    assert [(t.name, t.value) for t in MessageType] == [
        ("ENCLAVE_ANNOUNCE", 1), ("ANNOUNCE_ACK", 2), ("HELLO", 3), ("ATTESTATION", 4),
        ("SEALED_REQUEST", 5), ("SEALED_RESULT", 6), ("ACCEPTED", 7), ("SESSION_OPEN", 8),
        ("SESSION_READY", 9), ("SESSION_CLASSIFY", 10), ("SESSION_RESULT", 11),
        ("ERROR", 12), ("GOODBYE", 13),
    ]  # fmt: skip


def test_whole_buffer_several_frames_in_one_feed():
    decoder = FrameDecoder()
    decoder.feed(stream())
    assert drain(decoder) == SAMPLE
    assert decoder.at_frame_boundary and decoder.buffered == 0


def test_byte_at_a_time():
    decoder = FrameDecoder()
    got = []
    for i in range(len(data := stream())):
        decoder.feed(data[i : i + 1])
        got.extend(drain(decoder))
    assert got == SAMPLE
    assert decoder.at_frame_boundary


def test_returned_type_is_enum():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(5, b"x"))
    frame = decoder.next_frame()
    assert frame.type is MessageType.SEALED_REQUEST and frame.body == b"x"


def test_trailing_partial_frame_waits():
    decoder = FrameDecoder()
    partial = encode_frame(MessageType.HELLO, b"abcdef")[:-2]
    decoder.feed(stream() + partial)
    assert drain(decoder) == SAMPLE
    assert decoder.buffered == len(partial) and not decoder.at_frame_boundary
    decoder.feed(b"ef")
    assert decoder.next_frame() == Frame(MessageType.HELLO, b"abcdef")


def test_trailing_junk_after_valid_frames():
    decoder = FrameDecoder()
    decoder.feed(stream() + b"GET / HTTP/1.1\r\n")
    assert [decoder.next_frame() for _ in SAMPLE] == SAMPLE
    with pytest.raises(BadMagic, match=r"expected b'NL', got b'GE'"):
        decoder.next_frame()


def test_bad_magic_detected_from_first_byte():
    decoder = FrameDecoder()
    decoder.feed(b"\x16")  # a TLS ClientHello starts like this
    with pytest.raises(BadMagic):
        decoder.next_frame()


@pytest.mark.parametrize("version", [1, 3, 255])
def test_unsupported_version(version):
    # Version 1 is the protocol before enclave randomness entered the session keys: an old
    # peer is told plainly, from the third header byte.
    decoder = FrameDecoder()
    decoder.feed(raw_header(version=version)[:3])
    with pytest.raises(UnsupportedVersion, match=f"unsupported protocol version {version}: "
                                                 "this side speaks version 2; run the same"):
        decoder.next_frame()


@pytest.mark.parametrize("msg_type", [0, 14, 255])
def test_unknown_message_type(msg_type):
    decoder = FrameDecoder()
    decoder.feed(raw_header(msg_type=msg_type))
    with pytest.raises(UnknownMessageType, match=f"unknown message type {msg_type}"):
        decoder.next_frame()


@pytest.mark.parametrize("length", [MAX_BODY + 1, 2**63, 2**64 - 1])
def test_oversize_rejected_from_header_alone(length):
    decoder = FrameDecoder()
    decoder.feed(raw_header(length=length))
    with pytest.raises(FrameTooLarge, match=f"declared {length} bytes, limit {MAX_BODY}"):
        decoder.next_frame()


def test_exactly_max_body_accepted_with_custom_limit():
    decoder = FrameDecoder(max_body=100)
    decoder.feed(encode_frame(MessageType.HELLO, b"a" * 100, max_body=100))
    assert decoder.next_frame().body == b"a" * 100
    decoder.feed(raw_header(length=101))
    with pytest.raises(FrameTooLarge, match="declared 101 bytes, limit 100"):
        decoder.next_frame()


def test_error_state_is_sticky():
    decoder = FrameDecoder()
    decoder.feed(b"XX")
    with pytest.raises(BadMagic):
        decoder.next_frame()
    assert decoder.state is DecoderState.ERROR
    with pytest.raises(ProtocolError, match="ERROR state"):
        decoder.next_frame()
    with pytest.raises(ProtocolError, match="ERROR state"):
        decoder.feed(encode_frame(MessageType.HELLO, b""))


def test_buffer_is_bounded():
    decoder = FrameDecoder(max_body=MIN_BUFFER_LIMIT)
    limit = decoder.buffer_limit
    assert limit == 2 * (HEADER_SIZE + MIN_BUFFER_LIMIT)
    # A legitimate backlog up to the limit is fine ...
    decoder.feed(encode_frame(MessageType.HELLO, b"z" * 1000, max_body=MIN_BUFFER_LIMIT))
    decoder.feed(b"\x00" * (decoder.capacity_left))
    assert decoder.buffered == limit
    # ... one byte more is refused and poisons the decoder.
    with pytest.raises(ProtocolError, match="buffer limit exceeded"):
        decoder.feed(b"\x00")
    assert decoder.state is DecoderState.ERROR and decoder.buffered == 0


def test_small_max_body_still_accepts_a_socket_read_of_small_frames():
    decoder = FrameDecoder(max_body=16)
    data = encode_frame(MessageType.GOODBYE, b"") * 2000  # 24 000 bytes
    decoder.feed(data)
    assert len(drain(decoder)) == 2000


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((99, b""), {}, "unknown message type 99"),
        ((MessageType.HELLO, "text"), {}, "must be bytes"),
        ((MessageType.HELLO, b"abc"), {"max_body": 2}, "3 bytes, limit is 2"),
        ((MessageType.HELLO, b""), {"max_body": -1}, "max_body"),
        ((True, b""), {}, "must be an int"),
    ],
)
def test_encode_misuse_is_local_error(args, kwargs, message):
    with pytest.raises(LocalProtocolError, match=message):
        encode_frame(*args, **kwargs)
    assert issubclass(LocalProtocolError, ValueError)


def test_default_encode_limit_rejects_oversize_body():
    with pytest.raises(LocalProtocolError):
        encode_frame(MessageType.SEALED_REQUEST, bytes(MAX_BODY + 1))


def test_decoder_rejects_bad_max_body():
    with pytest.raises(LocalProtocolError):
        FrameDecoder(max_body=2**64)


# Valid headers with arbitrary bodies: hypothesis rarely finds "NL\x01" by chance.
frames_strategy = st.lists(
    st.builds(Frame, st.sampled_from(list(MessageType)), st.binary(max_size=200)),
    max_size=8,
)


@st.composite
def mutated_streams(draw):
    """Valid frames, then a few bytes overwritten: reaches the checks past the magic."""
    data = bytearray(b"".join(encode_frame(f.type, f.body) for f in draw(frames_strategy)))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data) + draw(st.binary(max_size=20))


# The fuzz invariant (fuzz/fuzz_frames.py) as a property test: any byte string, split
# anywhere, either parses into frames or raises ProtocolError, never anything else. Crashes
# found by the fuzzer become explicit regression tests above.
@settings(max_examples=300, deadline=None, print_blob=True)
@given(
    data=st.one_of(st.binary(max_size=300), mutated_streams()),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    max_body=st.integers(min_value=0, max_value=256),
)
def test_any_bytes_parse_or_raise_protocol_error(data, cuts, max_body):
    decoder = FrameDecoder(max_body=max_body)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    consumed = b""
    try:
        for start, end in zip(bounds, bounds[1:]):
            decoder.feed(data[start:end])
            for frame in drain(decoder):
                assert len(frame.body) <= max_body
                consumed += encode_frame(frame.type, frame.body, max_body=max_body)
    except ProtocolError:
        assert decoder.state is DecoderState.ERROR
        return
    # No error: every byte is accounted for by a re-encodable frame or the pending tail.
    assert data.startswith(consumed)
    assert decoder.buffered == len(data) - len(consumed)


@settings(max_examples=200, deadline=None, print_blob=True)
@given(frames=frames_strategy, chunk=st.integers(min_value=1, max_value=64))
def test_round_trip_any_chunking(frames, chunk):
    data = b"".join(encode_frame(f.type, f.body) for f in frames)
    decoder = FrameDecoder(max_body=200)
    got = []
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
        got.extend(drain(decoder))
    assert got == frames
    assert decoder.at_frame_boundary
