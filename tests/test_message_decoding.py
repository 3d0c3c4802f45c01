"""decode_message: any body for any type parses or raises ProtocolError, never anything else.

The hypothesis tests state the invariant of fuzz/fuzz_messages.py; the regression tests
below pin the inputs that broke it (found while hardening, see docs/ROBUSTNESS.md), and
fuzz/regressions/messages/ replays every crash the atheris harness has found.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nitrolesion.errors import ProtocolError
from nitrolesion.wire.frames import Frame, MessageType
from nitrolesion.wire.messages import (
    MAX_CBOR_DEPTH, MAX_CBOR_ITEMS, MAX_ERROR_TEXT, MESSAGE_CLASSES, Hello, SessionClassify,
    check_plain_cbor, decode_message, loads_plain)

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = ROOT / "fuzz" / "regressions" / "messages"
FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow], print_blob=True)
TYPES = st.sampled_from(list(MessageType))


def decode_or_protocol_error(msg_type: MessageType, body: bytes):
    try:
        message = decode_message(Frame(msg_type, body))
    except ProtocolError as exc:
        assert len(str(exc)) <= MAX_ERROR_TEXT, "error text must fit an ERROR frame"
        return exc
    assert type(message) is MESSAGE_CLASSES[msg_type]
    return message


@FUZZ
@given(TYPES, st.binary(max_size=512))
def test_any_bytes_for_any_type(msg_type, body):
    decode_or_protocol_error(msg_type, body)


# CBOR values shaped like our messages, so the fuzzer reaches the field checks.
_leaves = (st.binary(max_size=64) | st.text(max_size=16) | st.integers(-2**70, 2**70)
           | st.booleans() | st.none() | st.floats(allow_nan=True))
_values = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_field_names = st.sampled_from(sorted({name for cls in MESSAGE_CLASSES.values()
                                       for name in cls.SCHEMA}) + ["x"])


@FUZZ
@given(TYPES, st.dictionaries(_field_names | st.text(max_size=8), _values, max_size=6))
def test_message_shaped_maps(msg_type, data):
    decode_or_protocol_error(msg_type, cbor2.dumps(data))


@FUZZ
@given(TYPES, st.data())
def test_valid_body_with_one_byte_changed(msg_type, data):
    valid = {
        MessageType.HELLO: Hello(b"n" * 32).to_body(),
        MessageType.SESSION_CLASSIFY: SessionClassify(7, b"c" * 40).to_body(),
    }.get(msg_type, cbor2.dumps({}))
    index = data.draw(st.integers(0, len(valid) - 1))
    byte = data.draw(st.integers(0, 255))
    decode_or_protocol_error(msg_type, valid[:index] + bytes([byte]) + valid[index + 1:])


# -- regressions -------------------------------------------------------------------------------
def test_regression_bignum_key_raised_value_error():
    """A 1 MiB bignum map key made the error text call str() on it: ValueError escaped."""
    body = b"\xa1\xc2\x5a\x00\x10\x00\x00" + b"\x09" * 0x100000 + b"\x00"
    with pytest.raises(ProtocolError, match="CBOR tag 2 is not accepted"):
        decode_message(Frame(MessageType.HELLO, body))


def test_regression_rational_tag_is_refused_before_any_arithmetic():
    """Tag 30 made cbor2 build a Fraction: a quadratic gcd holding the GIL (~23 s for 640 KB)."""
    numerator, denominator = (b"\xc2" + cbor2.dumps(os.urandom(320_000)) for _ in range(2))
    body = b"\xa1" + cbor2.dumps("nonce") + b"\xd8\x1e\x82" + numerator + denominator
    started = time.perf_counter()
    with pytest.raises(ProtocolError, match="CBOR tag 30 is not accepted"):
        decode_message(Frame(MessageType.HELLO, body))
    assert time.perf_counter() - started < 0.5


def test_regression_long_keys_made_an_error_too_long_to_send():
    body = cbor2.dumps({"k" * 2000 + str(i): b"" for i in range(20)})
    with pytest.raises(ProtocolError) as info:
        decode_message(Frame(MessageType.HELLO, body))
    assert len(str(info.value)) <= MAX_ERROR_TEXT
    assert str(info.value).endswith("... 14 more")


def test_trailing_bytes_and_duplicate_keys_are_refused():
    with pytest.raises(ProtocolError, match="1 bytes after the CBOR item"):
        decode_message(Frame(MessageType.HELLO, Hello(b"n" * 32).to_body() + b"\x00"))
    duplicate = b"\xa2" + cbor2.dumps("nonce") + cbor2.dumps(b"a" * 16) + cbor2.dumps("nonce") \
        + cbor2.dumps(b"b" * 16)
    with pytest.raises(ProtocolError, match="repeats a key"):
        decode_message(Frame(MessageType.HELLO, duplicate))


@pytest.mark.parametrize("data, message", [
    (b"\x9f\x01\xff", "additional information 31"),       # indefinite-length array
    (b"\x81" * (MAX_CBOR_DEPTH + 1) + b"\x00", "nesting deeper"),
    (b"\x9b" + (2**63).to_bytes(8, "big"), "declares 9223372036854775808 items"),
    (b"\x5b" + (2**63).to_bytes(8, "big"), "declares 9223372036854775808 bytes"),
    (b"\x99\x01\x01" + b"\x00" * 257, f"more than {MAX_CBOR_ITEMS} items"),
    (b"\xd8\x23" + cbor2.dumps("(a+)+$"), "tag 35"),       # regex
    (b"\xd8\x1c\x81\xd8\x1d\x00", "tag 28"),               # shared (cyclic) reference
    (b"", "truncated"),
    (b"\x1b\x00", "truncated"),
])
def test_check_plain_cbor_refuses(data, message):
    with pytest.raises(ProtocolError, match=message):
        check_plain_cbor(data)


def test_loads_plain_accepts_what_we_send():
    result = {"request": 3, "result": {"code": "nv", "name": "Melanocytic Nevi",
                                       "confidence": 0.75,
                                       "probabilities": {str(i): 0.1 for i in range(7)}}}
    assert loads_plain(cbor2.dumps(result)) == result
    for cls in MESSAGE_CLASSES.values():
        if not cls.SCHEMA:
            assert decode_message(Frame(cls.TYPE, cls().to_body())) == cls()


def _regression_inputs() -> list[Path]:
    return sorted(p for p in REGRESSIONS.glob("*") if p.is_file() and p.name != "README")


@pytest.mark.parametrize("path", _regression_inputs(), ids=lambda p: p.name)
def test_fuzz_regression(path):
    """Every crash input atheris found, replayed through the harness's own check."""
    from fuzz_messages import check_one  # fuzz/ is on sys.path through pytest.ini
    check_one(path.read_bytes())
