"""libFuzzer harness (atheris) for nitrolesion.wire.frames.FrameDecoder.

Invariant, as in tests/test_frames.py::test_any_bytes_parse_or_raise_protocol_error: any
input, split into any chunks and fed to a decoder with any max_body, either yields frames
or raises ProtocolError. Anything else (IndexError, struct.error, MemoryError, a frame
longer than max_body, bytes lost or invented) is a crash.

Run through the Makefile (bounded):   make fuzz            # FUZZ_SECONDS=60 by default
or directly:  .venv/bin/python fuzz/fuzz_frames.py -max_total_time=60 \
                  -artifact_prefix=fuzz/crashes/ fuzz/corpus

When it finds a crash (fuzz/crashes/crash-<sha1>):
1. reproduce it:  PYTHONPATH=. .venv/bin/python fuzz/fuzz_frames.py fuzz/crashes/crash-...
   (libFuzzer runs just that input and prints the traceback);
2. decode what the input means: the first bytes are max_body and the chunk cuts
   (FuzzedDataProvider), the rest is the stream; write an explicit regression test in
   tests/test_frames.py that feeds that stream with those chunks and asserts
   ProtocolError or the right frames, named after the bug;
3. keep the input as fuzz/regressions/frames/<what-it-is> and add it to fuzz/corpus/ so
   later campaigns start from it; fix the bug; leave fuzz/crashes/ empty.
The message decoder has its own harness, fuzz/fuzz_messages.py, whose regressions are
replayed by pytest without atheris.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from nitrolesion.errors import ProtocolError
    from nitrolesion.wire.frames import (
        DecoderState,
        FrameDecoder,
        encode_frame,
    )

# Small limits keep each input fast and let the fuzzer reach the "too large" and
# "buffer limit" paths with short inputs.
MAX_FUZZ_BODY = 512
MAX_CHUNKS = 16


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_body = fdp.ConsumeIntInRange(0, MAX_FUZZ_BODY)
    n_cuts = fdp.ConsumeIntInRange(0, MAX_CHUNKS)
    cuts = sorted(fdp.ConsumeIntInRange(0, 4096) for _ in range(n_cuts))
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    bounds = [0, *(c for c in cuts if c <= len(stream)), len(stream)]

    decoder = FrameDecoder(max_body=max_body)
    consumed = bytearray()
    try:
        for start, end in zip(bounds, bounds[1:]):
            decoder.feed(stream[start:end])
            while (frame := decoder.next_frame()) is not None:
                if len(frame.body) > max_body:
                    raise AssertionError(f"frame body {len(frame.body)} > max_body {max_body}")
                consumed += encode_frame(frame.type, frame.body, max_body=max_body)
    except ProtocolError:
        if decoder.state is not DecoderState.ERROR:
            raise AssertionError("ProtocolError raised but decoder not in ERROR state")
        # The error state must be sticky.
        try:
            decoder.next_frame()
        except ProtocolError:
            return
        raise AssertionError("decoder accepted a call after a ProtocolError")
    # Every frame returned re-encodes to exactly the bytes it came from, and the rest is
    # still buffered: nothing lost, nothing invented.
    if not stream.startswith(bytes(consumed)):
        raise AssertionError("decoded frames do not re-encode to the input prefix")
    if decoder.buffered != len(stream) - len(consumed):
        raise AssertionError("buffered byte count does not match unconsumed input")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
