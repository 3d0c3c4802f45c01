"""Time the network at several input sizes and view counts before training it.

Which input size a recipe can afford depends on how many mirror views the exported file
averages (``train.py --tta``): the cost is about size squared times views. This builds the
exported form of the network (untrained head; the time does not depend on the weights'
values), writes each float16 file and times it the way ``train.py`` times its candidates,
under the enclave's runtime on one core, preprocessing of a 600x450 photo included:

    .venv-train/bin/python models/latency_budget.py 192 208 224 --views flips mirror

Leave the machine idle while it runs: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# These import no TensorFlow at module level: argument errors still come before it loads.
from train_export import (VIEW_COUNTS, export_tflite, runtime_latency_ms,
                          with_flip_averaging)
from train_network import build_model, fetch_backbone
from train_selection import LATENCY_BUDGET_MS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", type=int, nargs="*", default=[192, 208, 224],
                        help="square input sides to time (default: 192 208 224)")
    parser.add_argument("--views", nargs="+", choices=tuple(VIEW_COUNTS),
                        default=list(VIEW_COUNTS),
                        help="flips: four mirror views (the shipped form); mirror: two "
                             "(default: both)")
    parser.add_argument("--build", type=Path, default=ROOT.parent / "build",
                        help="where the backbone weights are cached (see train.py)")
    args = parser.parse_args(argv)
    if any(size < 32 for size in args.sizes):
        parser.error("sizes must be at least 32 pixels")

    weights = fetch_backbone(args.build)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            network, _ = build_model(size, weights, 0.0, 0, "train")
            for views in args.views:
                path = Path(scratch) / f"{size}-{views}.tflite"
                export_tflite(with_flip_averaging(network, views), "float16", None, path)
                rows.append((size, VIEW_COUNTS[views], runtime_latency_ms(path)))
    # The table comes last: the TFLite converter prints its own notes to stdout.
    print(f"budget: {LATENCY_BUDGET_MS:.0f} ms per photo (90 % of the 30 ms target)")
    print(f"{'size':>5} {'views':>6} {'ms/photo':>9}  fits")
    for size, views, ms in rows:
        fits = "yes" if ms <= LATENCY_BUDGET_MS else "no"
        print(f"{size:>5} {views:>6} {ms:>9.1f}  {fits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
