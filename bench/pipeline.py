"""The whole pipeline (client -> TCP -> enclave process -> workers) against in-process inference.

    .venv/bin/python bench/pipeline.py [--images 200] [--single 20] [--window 4] [--workers N]
                                       [--queue 16] [--eif enclave.eif]

In one run, on the same test-split images ($HAM10000_DIR, default ../shared/ham10000) and the
same model file:

1. baseline: preprocessing + inference in this process, one image after another, one
   interpreter thread (``LesionModel().new_classifier(num_threads=1).classify``);
2. single request: a new client per image - connect, HELLO/ATTESTATION, verify the document,
   SESSION_OPEN, classify one image, GOODBYE - against a local enclave process over TCP
   loopback (development attestation authority, as tests/harness.py starts it);
3. batch: all images over one session with ``classify_many(window=...)``.

It prints latency percentiles, throughput, the enclave's boot time and peak RSS, bytes on
the wire per image and a suggested ``nitro-cli run-enclave --memory``, each next to its
target. Timings are only meaningful on an otherwise idle machine (the load average is
printed first). Exit status 1 if a batch result differs from the in-process result.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench.stats import percentile  # noqa: E402
from harness import ENCLAVE_APP, Proc, free_port, tcp_env  # noqa: E402
from nitrolesion.enclave_image import image_files  # noqa: E402
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH, LesionModel  # noqa: E402
from nitrolesion.model.dataset import default_data_dir, load_split  # noqa: E402
from nitrolesion.model.labels import CODES  # noqa: E402
from nitrolesion.transport import Endpoint  # noqa: E402
from enclave.service import MAX_CONNECTIONS  # noqa: E402
from nitrolesion.model.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS  # noqa: E402
from nitrolesion.wire.frames import BUFFER_FRAMES, HEADER_SIZE, MAX_BODY  # noqa: E402
from parent.enclave_client import DEFAULT_WINDOW, EnclaveClient, Trust  # noqa: E402

MIB = 1024 * 1024

#: Targets from the "Serve many" issue.
TARGET_BATCH_RATIO = 0.9      # batch throughput >= 0.9 x baseline throughput
TARGET_SINGLE_EXTRA_MS = 60.0  # single request p50 <= baseline p50 + 60 ms
TARGET_RSS_MIB = 300.0
TARGET_BOOT_S = 4.0

#: Seconds to wait for the enclave's "ready in" line.
BOOT_TIMEOUT = 60.0
#: Results must equal the in-process ones this closely (same code, same model file).
TOLERANCE = 1e-6

# -- enclave memory sizing ---------------------------------------------------------------
# An enclave has no disk: the EIF's root file system is unpacked into enclave RAM at boot and
# stays there, next to the enclave's own Linux kernel. So --memory must hold
#     the application's peak RSS (measured here, VmHWM)
#   + the unpacked root file system (python:3.11-slim + enclave/requirements.txt + our code
#     and model; estimated below from this machine's installed packages)
#   + the kernel, init and their page tables (KERNEL_OVERHEAD_MIB, a round estimate)
# with HEADROOM for what this benchmark does not exercise (20 MiB images, many connections),
# rounded up to a multiple of 256 MiB and never below 512 MiB. nitro-cli also refuses less
# than 4 x the EIF file size (EIF-to-memory ratio enforced since aws-nitro-enclaves-cli
# PR #198, so the initramfs can be unpacked): pass --eif to include that bound.
#: Unpacked size of the python:3.11-slim base image (Debian slim + CPython): about 125 MiB.
BASE_IMAGE_MIB = 125.0
#: The enclave kernel, init and page tables: a round, conservative figure.
KERNEL_OVERHEAD_MIB = 64.0
#: Slack over the measured figures.
HEADROOM = 1.25
#: nitro-cli's minimum enclave memory relative to the EIF size.
EIF_MEMORY_RATIO = 4
MEMORY_STEP_MIB = 256
MEMORY_FLOOR_MIB = 512


# -- the enclave process -------------------------------------------------------------------


class LocalEnclave:
    """``enclave/app.py`` over TCP with the development authority, started by tests/harness.py.

    No parent server is started: sessions return results on the client connection, so the
    enclave's parent link only retries quietly in the background.
    """

    #: The enclave's own boot line (logged from main(), after imports).
    READY_LINE = r"ready in ([\d.]+) s \(key generation ([\d.]+) s, (\d+) workers"

    def __init__(self, state_dir: Path, extra_args: list[str]) -> None:
        self.dev_dir = state_dir / "dev-authority"
        self.port = free_port()
        self.started = time.perf_counter()
        self.proc = Proc([str(ENCLAVE_APP), "3", str(self.port), str(free_port()),
                          "--dev-attestation", str(self.dev_dir), *extra_args], tcp_env())
        try:
            ready = self.proc.wait_for(self.READY_LINE, timeout=BOOT_TIMEOUT)
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(f"the enclave did not become ready: {exc}") from None
        self.ready_at = time.perf_counter()
        self._logged = (float(ready.group(1)), float(ready.group(2)), ready.group(3))

    @property
    def boot_seconds(self) -> float:
        """Process start to the "ready in" line, as seen from outside."""
        return self.ready_at - self.started

    def logged_boot(self) -> tuple[float, float, str]:
        """(ready, key generation, workers) as the enclave logs them (from main(), after imports)."""
        return self._logged

    def cpu_seconds(self) -> float:
        """User + system CPU time the enclave process has used so far."""
        stat = Path(f"/proc/{self.proc.process.pid}/stat").read_text(encoding="ascii")
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        """VmHWM (peak resident set) of the enclave process, in MiB."""
        return self.proc.status_kib()["VmHWM"] / 1024

    def trust(self) -> Trust:
        return Trust.for_dev_enclave(self.dev_dir, ROOT)

    def endpoint(self) -> Endpoint:
        return Endpoint("tcp", 16, self.port)

    def stop(self) -> int | None:
        return self.proc.stop(timeout=30)


class CountingConnection:
    """A FramedConnection that counts the bytes of every frame (12-byte header + body)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.sent = 0
        self.received = 0

    def send(self, msg_type, body, **kwargs) -> None:
        self._inner.send(msg_type, body, **kwargs)
        self.sent += HEADER_SIZE + len(body)

    def receive(self, **kwargs):
        frame = self._inner.receive(**kwargs)
        self.received += HEADER_SIZE + len(frame.body)
        return frame

    def __getattr__(self, name):
        return getattr(self._inner, name)


