"""Time the network at several input sizes and view counts before training it.

Which input size a recipe can afford depends on the backbone and on how many mirror views
the exported file averages (``train.py --tta``): the cost is about size squared times
views. This builds the exported form of the network (untrained head; the time does not
depend on the weights' values), with its two outputs (probabilities and pooled features),
writes each float16 file and times it the way ``train.py`` times its candidates, under the
enclave's runtime on one core, preprocessing of a 600x450 photo included. The shipped
model (``--reference``, model 7) is timed in the same run, in turn with them (fastest of
three rounds each), and each size's ratio to it is printed against the budget (1.5x, chosen against 90 % of it):

    .venv-train/bin/python models/latency_budget.py 192 224 --backbone lite0 --views flips mirror

Leave the machine idle while it runs: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# These import no TensorFlow at module level: argument errors still come before it loads.
from train_export import (LATENCY_ROUNDS, VIEW_COUNTS, export_tflite, paired_latency_ms,
                          with_flip_averaging)
from train_network import BACKBONES, build_model, fetch_backbone
from train_selection import LATENCY_MARGIN, LATENCY_RATIO_BUDGET


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", type=int, nargs="*", default=[192, 208, 224],
                        help="square input sides to time (default: 192 208 224)")
    parser.add_argument("--views", nargs="+", choices=tuple(VIEW_COUNTS),
                        default=list(VIEW_COUNTS),
                        help="flips: four mirror views (the shipped form); mirror: two "
                             "(default: both)")
    parser.add_argument("--backbone", choices=BACKBONES, default="mobilenetv2")
    parser.add_argument("--reference", type=Path,
                        default=ROOT / "lesion_classifier.tflite",
                        help="the shipped file the budget is relative to (default: %(default)s)")
    parser.add_argument("--build", type=Path, default=ROOT.parent / "build",
                        help="where the backbone weights are cached (see train.py)")
    args = parser.parse_args(argv)
    if any(size < 32 for size in args.sizes):
        parser.error("sizes must be at least 32 pixels")

    weights = fetch_backbone(args.build, args.backbone)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            network, _ = build_model(size, weights, 0.0, 0, "train", args.backbone)
            for views in args.views:
                path = Path(scratch) / f"{size}-{views}.tflite"
                size_bytes = export_tflite(with_flip_averaging(network, views, features=True),
                                           "float16", None, path)
                rows.append((size, VIEW_COUNTS[views], size_bytes, path))
        latencies, reference = paired_latency_ms([row[3] for row in rows], args.reference)
    # The table comes last: the TFLite converter prints its own notes to stdout.
    print(f"reference {args.reference.name}: {reference:.1f} ms per photo (fastest of "
          f"{LATENCY_ROUNDS} rounds, timed in turn with the candidates); budget "
          f"{LATENCY_RATIO_BUDGET:g}x, chosen against {LATENCY_MARGIN * LATENCY_RATIO_BUDGET:.2f}x")
    print(f"{args.backbone}: {'size':>5} {'views':>6} {'bytes':>10} {'ms/photo':>9} {'ratio':>6}  fits")
    for (size, views, size_bytes, _), ms in zip(rows, latencies):
        ratio = ms / reference
        fits = "yes" if ratio <= LATENCY_MARGIN * LATENCY_RATIO_BUDGET else "no"
        print(f"{'':>{len(args.backbone) + 1}} {size:>5} {views:>6} {size_bytes:>10} "
              f"{ms:>9.1f} {ratio:>6.2f}  {fits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
