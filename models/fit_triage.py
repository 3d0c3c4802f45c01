"""Fit the triage file of a two-output TFLite model, and report and draw its figures.

    python models/fit_triage.py [--model models/lesion_classifier.tflite]

Needs the inference packages (requirements.txt) plus matplotlib for the figures and
scikit-image for its bundled photos, all pinned in models/requirements-train.txt (a fitting
environment only: never the enclave's). Steps, each on the split the issue names:

1. run the model (the enclave's code path: preprocessing, then the interpreter) on the
   train, val and test splits of ``$HAM10000_DIR`` (default ../shared/ham10000) and on
   inputs that are not lesions: the photos scikit-image ships plus synthetic ones (blank,
   noise, text, a screenshot, ...);
2. on validation: the temperature (NLL), the refer threshold (malignant sensitivity
   ``--sensitivity``, default 0.95, of the calibrated malignant score);
3. on train: class means and the shared Ledoit-Wolf covariance of the penultimate features;
   on validation: the "not a lesion" threshold (the ``--ood-quantile`` of validation
   lesions' distances, default 0.995);
4. write ``<model>.triage.npz`` (with the model's SHA-256) and score the test split once:
   headline figures with lesion-bootstrap intervals, ECE before and after, flag rates;
   ``--report`` (JSON) and ``--figures`` (ROC, reliability diagram, confusion matrix PNGs).

The test split is used for nothing but the report; ``--no-test`` does not read it at all
(fit and write the triage file, report validation only), so a candidate can be put in
place and its suite run before the test split scores it.
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

from nitrolesion.errors import ImageError
from nitrolesion.model.calibration import (
    fit_class_gaussians, fit_temperature, negative_log_likelihood, sensitivity_specificity,
    threshold_for_sensitivity)
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH, LesionModel
from nitrolesion.model.dataset import default_data_dir, image_path, load_split, read_metadata
from nitrolesion.model.labels import CODES, DEFAULT_LABELS_PATH
from nitrolesion.model.metrics import (
    CONFIDENCE_LEVEL, calibration, headline_figures, lesion_bootstrap, summarize,
    triage_figures)
from nitrolesion.model.triage import (
    MALIGNANT_CODES, OOD_METHOD, Triage, temperature_scaled, triage_path_for)

MODELS_DIR = Path(__file__).resolve().parent
#: scikit-image's bundled photos (no download): natural scenes, objects, text, microscopy.
SKIMAGE_FILES = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
    "chessboard_RGB.png", "clock_motion.png", "coffee.png", "coins.png", "color.png",
    "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png", "phantom.png",
    "retina.jpg", "rocket.jpg", "text.png")


def encoded(image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def synthetic_inputs() -> dict[str, bytes]:
    """Inputs a clinic might send by mistake, drawn with Pillow (seeded, so repeatable)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(20261203)
    images = {
        "blank_white": Image.new("RGB", (600, 450), "white"),
        "blank_black": Image.new("RGB", (600, 450), "black"),
        "blank_grey": Image.new("RGB", (600, 450), (128, 128, 128)),
        "blank_skin_tone": Image.new("RGB", (600, 450), (224, 172, 150)),
        "noise_uniform": Image.fromarray(rng.integers(0, 256, (450, 600, 3), dtype=np.uint8)),
        "noise_gaussian": Image.fromarray(
            np.clip(rng.normal(128, 40, (450, 600, 3)), 0, 255).astype(np.uint8)),
        "gradient": Image.fromarray(np.broadcast_to(
            np.linspace(0, 255, 600, dtype=np.uint8)[None, :, None], (450, 600, 3)).copy()),
    }
    text = Image.new("RGB", (600, 450), "white")
    draw = ImageDraw.Draw(text)
    for row in range(20):
        draw.text((20, 10 + row * 21), "Patient referral letter: please see the attached "
                  f"image, line {row}", fill="black")
    images["text_letter"] = text
    screen = Image.new("RGB", (800, 500), (240, 240, 240))
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, 800, 30), fill=(40, 60, 120))
    draw.text((10, 8), "Clinic records - Mozilla Firefox", fill="white")
    draw.rectangle((0, 30, 160, 500), fill=(220, 225, 235))
    for i, item in enumerate(("Patients", "Appointments", "Images", "Reports", "Settings")):
        draw.text((15, 50 + 30 * i), item, fill="black")
    for i in range(8):
        draw.rectangle((180, 60 + 45 * i, 780, 95 + 45 * i), outline=(180, 180, 180), fill="white")
        draw.text((190, 70 + 45 * i), f"Record {1000 + i}   2026-12-0{i % 9 + 1}   pending",
                  fill=(30, 30, 30))
    images["screenshot"] = screen
    return {name: encoded(image) for name, image in images.items()}