# -- measurements --------------------------------------------------------------------------
def load_images(count: int) -> list[bytes]:
    images_dir = default_data_dir() / "images"
    ids = load_split("test")[:count]
    if len(ids) < count or not images_dir.is_dir():
        raise SystemExit(f"need {count} test-split images under {images_dir} (set HAM10000_DIR)")
    return [(images_dir / f"{image_id}.jpg").read_bytes() for image_id in ids]


def run_baseline(images: list[bytes]):
    classifier = LesionModel().new_classifier(num_threads=1)
    for image in images[:5]:  # warm-up: first invocations allocate and pick kernels
        classifier.classify(image)
    latencies, predictions = [], []
    started, cpu = time.perf_counter(), time.process_time()
    for image in images:
        begin = time.perf_counter()
        predictions.append(classifier.classify(image))
        latencies.append((time.perf_counter() - begin) * 1000)
    return latencies, time.perf_counter() - started, time.process_time() - cpu, predictions


def run_single(enclave: LocalEnclave, trust: Trust, images: list[bytes], repetitions: int) -> list[float]:
    def one(image: bytes) -> None:
        with EnclaveClient(enclave.endpoint(), trust) as client:
            client.attest()
            client.open_session()
            [outcome] = list(client.classify_many([image]))
        if outcome.result is None:
            raise RuntimeError(f"single request failed: {outcome.error}")

    one(images[0])  # warm-up: first connection imports and caches on both sides
    latencies = []
    for number in range(repetitions):
        begin = time.perf_counter()
        one(images[number % len(images)])
        latencies.append((time.perf_counter() - begin) * 1000)
    return latencies


