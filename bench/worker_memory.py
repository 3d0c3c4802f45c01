"""What each enclave worker costs in memory: RSS of the enclave process for 1, 2, 3, 4 workers.

    .venv/bin/python bench/worker_memory.py [--workers 1,2,3,4] [--interpreters 1] [--images 200]
                                            [--app enclave/app.py]

For each worker count it starts ``enclave/app.py --workers N`` over TCP (development
attestation, as bench/pipeline.py does), reads VmRSS once it is ready, sends ``--images``
images over one session with 2 x N requests in flight (so every worker decodes and
classifies at once), then reads VmRSS and VmHWM (the peak). It prints each figure and what
each worker beyond the first adds to the peak, (peak(N) - peak(1)) / (N - 1), against the
target of 10 MiB. ``--interpreters N`` starts every enclave with N interpreters (the row
for 1 worker then carries their cost; compare with a run at the default 1). ``--app`` points at another checkout's enclave/app.py (e.g. a ``git
worktree`` of an older commit) to measure its layout the same way. Exit status 1 if a
result differs from the in-process classifier's.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench.machine import load_line
from bench.pipeline import LocalEnclave, image_counts, load_images, mismatches, run_batch
from nitrolesion.enclave.service import default_interpreters
from nitrolesion.model.classifier import LesionModel

#: Issue 19: each worker beyond the first costs at most this much.
TARGET_PER_WORKER_MIB = 10.0


def measure(workers: int, images: list[bytes], app: Path, expected: list,
            extra: list[str] = ()) -> tuple[float, float, float, int]:
    """(RSS when ready, RSS after the batch, peak RSS, results that differ) in MiB."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as state:
        enclave = LocalEnclave(Path(state), ["--workers", str(workers), *extra], app=app)
        try:
            ready = enclave.proc.status_kib()["VmRSS"] / 1024
            batch = run_batch(enclave, enclave.trust(), images, window=2 * workers)
            status = enclave.proc.status_kib()
        finally:
            enclave.stop()
    return ready, status["VmRSS"] / 1024, status["VmHWM"] / 1024, mismatches(batch.outcomes, expected)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=image_counts, default=[1, 2, 3, 4],
                        help="worker counts, comma-separated (default 1,2,3,4)")
    parser.add_argument("--images", type=int, default=200, help="images per batch (default 200)")
    parser.add_argument("--interpreters", type=int,
                        help="enclave --interpreters for every run (default: the enclave's own)")
    parser.add_argument("--app", type=Path, default=ROOT / "enclave" / "app.py",
                        help="the enclave/app.py to run (default this checkout's)")
    args = parser.parse_args(argv)
    images, source = load_images(args.images)
    classifier = LesionModel().new_classifier()
    expected = [classifier.classify(image) for image in images]
    print(f"{platform.node()}: {os.cpu_count()} CPUs; app {args.app}")
    print(load_line("start", timings=False))
    print(f"images: {source}; 2 x workers requests in flight; "
          f"{args.interpreters or default_interpreters()} interpreter(s)")
    rows, wrong = [], 0
    for workers in args.workers:
        ready, after, peak, differ = measure(
            workers, images, args.app, expected,
            ["--interpreters", str(args.interpreters)] if args.interpreters else [])
        rows.append((workers, ready, after, peak))
        wrong += differ
    print(load_line("end  ", timings=False))
    base = rows[0]
    print(f"\n{'workers':>7}  {'RSS ready':>10}  {'RSS after batch':>15}  {'peak (VmHWM)':>12}  "
          f"{'peak per worker beyond the first':>32}")
    for workers, ready, after, peak in rows:
        extra = ((peak - base[3]) / (workers - base[0])) if workers != base[0] else None
        verdict = "" if extra is None else (
            f"{extra:>8.1f} MiB  {'met' if extra <= TARGET_PER_WORKER_MIB else 'NOT met'}"
            f" (<= {TARGET_PER_WORKER_MIB:g})")
        print(f"{workers:>7}  {ready:>6.1f} MiB  {after:>11.1f} MiB  {peak:>8.1f} MiB  {verdict:>32}")
    print(f"results identical to in-process: {'yes' if not wrong else f'NO, {wrong} differ'}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
