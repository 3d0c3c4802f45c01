"""Soak test: many concurrent clients against a local enclave process, every answer checked.

    .venv/bin/python bench/soak.py                       # 32 clients, 120 s
    .venv/bin/python bench/soak.py --seconds 15 --clients 8

Starts ``parent.py server`` and ``enclave/app.py`` as real processes over TCP loopback
(tests/harness.py), then runs ``--clients`` threads for ``--seconds``. Each client attests
the enclave, opens a session, classifies ``--requests-per-session`` images, closes, and
starts over, so connection setup and teardown are soaked too. Every result is compared with
the in-process classifier's answer for the same image (same model, same preprocessing).

Reported: total requests, errors by kind, wrong answers, throughput, latency percentiles,
the enclave's RSS at start, peak and end (VmRSS sampled every second from
/proc/PID/status, plus the kernel's high-water mark VmHWM) and its open file descriptors
at start and end (a leak shows as growth). Every loop is bounded by the deadline; the
script always stops by itself.

Images: the first ``--images`` HAM10000 test-split files if the dataset is present
($HAM10000_DIR or ../shared/ham10000), else synthetic lesion-like pictures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench.stats import percentile
from harness import EnclaveStack, Proc
from nitrolesion.enclave.service import DEFAULT_WORKERS
from nitrolesion.errors import NitroLesionError
from nitrolesion.model.classifier import LesionModel

#: Seconds between RSS samples.
SAMPLE_PERIOD = 1.0
#: Seconds each client waits for one answer; far above a loaded enclave's worst case,
#: and it bounds how long a stuck request can keep the soak from ending.
CLIENT_TIMEOUT = 60.0
#: Seconds after the clients stop before the final RSS / descriptor reading, so
#: connection threads that are finishing have closed their sockets.
SETTLE_SECONDS = 2.0
#: Tolerance when comparing probabilities with the in-process classifier.
TOLERANCE = 1e-5


@dataclass
class SoakResult:
    seconds: float
    clients: int
    workers: int
    images: int
    image_source: str
    requests: int = 0
    sessions: int = 0
    errors: dict = field(default_factory=dict)
    wrong: int = 0
    throughput: float = 0.0
    latency_ms: dict = field(default_factory=dict)
    rss_kib: dict = field(default_factory=dict)
    fds: dict = field(default_factory=dict)
    enclave_alive: bool = True

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def load_images(count: int) -> tuple[list[bytes], str]:
    """Real test-split images if the dataset is here, else synthetic ones."""
    try:
        from nitrolesion.model.dataset import default_data_dir, load_split

        folder = default_data_dir() / "images"
        paths = [folder / f"{image_id}.jpg" for image_id in load_split("test")[:count]]
        if paths and all(p.is_file() for p in paths):
            return [p.read_bytes() for p in paths], f"HAM10000 test split ({folder})"
    except Exception:  # noqa: BLE001 - no dataset: fall back to synthetic images
        pass
    from hostile_cases import encode, lesion_image

    images = [encode(lesion_image(seed=seed), "JPEG", quality=90) for seed in range(count)]
    return images, "synthetic (tests/hostile_cases.lesion_image)"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    """Reads the enclave's RSS every SAMPLE_PERIOD seconds until stopped."""

    def __init__(self, proc: Proc) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.proc = proc
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(self.proc.status_kib()["VmRSS"])
            except (OSError, KeyError):
                return  # the process is gone
            self.stop.wait(SAMPLE_PERIOD)