def run_batch(enclave: LocalEnclave, trust: Trust, images: list[bytes], window: int):
    """(seconds for classify_many, enclave CPU seconds meanwhile, outcomes by index,
    counted connection)."""
    with EnclaveClient(enclave.endpoint(), trust) as client:
        client.attest()
        counted = CountingConnection(client.connection)
        client.connection = counted
        client.open_session()
        started, cpu = time.perf_counter(), enclave.cpu_seconds()
        outcomes = {outcome.index: outcome for outcome in client.classify_many(images, window=window)}
        seconds, cpu = time.perf_counter() - started, enclave.cpu_seconds() - cpu
    return seconds, cpu, outcomes, counted


def mismatches(outcomes: dict, predictions: list) -> int:
    wrong = 0
    for index, expected in enumerate(predictions):
        outcome = outcomes.get(index)
        if outcome is None or outcome.result is None or outcome.result["code"] != expected.code or any(
                abs(outcome.result["probabilities"][c] - expected.probabilities[c]) > TOLERANCE
                for c in CODES):
            wrong += 1
    return wrong


def rootfs_estimate_mib() -> float:
    """Unpacked enclave root file system: base image + pinned packages (as installed here) +
    the project files the Dockerfile copies."""
    names = []
    for line in (ROOT / "enclave" / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].split(";")[0].strip()
        if line:
            names.append(re.split(r"[=<>!~ ]", line, maxsplit=1)[0])
    total = 0
    for name in names:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            continue
        for file in files:
            try:
                total += os.path.getsize(file.locate())
            except OSError:
                pass
    total += sum(path.stat().st_size for path in image_files(ROOT))
    return BASE_IMAGE_MIB + total / MIB


def worst_case_mib(workers: int, queue: int) -> float:
    """What the enclave's own limits allow it to hold at once, far above what this benchmark's
    small JPEGs use: every connection's frame buffer full, every queued or running job a
    maximal image, every worker decoding a maximal picture (RGB, plus the converted copy)."""
    frames = MAX_CONNECTIONS * BUFFER_FRAMES * (HEADER_SIZE + MAX_BODY)
    jobs = (queue + workers) * DEFAULT_MAX_BYTES
    decoding = workers * DEFAULT_MAX_PIXELS * 3 * 2
    return (frames + jobs + decoding) / MIB


def suggested_memory_mib(peak_rss_mib: float, rootfs_mib: float, eif_mib: float | None) -> int:
    need = (peak_rss_mib + rootfs_mib + KERNEL_OVERHEAD_MIB) * HEADROOM
    if eif_mib is not None:
        need = max(need, EIF_MEMORY_RATIO * eif_mib)
    return max(MEMORY_FLOOR_MIB, math.ceil(need / MEMORY_STEP_MIB) * MEMORY_STEP_MIB)