def skimage_inputs() -> dict[str, bytes]:
    """The photos scikit-image ships in its wheel, read as files (nothing is downloaded)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    return {name.split(".")[0]: (folder / name).read_bytes()
            for name in SKIMAGE_FILES if (folder / name).is_file()}


def run(classifier, items: dict[str, bytes]) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """(names, raw probabilities (N, 7), view-mean features (N, D), refused {name: why})."""
    names, probabilities, features, refused = [], [], [], {}
    for name, data in items.items():
        try:
            output = classifier.predict_array(classifier.preprocess(data))
        except ImageError as exc:
            refused[name] = str(exc)
            continue
        names.append(name)
        probabilities.append(output.probabilities)
        features.append(output.features.reshape(-1, output.features.shape[-1]).mean(axis=0))
    return names, np.array(probabilities), np.array(features), refused


def split_outputs(classifier, data_dir: Path, split: str, by_id: dict) -> dict:
    """Raw outputs, labels and lesions of one split's images."""
    ids = [i for i in load_split(split) if image_path(data_dir / "images", i).is_file()]
    items = {i: image_path(data_dir / "images", i).read_bytes() for i in ids}
    names, probabilities, features, refused = run(classifier, items)
    if refused:
        raise SystemExit(f"fit_triage: {len(refused)} {split} images refused: {refused}")
    return {"ids": names, "probabilities": probabilities, "features": features,
            "y": np.array([CODES.index(by_id[i].dx) for i in names]),
            "lesions": [by_id[i].lesion_id for i in names]}


def shown(path: Path) -> str:
    """``path`` relative to the project when inside it (a committed report names no
    machine's folders)."""
    try:
        return Path(path).resolve().relative_to(MODELS_DIR.parent).as_posix()
    except ValueError:
        return str(path)


