"""Memory attacks on a real enclave process (security review, finding 4), one definition
for the test (tests/test_memory_budget.py, smaller) and the report
(scripts/robustness_report.py --memory-attacks, the review's full sizes).

Each attack runs against a fresh enclave process with the production defaults (2 workers,
--memory 768, 64 connections, 30 s I/O timeout) and reports the enclave's peak RSS
(VmHWM, reset just before the attack via /proc/PID/clear_refs), what the attackers were
answered, and whether legitimate clients were served while it lasted. Before the memory
budget, the review measured: 60 unfinished 24 MiB frames 1.94 GiB; 32 small images
declaring 40 megapixels 2.43 GiB; both 4.0 GiB; 64 silent connections after HELLO locked
legitimate clients out (0/12) for 30 s.
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from harness import EnclaveStack
from hostile_cases import encode, lesion_image
from nitrolesion.errors import NitroLesionError
from nitrolesion.memory_budget import MIB, RECOMMENDED_ENCLAVE_MIB, SYSTEM_MIB
from nitrolesion.protocol import AttestationReceived, ClientSession
from nitrolesion.wire.frames import HEADER, MAGIC, PROTOCOL_VERSION, FrameDecoder, MessageType, encode_frame
from nitrolesion.wire.messages import ErrorMessage, decode_message
from nitrolesion.parent.enclave_client import EnclaveClient

#: What the enclave process may use at most: the recommended --memory less the root file
#: system and kernel that share it (nitrolesion/memory_budget.py).
PROCESS_LIMIT_MIB = RECOMMENDED_ENCLAVE_MIB - SYSTEM_MIB
#: Seconds a legitimate client waits for its answer during an attack.
LEGIT_TIMEOUT = 20.0


@dataclass
class AttackResult:
    name: str
    summary: str
    answers: Counter = field(default_factory=Counter)
    peak_rss_mib: float = 0.0
    legit_served: int = 0
    legit_total: int = 0
    legit_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        answers = ", ".join(f"{code} {count}" for code, count in sorted(self.answers.items()))
        slowest = f", slowest {max(self.legit_seconds):.2f} s" if self.legit_seconds else ""
        return (f"{self.name}: peak RSS {self.peak_rss_mib:.0f} MiB (limit {PROCESS_LIMIT_MIB}); "
                f"attackers got {answers or 'nothing'}; legitimate clients served "
                f"{self.legit_served}/{self.legit_total}{slowest}; {self.seconds:.1f} s")


def new_attack_stack(tmp: Path) -> EnclaveStack:
    """The production defaults, with the development authority (no parent server needed)."""
    return EnclaveStack(tmp, (), start_server=False)


def reset_peak(stack: EnclaveStack) -> None:
    with open(f"/proc/{stack.enclave.process.pid}/clear_refs", "w") as refs:
        refs.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS


def peak_mib(stack: EnclaveStack) -> float:
    return stack.enclave.status_kib()["VmHWM"] / 1024


def _attested_socket(stack: EnclaveStack) -> tuple[socket.socket, FrameDecoder]:
    """A raw connection that said HELLO and read the attestation (what any peer can do)."""
    sock = socket.create_connection(("127.0.0.1", stack.client_port), timeout=LEGIT_TIMEOUT)
    session, decoder = ClientSession(), FrameDecoder()
    frame = session.hello()
    sock.sendall(encode_frame(frame.type, frame.body))
    while (answer := decoder.next_frame()) is None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before ATTESTATION")
        decoder.feed(data)
    assert isinstance(session.receive(answer), AttestationReceived)
    return sock, decoder


def _answer_code(sock: socket.socket, decoder: FrameDecoder, wait: float) -> str:
    sock.settimeout(wait)
    try:
        while (frame := decoder.next_frame()) is None:
            data = sock.recv(65536)
            if not data:
                return "CLOSED"
            decoder.feed(data)
    except (TimeoutError, socket.timeout):
        return "NO_ANSWER"
    except OSError:
        return "CLOSED"
    message = decode_message(frame)
    return message.code if isinstance(message, ErrorMessage) else message.TYPE.name


def legitimate_clients(stack: EnclaveStack, count: int, result: AttackResult) -> None:
    """``count`` clients one after another, each a whole attested session of one image."""
    image = encode(lesion_image(seed=7), "JPEG", quality=90)
    result.legit_total += count
    for _ in range(count):
        started = time.monotonic()
        try:
            with EnclaveClient(stack.endpoint(), stack.trust(), timeout=LEGIT_TIMEOUT) as client:
                client.attest()
                client.open_session()
                (outcome,) = list(client.classify_many([image]))
            if outcome.result is not None:
                result.legit_served += 1
                result.legit_seconds.append(time.monotonic() - started)
        except NitroLesionError:
            pass


def partial_frames(stack: EnclaveStack, connections: int, size: int = 24 * MIB,
                   sent_share: float = 0.95, legit: int = 4, reset: bool = True) -> AttackResult:
    """Attested connections that each start a ``size`` SEALED_REQUEST and never finish it."""
    result = AttackResult("partial_frames", f"{connections} attested connections each sending "
                          f"{sent_share:.0%} of a {size // MIB} MiB frame, then stalling")
    if reset:
        reset_peak(stack)
    started = time.monotonic()
    held: list[socket.socket] = []
    lock = threading.Lock()
    body = bytes(int(size * sent_share))

    def attack() -> None:
        try:
            sock, decoder = _attested_socket(stack)
        except (OSError, AssertionError, NitroLesionError):
            with lock:
                result.answers["CONNECT_FAILED"] += 1
            return
        with lock:
            held.append(sock)
        try:
            sock.sendall(HEADER.pack(MAGIC, PROTOCOL_VERSION, MessageType.SEALED_REQUEST, size))
            sock.sendall(body)
            code = _answer_code(sock, decoder, 2.0)  # stalled: no answer while it waits
        except OSError:
            code = _answer_code(sock, decoder, 1.0)  # refused: the answer is already there
        with lock:
            result.answers[code] += 1

    threads = [threading.Thread(target=attack) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    legitimate_clients(stack, legit, result)
    result.peak_rss_mib = peak_mib(stack)
    for sock in held:
        sock.close()
    result.seconds = time.monotonic() - started
    return result


def png_bomb_16bit(pixels: int = 40_000_000) -> bytes:
    """A real 16-bit grey PNG of ``pixels`` pixels (all zero): ~80 KB that decodes to 80 MB."""
    width = 8000
    height = pixels // width
    row = b"\x00" + bytes(2 * width)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tiff_bomb_float(pixels: int = 40_000_000) -> bytes:
    """A real 32-bit float TIFF of ``pixels`` pixels, deflate-compressed zeros."""
    width = 8000
    out = io.BytesIO()
    Image.fromarray(np.zeros((pixels // width, width), dtype=np.float32), mode="F").save(
        out, format="TIFF", compression="tiff_adobe_deflate")
    return out.getvalue()


def pixel_bombs(stack: EnclaveStack, images: int, legit: int = 4, sessions: int = 4,
                reset: bool = True) -> AttackResult:
    """Small images that declare 40 megapixels, sent over attested sessions at once."""
    bombs = [png_bomb_16bit(), tiff_bomb_float()]
    sizes = "/".join(f"{len(b) // 1024} KB" for b in bombs)
    result = AttackResult("pixel_bombs", f"{images} images declaring 40 MP (16-bit PNG and "
                          f"32-bit float TIFF, {sizes}) over {sessions} sessions at once")
    if reset:
        reset_peak(stack)
    started = time.monotonic()
    lock = threading.Lock()

    def attack(number: int) -> None:
        share = [bombs[i % 2] for i in range(number, images, sessions)]
        try:
            with EnclaveClient(stack.endpoint(), stack.trust(), timeout=60) as client:
                client.attest()
                client.open_session()
                for outcome in client.classify_many(share, window=8):
                    with lock:
                        result.answers["OK" if outcome.result else outcome.error[0]] += 1
        except NitroLesionError as exc:
            with lock:
                result.answers[type(exc).__name__] += 1

    threads = [threading.Thread(target=attack, args=(n,)) for n in range(sessions)]
    for thread in threads:
        thread.start()
    legitimate_clients(stack, legit, result)
    for thread in threads:
        thread.join(timeout=300)
    result.peak_rss_mib = peak_mib(stack)
    result.seconds = time.monotonic() - started
    return result


def silent_after_hello(stack: EnclaveStack, connections: int = 64, legit: int = 12) -> AttackResult:
    """``connections`` peers say HELLO, read the attestation and then say nothing."""
    result = AttackResult("silent_after_hello", f"{connections} connections that say HELLO and "
                          f"then stay silent, while {legit} legitimate clients arrive")
    reset_peak(stack)
    started = time.monotonic()
    held = []
    for _ in range(connections):
        try:
            held.append(_attested_socket(stack))
        except (OSError, AssertionError, NitroLesionError):
            result.answers["CONNECT_FAILED"] += 1
    time.sleep(1.5)  # all of them idle past the eviction grace
    legitimate_clients(stack, legit, result)
    # Every held connection gets 0.2 s for an answer, all at once: one after another they
    # took 64 x 0.2 s, and any answer (an eviction's TIMEOUT) is already in its buffer.
    with ThreadPoolExecutor(max_workers=max(1, len(held))) as pool:
        codes = list(pool.map(lambda pair: _answer_code(*pair, 0.2), held))
    for (sock, _decoder), code in zip(held, codes):
        result.answers[code] += 1
        sock.close()
    result.peak_rss_mib = peak_mib(stack)
    result.seconds = time.monotonic() - started
    return result


def combined(stack: EnclaveStack, connections: int, images: int) -> AttackResult:
    """Partial frames and pixel bombs at the same time."""
    outcomes: dict[str, AttackResult] = {}
    reset_peak(stack)
    started = time.monotonic()
    frames = threading.Thread(target=lambda: outcomes.update(
        f=partial_frames(stack, connections, legit=0, reset=False)))
    frames.start()
    outcomes["p"] = pixel_bombs(stack, images, legit=4, reset=False)
    frames.join(timeout=300)
    result = AttackResult("combined", "partial frames and pixel bombs at once",
                          outcomes["f"].answers + outcomes["p"].answers,
                          legit_served=outcomes["p"].legit_served,
                          legit_total=outcomes["p"].legit_total,
                          legit_seconds=outcomes["p"].legit_seconds)
    result.peak_rss_mib = peak_mib(stack)
    result.seconds = time.monotonic() - started
    return result
