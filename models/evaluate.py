"""Evaluate the shipped TFLite model on a folder of images and a HAM10000-style metadata CSV.

    python models/evaluate.py                                  # committed test split in ../shared
    python models/evaluate.py IMAGES_DIR METADATA_CSV          # every listed image found there
    python models/evaluate.py --split val --predictions val.csv --upscale 3

The images go through exactly the enclave's code path (``Classifier.classify`` on the encoded
bytes: shared preprocessing, then the interpreter). A JSON summary goes to stdout: accuracy,
balanced accuracy, macro one-vs-rest ROC-AUC, top-3 accuracy, per-class precision/recall and
the confusion matrix.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nitrolesion.errors import NitroLesionError  # noqa: E402
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH, LesionModel  # noqa: E402
from nitrolesion.model.dataset import (  # noqa: E402
    SPLIT_NAMES, default_data_dir, image_path, load_split, read_metadata)
from nitrolesion.model.labels import DEFAULT_LABELS_PATH  # noqa: E402
from nitrolesion.model.metrics import summarize  # noqa: E402


def upscaled(data: bytes, factor: int) -> bytes:
    """Re-encode an image ``factor`` times larger (bicubic, JPEG q95), like a full-size photo."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        big = image.convert("RGB").resize((image.width * factor, image.height * factor),
                                          Image.Resampling.BICUBIC)
    out = io.BytesIO()
    big.save(out, format="JPEG", quality=95)
    return out.getvalue()


def render_confusion_png(matrix: list[list[int]], codes: list[str], path: Path, title: str) -> None:
    """Draw a row-normalised confusion matrix with counts as a PNG (Pillow only)."""
    from PIL import Image, ImageDraw

    cell, margin_left, margin_top = 72, 90, 70
    n = len(codes)
    image = Image.new("RGB", (margin_left + n * cell + 20, margin_top + n * cell + 60), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin_left, 10), title, fill="black")
    draw.text((margin_left, 30), "rows: true diagnosis, columns: predicted; colour = row share",
              fill="black")
    for j, code in enumerate(codes):
        draw.text((margin_left + j * cell + cell // 3, margin_top - 18), code, fill="black")
    for i, code in enumerate(codes):
        row_total = max(sum(matrix[i]), 1)
        draw.text((20, margin_top + i * cell + cell // 2 - 6), code, fill="black")
        for j in range(n):
            share = matrix[i][j] / row_total
            shade = int(255 - 200 * share)
            box = (margin_left + j * cell, margin_top + i * cell,
                   margin_left + (j + 1) * cell, margin_top + (i + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline="grey")
            colour = "white" if share > 0.6 else "black"
            draw.text((box[0] + 8, box[1] + 22), f"{matrix[i][j]}", fill=colour)
            draw.text((box[0] + 8, box[1] + 40), f"{share:.0%}", fill=colour)
    draw.text((margin_left, margin_top + n * cell + 15), "predicted ->", fill="black")
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Evaluate the shipped TFLite model; prints a JSON summary.",
        epilog="Data default: $HAM10000_DIR or ../shared/ham10000 (images/ and "
               "HAM10000_metadata.csv), restricted to the committed test split.")
    parser.add_argument("images", nargs="?", type=Path, help="folder of <image_id>.jpg files")
    parser.add_argument("metadata", nargs="?", type=Path,
                        help="CSV with HAM10000 columns (lesion_id,image_id,dx,...)")
    parser.add_argument("--images", dest="images_opt", type=Path, help="same as IMAGES")
    parser.add_argument("--metadata", dest="metadata_opt", type=Path, help="same as METADATA")
    parser.add_argument("--split", choices=SPLIT_NAMES + ("all",),
                        help="restrict to a committed split (default: test for the default "
                             "data folder, all for a folder you name)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS_PATH)
    parser.add_argument("--predictions", type=Path,
                        help="write one CSV row per image: image_id, predicted code, 7 probabilities")
    parser.add_argument("--upscale", type=int, default=1,
                        help="enlarge each image N times (bicubic, JPEG q95) before classifying, "
                             "to check full-resolution inputs")
    parser.add_argument("--confusion-png", type=Path, help="also draw the confusion matrix here")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    args = parser.parse_args(argv)

    images_dir = args.images_opt or args.images
    metadata = args.metadata_opt or args.metadata
    explicit = images_dir is not None or metadata is not None
    data_dir = default_data_dir()
    images_dir = images_dir or data_dir / "images"
    metadata = metadata or data_dir / "HAM10000_metadata.csv"
    split = args.split or ("all" if explicit else "test")
    if not metadata.is_file() or not images_dir.is_dir():
        print(f"evaluate: need an images folder and a metadata CSV; not found: "
              f"{images_dir if not images_dir.is_dir() else metadata} "
              f"(set HAM10000_DIR or pass IMAGES_DIR METADATA_CSV)", file=sys.stderr)
        return 2
    if args.upscale < 1:
        parser.error("--upscale must be >= 1")

    try:
        model = LesionModel(args.model, args.labels)
        classifier = model.new_classifier()
        records = read_metadata(metadata)
    except (NitroLesionError, ValueError, OSError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    if split != "all":
        wanted = set(load_split(split))
        records = [r for r in records if r.image_id in wanted]
    codes = [label.code for label in model.labels]
    unknown = sorted({r.dx for r in records} - set(codes))
    if unknown:
        print(f"evaluate: metadata has diagnosis codes the model does not know: {unknown}",
              file=sys.stderr)
        return 2
    present = [r for r in records if image_path(images_dir, r.image_id).is_file()]
    missing = len(records) - len(present)
    if args.limit:
        present = present[: args.limit]
    if not present:
        print(f"evaluate: none of the {len(records)} listed images are in {images_dir}",
              file=sys.stderr)
        return 2

    started = time.perf_counter()
    y_true, probs, failed, rows = [], [], [], []
    for record in present:
        data = image_path(images_dir, record.image_id).read_bytes()
        try:
            if args.upscale > 1:
                data = upscaled(data, args.upscale)
            prediction = classifier.classify(data)
        except NitroLesionError as exc:
            failed.append({"image_id": record.image_id, "error": str(exc)})
            continue
        y_true.append(codes.index(record.dx))
        probs.append([prediction.probabilities[c] for c in codes])
        rows.append([record.image_id, codes[int(np.argmax(probs[-1]))]]
                    + [f"{p:.6f}" for p in probs[-1]])
    elapsed = time.perf_counter() - started
    if not probs:
        print("evaluate: no image could be classified", file=sys.stderr)
        return 1

    summary = summarize(np.array(y_true), np.array(probs), codes)
    summary = {
        "model": str(args.model),
        "model_sha256": hashlib.sha256(model.model_bytes).hexdigest(),
        "images_dir": str(images_dir),
        "metadata": str(metadata),
        "split": split,
        "upscale": args.upscale,
        "missing_images": missing,
        "failed_images": failed,
        "seconds": round(elapsed, 2),
        **summary,
    }
    if args.predictions:
        tmp = args.predictions.with_name(args.predictions.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_id", "predicted"] + [f"p_{c}" for c in codes])
            writer.writerows(rows)
        os.replace(tmp, args.predictions)
    if args.confusion_png:
        render_confusion_png(summary["confusion_matrix"]["rows_true_cols_predicted"], codes,
                             args.confusion_png,
                             f"{args.model.name} on {split} split ({summary['n_images']} images)")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
