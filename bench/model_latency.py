"""Per-image latency of preprocessing + the TFLite interpreter, pinned to one CPU core.

    python bench/model_latency.py [--images N] [--size 600x450]

Measures, on the same images in one run: (a) baseline = Pillow decode only, (b) the shared
preprocessing, (c) preprocessing + interpreter (what the enclave does per image), all on one
core, then (d) = (c) with the interpreter on every core this process may use (as the
enclave's one interpreter does with ``--interpreters 1``), one image at a time. Images are dataset images from
$HAM10000_DIR (default ../shared/ham10000) re-encoded at a full-photo size (600x450 by
default), else the seven test-split samples in sample_images/ re-encoded the same way. It
prints the load average and the CPU share other processes took while (c) and (d) ran:
figures from a busy machine are not the model's. Target: (c) <= 30 ms per image on one core.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


from bench.machine import OtherCpu, load_line
from bench.stats import percentile
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH, LesionModel
from nitrolesion.model.dataset import default_data_dir, load_split
from nitrolesion.model.preprocess import preprocess_image
from nitrolesion.model.triage import triage_path_for

TARGET_MS = 30.0  # issue 2: preprocessing + interpreter, one image, one core
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "sample_images"


def sample_photos(count: int, size: tuple[int, int]) -> tuple[list[bytes], str]:
    """``count`` JPEGs at ``size``: test-split images re-encoded, else the committed
    test-split samples (sample_images/) re-encoded and repeated, else noise."""
    images_dir = default_data_dir() / "images"
    ids = load_split("test")[:count] if images_dir.is_dir() else []
    sources = [images_dir / f"{image_id}.jpg" for image_id in ids]
    source = f"{len(sources)} test-split images re-encoded at {size[0]}x{size[1]}"
    if not sources:
        samples = sorted(SAMPLES_DIR.glob("*.jpg"))
        sources = [samples[i % len(samples)] for i in range(count)] if samples else []
        source = (f"{len(samples)} test-split samples from {SAMPLES_DIR.name}/ re-encoded at "
                  f"{size[0]}x{size[1]}, repeated to {count} (dataset not found at {images_dir})")
    photos = []
    for path in sources:
        with Image.open(path) as image:
            big = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=92)
        photos.append(buffer.getvalue())
    if photos:
        return photos, source
    rng = np.random.default_rng(0)
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            buffer, format="JPEG", quality=92)
        photos.append(buffer.getvalue())
    return photos, f"{count} synthetic {size[0]}x{size[1]} JPEGs (no dataset, no samples)"


def timed(function, items) -> list[float]:
    out = []
    for item in items:
        start = time.perf_counter()
        function(item)
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def describe(name: str, samples: list[float], baseline: float) -> str:
    p95 = percentile(samples, 0.95)
    return (f"{name:34s} mean {statistics.fmean(samples):7.2f} ms  p50 {statistics.median(samples):7.2f}"
            f"  p95 {p95:7.2f}  x{statistics.fmean(samples) / baseline:5.2f} of decode")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", default="600x450", help="WIDTHxHEIGHT of the test photos")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="TFLite file to time")
    parser.add_argument("--model-only", action="store_true",
                        help="time preprocessing and the interpreter without the triage, even "
                             "when the model has a triage file (train.py compares candidates, "
                             "which have none yet, with the shipped model this way)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (milliseconds) instead of the table; "
                             "models/train.py reads it to keep the shipped file within budget")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    all_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if all_cpus:
        os.sched_setaffinity(0, {sorted(all_cpus)[0]})
    # A freshly exported candidate (train.py times each one) has no triage file yet: then
    # time the model alone, preprocessing and interpreter, as its budget means.
    has_triage = not args.model_only and triage_path_for(Path(args.model)).exists()
    model = LesionModel(args.model, triage=has_triage)
    classifier = model.new_classifier(num_threads=1)

    def run(on):
        if has_triage:
            return lambda photo: on.classify(photo)
        return lambda photo: on.predict_array(preprocess_image(photo, model.input_size))

    photos, source = sample_photos(args.images, (width, height))
    for photo in photos[:5]:  # warm-up: first invocations allocate and pick kernels
        run(classifier)(photo)

    decode = timed(lambda b: Image.open(io.BytesIO(b)).convert("RGB"), photos)
    preprocess = timed(lambda b: preprocess_image(b, model.input_size), photos)
    with OtherCpu() as other:
        full = timed(run(classifier), photos)
    baseline = statistics.fmean(decode)
    mean_full = statistics.fmean(full)
    if args.json:
        print(json.dumps({"model": str(args.model), "images": source, "target_ms": TARGET_MS,
                          **{f"{name}_{stat}": round(value, 3) for name, samples in
                             (("decode", decode), ("preprocess", preprocess), ("full", full))
                             for stat, value in (("mean", statistics.fmean(samples)),
                                                 ("p95", percentile(samples, 0.95)))}}))
        return 0
    print(load_line("load:"))
    print(f"model {model.model_path.name}: {len(model.model_bytes) / 1e6:.2f} MB, "
          f"input {model.input_size}x{model.input_size}; 1 core, 1 interpreter thread")
    print(f"images: {source}")
    print(describe("baseline: Pillow decode only", decode, baseline))
    print(describe("shared preprocessing", preprocess, baseline))
    print(describe("preprocessing + interpreter" + (" + triage" if has_triage else ""),
                   full, baseline))
    print(f"  other processes used {other.share:.0%} of the CPUs meanwhile")
    print(f"target <= {TARGET_MS:g} ms per image: "
          f"{'met' if mean_full <= TARGET_MS else 'NOT met'} ({mean_full:.2f} ms)")
    if all_cpus and len(all_cpus) > 1:  # the enclave's --interpreters 1: one interpreter on every CPU
        os.sched_setaffinity(0, all_cpus)
        several = model.new_classifier(num_threads=len(all_cpus))
        for photo in photos[:5]:
            run(several)(photo)
        with OtherCpu() as other:
            spread = timed(run(several), photos)
        print(describe(f"same, interpreter on {len(all_cpus)} cores", spread, baseline))
        print(f"  other processes used {other.share:.0%} of the CPUs meanwhile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
