"""libFuzzer harness (atheris) for nitrolesion.wire.messages.decode_message.

Invariant, as in tests/test_message_decoding.py: any body, for any message type, is
decoded into that type's message class or raises ProtocolError whose text fits an ERROR
frame (MAX_ERROR_TEXT). Anything else (ValueError, RecursionError, a decode that takes
seconds) is a crash. Input layout: byte 0 picks the message type, the rest is the body.

Run through the Makefile (bounded; `make fuzz` runs this and fuzz_frames.py):
    make fuzz FUZZ_SECONDS=60
or directly:
    PYTHONPATH=. .venv/bin/python fuzz/fuzz_messages.py -max_total_time=60 \\
        -artifact_prefix=fuzz/crashes/messages- fuzz/corpus-messages

When it finds a crash (fuzz/crashes/messages-crash-<sha1>):
1. reproduce it:  PYTHONPATH=. .venv/bin/python fuzz/fuzz_messages.py fuzz/crashes/messages-crash-...
2. copy the file to fuzz/regressions/messages/<what-it-is> (a short descriptive name);
   tests/test_message_decoding.py::test_fuzz_regression replays every file there through
   ``check_one`` on each pytest run, without atheris, so it fails until the bug is fixed;
3. fix the bug, and add a named test in tests/test_message_decoding.py saying what broke;
4. leave fuzz/crashes/ empty (it is the inbox, regressions/ is the archive).
"""

from __future__ import annotations

import sys
import time

MAX_SECONDS_PER_INPUT = 1.0

try:
    import atheris
except ImportError:  # replaying regressions under pytest does not need atheris
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        from nitrolesion.errors import ProtocolError
        from nitrolesion.wire.frames import Frame, MessageType
        from nitrolesion.wire.messages import MAX_ERROR_TEXT, MESSAGE_CLASSES, decode_message
else:
    from nitrolesion.errors import ProtocolError
    from nitrolesion.wire.frames import Frame, MessageType
    from nitrolesion.wire.messages import MAX_ERROR_TEXT, MESSAGE_CLASSES, decode_message

_TYPES = list(MessageType)


def check_one(data: bytes) -> None:
    """Raise AssertionError (or let an unexpected exception escape) if the invariant breaks."""
    if not data:
        return
    msg_type = _TYPES[data[0] % len(_TYPES)]
    started = time.perf_counter()
    try:
        message = decode_message(Frame(msg_type, data[1:]))
    except ProtocolError as exc:
        if len(str(exc)) > MAX_ERROR_TEXT:
            raise AssertionError(f"error text of {len(str(exc))} characters") from exc
    else:
        if type(message) is not MESSAGE_CLASSES[msg_type]:
            raise AssertionError(f"{msg_type.name} decoded as {type(message).__name__}")
    if time.perf_counter() - started > MAX_SECONDS_PER_INPUT:
        raise AssertionError(f"decoding took {time.perf_counter() - started:.1f} s")


def main() -> None:
    atheris.Setup(sys.argv, check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
