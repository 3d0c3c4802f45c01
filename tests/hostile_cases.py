"""Hostile inputs against a running enclave stack: one definition for tests and the report.

Every case here is a function ``action(ctx, attempt) -> Outcome`` run against a real
``parent.py server`` and ``enclave/app.py`` (tests/harness.py, TCP loopback), plus the
outcome the peer must get (``codes`` and a ``text`` pattern). After each case
``HostileContext.serving(target)`` proves the server still serves: for the enclave a full
attested session classifying a reference image, checked against the in-process classifier;
for the parent server a new connection that announces and gets ANNOUNCE_ACK.

tests/test_hostile_*.py and tests/test_faults.py run each case once and assert;
scripts/robustness_report.py runs each many times and writes docs/ROBUSTNESS.md. Both take
the cases from here, so the report and the tests cannot drift apart.

Outcome codes are the ERROR code the peer received (BAD_FRAME, TIMEOUT, ...), a per-image
error code from a sealed session result (BAD_IMAGE, ...), or one of: OK (classified and
correct), ACCEPTED (one-shot queued), CLOSED (the server closed without an answer),
NO_ANSWER (nothing within the wait), WRONG_RESULT / SESSION_BROKEN (test failures).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
import resource
import select
import signal
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cbor2
from PIL import Image, ImageDraw, ImageFilter


from harness import EnclaveStack
from nitrolesion.crypto.envelope import (
    generate_keypair, load_public_key, new_request_id, public_key_der, request_aad,
    seal, sealed_request_aad)
from nitrolesion.crypto.keystore import ParentKeyStore
from nitrolesion.crypto.keywrap import wrap_session_secret
from nitrolesion.crypto.session import new_session_id, new_session_secret
from nitrolesion.protocol import ClientSession, PeerError, ResultReceived, SessionEstablished
from nitrolesion.errors import (
    ConnectionClosed, NitroLesionError, ProtocolError, TransportError,
    TransportTimeout)
from nitrolesion.model.classifier import LesionModel
from nitrolesion.transport import FramedConnection, TcpEndpoint, connect
from nitrolesion.wire.frames import HEADER, MAGIC, PROTOCOL_VERSION, MessageType, encode_frame
from nitrolesion.wire.messages import (
    MAX_ERROR_TEXT, AnnounceAck, Attestation, EnclaveAnnounce, ErrorMessage, Hello,
    SealedRequest, SessionClassify, SessionOpen, decode_message)
from nitrolesion.parent.enclave_client import EnclaveClient
from nitrolesion.parent.server import load_announcement

# -- the stack every case runs against ---------------------------------------------------
#: Short server timeouts so slow-peer cases take about a second, not the production 5-30 s.
HANDSHAKE_TIMEOUT = 1.0
IO_TIMEOUT = 2.0
#: Image limits lowered from the 20 MiB / 40 MP defaults so "over the limit" cases stay
#: small and fast; the check is the same code path.
MAX_IMAGE_BYTES = 2_000_000
MAX_IMAGE_PIXELS = 4_000_000
ENCLAVE_OPTIONS = ("--workers", "1", "--handshake-timeout", str(HANDSHAKE_TIMEOUT),
                   "--io-timeout", str(IO_TIMEOUT), "--max-image-bytes", str(MAX_IMAGE_BYTES),
                   "--max-image-pixels", str(MAX_IMAGE_PIXELS))
#: The parent server's cap is small so a flood is refused from the 5th connection on.
PARENT_MAX_CONNECTIONS = 4
SERVER_OPTIONS = ("--handshake-timeout", str(HANDSHAKE_TIMEOUT), "--io-timeout", str(IO_TIMEOUT),
                  "--max-connections", str(PARENT_MAX_CONNECTIONS))
#: Seconds beyond a server timeout we wait for its answer before calling it NO_ANSWER.
ANSWER_SLACK = 4.0
#: Client-side budget for a normal request in the serving check and the fault cases.
CLIENT_TIMEOUT = 15.0
#: Sockets opened at once by the flood cases: well past both connection caps and the
#: listen backlogs, yet far below the 20000-descriptor limit of this machine.
FLOOD_SOCKETS = 1500
#: Probabilities from the enclave must equal the in-process ones to this tolerance (same
#: model, same preprocessing, one thread each: in practice they are bit-identical).
PROBABILITY_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Outcome:
    """What the peer observed: a code (see the module docstring) and its text."""

    code: str
    text: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.code}: {self.text}" if self.text else self.code


@dataclass(frozen=True)
class HostileCase:
    """One hostile action and the answer the peer must get for it."""

    name: str
    group: str  # frames | crypto | images | flood
    target: str  # enclave | parent
    summary: str
    action: Callable[["HostileContext", int], Outcome]
    codes: frozenset[str]
    text: str | None = None  # regex the outcome text must match (re.search)
    max_seconds: float | None = None  # the answer must come at least this fast

    def problems(self, outcome: Outcome) -> list[str]:
        """Why ``outcome`` is not the expected one (empty list if it is)."""
        found = []
        if outcome.code not in self.codes:
            found.append(f"expected code in {sorted(self.codes)}, got {outcome.code}")
        if self.text is not None and not re.search(self.text, outcome.text):
            found.append(f"expected text matching {self.text!r}, got {outcome.text!r}")
        if self.max_seconds is not None and outcome.seconds > self.max_seconds:
            found.append(f"expected an answer within {self.max_seconds} s, "
                         f"got one after {outcome.seconds:.2f} s")
        return found

    def check(self, outcome: Outcome) -> None:
        """Raises AssertionError naming every mismatch."""
        found = self.problems(outcome)
        if found:
            raise AssertionError(f"{self.name}: " + "; ".join(found))


# -- synthetic images (never files from the dataset) ---------------------------------------
def lesion_image(size: tuple[int, int] = (600, 450), seed: int = 0) -> Image.Image:
    """A dermatoscope-like RGB picture: skin tone, a blurred dark blob, a little noise."""
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, (224, 172, 150))
    draw = ImageDraw.Draw(image)
    cx, cy = width // 2 + rng.randint(-20, 20), height // 2 + rng.randint(-20, 20)
    for radius, colour in ((0.30, (150, 95, 70)), (0.20, (110, 60, 45)), (0.10, (70, 40, 35))):
        rx, ry = int(width * radius), int(height * radius * rng.uniform(0.8, 1.2))
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=max(2, width // 60)))
    noise = Image.effect_noise(size, 12).convert("RGB")
    return Image.blend(image, noise, 0.08)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def reference_jpeg() -> bytes:
    """The image every serving check classifies."""
    return encode(lesion_image(), "JPEG", quality=90)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(width: int = 50000, height: int = 50000) -> bytes:
    """A ~100-byte PNG whose header declares width x height RGB pixels (7.5 GB decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096, 9)) + _png_chunk(b"IEND", b""))


