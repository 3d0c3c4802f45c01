"""The whole pipeline (client -> TCP -> enclave process -> workers) against in-process inference.

    .venv/bin/python bench/pipeline.py [--images 50,200,1000] [--rounds 2] [--single 20]
                                       [--window 4] [--workers N] [--interpreters N] [--queue 16]
                                       [--eif enclave.eif]
                                       [--app OTHER_CHECKOUT/enclave/app.py]

In one run, on the same images and the same model file, for each image count:

1. baseline: every in-process configuration of bench/baselines.py (preprocessing + inference
   in this process on all cores: one interpreter on one or N threads, N interpreters on N
   threads, one interpreter on N threads with decoding on another thread, the enclave's
   WorkerPool itself, batches of 2 and 4); the fastest is the baseline, and the script says
   which one it was;
2. batch: all images over one session with ``classify_many(window=...)`` against a local
   enclave process over TCP loopback (development attestation authority, as tests/harness.py
   starts it), timed from the first request to the last answer;
3. once: single requests, a new client per image - connect, HELLO/ATTESTATION, verify the
   document, SESSION_OPEN, classify one image, GOODBYE.

Each image count is measured ``--rounds`` times, baseline and batch in turn, and the best
round of each is reported (other load only ever slows a round down), with every round
printed. Images: the HAM10000 test split ($HAM10000_DIR, default ../shared/ham10000); without
it, the seven test-split images in sample_images/ repeated (the script says so).

It prints throughput and the batch / best-baseline ratio per image count, latency
percentiles, CPU per image (baseline, enclave, client), the enclave's boot time and peak RSS,
bytes on the wire per image and a suggested ``nitro-cli run-enclave --memory``, each next to
its target. Timings are only meaningful on an otherwise idle machine (the load average is
printed first and last, and the share of the CPUs other processes took during each
round). Exit status 1 if any result differs from the in-process result.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench.baselines import Run, configurations, largest_difference, run_all
from bench.machine import OtherCpu, load_line, process_ticks
from bench.stats import percentile
from harness import ENCLAVE_APP, Proc, free_port, tcp_env
from nitrolesion.attestation.dev_authority import DEV_POLICY_FILE, ROOT_CERT_FILE
from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.attestation.trust import load_pem_roots
from nitrolesion.enclave_image import image_files
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH, LesionModel, usable_cpus
from nitrolesion.model.dataset import default_data_dir, load_split
from nitrolesion.model.labels import CODES
from nitrolesion.transport import TcpEndpoint
from nitrolesion.enclave.service import MAX_CONNECTIONS, default_interpreters
from nitrolesion.model.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from nitrolesion.wire.frames import BUFFER_FRAMES, HEADER_SIZE, MAX_BODY
from nitrolesion.parent.enclave_client import DEFAULT_WINDOW, EnclaveClient, Trust

MIB = 1024 * 1024

#: Targets from issue 19 section 4 (the single-request, RSS and boot ones from "Serve many").
TARGET_BATCH_RATIO = 0.95     # batch throughput >= 0.95 x the best in-process configuration...
TARGET_FROM_IMAGES = 200      # ...for batches of this many images and more
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

    def __init__(self, state_dir: Path, extra_args: list[str], app: Path = ENCLAVE_APP) -> None:
        self.dev_dir = state_dir / "dev-authority"
        self.port = free_port()
        self.started = time.perf_counter()
        self.proc = Proc([str(app), "3", str(self.port), str(free_port()),
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
        return process_ticks(self.proc.process.pid) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        """VmHWM (peak resident set) of the enclave process, in MiB."""
        return self.proc.status_kib()["VmHWM"] / 1024

    def trust(self) -> Trust:
        """Trust the PCRs this enclave measured at boot (the policy.json its development
        authority wrote), not the files as they are now: the working tree may change while
        a benchmark runs, and that must not fail the attestation of a running enclave."""
        return Trust(AttestationPolicy.from_json_file(self.dev_dir / DEV_POLICY_FILE),
                     load_pem_roots(self.dev_dir / ROOT_CERT_FILE))

    def endpoint(self) -> TcpEndpoint:
        return TcpEndpoint(self.port)

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

    def send_frame(self, frame, **kwargs) -> None:
        # EnclaveClient sends through send_frame: count it here too (it used to reach the
        # inner connection uncounted through __getattr__).
        self.send(frame.type, frame.body, **kwargs)

    def receive(self, **kwargs):
        frame = self._inner.receive(**kwargs)
        self.received += HEADER_SIZE + len(frame.body)
        return frame

    def __getattr__(self, name):
        return getattr(self._inner, name)


# -- measurements --------------------------------------------------------------------------
SAMPLES_DIR = ROOT / "sample_images"


def load_images(count: int) -> tuple[list[bytes], str]:
    """(``count`` encoded images, where they came from): the first ``count`` test-split
    images, else the committed test-split samples repeated."""
    images_dir = default_data_dir() / "images"
    ids = load_split("test")[:count]
    if images_dir.is_dir() and len(ids) == count:
        return ([(images_dir / f"{image_id}.jpg").read_bytes() for image_id in ids],
                f"the first {count} HAM10000 test-split images ({images_dir})")
    samples = [path.read_bytes() for path in sorted(SAMPLES_DIR.glob("*.jpg"))]
    if not samples:
        raise SystemExit(f"no images: neither {images_dir} (set HAM10000_DIR) nor {SAMPLES_DIR}/*.jpg")
    return ([samples[i % len(samples)] for i in range(count)],
            f"{len(samples)} test-split samples from {SAMPLES_DIR.name}/ repeated to {count} "
            f"(dataset not found at {images_dir})")


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


@dataclass
class Batch:
    """One batch over one session: wall and CPU seconds (enclave, client), outcomes by
    index, the counted connection."""

    seconds: float
    enclave_cpu: float
    client_cpu: float
    outcomes: dict
    counted: CountingConnection
    #: Share of the CPUs processes other than the client and the enclave used meanwhile.
    other_cpu: float = 0.0

    def rate(self) -> float:
        return len(self.outcomes) / self.seconds


def run_batch(enclave: LocalEnclave, trust: Trust, images: list[bytes], window: int) -> Batch:
    """All ``images`` over one new attested session; only classify_many is timed."""
    with EnclaveClient(enclave.endpoint(), trust) as client:
        client.attest()
        counted = CountingConnection(client.connection)
        client.connection = counted
        client.open_session()
        with OtherCpu(enclave.proc.process.pid) as other:
            started, cpu, client_cpu = time.perf_counter(), enclave.cpu_seconds(), time.process_time()
            outcomes = {outcome.index: outcome for outcome in client.classify_many(images, window=window)}
            seconds = time.perf_counter() - started
            cpu, client_cpu = enclave.cpu_seconds() - cpu, time.process_time() - client_cpu
        return Batch(seconds, cpu, client_cpu, outcomes, counted, other.share)


def mismatches(outcomes: dict, predictions: list) -> int:
    wrong = 0
    for index, expected in enumerate(predictions):
        outcome = outcomes.get(index)
        if outcome is None or outcome.result is None or outcome.result.code != expected.code or any(
                abs(outcome.result.probabilities[c] - expected.probabilities[c]) > TOLERANCE
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


#: The batch's row in the throughput table.
BATCH = "batch through the enclave"


@dataclass
class Measure:
    """A throughput and the CPU share other processes took meanwhile."""

    images_per_second: float
    other_cpu: float


def rate_of(measure) -> float:
    """Images per second of a baselines.Run or a Measure."""
    return measure.images_per_second


def image_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 50,200,1000, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("image counts must be at least 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=image_counts, default=[50, 200, 1000],
                        help="image counts to measure, comma-separated (default 50,200,1000)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times each count is measured, baseline and batch in turn (default 2)")
    parser.add_argument("--single", type=int, default=20, help="single-request repetitions (default 20)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"requests in flight in the batch (default {DEFAULT_WINDOW}, as parent.py)")
    parser.add_argument("--workers", type=int, help="enclave --workers (default: the enclave's own)")
    parser.add_argument("--interpreters", type=int,
                        help="enclave --interpreters (default: the enclave's own)")
    parser.add_argument("--queue", type=int, default=16, help="enclave --queue (default 16, its own)")
    parser.add_argument("--eif", type=Path, help="a built enclave.eif, to apply nitro-cli's 4x rule")
    parser.add_argument("--app", type=Path, default=ENCLAVE_APP,
                        help="the enclave/app.py to run (default this checkout's; e.g. a `git "
                             "archive` of an older commit, to measure its layout the same way)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.single < 1 or args.window < 1:
        parser.error("--rounds, --single and --window must be at least 1")

    counts = args.images
    images, source = load_images(counts[-1])
    print(f"{platform.node()}: {os.cpu_count()} CPUs ({usable_cpus()} usable), "
          f"{platform.processor() or platform.machine()}")
    print(load_line("start"))
    print(f"images: {source}; model {DEFAULT_MODEL_PATH.name}; enclave {args.app}")
    model = LesionModel()
    configs = configurations(model)
    baselines: dict[int, list[list[Run]]] = {n: [] for n in counts}
    batches: dict[int, list[Batch]] = {n: [] for n in counts}
    extra = (["--queue", str(args.queue)] + (["--workers", str(args.workers)] if args.workers else [])
             + (["--interpreters", str(args.interpreters)] if args.interpreters else []))
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as state:
        enclave = LocalEnclave(Path(state), extra, app=args.app)
        try:
            logged_ready, keygen, workers = enclave.logged_boot()
            trust = enclave.trust()
            single_ms = run_single(enclave, trust, images, args.single)
            run_batch(enclave, trust, images[:20], args.window)  # warm-up, as the baselines have
            for _ in range(args.rounds):
                for n in counts:
                    baselines[n].append(run_all(configs, images[:n]))
                    batches[n].append(run_batch(enclave, trust, images[:n], args.window))
            rss = enclave.peak_rss_mib()
        finally:
            exit_status = enclave.stop()
    print(load_line("end  "))

    # -- results identical: every configuration and every batch against the first one ----
    reference = {n: next(run for run in baselines[n][0] if run.name == configs[0][0]).predictions
                 for n in counts}
    differ = max(largest_difference(run.predictions, reference[n])
                 for n in counts for runs in baselines[n] for run in runs)
    wrong = sum(mismatches(batch.outcomes, reference[n]) for n in counts for batch in batches[n])

    # -- throughput: best round of each configuration and of the batch, per count ------------
    print(f"\nthroughput in images/s, best of {args.rounds} round(s); in brackets every round, "
          "with the share of the CPUs other processes took during it;\n"
          f"batch = client -> TCP -> enclave, window {args.window}, {workers} workers, "
          f"{args.interpreters or default_interpreters()} interpreter(s)")
    names = [name for name, _ in configs]
    measured = {(n, name): [run for runs in baselines[n] for run in runs if run.name == name]
                for n in counts for name in names}
    measured.update({(n, BATCH): [Measure(b.rate(), b.other_cpu) for b in batches[n]] for n in counts})
    best = {key: max(runs, key=rate_of) for key, runs in measured.items()}

    def cell(key) -> str:
        rounds = " / ".join(f"{rate_of(run):.0f} ({run.other_cpu:.0%})" for run in measured[key])
        return f"{rate_of(best[key]):.1f} [{rounds}]"

    width = max(len(name) for name in names) + 2
    cells = {key: cell(key) for key in measured}
    column = max(len(text) for text in cells.values()) + 2
    print(f"{'configuration':{width}}" + "".join(f"{f'{n} images':>{column}}" for n in counts))
    for name in [*names, BATCH]:
        print(f"{name:{width}}" + "".join(f"{cells[n, name]:>{column}}" for n in counts))

    print(f"\n{'images':>6}  {'best in-process configuration':{width}}{'baseline':>10}{'batch':>9}"
          f"{'batch / baseline':>18}{'other CPU':>11}  target")
    for n in counts:
        winner = max(names, key=lambda name: rate_of(best[n, name]))
        base, batch = best[n, winner], best[n, BATCH]
        ratio = rate_of(batch) / rate_of(base)
        target = (f">= {TARGET_BATCH_RATIO:g}x  {verdict(ratio >= TARGET_BATCH_RATIO)}"
                  if n >= TARGET_FROM_IMAGES else f"(target applies from {TARGET_FROM_IMAGES} images)")
        print(f"{n:>6}  {winner:{width}}{rate_of(base):>10.1f}{rate_of(batch):>9.1f}"
              f"{ratio:>17.2f}x{f'{base.other_cpu:.0%}/{batch.other_cpu:.0%}':>11}  {target}")

    # -- the rest, at the largest count ------------------------------------------------------
    n = counts[-1]
    base_run = best[n, max(names, key=lambda name: rate_of(best[n, name]))]
    batch = max(batches[n], key=Batch.rate)
    latency_run = min((run for runs in baselines[n] for run in runs),
                      key=lambda run: statistics.median(run.latencies_ms))
    base_p50, single_p50 = statistics.median(latency_run.latencies_ms), statistics.median(single_ms)
    wire = (batch.counted.sent + batch.counted.received) / n
    mean_image = statistics.fmean(len(image) for image in images[:n])
    rootfs = rootfs_estimate_mib()
    eif_mib = args.eif.stat().st_size / MIB if args.eif else None
    memory = suggested_memory_mib(rss, rootfs, eif_mib)
    rows = [
        (f"in-process latency p50 / p95 ({latency_run.name})",
         f"{base_p50:.2f} / {percentile(latency_run.latencies_ms, 0.95):.2f} ms", ""),
        ("single request latency p50 / p95",
         f"{single_p50:.2f} / {percentile(single_ms, 0.95):.2f} ms", ""),
        ("single minus in-process (p50)", f"{single_p50 - base_p50:.2f} ms",
         f"<= {TARGET_SINGLE_EXTRA_MS:g} ms  {verdict(single_p50 - base_p50 <= TARGET_SINGLE_EXTRA_MS)}"),
        (f"CPU per image, {n} images: baseline / enclave / client",
         f"{base_run.cpu_seconds / n * 1000:.2f} / {batch.enclave_cpu / n * 1000:.2f} / "
         f"{batch.client_cpu / n * 1000:.2f} ms", "enclave + client - baseline = protocol cost"),
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
    print(f"\n{args.single} single requests; wire bytes count every frame after attestation")
    width = max(len(name) for name, _, _ in rows)
    print(f"{'metric':{width}}  {'value':>22}  target")
    for name, value, target in rows:
        print(f"{name:{width}}  {value:>22}  {target}")
    print(f"results identical to in-process: "
          f"{'yes' if not wrong and differ <= TOLERANCE else f'NO, {wrong} batch results differ'}"
          f" (largest difference between in-process configurations {differ:.1g}); "
          f"enclave exit status after SIGTERM: {exit_status}")
    return 1 if wrong or differ > TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(main())