class Tally:
    """Counters shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.sessions = 0
        self.wrong = 0
        self.errors: Counter = Counter()
        self.latencies: list[float] = []


def client_loop(index: int, stack: EnclaveStack, trust, images: list[bytes],
                expected: list[dict], deadline: float, per_session: int, tally: Tally) -> None:
    """Sessions of ``per_session`` random images each, until the deadline."""
    from nitrolesion.parent.enclave_client import EnclaveClient

    rng = random.Random(index)
    while time.monotonic() < deadline:
        picks = [rng.randrange(len(images)) for _ in range(per_session)]
        try:
            with EnclaveClient(stack.endpoint(), trust, timeout=CLIENT_TIMEOUT) as client:
                client.attest()
                client.open_session()
                with tally.lock:
                    tally.sessions += 1
                last = time.monotonic()
                for outcome in client.classify_many((images[i] for i in picks), window=1):
                    now = time.monotonic()
                    want = expected[picks[outcome.index]]
                    with tally.lock:
                        tally.requests += 1
                        tally.latencies.append(now - last)
                        if outcome.error is not None:
                            tally.errors[outcome.error[0]] += 1
                        elif not matches(outcome.result, want):
                            tally.wrong += 1
                    last = now
                    if now >= deadline:
                        break
        except NitroLesionError as exc:
            with tally.lock:
                tally.errors[type(exc).__name__] += 1
            time.sleep(0.1)  # do not spin if the enclave is down


def matches(result, want: dict) -> bool:
    return result.code == want["code"] and all(
        abs(result.probabilities[k] - v) <= TOLERANCE for k, v in want["probabilities"].items())


def run_soak(seconds: float = 120.0, clients: int = 32, workers: int = DEFAULT_WORKERS, image_count: int = 24,
             per_session: int = 25, log=print) -> SoakResult:
    """Run the soak against a fresh local stack; returns the figures (see module docstring)."""
    images, source = load_images(image_count)
    classifier = LesionModel().new_classifier()
    expected = []
    for image in images:
        prediction = classifier.classify(image)
        expected.append({"code": prediction.code, "probabilities": prediction.probabilities})
    result = SoakResult(seconds, clients, workers, len(images), source)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        # A queue as deep as the clients' total window: this soak measures correctness and
        # leaks, not BUSY backpressure (tests/test_service_concurrency.py covers that).
        stack = EnclaveStack(Path(tmp), ("--workers", str(workers), "--queue", str(clients)))
        try:
            pid = stack.enclave.process.pid
            trust = stack.trust()
            start_status, start_fds = stack.enclave.status_kib(), open_fds(pid)
            log(f"enclave pid {pid}: RSS {start_status['VmRSS']} KiB, {start_fds} fds; "
                f"{clients} clients for {seconds:g} s")
            sampler = Sampler(stack.enclave)
            sampler.start()
            tally = Tally()
            started = time.monotonic()
            deadline = started + seconds
            threads = [threading.Thread(target=client_loop, name=f"client-{i}", daemon=True,
                                        args=(i, stack, trust, images, expected, deadline,
                                              per_session, tally))
                       for i in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=max(0.0, deadline - time.monotonic()) + CLIENT_TIMEOUT + 10)
            elapsed = time.monotonic() - started
            time.sleep(SETTLE_SECONDS)
            result.enclave_alive = stack.enclave.process.poll() is None
            end_status = stack.enclave.status_kib() if result.enclave_alive else {"VmRSS": 0, "VmHWM": 0}
            end_fds = open_fds(pid) if result.enclave_alive else -1
            sampler.stop.set()
            sampler.join(timeout=5)
            result.requests, result.sessions = tally.requests, tally.sessions
            result.errors, result.wrong = dict(tally.errors), tally.wrong
            result.throughput = round(tally.requests / elapsed, 2)
            result.latency_ms = {name: round(1000 * percentile(tally.latencies, q), 1)
                                 for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
            if tally.latencies:
                result.latency_ms["mean"] = round(1000 * statistics.fmean(tally.latencies), 1)
            result.rss_kib = {"start": start_status["VmRSS"],
                              "peak_sampled": max(sampler.samples or [0]),
                              "end": end_status["VmRSS"], "hwm": end_status["VmHWM"]}
            result.fds = {"start": start_fds, "end": end_fds}
            result.seconds = round(elapsed, 1)
        finally:
            stack.stop()
    return result


def format_result(result: SoakResult) -> str:
    rss = result.rss_kib
    return "\n".join([
        f"clients {result.clients}, enclave workers {result.workers}, {result.seconds} s, "
        f"{result.images} images ({result.image_source})",
        f"requests {result.requests} in {result.sessions} sessions, "
        f"throughput {result.throughput} req/s",
        f"errors {result.error_count}" + (f" {result.errors}" if result.errors else "")
        + f", wrong answers {result.wrong}",
        f"latency ms: {result.latency_ms}",
        f"enclave RSS KiB: start {rss['start']}, peak {rss['peak_sampled']} (VmHWM {rss['hwm']}), "
        f"end {rss['end']}",
        f"enclave open fds: start {result.fds['start']}, end {result.fds['end']}",
        f"enclave still running: {result.enclave_alive}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="enclave worker threads (default %(default)s, the enclave's own)")
    parser.add_argument("--images", type=int, default=24, help="distinct images to cycle")
    parser.add_argument("--requests-per-session", type=int, default=25)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.clients < 1 or args.workers < 1 or args.images < 1:
        parser.error("--seconds must be positive; --clients, --workers, --images at least 1")
    result = run_soak(args.seconds, args.clients, args.workers, args.images,
                      args.requests_per_session)
    print(format_result(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    ok = result.enclave_alive and not result.error_count and not result.wrong
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