def rounded(figures: dict, digits: int = 4) -> dict:
    return {k: round(float(v), digits) for k, v in figures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH,
                        help="TFLite model with outputs (probabilities, features)")
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS_PATH)
    parser.add_argument("--out", type=Path, help="triage file (default: beside the model)")
    parser.add_argument("--temperature", type=float,
                        help="use this temperature instead of fitting one on validation "
                             "(1: no calibration), e.g. for a model whose validation split "
                             "was part of its training data")
    parser.add_argument("--sensitivity", type=float, default=0.95,
                        help="malignant sensitivity the refer threshold keeps on validation")
    parser.add_argument("--ood-quantile", type=float, default=0.995,
                        help="share of validation lesions the 'not a lesion' threshold keeps")
    parser.add_argument("--report", type=Path, default=MODELS_DIR / "triage_report.json")
    parser.add_argument("--figures", type=Path, default=MODELS_DIR,
                        help="folder for triage_roc.png, triage_reliability.png, "
                             "triage_confusion.png (default: models/)")
    parser.add_argument("--cache", type=Path,
                        help="npz of the model's outputs: read if present, else written "
                             "(refitting without rerunning the model)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--no-test", action="store_true",
                        help="do not read the test split: fit, write the triage file and "
                             "report validation only (no figures)")
    args = parser.parse_args(argv)
    if args.no_test and args.cache:
        parser.error("--cache holds every split's outputs; it cannot be used with --no-test")
    scored_splits = ("val",) if args.no_test else ("val", "test")

    model = LesionModel(args.model, args.labels, triage=False)
    classifier = model.new_classifier()
    sha256 = hashlib.sha256(model.model_bytes).hexdigest()
    data_dir = default_data_dir()
    started = time.perf_counter()
    from_cache = bool(args.cache and args.cache.is_file())
    if from_cache:
        with np.load(args.cache, allow_pickle=False) as cached:
            if str(cached["model_sha256"]) != sha256:
                raise SystemExit(f"fit_triage: cache {args.cache} is for another model")
            outputs = json.loads(str(cached["outputs"]))
            for part in outputs.values():
                for key in ("probabilities", "features", "y"):
                    part[key] = np.array(part[key])
    else:
        by_id = {r.image_id: r for r in read_metadata(data_dir / "HAM10000_metadata.csv")}
        outputs = {split: split_outputs(classifier, data_dir, split, by_id)
                   for split in ("train", *scored_splits)}
        others = {**{f"skimage/{k}": v for k, v in skimage_inputs().items()},
                  **{f"synthetic/{k}": v for k, v in synthetic_inputs().items()}}
        names, probabilities, features, refused = run(classifier, others)
        outputs["not_lesions"] = {"ids": names, "probabilities": probabilities,
                                  "features": features, "y": np.zeros(len(names), int),
                                  "lesions": names, "refused": refused}
        if args.cache:
            serial = {s: {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                          for k, v in part.items()} for s, part in outputs.items()}
            np.savez(args.cache, model_sha256=np.array(sha256),
                     outputs=np.array(json.dumps(serial)))
    inference_seconds = time.perf_counter() - started
    train, val, others = (outputs[k] for k in ("train", "val", "not_lesions"))

    # -- fit on validation (temperature, refer) and train (feature Gaussians) --
    temperature = (args.temperature if args.temperature is not None
                   else fit_temperature(val["y"], val["probabilities"]))
    malignant_columns = [CODES.index(c) for c in MALIGNANT_CODES]
    is_malignant = lambda y: np.isin(y, malignant_columns)  # noqa: E731
    val_calibrated = temperature_scaled(val["probabilities"], temperature)
    refer_threshold = threshold_for_sensitivity(val_calibrated[:, malignant_columns].sum(axis=1),
                                                is_malignant(val["y"]), args.sensitivity)
    means, precision, shrinkage = fit_class_gaussians(train["features"], train["y"], len(CODES))
    triage = Triage(sha256, temperature, refer_threshold, MALIGNANT_CODES, OOD_METHOD, 0.0,
                    means, precision.astype(np.float32))  # as shipped and loaded
    val_ood = triage.ood_scores(val["features"])
    ood_threshold = float(np.quantile(val_ood, args.ood_quantile))
    triage = Triage(sha256, temperature, refer_threshold, MALIGNANT_CODES, OOD_METHOD,
                    ood_threshold, means, triage.precision)
    out = args.out or triage_path_for(args.model)
    triage.save(out)

    # -- score: validation (fitted on) and test (once) --
    def scored(part):
        calibrated = triage.calibrate(part["probabilities"])
        malignant = triage.malignant_score(calibrated)
        ood = triage.ood_scores(part["features"])
        not_lesion = ~(ood <= ood_threshold)
        refer = not_lesion | (malignant >= refer_threshold)
        return calibrated, malignant, ood, not_lesion, refer

    report = {
        "model": shown(args.model), "model_sha256": sha256, "triage_file": shown(out),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        # Seconds to run the model on every image, or to read its outputs from --cache.
        "model_outputs": {"seconds": round(inference_seconds, 1), "from_cache": from_cache},
        "temperature": round(temperature, 4), "refer_threshold": round(refer_threshold, 6),
        "ood": {"method": OOD_METHOD, "threshold": round(ood_threshold, 3),
                "quantile_of_val": args.ood_quantile, "ledoit_wolf_shrinkage": round(shrinkage, 4),
                "fitted_on": "train features (class means, shared covariance)"},
        "splits": {}}
    drawn = {}
    for name in scored_splits:
        part = outputs[name]
        calibrated, malignant, ood, not_lesion, refer = scored(part)
        y = part["y"]
        figures = {**headline_figures(y, calibrated, CODES),
                   **triage_figures(y, malignant, refer, CODES)}
        entry = {
            "images": int(len(y)),
            "figures": rounded(figures),
            "nll_before": round(negative_log_likelihood(y, part["probabilities"], 1.0), 4),
            "nll_after": round(negative_log_likelihood(y, part["probabilities"], temperature), 4),
            "ece_before": round(calibration(y, part["probabilities"])["expected_calibration_error"], 4),
            "ece_after": round(calibration(y, calibrated)["expected_calibration_error"], 4),
            "not_a_lesion_flagged": round(float(not_lesion.mean()), 4),
            "not_a_lesion_flagged_count": int(not_lesion.sum()),
            "malignant_score_only": rounded(dict(zip(
                ("sensitivity", "specificity"),
                sensitivity_specificity(malignant, is_malignant(y), refer_threshold)))),
        }
        if args.bootstrap:
            intervals = lesion_bootstrap(
                lambda at: {**headline_figures(y[at], calibrated[at], CODES),
                            **triage_figures(y[at], malignant[at], refer[at], CODES)},
                y, part["lesions"], args.bootstrap, 0, CONFIDENCE_LEVEL)
            entry["intervals"] = {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in intervals.items()}
        report["splits"][name] = entry
        drawn[name] = (y, part["probabilities"], calibrated, malignant, refer)
    _, _, others_ood, others_flag, _ = scored(others)
    report["not_lesions"] = {
        "inputs": len(others["ids"]) + len(others.get("refused", {})),
        "classified": len(others["ids"]),
        "flagged": int(others_flag.sum()),
        "flag_rate": round(float(others_flag.mean()), 4) if len(others["ids"]) else None,
        "refused_by_preprocessing": sorted(others.get("refused", {})),
        "not_flagged": [n for n, f in zip(others["ids"], others_flag) if not f],
        "scores": {n: round(float(s), 1) for n, s in zip(others["ids"], others_ood)},
    }
    if args.no_test:
        report["splits"]["test"] = "not read (--no-test)"
    else:
        report["test_summary"] = summarize(drawn["test"][0], drawn["test"][2], list(CODES))
    args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.figures and not args.no_test:
        from triage_figures import draw_all  # noqa: E402 (matplotlib only when drawing)

        draw_all(args.figures, drawn["test"], refer_threshold, report)
    print(json.dumps({k: v for k, v in report.items() if k != "test_summary"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
