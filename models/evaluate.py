"""Evaluate the shipped TFLite model on a folder of images and a HAM10000-style metadata CSV.

    python models/evaluate.py                                  # committed test split in ../shared
    python models/evaluate.py IMAGES_DIR METADATA_CSV          # every listed image found there
    python models/evaluate.py --split val --predictions val.csv --upscale 3

The images go through exactly the enclave's code path (``Classifier.classify`` on the encoded
bytes: shared preprocessing, then the interpreter). A JSON summary goes to stdout: accuracy,
balanced accuracy, macro one-vs-rest ROC-AUC, top-3 accuracy, per-class precision/recall,
the confusion matrix, calibration (expected calibration error and a reliability table of
the top probability), the triage (the refer flag as a malignant-vs-benign screen: refer
sensitivity and specificity, melanoma sensitivity at the refer threshold, the malignant
score's ROC-AUC, the share flagged "not a lesion"), and 95 % confidence intervals for the
headline and triage figures and per-class recalls (a bootstrap over lesions within each
diagnosis; ``--bootstrap 0`` skips it). The probabilities are the calibrated ones the
enclave returns (the model's triage file beside it); ``--no-triage`` scores the model's own
probabilities instead, for a fresh training export that has no triage file yet (no triage
figures, no ``malignant``/``refer`` columns): the paired validation comparison of two
candidates (models/compare.py) reads such files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from nitrolesion.errors import NitroLesionError
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH, LesionModel
from nitrolesion.model.dataset import (
    SPLIT_NAMES, default_data_dir, image_path, load_split, read_metadata)
from nitrolesion.model.labels import DEFAULT_LABELS_PATH
from nitrolesion.model.metrics import (
    CONFIDENCE_LEVEL, calibration, headline_figures, lesion_bootstrap, summarize,
    triage_figures, zero_width_note)
from nitrolesion.model.predictions import Predictions, write_predictions


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
                        help="write one CSV row per image: image_id, predicted code, "
                             "7 probabilities, malignant, refer")
    parser.add_argument("--upscale", type=int, default=1,
                        help="enlarge each image N times (bicubic, JPEG q95) before classifying, "
                             "to check full-resolution inputs")
    parser.add_argument("--confusion-png", type=Path, help="also draw the confusion matrix here")
    parser.add_argument("--no-triage", action="store_true",
                        help="score the model's uncalibrated probabilities without a triage "
                             "file (a fresh training export); no triage figures or columns")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                        help="resamples for the 95%% confidence intervals (default 2000, about "
                             "4 s for the test split; 0: no intervals). Whole lesions are "
                             "resampled within each diagnosis, because images of one lesion "
                             "are not independent")
    parser.add_argument("--bootstrap-seed", type=int, default=0,
                        help="seed of the resampling (default 0), so the intervals repeat")
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
    if args.bootstrap < 0:
        parser.error("--bootstrap must be >= 0")
    if args.limit < 0:
        parser.error("--limit must be >= 0")

    try:
        model = LesionModel(args.model, args.labels, triage=not args.no_triage)
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
    y_true, probs, lesions, image_ids, failed = [], [], [], [], []
    malignant, refer, not_a_lesion = [], [], []
    for record in present:
        data = image_path(images_dir, record.image_id).read_bytes()
        try:
            if args.upscale > 1:
                data = upscaled(data, args.upscale)
            output = classifier.predict_array(classifier.preprocess(data))
            prediction = None if args.no_triage else classifier.prediction_from(output)
        except NitroLesionError as exc:
            failed.append({"image_id": record.image_id, "error": str(exc)})
            continue
        y_true.append(codes.index(record.dx))
        lesions.append(record.lesion_id)
        image_ids.append(record.image_id)
        if prediction is None:
            probs.append(list(output.probabilities))
            continue
        probs.append([prediction.probabilities[c] for c in codes])
        malignant.append(prediction.malignant)
        refer.append(prediction.refer)
        not_a_lesion.append(prediction.refer_reason == "not_a_lesion")
    elapsed = time.perf_counter() - started
    if not probs:
        print("evaluate: no image could be classified", file=sys.stderr)
        return 1

    y_true, probs = np.array(y_true), np.array(probs)
    malignant, refer = np.array(malignant), np.array(refer, dtype=bool)
    summary = summarize(y_true, probs, codes)
    summary["calibration"] = calibration(y_true, probs)
    triage = model.triage is not None
    if triage:
        summary["triage"] = {
            "refer_threshold": model.triage.refer_threshold,
            "temperature": model.triage.temperature,
            **triage_figures(y_true, malignant, refer, codes),
            "not_a_lesion_flagged": float(np.mean(not_a_lesion)),
        }
    else:
        summary["triage"] = None  # --no-triage: the model's own probabilities

    def figures(at: np.ndarray) -> dict[str, float]:
        headline = headline_figures(y_true[at], probs[at], codes)
        if not triage:
            return headline
        return {**headline, **triage_figures(y_true[at], malignant[at], refer[at], codes)}

    if args.bootstrap:
        intervals = lesion_bootstrap(figures,
                                     y_true, lesions, args.bootstrap, args.bootstrap_seed,
                                     CONFIDENCE_LEVEL)
        summary["confidence_intervals"] = {
            "level": CONFIDENCE_LEVEL,
            "method": "percentile bootstrap; lesions drawn with replacement within each "
                      "diagnosis",
            "resamples": args.bootstrap,
            "seed": args.bootstrap_seed,
            "lesions": len(set(lesions)),
            **{name: [round(low, 4), round(high, 4)] for name, (low, high) in intervals.items()},
        }
        note = zero_width_note(
            intervals, "every image the figure counts was right (or every one wrong), so no "
                       "resample can differ; the bootstrap cannot see past the sample here, "
                       "and the true figure is less certain than a point")
        if note:
            summary["confidence_intervals"]["zero_width"] = note
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
        write_predictions(args.predictions, Predictions(
            image_ids, codes, probs, *((malignant, refer) if triage else (None, None))))
    if args.confusion_png:
        render_confusion_png(summary["confusion_matrix"]["rows_true_cols_predicted"], codes,
                             args.confusion_png,
                             f"{args.model.name} on {split} split ({summary['n_images']} images)")
    print(json.dumps(json_safe(summary), indent=2))
    return 0


def json_safe(value):
    """``value`` with every NaN (a ROC-AUC with no positives or no negatives) as null, so
    the summary is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