# -- report --------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="batch and baseline size (default 200)")
    parser.add_argument("--single", type=int, default=20, help="single-request repetitions (default 20)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"requests in flight in the batch (default {DEFAULT_WINDOW}, as parent.py)")
    parser.add_argument("--workers", type=int, help="enclave --workers (default: the enclave's own)")
    parser.add_argument("--queue", type=int, default=16, help="enclave --queue (default 16, its own)")
    parser.add_argument("--eif", type=Path, help="a built enclave.eif, to apply nitro-cli's 4x rule")
    args = parser.parse_args(argv)

    images = load_images(args.images)
    load = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}  {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("  (machine busy: timings are not trustworthy)" if load[0] > 0.5 else ""))
    extra = ["--queue", str(args.queue)] + (["--workers", str(args.workers)] if args.workers else [])
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as state:
        enclave = LocalEnclave(Path(state), extra)
        try:
            logged_ready, keygen, workers = enclave.logged_boot()
            trust = enclave.trust()
            base_ms, base_seconds, base_cpu, predictions = run_baseline(images)
            single_ms = run_single(enclave, trust, images, args.single)
            batch_seconds, batch_cpu, outcomes, counted = run_batch(enclave, trust, images,
                                                                    args.window)
            rss = enclave.peak_rss_mib()
        finally:
            exit_status = enclave.stop()

    n = len(images)
    base_rate, batch_rate = n / base_seconds, n / batch_seconds
    base_p50, single_p50 = statistics.median(base_ms), statistics.median(single_ms)
    wire = (counted.sent + counted.received) / n
    mean_image = statistics.fmean(len(image) for image in images)
    rootfs = rootfs_estimate_mib()
    eif_mib = args.eif.stat().st_size / MIB if args.eif else None
    memory = suggested_memory_mib(rss, rootfs, eif_mib)
    wrong = mismatches(outcomes, predictions)

    rows = [
        ("baseline latency p50 / p95", f"{base_p50:.2f} / {percentile(base_ms, 0.95):.2f} ms", ""),
        ("single request latency p50 / p95",
         f"{single_p50:.2f} / {percentile(single_ms, 0.95):.2f} ms", ""),
        ("single minus baseline (p50)", f"{single_p50 - base_p50:.2f} ms",
         f"<= {TARGET_SINGLE_EXTRA_MS:g} ms  {verdict(single_p50 - base_p50 <= TARGET_SINGLE_EXTRA_MS)}"),
        ("baseline throughput", f"{base_rate:.1f} img/s", ""),
        (f"batch throughput (window {args.window}, workers {workers})", f"{batch_rate:.1f} img/s", ""),
        ("batch / baseline", f"{batch_rate / base_rate:.2f}x",
         f">= {TARGET_BATCH_RATIO:g}x  {verdict(batch_rate / base_rate >= TARGET_BATCH_RATIO)}"),
        ("CPU per image: baseline / enclave in batch",
         f"{base_cpu / n * 1000:.2f} / {batch_cpu / n * 1000:.2f} ms", "protocol + threads cost"),
        ("enclave boot to ready (process start)", f"{enclave.boot_seconds:.2f} s",
         f"<= {TARGET_BOOT_S:g} s  {verdict(enclave.boot_seconds <= TARGET_BOOT_S)}"),
        ("  as logged: ready in / key generation", f"{logged_ready:.2f} / {keygen:.2f} s", ""),
        ("enclave peak RSS (VmHWM)", f"{rss:.1f} MiB",
         f"<= {TARGET_RSS_MIB:g} MiB  {verdict(rss <= TARGET_RSS_MIB)}"),
        ("bytes on the wire per image (batch)", f"{wire / 1024:.2f} KiB",
         f"image {mean_image / 1024:.2f} KiB, +{(wire / mean_image - 1) * 100:.1f}%"),
        ("enclave worst case allowed by its limits", f"{worst_case_mib(int(workers), args.queue):.0f} MiB",
         f"{MAX_CONNECTIONS} connections x {BUFFER_FRAMES} frames of {MAX_BODY // MIB} MiB, "
         "maximal images queued and decoding"),
        ("suggested nitro-cli --memory", f"{memory} MiB",
         f"(RSS + rootfs ~{rootfs:.0f} + kernel {KERNEL_OVERHEAD_MIB:g}) x {HEADROOM:g}"
         + (f", >= {EIF_MEMORY_RATIO} x EIF {eif_mib:.0f}" if eif_mib else ", no --eif given")),
    ]
    print(f"{n} test-split images, model {DEFAULT_MODEL_PATH.name}; "
          f"{args.single} single requests; wire bytes count every frame after attestation")
    width = max(len(name) for name, _, _ in rows)
    print(f"{'metric':{width}}  {'value':>18}  target")
    for name, value, target in rows:
        print(f"{name:{width}}  {value:>18}  {target}")
    print(f"results identical to in-process: {'yes' if not wrong else f'NO, {wrong} differ'}; "
          f"enclave exit status after SIGTERM: {exit_status}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
