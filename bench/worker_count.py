"""Which enclave --workers is fastest: one enclave process per worker count, batches in turn.

    .venv/bin/python bench/worker_count.py [--workers 1,2,3,4] [--images 200] [--rounds 3]

It starts ``enclave/app.py --workers N`` for every N (over TCP with the development
attestation authority, as bench/pipeline.py does; an enclave waiting for work sleeps), then
sends ``--images`` images over one session to each in turn, ``--rounds`` times, with the
parent's window (DEFAULT_WINDOW requests in flight). Taking turns round by round puts every
count under the same load, so the comparison holds even when the machine is shared; each
round prints the CPU share other processes took during it. It prints images/s per count
(best round, and every round) and which count was fastest. Exit status 1 if a result
differs from the in-process classifier's.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from bench.machine import load_line
from bench.pipeline import LocalEnclave, image_counts, load_images, mismatches, run_batch
from nitrolesion.model.classifier import LesionModel
from nitrolesion.parent.enclave_client import DEFAULT_WINDOW


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=image_counts, default=[1, 2, 3, 4],
                        help="worker counts, comma-separated (default 1,2,3,4)")
    parser.add_argument("--images", type=int, default=200, help="images per batch (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="batches per worker count (default 3)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"requests in flight (default {DEFAULT_WINDOW}, as parent.py)")
    args = parser.parse_args(argv)
    images, source = load_images(args.images)
    classifier = LesionModel().new_classifier()
    expected = [classifier.classify(image) for image in images]
    print(load_line("start"))
    print(f"images: {source}; window {args.window}")
    rates: dict[int, list[tuple[float, float]]] = {n: [] for n in args.workers}
    wrong = 0
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as state, contextlib.ExitStack() as stack:
        enclaves = {}
        for workers in args.workers:
            enclave = LocalEnclave(Path(state) / str(workers), ["--workers", str(workers)])
            stack.callback(enclave.stop)
            enclaves[workers] = (enclave, enclave.trust())
            run_batch(enclave, enclaves[workers][1], images[:20], args.window)  # warm-up
        for _ in range(args.rounds):
            for workers, (enclave, trust) in enclaves.items():
                batch = run_batch(enclave, trust, images, args.window)
                rates[workers].append((batch.rate(), batch.other_cpu))
                wrong += mismatches(batch.outcomes, expected)
    print(load_line("end  "))
    print(f"\n{'workers':>7}  {'best img/s':>10}  every round (other processes' CPU share)")
    for workers, measured in rates.items():
        rounds = " / ".join(f"{rate:.1f} ({other:.0%})" for rate, other in measured)
        print(f"{workers:>7}  {max(rate for rate, _ in measured):>10.1f}  {rounds}")
    fastest = max(rates, key=lambda n: max(rate for rate, _ in rates[n]))
    print(f"fastest: --workers {fastest}; results identical to in-process: "
          f"{'yes' if not wrong else f'NO, {wrong} differ'}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