def grey_pixel_tiff(*, second_page_without_dimensions: bool) -> bytes:
    """A little-endian TIFF: page 1 is one grey pixel; optionally a page 2 with no width or
    length tags, which page 1's next-page pointer leads to."""
    def ifd(entries, next_offset):
        body = struct.pack("<H", len(entries))
        body += b"".join(struct.pack("<HHII", tag, 3, 1, value) for tag, value in entries)  # SHORT
        return body + struct.pack("<I", next_offset)

    first_at = 8
    second_at = first_at + 2 + 9 * 12 + 4
    pixel_at = second_at + 2 + 1 * 12 + 4
    first = ifd([(256, 1), (257, 1), (258, 8), (259, 1), (262, 1), (273, pixel_at),
                 (277, 1), (278, 1), (279, 1)], second_at if second_page_without_dimensions else 0)
    second = ifd([(259, 1)], 0)
    return b"II*\x00" + struct.pack("<I", first_at) + first + second + b"\x80"


def animated_gif() -> bytes:
    frames = [lesion_image((200, 150), seed).convert("P") for seed in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png_16bit() -> bytes:
    gray = lesion_image((300, 225)).convert("L")
    wide = Image.frombytes("I;16", gray.size, bytes(b for v in gray.tobytes() for b in
                                                    (v * 257).to_bytes(2, "little")))
    data = encode(wide, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I"), "expected a 16-bit PNG"
    return data


def cmyk_jpeg() -> bytes:
    return encode(lesion_image((400, 300)).convert("CMYK"), "JPEG", quality=90)


def exif_rotated_jpeg() -> bytes:
    """A portrait-stored JPEG whose EXIF orientation (6) says to rotate it upright."""
    image = lesion_image((300, 400))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return encode(image, "JPEG", quality=90, exif=exif.tobytes())


def over_byte_limit() -> bytes:
    data = reference_jpeg()
    return data + b"\x00" * (MAX_IMAGE_BYTES + 1 - len(data))


def over_pixel_limit() -> bytes:
    """A real, tiny PNG of 2100 x 2000 = 4.2 MP, over the 4 MP configured for the stack."""
    return encode(Image.new("RGB", (2100, 2000), (200, 150, 130)), "PNG", optimize=True)


# -- the running stack ----------------------------------------------------------------------
class HostileContext:
    """A running EnclaveStack plus what the cases need: trust, reference answers, keys."""

    def __init__(self, stack: EnclaveStack, model: LesionModel | None = None) -> None:
        self.stack = stack
        self.reference = reference_jpeg()
        self.model = model or LesionModel()
        self._classifier = self.model.new_classifier()
        self._expected: dict[bytes, dict] = {}
        self._trust = stack.trust()
        self._parent_key = ParentKeyStore(stack.key_dir).load_or_create()
        self._stranger_key = None
        self._lock = threading.Lock()

    # where things are
    def address(self, target: str) -> tuple[str, int]:
        port = self.stack.client_port if target == "enclave" else self.stack.parent_port
        return ("127.0.0.1", port)

    def endpoint(self, target: str = "enclave") -> TcpEndpoint:
        return TcpEndpoint(self.address(target)[1])

    @property
    def parent_public_key(self) -> bytes:
        return public_key_der(self._parent_key)

    def stranger_key(self):
        """An RSA-3072 key that is not the enclave's (generated once; ~1 s)."""
        with self._lock:
            if self._stranger_key is None:
                self._stranger_key = generate_keypair()
            return self._stranger_key

    # what a correct answer is
    def expected(self, image: bytes) -> dict:
        """The in-process classification of ``image`` with the stack's limits."""
        digest = hashlib.sha256(image).digest()
        with self._lock:
            if digest not in self._expected:
                prediction = self._classifier.classify(image, max_bytes=MAX_IMAGE_BYTES,
                                                       max_pixels=MAX_IMAGE_PIXELS)
                self._expected[digest] = {"code": prediction.code,
                                          "probabilities": prediction.probabilities}
            return self._expected[digest]

    def matches(self, image: bytes, result) -> bool:
        expected = self.expected(image)
        return result.code == expected["code"] and all(
            abs(result.probabilities[k] - v) <= PROBABILITY_TOLERANCE
            for k, v in expected["probabilities"].items())

    # normal traffic
    def client(self, timeout: float = CLIENT_TIMEOUT) -> EnclaveClient:
        """An attested EnclaveClient (close it)."""
        client = EnclaveClient(self.endpoint(), self._trust, timeout=timeout)
        try:
            client.attest()
        except BaseException:
            client.close()
            raise
        return client

    def classify(self, images: list[bytes], timeout: float = CLIENT_TIMEOUT) -> list:
        """Classify over one new session; a list of ImageOutcome in input order."""
        with self.client(timeout) as client:
            client.open_session()
            outcomes = list(client.classify_many(images))
        return sorted(outcomes, key=lambda o: o.index)

    def serving(self, target: str, busy_wait: float = 3.0) -> Outcome:
        """Prove ``target`` still serves a normal request; Outcome code OK if it does.

        A BUSY answer is retried for up to ``busy_wait`` seconds: a case that just closed
        its connections may still hold a slot for the moment the server needs to notice.
        """
        started = time.monotonic()
        while True:
            outcome = self._serve_once(target)
            waited = time.monotonic() - started
            if outcome.code == "OK" or "BUSY" not in str(outcome) or waited >= busy_wait:
                return Outcome(outcome.code, outcome.text, waited)
            time.sleep(0.05)

    def _serve_once(self, target: str) -> Outcome:
        started = time.monotonic()
        try:
            if target == "enclave":
                (outcome,) = self.classify([self.reference])
                if outcome.error is not None:
                    return Outcome(outcome.error[0], outcome.error[1])
                if not self.matches(self.reference, outcome.result):
                    return Outcome("WRONG_RESULT", str(outcome.result))
                return Outcome("OK", outcome.result.code, time.monotonic() - started)
            return self._announce_again(started)
        except NitroLesionError as exc:
            return Outcome(type(exc).__name__, str(exc), time.monotonic() - started)

    def fresh_announcement(self) -> EnclaveAnnounce:
        """A genuine announcement made now: a key of ours attested by the stack's development
        authority (the stored one ages past the server's 5-minute limit in long runs)."""
        key = public_key_der(self.stranger_key())
        return EnclaveAnnounce(key, self.stack.authority.attest(public_key=key))

    def _announce_again(self, started: float) -> Outcome:
        announcement = self.fresh_announcement()
        with connect(self.endpoint("parent"), timeout=CLIENT_TIMEOUT) as connection:
            connection.send(announcement.TYPE, announcement.to_body())
            reply = decode_message(connection.receive())
        if isinstance(reply, AnnounceAck):
            return Outcome("OK", "announce acknowledged", time.monotonic() - started)
        if isinstance(reply, ErrorMessage):
            return Outcome(reply.code, reply.message)
        return Outcome(type(reply).__name__, str(reply))

    def raw_socket(self, target: str) -> socket.socket:
        sock = socket.create_connection(self.address(target), timeout=CLIENT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


# -- reading what the server answered ---------------------------------------------------------
def answer(connection: FramedConnection, wait: float, started: float) -> Outcome:
    """The next thing the server sent, as an Outcome (an ERROR frame gives its code)."""
    try:
        message = decode_message(connection.receive(timeout=wait))
    except ConnectionClosed:
        return Outcome("CLOSED", "closed without an answer", time.monotonic() - started)
    except TransportTimeout:
        return Outcome("NO_ANSWER", f"nothing within {wait:g} s", time.monotonic() - started)
    except TransportError as exc:
        return Outcome("CLOSED", f"connection ended: {exc}", time.monotonic() - started)
    except ProtocolError as exc:
        return Outcome("GARBAGE", str(exc), time.monotonic() - started)
    elapsed = time.monotonic() - started
    if isinstance(message, ErrorMessage):
        assert len(message.message) <= MAX_ERROR_TEXT
        return Outcome(message.code, message.message, elapsed)
    return Outcome(message.TYPE.name, "", elapsed)


def _framed(sock: socket.socket) -> FramedConnection:
    return FramedConnection(sock, timeout=CLIENT_TIMEOUT)


def send_raw(target: str, payload: Callable[[int], bytes], *, hold: float = 0.0,
             eof: bool = False, wait: float | None = None):
    """An action: connect, write ``payload(attempt)``, optionally EOF, report the answer."""
    def action(ctx: HostileContext, attempt: int) -> Outcome:
        with ctx.raw_socket(target) as sock:
            started = time.monotonic()
            data = payload(attempt)
            if data:
                sock.sendall(data)
            if eof:
                sock.shutdown(socket.SHUT_WR)
            return answer(_framed(sock), wait or HANDSHAKE_TIMEOUT + ANSWER_SLACK, started)
    return action


def header(msg_type: int = MessageType.HELLO, length: int = 0, *, version: int = PROTOCOL_VERSION,
           magic: bytes = MAGIC) -> bytes:
    return HEADER.pack(magic, version, msg_type, length)


def random_garbage(attempt: int) -> bytes:
    data = bytearray(random.Random(attempt).randbytes(256))
    data[0] = data[0] if data[0] != MAGIC[0] else 0  # never a valid magic by chance
    return bytes(data)


def hello_frame() -> bytes:
    return encode_frame(MessageType.HELLO, Hello(os.urandom(32)).to_body())


def tag_bomb(attempt: int) -> bytes:
    """HELLO whose nonce is a CBOR rational of two 64 KiB bignums (tags 30 and 2).

    cbor2 used to build a Fraction from it, reducing it with a quadratic gcd while holding
    the GIL: a 640 KB body froze the whole process for ~20 s. Now refused from its head.
    """
    body = b"\xa1" + cbor2.dumps("nonce") + rational_bomb(random.Random(attempt))
    return encode_frame(MessageType.HELLO, body)


def rational_bomb(rng: random.Random, size: int = 65536) -> bytes:
    """CBOR tag 30 (rational) over two random tag-2 bignums of ``size`` bytes each."""
    numerator, denominator = (b"\xc2" + cbor2.dumps(rng.randbytes(size)) for _ in range(2))
    return b"\xd8\x1e\x82" + numerator + denominator


def long_keys(attempt: int) -> bytes:
    body = cbor2.dumps({f"{'k' * 2000}{i}": b"" for i in range(20)})
    return encode_frame(MessageType.HELLO, body)


def trickle(target: str, prelude: Callable[[HostileContext, FramedConnection], None] | None,
            msg_type: int, budget: float):
    """An action: optional prelude, then a valid header whose body arrives 1 byte / 0.2 s."""
    def action(ctx: HostileContext, attempt: int) -> Outcome:
        with ctx.raw_socket(target) as sock:
            connection = _framed(sock)
            if prelude is not None:
                prelude(ctx, connection)
            started = time.monotonic()
            sock.sendall(header(msg_type, 4096))
            deadline = started + budget + ANSWER_SLACK
            while time.monotonic() < deadline:
                readable, _, _ = select.select([sock], [], [], 0.2)
                if readable:
                    break
                try:
                    sock.send(b"\x00")
                except OSError:
                    break
            return answer(connection, max(0.5, deadline - time.monotonic()), started)
    return action


def say_hello(ctx: HostileContext, connection: FramedConnection) -> ClientSession:
    """HELLO / ATTESTATION through the client state machine, verified: state ATTESTED."""
    session = ClientSession()
    connection.send_frame(session.hello())
    event = session.receive(connection.receive())
    session.attestation_verified(ctx._trust.verify(
        Attestation(event.public_key, event.document), event.nonce))
    return session


def announce(ctx: HostileContext, connection: FramedConnection) -> None:
    announcement = ctx.fresh_announcement()
    connection.send(announcement.TYPE, announcement.to_body())
    assert isinstance(decode_message(connection.receive()), AnnounceAck)


def flood(target: str):
    """An action: open FLOOD_SOCKETS connections at once, collect answers, close them all."""
    def action(ctx: HostileContext, attempt: int) -> Outcome:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = FLOOD_SOCKETS + 256
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
        started = time.monotonic()
        sockets: list[socket.socket] = []
        counts = {"BUSY": 0, "TIMEOUT": 0, "CLOSED": 0, "NO_ANSWER": 0, "CONNECT_FAILED": 0}
        try:
            for _ in range(FLOOD_SOCKETS):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                if sock.connect_ex(ctx.address(target)) not in (0, errno.EINPROGRESS):
                    counts["CONNECT_FAILED"] += 1
                    sock.close()
                    continue
                sockets.append(sock)
            poller = select.poll()
            by_fd = {sock.fileno(): sock for sock in sockets}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            pending = dict(by_fd)
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT + ANSWER_SLACK
            while pending and time.monotonic() < deadline:
                for fd, _ in poller.poll(200):
                    sock = pending.pop(fd, None)
                    if sock is None:
                        continue
                    poller.unregister(fd)
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    counts[_flood_code(data)] += 1
            counts["NO_ANSWER"] += len(pending)
        finally:
            for sock in sockets:
                sock.close()
        text = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        code = "BUSY" if counts["BUSY"] and not counts["CONNECT_FAILED"] else "FLOOD_FAILED"
        return Outcome(code, f"{FLOOD_SOCKETS} sockets: {text}", time.monotonic() - started)
    return action


def _flood_code(data: bytes) -> str:
    if not data:
        return "CLOSED"
    try:
        message = decode_message(next(iter(_frames(data))))
    except (StopIteration, NitroLesionError):
        return "CLOSED"
    return message.code if isinstance(message, ErrorMessage) else "CLOSED"


def _frames(data: bytes):
    from nitrolesion.wire.frames import FrameDecoder

    decoder = FrameDecoder()
    decoder.feed(data)
    while (frame := decoder.next_frame()) is not None:
        yield frame


# -- crypto -----------------------------------------------------------------------------------
def _flip(data: bytes, rng: random.Random, within: int | None = None) -> bytes:
    """``data`` with one random bit flipped (in the first ``within`` bytes if given)."""
    index = rng.randrange(min(len(data), within or len(data)))
    out = bytearray(data)
    out[index] ^= 1 << rng.randrange(8)
    return bytes(out)


def sealed_request(ctx: HostileContext, session: ClientSession, image: bytes, *,
                   request_id: bytes | None = None, aad: bytes | None = None,
                   to_key=None) -> SealedRequest:
    """A SEALED_REQUEST built by hand on ``session``'s attested connection (its binding),
    so cases can change what the state machine never would."""
    request_id = request_id or new_request_id()
    aad = aad if aad is not None else sealed_request_aad(request_id, ctx.parent_public_key,
                                                         session.binding)
    sealed = seal(to_key or session.enclave_key, image, aad)
    return SealedRequest(request_id, ctx.parent_public_key, sealed.wrapped_key, sealed.nonce,
                         sealed.ciphertext)


Mutation = Callable[[HostileContext, SealedRequest, ClientSession, random.Random], SealedRequest]


def one_shot(mutate: Mutation):
    """An action: attest, seal the reference image, mutate the request, send, report."""
    def action(ctx: HostileContext, attempt: int) -> Outcome:
        rng = random.Random(attempt)
        ctx.stranger_key()  # RSA keygen takes seconds: never between HELLO and the request
        with connect(ctx.endpoint(), timeout=CLIENT_TIMEOUT) as connection:
            session = say_hello(ctx, connection)
            request = mutate(ctx, sealed_request(ctx, session, ctx.reference), session, rng)
            started = time.monotonic()
            connection.send(request.TYPE, request.to_body())
            return answer(connection, IO_TIMEOUT + ANSWER_SLACK, started)
    return action


def flip_field(name: str):
    def mutate(ctx, request: SealedRequest, key: bytes, rng: random.Random) -> SealedRequest:
        fields = {f: getattr(request, f) for f in ("request_id", "parent_public_key",
                                                   "wrapped_key", "nonce", "ciphertext")}
        fields[name] = _flip(fields[name], rng)
        return SealedRequest(**fields)
    return mutate


def sealed_to_stranger(ctx, request: SealedRequest, key: ClientSession, rng) -> SealedRequest:
    return sealed_request(ctx, key, ctx.reference, request_id=request.request_id,
                          to_key=ctx.stranger_key().public_key())


def sealed_as_result(ctx, request: SealedRequest, key: ClientSession, rng) -> SealedRequest:
    """Sealed under the SEALED_RESULT associated data: a ciphertext moved between types."""
    return sealed_request(ctx, key, ctx.reference, request_id=request.request_id,
                          aad=request_aad(MessageType.SEALED_RESULT, request.request_id))


def sealed_without_parent_key(ctx, request: SealedRequest, key: ClientSession, rng) -> SealedRequest:
    """Sealed under an AAD that does not bind the parent key (an old weakness)."""
    return sealed_request(ctx, key, ctx.reference, request_id=request.request_id,
                          aad=request_aad(MessageType.SEALED_REQUEST, request.request_id))


#: What a bit flipped anywhere in a frame may legitimately produce: header flips give
#: BAD_FRAME (or TIMEOUT when the length grows, since the rest never arrives), a flipped
#: type byte or CBOR byte BAD_MESSAGE, a flipped session counter REPLAY, anything in the
#: sealed fields DECRYPT_FAILED. Never a classification.
FRAME_FLIP_CODES = frozenset({"BAD_FRAME", "BAD_MESSAGE", "DECRYPT_FAILED", "TIMEOUT",
                              "REPLAY", "UNEXPECTED"})


def flip_whole_frame(kind: str):
    """An action: a valid SEALED_REQUEST or SESSION_CLASSIFY frame with one bit flipped."""
    def action(ctx: HostileContext, attempt: int) -> Outcome:
        rng = random.Random(attempt)
        if kind == "sealed_request":
            connection, attested = attested_connection(ctx)
            request = sealed_request(ctx, attested, ctx.reference)
        else:
            session = open_raw_session(ctx)
            connection, request = session.connection, classify_request(
                session, {"image": ctx.reference})
        with connection:
            # Every other try flips within the first 128 bytes (header, CBOR heads, keys,
            # ids) instead of anywhere, or nearly every flip would land in the ciphertext.
            frame = _flip(encode_frame(request.TYPE, request.to_body()), rng,
                          within=None if attempt % 2 else 128)
            started = time.monotonic()
            connection._sock.sendall(frame)
            return answer(connection, IO_TIMEOUT + ANSWER_SLACK, started)
    return action


def replay_one_shot(same_connection: bool):
    """An action: a one-shot request is accepted once; sent again on the same connection it
    is UNEXPECTED (one per connection), on a new one it does not authenticate (it is bound
    to the connection's attestation, which carries the enclave's fresh random value)."""
    def action(ctx: HostileContext, attempt: int) -> Outcome:
        with connect(ctx.endpoint(), timeout=CLIENT_TIMEOUT) as connection:
            session = say_hello(ctx, connection)
            first = sealed_request(ctx, session, ctx.reference)
            connection.send(first.TYPE, first.to_body())
            got = answer(connection, CLIENT_TIMEOUT, time.monotonic())
            if got.code != "ACCEPTED":
                return Outcome("FIRST_REFUSED", str(got))
            if same_connection:
                started = time.monotonic()
                connection.send(first.TYPE, first.to_body())
                return answer(connection, CLIENT_TIMEOUT, started)
        with connect(ctx.endpoint(), timeout=CLIENT_TIMEOUT) as connection:
            say_hello(ctx, connection)
            started = time.monotonic()
            connection.send(first.TYPE, first.to_body())
            return answer(connection, CLIENT_TIMEOUT, started)
    return action


@dataclass
class RawSession:
    """A session opened through the client state machine; cases send what a correct client
    never would with its ``seal_arbitrary_for_testing`` and read answers through it."""

    connection: FramedConnection
    client: ClientSession
    extra: dict = field(default_factory=dict)


def open_raw_session(ctx: HostileContext) -> RawSession:
    connection, attested = attested_connection(ctx)
    connection.send_frame(attested.open_session())
    event = attested.receive(connection.receive())
    assert isinstance(event, SessionEstablished), f"expected SESSION_READY, got {event}"
    return RawSession(connection, attested)


def classify_request(session: RawSession, payload: dict | bytes,
                     msg_type: int = MessageType.SESSION_CLASSIFY) -> SessionClassify:
    plaintext = payload if isinstance(payload, bytes) else cbor2.dumps(payload)
    _, frame = session.client.seal_arbitrary_for_testing(plaintext, msg_type=msg_type)
    return decode_message(frame)


def session_answer(session: RawSession, wait: float, started: float) -> Outcome:
    """An ERROR frame, or a sealed result opened by the client state machine."""
    try:
        frame = session.connection.receive(timeout=wait)
    except NitroLesionError as exc:
        return answer_from_error(exc, wait, started)
    elapsed = time.monotonic() - started
    try:
        event = session.client.receive(frame)
    except NitroLesionError as exc:  # what the enclave sent is itself a violation
        return Outcome(type(exc).__name__, str(exc), elapsed)
    if isinstance(event, PeerError):
        return Outcome(event.code, event.message, elapsed)
    if isinstance(event, ResultReceived):
        if event.payload.error is not None:
            return Outcome(*event.payload.error, elapsed)
        return Outcome("OK", event.payload.prediction.code, elapsed)
    return Outcome(type(event).__name__, "", elapsed)


def answer_from_error(exc: NitroLesionError, wait: float, started: float) -> Outcome:
    elapsed = time.monotonic() - started
    if isinstance(exc, ConnectionClosed):
        return Outcome("CLOSED", "closed without an answer", elapsed)
    if isinstance(exc, TransportTimeout):
        return Outcome("NO_ANSWER", f"nothing within {wait:g} s", elapsed)
    return Outcome(type(exc).__name__, str(exc), elapsed)


def session_case(build: Callable[[HostileContext, RawSession, random.Random], list[tuple[int, bytes]]]):
    """An action: open a session, send the frames ``build`` returns, report the last answer."""
    def action(ctx: HostileContext, attempt: int) -> Outcome:
        session = open_raw_session(ctx)
        with session.connection:
            frames = build(ctx, session, random.Random(attempt))
            started = time.monotonic()
            outcome = Outcome("NO_ANSWER")
            for msg_type, body in frames:
                session.connection.send(msg_type, body)
                outcome = session_answer(session, IO_TIMEOUT + ANSWER_SLACK, started)
            return outcome
    return action


def _image_request(session: RawSession, ctx: HostileContext) -> tuple[int, bytes]:
    request = classify_request(session, {"image": ctx.reference})
    return request.TYPE, request.to_body()


def session_bitflip(ctx, session: RawSession, rng) -> list:
    request = classify_request(session, {"image": ctx.reference})
    return [(request.TYPE, SessionClassify(request.counter, _flip(request.ciphertext, rng)).to_body())]


def session_replay(ctx, session: RawSession, rng) -> list:
    first = _image_request(session, ctx)
    return [first, first]  # answer to the first is OK; the second is what we report


def session_skip(ctx, session: RawSession, rng) -> list:
    for _ in range(5):  # sealed and never sent: as if five messages were dropped on the way
        session.client.seal_arbitrary_for_testing(b"dropped")
    return [_image_request(session, ctx)]


def session_other_session(ctx, session: RawSession, rng) -> list:
    other = open_raw_session(ctx)
    with other.connection:
        stolen = classify_request(other, {"image": ctx.reference})
    return [(stolen.TYPE, stolen.to_body())]


def session_other_type(ctx, session: RawSession, rng) -> list:
    request = classify_request(session, {"image": ctx.reference}, MessageType.SESSION_RESULT)
    return [(MessageType.SESSION_CLASSIFY, request.to_body())]


def session_reflected(ctx, session: RawSession, rng) -> list:
    """The enclave's own first result sent back to it as the client's second request."""
    first = _image_request(session, ctx)
    session.connection.send(*first)
    frame = session.connection.receive()
    result = decode_message(frame)
    session.client.receive(frame)  # opened: the client expects the enclave's next counter
    return [(MessageType.SESSION_CLASSIFY, SessionClassify(1, result.ciphertext).to_body())]


def session_not_image_map(ctx, session: RawSession, rng) -> list:
    request = classify_request(session, {"picture": "not bytes"})
    return [(request.TYPE, request.to_body())]


def session_tag_bomb(ctx, session: RawSession, rng) -> list:
    plaintext = b"\xa1" + cbor2.dumps("image") + rational_bomb(rng)
    request = classify_request(session, plaintext)
    return [(request.TYPE, request.to_body())]


def session_open_with(wrap: Callable[[HostileContext, bytes, bytes, bytes], tuple[bytes, bytes]]):
    """An action: HELLO, then a SESSION_OPEN whose wrapped secret is built by ``wrap``."""
    def action(ctx: HostileContext, attempt: int) -> Outcome:
        ctx.stranger_key()  # RSA keygen takes seconds: never between HELLO and SESSION_OPEN
        with connect(ctx.endpoint(), timeout=CLIENT_TIMEOUT) as connection:
            attested = say_hello(ctx, connection)
            session_id, wrapped = wrap(ctx, attested.enclave_key, new_session_secret(),
                                       new_session_id())
            started = time.monotonic()
            connection.send(MessageType.SESSION_OPEN, SessionOpen(session_id, wrapped).to_body())
            return answer(connection, IO_TIMEOUT + ANSWER_SLACK, started)
    return action


def wrapped_to_stranger(ctx, enclave_key, secret, session_id):
    return session_id, wrap_session_secret(ctx.stranger_key().public_key(), secret, session_id)


def wrapped_for_other_id(ctx, enclave_key, secret, session_id):
    wrapped = wrap_session_secret(enclave_key, secret, session_id)
    return new_session_id(), wrapped


def wrapped_bitflip(ctx, enclave_key, secret, session_id):
    wrapped = wrap_session_secret(enclave_key, secret, session_id)
    return session_id, _flip(wrapped, random.Random(session_id))


# -- images -----------------------------------------------------------------------------------
def image_case(make: Callable[[], bytes]):
    """An action: one session, the hostile image then the reference image.

    Reports the hostile image's outcome (a per-image error code, or OK if it was classified
    and matches the in-process classifier), or SESSION_BROKEN if the reference image that
    follows it in the same session was not classified correctly.
    """
    def action(ctx: HostileContext, attempt: int) -> Outcome:
        image = make()
        started = time.monotonic()
        try:
            hostile, follow = ctx.classify([image, ctx.reference])
        except NitroLesionError as exc:
            return Outcome(type(exc).__name__, str(exc), time.monotonic() - started)
        elapsed = time.monotonic() - started
        if follow.error is not None or not ctx.matches(ctx.reference, follow.result):
            return Outcome("SESSION_BROKEN", f"reference image after it: {follow}")
        if hostile.error is not None:
            return Outcome(hostile.error[0], hostile.error[1], elapsed)
        if not ctx.matches(image, hostile.result):
            return Outcome("WRONG_RESULT", f"enclave {hostile.result.code}, "
                                           f"in-process {ctx.expected(image)['code']}")
        return Outcome("OK", f"classified as {hostile.result.code}, same as in-process", elapsed)
    return action


# -- the catalogue ------------------------------------------------------------------------------
def _codes(*codes: str) -> frozenset[str]:
    return frozenset(codes)


def _frame_cases(target: str) -> list[HostileCase]:
    first = HANDSHAKE_TIMEOUT
    cases = [
        HostileCase("random_bytes", "frames", target, "256 random bytes",
                    send_raw(target, random_garbage), _codes("BAD_FRAME"), r"^bad magic"),
        HostileCase("http_request", "frames", target, "an HTTP request on the port",
                    send_raw(target, lambda a: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                    _codes("BAD_FRAME"), r"bad magic: expected b'NL', got b'GE'"),
        HostileCase("truncated_header_eof", "frames", target, "6 of 12 header bytes, then EOF",
                    send_raw(target, lambda a: header()[:6], eof=True), _codes("CLOSED")),
        HostileCase("truncated_header_silent", "frames", target,
                    "6 of 12 header bytes, then silence",
                    send_raw(target, lambda a: header()[:6]), _codes("TIMEOUT"),
                    rf"within {first:g} s", max_seconds=first + ANSWER_SLACK),
        HostileCase("length_2_63", "frames", target, "a header declaring 2**63 body bytes",
                    send_raw(target, lambda a: header(length=2**63)), _codes("BAD_FRAME"),
                    r"frame declared 9223372036854775808 bytes, limit \d+", max_seconds=1.0),
        HostileCase("length_max_body_plus_1", "frames", target,
                    "a header declaring MAX_BODY + 1 bytes",
                    send_raw(target, lambda a: header(length=24 * 1024 * 1024 + 1)),
                    _codes("BAD_FRAME"), r"frame declared 25165825 bytes, limit 25165824"),
        HostileCase("old_version", "frames", target, "a peer of protocol version 1",
                    send_raw(target, lambda a: header(version=1)), _codes("BAD_FRAME"),
                    r"unsupported protocol version 1: this side speaks version 2"),
        HostileCase("unknown_type", "frames", target, "message type 200",
                    send_raw(target, lambda a: header(msg_type=200)), _codes("BAD_FRAME"),
                    r"unknown message type 200"),
        HostileCase("silent_connection", "frames", target, "connect and never speak",
                    send_raw(target, lambda a: b""), _codes("TIMEOUT"),
                    rf"within {first:g} s", max_seconds=first + ANSWER_SLACK),
        HostileCase("slow_first_frame", "frames", target,
                    "valid header, body trickled at 1 byte / 0.2 s",
                    trickle(target, None, MessageType.HELLO if target == "enclave"
                            else MessageType.ENCLAVE_ANNOUNCE, first),
                    _codes("TIMEOUT"), rf"within {first:g} s", max_seconds=first + ANSWER_SLACK),
        HostileCase("bad_cbor_body", "frames", target, "valid header, body not CBOR",
                    send_raw(target, lambda a: encode_frame(MessageType.HELLO, b"\xff\xfe")),
                    _codes("BAD_MESSAGE"), r"HELLO: "),
        # The enclave refuses these from the header (no frame over 4 KiB before attestation);
        # the parent server reads them and its CBOR checks refuse the body.
        HostileCase("cbor_tag_bomb", "frames", target,
                    "HELLO whose nonce is a CBOR rational of two 64 KiB bignums",
                    send_raw(target, tag_bomb), *_too_big_before_hello(
                        target, _codes("BAD_MESSAGE"), r"CBOR tag 30 is not accepted"),
                    max_seconds=1.0),
        HostileCase("long_keys", "frames", target, "HELLO map with 20 keys of 2000 characters",
                    send_raw(target, long_keys), *_too_big_before_hello(
                        target, _codes("BAD_MESSAGE"), r"expected fields \['nonce'\], got 'k{32}'.*more$")),
        HostileCase("trailing_cbor", "frames", target, "HELLO body with a byte after the map",
                    send_raw(target, lambda a: encode_frame(
                        MessageType.HELLO, Hello(os.urandom(32)).to_body() + b"\x00")),
                    _codes("BAD_MESSAGE"), r"1 bytes after the CBOR item"),
    ]
    if target == "enclave":
        cases += [
            HostileCase("slow_frame_after_hello", "frames", target,
                        "after HELLO, a header whose body trickles in",
                        trickle(target, say_hello, MessageType.SESSION_OPEN, IO_TIMEOUT),
                        _codes("TIMEOUT"), rf"within {IO_TIMEOUT:g} s",
                        max_seconds=IO_TIMEOUT + ANSWER_SLACK),
            HostileCase("unexpected_message", "frames", target, "SESSION_CLASSIFY before HELLO",
                        send_raw(target, lambda a: encode_frame(
                            MessageType.SESSION_CLASSIFY,
                            SessionClassify(0, b"\x00" * 32).to_body())),
                        _codes("UNEXPECTED"), r"SESSION_CLASSIFY is not expected in state idle"),
        ]
    else:
        cases += [
            HostileCase("slow_frame_after_announce", "frames", target,
                        "after a valid announce, a header whose body trickles in",
                        trickle(target, announce, MessageType.SEALED_RESULT, IO_TIMEOUT),
                        _codes("TIMEOUT"), rf"within {IO_TIMEOUT:g} s",
                        max_seconds=IO_TIMEOUT + ANSWER_SLACK),
            HostileCase("unexpected_message", "frames", target, "HELLO sent to the parent server",
                        send_raw(target, lambda a: hello_frame()),
                        _codes("UNEXPECTED"), r"HELLO is not expected"),
        ]
    cases.append(HostileCase("connection_flood", "flood", target,
                             f"{FLOOD_SOCKETS} connections opened at once, answers read "
                             f"for {HANDSHAKE_TIMEOUT + ANSWER_SLACK:g} s, then all closed "
                             f"(NO_ANSWER: still queued in the kernel's full listen backlog)",
                             flood(target), _codes("BUSY"), r"BUSY \d+"))
    return cases


def _too_big_before_hello(target: str, codes: frozenset[str], text: str) -> tuple:
    """What a large HELLO gets: at the enclave BAD_FRAME from its header alone, at the
    parent server ``codes``/``text`` from its body."""
    if target == "enclave":
        return _codes("BAD_FRAME"), r"a frame of \d+ bytes is not allowed in state idle"
    return codes, text


_DECRYPT = r"did not authenticate|did not unwrap"
CRYPTO_CASES = [
    HostileCase("session_open_wrong_key", "crypto", "enclave",
                "session secret wrapped to another RSA key",
                session_open_with(wrapped_to_stranger), _codes("DECRYPT_FAILED"),
                r"session secret did not unwrap"),
    HostileCase("session_open_other_id", "crypto", "enclave",
                "session secret wrapped for another session id (OAEP label)",
                session_open_with(wrapped_for_other_id), _codes("DECRYPT_FAILED"),
                r"session secret did not unwrap"),
    HostileCase("session_open_bitflip", "crypto", "enclave", "one bit flipped in the wrapped secret",
                session_open_with(wrapped_bitflip), _codes("DECRYPT_FAILED"),
                r"session secret did not unwrap"),
    HostileCase("sealed_request_wrong_key", "crypto", "enclave",
                "one-shot request sealed to another RSA key",
                one_shot(sealed_to_stranger), _codes("DECRYPT_FAILED"), _DECRYPT),
    *[HostileCase(f"sealed_request_bitflip_{name}", "crypto", "enclave",
                  f"one random bit flipped in SEALED_REQUEST.{name}",
                  one_shot(flip_field(name)), _codes("DECRYPT_FAILED"),
                  _DECRYPT + r"|public key is not")
      for name in ("request_id", "parent_public_key", "wrapped_key", "nonce", "ciphertext")],
    HostileCase("sealed_request_frame_bitflip", "crypto", "enclave",
                "one random bit flipped anywhere in a SEALED_REQUEST frame (header included)",
                flip_whole_frame("sealed_request"), FRAME_FLIP_CODES),
    HostileCase("session_frame_bitflip", "crypto", "enclave",
                "one random bit flipped anywhere in a SESSION_CLASSIFY frame (header included)",
                flip_whole_frame("session"), FRAME_FLIP_CODES),
    HostileCase("sealed_request_as_result", "crypto", "enclave",
                "sealed under SEALED_RESULT associated data (moved between message types)",
                one_shot(sealed_as_result), _codes("DECRYPT_FAILED"), _DECRYPT),
    HostileCase("sealed_request_parent_key_unbound", "crypto", "enclave",
                "sealed without binding the parent key (the old associated data)",
                one_shot(sealed_without_parent_key), _codes("DECRYPT_FAILED"), _DECRYPT),
    HostileCase("sealed_request_replayed", "crypto", "enclave",
                "an accepted SEALED_REQUEST replayed on a new connection (bound to the old one)",
                replay_one_shot(same_connection=False), _codes("DECRYPT_FAILED"), _DECRYPT),
    HostileCase("sealed_request_twice", "crypto", "enclave",
                "an accepted SEALED_REQUEST sent again on its own connection",
                replay_one_shot(same_connection=True), _codes("BAD_FRAME"),
                r"a frame of \d+ bytes is not allowed in state done"),
    HostileCase("session_bitflip", "crypto", "enclave",
                "one random bit flipped in a SESSION_CLASSIFY ciphertext",
                session_case(session_bitflip), _codes("DECRYPT_FAILED"),
                r"session message did not authenticate"),
    HostileCase("session_replayed", "crypto", "enclave",
                "the same SESSION_CLASSIFY (counter 0) sent twice",
                session_case(session_replay), _codes("REPLAY"),
                r"replayed session message: expected counter 1, got 0"),
    HostileCase("session_counter_skipped", "crypto", "enclave", "counter 5 when 0 is expected",
                session_case(session_skip), _codes("REPLAY"),
                r"out of order: expected counter 0, got 5"),
    HostileCase("session_ciphertext_other_session", "crypto", "enclave",
                "a SESSION_CLASSIFY sealed in another session",
                session_case(session_other_session), _codes("DECRYPT_FAILED"),
                r"session message did not authenticate"),
    HostileCase("session_ciphertext_other_type", "crypto", "enclave",
                "sealed as SESSION_RESULT, sent as SESSION_CLASSIFY",
                session_case(session_other_type), _codes("DECRYPT_FAILED"),
                r"session message did not authenticate"),
    HostileCase("session_result_reflected", "crypto", "enclave",
                "the enclave's own SESSION_RESULT sent back as the next request",
                session_case(session_reflected), _codes("DECRYPT_FAILED"),
                r"session message did not authenticate"),
    HostileCase("session_plaintext_not_image_map", "crypto", "enclave",
                "authenticated plaintext that is not {'image': bytes}",
                session_case(session_not_image_map), _codes("BAD_MESSAGE"),
                r"expected \{'image': bytes\}"),
    HostileCase("session_plaintext_tag_bomb", "crypto", "enclave",
                "authenticated plaintext with a CBOR rational of 64 KiB bignums",
                session_case(session_tag_bomb), _codes("BAD_MESSAGE"),
                r"expected \{'image': bytes\}", max_seconds=2.0),
]

_BAD_IMAGE = _codes("BAD_IMAGE")
IMAGE_CASES = [
    HostileCase("not_an_image", "images", "enclave", "PDF-like text",
                image_case(lambda: b"%PDF-1.4 not really an image\n" * 20), _BAD_IMAGE,
                r"not an image in an accepted format"),
    HostileCase("empty_image", "images", "enclave", "zero bytes",
                image_case(lambda: b""), _BAD_IMAGE, r"empty image"),
    HostileCase("truncated_jpeg", "images", "enclave", "first half of a JPEG",
                image_case(lambda: reference_jpeg()[: len(reference_jpeg()) // 2]), _BAD_IMAGE,
                r"truncated or corrupt"),
    HostileCase("truncated_png", "images", "enclave", "first half of a PNG",
                image_case(lambda: (lambda d: d[: len(d) // 2])(encode(lesion_image(), "PNG"))),
                _BAD_IMAGE, r"truncated or corrupt"),
    HostileCase("png_bomb_50000x50000", "images", "enclave",
                "~100-byte PNG declaring 50000 x 50000 pixels",
                image_case(png_bomb), _BAD_IMAGE,
                rf"image is 50000x50000 = 2500000000 pixels, limit is {MAX_IMAGE_PIXELS}",
                max_seconds=5.0),
    HostileCase("over_pixel_limit", "images", "enclave",
                f"real 2100 x 2000 PNG, limit {MAX_IMAGE_PIXELS} pixels",
                image_case(over_pixel_limit), _BAD_IMAGE,
                rf"image is 2100x2000 = 4200000 pixels, limit is {MAX_IMAGE_PIXELS}"),
    HostileCase("over_byte_limit", "images", "enclave",
                f"{MAX_IMAGE_BYTES + 1} bytes, limit {MAX_IMAGE_BYTES}",
                image_case(over_byte_limit), _BAD_IMAGE,
                rf"image is {MAX_IMAGE_BYTES + 1} bytes, limit is {MAX_IMAGE_BYTES}"),
    HostileCase("tiff_page_without_dimensions", "images", "enclave",
                "2-page TIFF whose page 2 has no width or length",
                image_case(lambda: grey_pixel_tiff(second_page_without_dimensions=True)), _BAD_IMAGE,
                r"truncated or corrupt \(TypeError\)"),
    HostileCase("animated_gif", "images", "enclave", "3-frame animated GIF (first frame used)",
                image_case(animated_gif), _codes("OK")),
    HostileCase("one_pixel", "images", "enclave", "1 x 1 PNG",
                image_case(lambda: encode(Image.new("RGB", (1, 1), (120, 80, 60)), "PNG")),
                _codes("OK")),
    HostileCase("png_16bit", "images", "enclave", "16-bit grayscale PNG",
                image_case(png_16bit), _codes("OK")),
    HostileCase("cmyk_jpeg", "images", "enclave", "CMYK JPEG", image_case(cmyk_jpeg),
                _codes("OK")),
    HostileCase("exif_rotated", "images", "enclave", "JPEG with EXIF orientation 6",
                image_case(exif_rotated_jpeg), _codes("OK")),
]

FRAME_CASES = _frame_cases("enclave") + _frame_cases("parent")
CASES: list[HostileCase] = FRAME_CASES + CRYPTO_CASES + IMAGE_CASES


def case_id(case: HostileCase) -> str:
    return f"{case.target}-{case.name}"


def run_case(ctx: HostileContext, case: HostileCase, attempt: int = 0) -> tuple[Outcome, Outcome]:
    """Run one case, then the serving check: (what the peer got, serving check outcome)."""
    outcome = case.action(ctx, attempt)
    return outcome, ctx.serving(case.target)


def check_case(ctx: HostileContext, case: HostileCase) -> None:
    """Run ``case`` once; assert the precise answer, then that its server still serves."""
    outcome, serving = run_case(ctx, case)
    case.check(outcome)
    assert serving.code == "OK", f"{case.target} stopped serving after {case.name}: {serving}"


# -- faults: each needs its own stack -----------------------------------------------------------
KEY_LINE = r"Enclave public key received \(sha256 ([0-9a-f]+)\.\.\.\)"


def fingerprints(server) -> list[str]:
    return [m.group(1) for line in server.lines if (m := re.search(KEY_LINE, line))]


def new_stack(tmp: Path, *extra: str) -> EnclaveStack:
    return EnclaveStack(tmp, (*ENCLAVE_OPTIONS, *extra), server_args=SERVER_OPTIONS)


def fault_enclave_killed(tmp: Path, model: LesionModel | None = None) -> Outcome:
    """SIGKILL the enclave while a session has requests in flight.

    The client must get a transport error well within its timeout; the parent server
    keeps running and takes the restarted enclave's (different) key; the new enclave serves.
    """
    stack = new_stack(tmp)
    try:
        ctx = HostileContext(stack, model)
        first_key = fingerprints(stack.server)[-1]
        client_timeout = 5.0
        started = None
        with ctx.client(timeout=client_timeout) as client:
            client.open_session()
            try:
                for outcome in client.classify_many([ctx.reference] * 32, window=4):
                    if started is None:  # one answer is in: now kill it mid-stream
                        stack.enclave.process.send_signal(signal.SIGKILL)
                        started = time.monotonic()
                error = Outcome("NO_ERROR", "all 32 answers arrived after SIGKILL")
            except NitroLesionError as exc:
                error = Outcome(type(exc).__name__, str(exc), time.monotonic() - started)
        stack.enclave.process.wait(timeout=10)
        if stack.server.process.poll() is not None:
            return Outcome("SERVER_DIED", stack.server.output)
        mark = len(stack.server.lines)
        stack.start_enclave(*ENCLAVE_OPTIONS)
        match = stack.server.wait_for(KEY_LINE, timeout=30, start=mark)
        if match.group(1) == first_key:
            return Outcome("SAME_KEY", "the restarted enclave announced the old key")
        serving = HostileContext(stack, ctx.model).serving("enclave")
        if serving.code != "OK":
            return Outcome("NOT_SERVING", str(serving))
        return Outcome(error.code, f"{error.text} (after {error.seconds:.2f} s, client timeout "
                                   f"{client_timeout:g} s); server took new key "
                                   f"{match.group(1)} != {first_key}", error.seconds)
    finally:
        stack.stop()


def fault_parent_restarted(tmp: Path, model: LesionModel | None = None) -> Outcome:
    """Restart the parent server: the enclave re-announces with backoff and results flow."""
    stack = new_stack(tmp)
    try:
        ctx = HostileContext(stack, model)
        key = fingerprints(stack.server)[-1]
        enclave_mark = len(stack.enclave.lines)
        stack.server.stop()
        # the enclave sees the link drop and starts backing off (its log says when)
        stack.enclave.wait_for(r"parent link lost", start=enclave_mark, timeout=10)
        started = time.monotonic()
        stack.start_server()
        match = stack.server.wait_for(KEY_LINE, timeout=30)
        reconnect = time.monotonic() - started
        stack.enclave.wait_for(r"announced public key to parent", start=enclave_mark, timeout=10)
        retries = [line for line in stack.enclave.lines[enclave_mark:]
                   if "retrying in" in line or "announcing again" in line]
        if match.group(1) != key:
            return Outcome("WRONG_KEY", f"{match.group(1)} != {key}")
        with EnclaveClient(ctx.endpoint(), stack.trust(), timeout=CLIENT_TIMEOUT) as client:
            client.attest(expected_key=load_announcement(stack.key_dir).public_key)
            client.send_one_shot(ctx.reference, ctx.parent_public_key)
        stack.server.wait_for(r"Classification received", timeout=CLIENT_TIMEOUT)
        return Outcome("REANNOUNCED", f"new server got key {key} {reconnect:.1f} s after it "
                                      f"started; enclave log: {len(retries)} backoff line(s); "
                                      f"a one-shot result then reached the new server",
                       reconnect)
    finally:
        stack.stop()


def _served_despite_busy(ctx: HostileContext, within: float) -> tuple[Outcome, float]:
    """The serving check, retried while the enclave answers BUSY (slots not yet freed)."""
    outcome = ctx.serving("enclave", busy_wait=within)
    return outcome, outcome.seconds


def attested_connection(ctx: HostileContext, busy_wait: float = 5.0
                        ) -> tuple[FramedConnection, ClientSession]:
    """Connect and attest (verified), retrying while the enclave still holds the previous
    client's slot."""
    deadline = time.monotonic() + busy_wait
    while True:
        connection = connect(ctx.endpoint(), timeout=CLIENT_TIMEOUT)
        session = ClientSession()
        connection.send_frame(session.hello())
        frame = connection.receive()
        message = decode_message(frame)
        if isinstance(message, Attestation):
            event = session.receive(frame)
            session.attestation_verified(ctx._trust.verify(message, event.nonce))
            return connection, session
        connection.close()
        if not (isinstance(message, ErrorMessage) and message.code == "BUSY"
                and time.monotonic() < deadline):
            raise AssertionError(f"expected ATTESTATION, got {message}")
        time.sleep(0.05)


def fault_client_disconnects_mid_frame(tmp: Path, model: LesionModel | None = None,
                                       rounds: int = 3) -> Outcome:
    """With --max-connections 2, clients that vanish mid-frame must not leak their slots."""
    stack = new_stack(tmp, "--max-connections", "2")
    try:
        ctx = HostileContext(stack, model)
        waits, busy_seen = [], 0
        for index in range(rounds):
            holders = [attested_connection(ctx)[0] for _ in range(2)]
            # Both slots are taken: a third client is refused (proves the cap is real).
            probe = ctx.serving("enclave", busy_wait=0)
            busy_seen += "BUSY" in str(probe)
            for n, connection in enumerate(holders):
                connection._sock.sendall(header(MessageType.SESSION_OPEN, 4096) + b"\x00" * 100)
                if (index + n) % 2:  # alternate a FIN with a RST (SO_LINGER 0)
                    connection._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                struct.pack("ii", 1, 0))
                connection.close()
            outcome, waited = _served_despite_busy(ctx, within=5.0)
            if outcome.code != "OK":
                return Outcome("NOT_SERVING", f"round {index}: {outcome}")
            waits.append(waited)
        if busy_seen != rounds:
            return Outcome("CAP_NOT_ENFORCED", f"third client refused in {busy_seen}/{rounds}")
        return Outcome("SLOTS_FREED", f"{rounds} rounds of 2 clients vanishing mid-frame "
                                      f"(FIN and RST); a new client served after at most "
                                      f"{max(waits):.2f} s", max(waits))
    finally:
        stack.stop()


def fault_client_vanishes_in_flight(tmp: Path, model: LesionModel | None = None,
                                    rounds: int = 4) -> Outcome:
    """Clients that send 8 requests and close without reading must not leak slots."""
    stack = new_stack(tmp, "--max-connections", "2")
    try:
        ctx = HostileContext(stack, model)
        waits = []
        for index in range(rounds):
            session = open_raw_session(ctx)
            for _ in range(8):
                session.connection.send(*_image_request(session, ctx))
            session.connection.close()
            outcome, waited = _served_despite_busy(ctx, within=10.0)
            if outcome.code != "OK":
                return Outcome("NOT_SERVING", f"round {index}: {outcome}")
            waits.append(waited)
        return Outcome("SLOTS_FREED", f"{rounds} clients closed with 8 requests in flight; "
                                      f"a new client served after at most {max(waits):.2f} s",
                       max(waits))
    finally:
        stack.stop()


@dataclass(frozen=True)
class FaultCase:
    name: str
    summary: str
    run: Callable[..., Outcome]
    codes: frozenset[str]


FAULTS = [
    FaultCase("enclave_sigkill_mid_request", "SIGKILL the enclave with 32 session requests "
              "in flight; restart it", fault_enclave_killed,
              _codes("ConnectionClosed", "TransportError")),
    FaultCase("parent_server_restart", "stop the parent server and start a new one on the "
              "same port", fault_parent_restarted, _codes("REANNOUNCED")),
    FaultCase("client_disconnects_mid_frame", "--max-connections 2; clients close (FIN/RST) "
              "halfway through a frame", fault_client_disconnects_mid_frame,
              _codes("SLOTS_FREED")),
    FaultCase("client_vanishes_in_flight", "--max-connections 2; clients close with 8 "
              "requests queued", fault_client_vanishes_in_flight, _codes("SLOTS_FREED")),
]
