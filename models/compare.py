"""Compare two models' predictions on the same images, with paired confidence intervals.

    python models/evaluate.py --model A.tflite --predictions a.csv
    python models/evaluate.py --model B.tflite --predictions b.csv
    python models/compare.py a.csv b.csv                   # metadata from $HAM10000_DIR

Prints a JSON summary: each headline figure (accuracy, balanced accuracy, macro ROC-AUC,
top-3, per-class recall) for the baseline and the candidate, their difference (candidate
minus baseline) and a 95 % confidence interval for that difference. The interval is
*paired*: each bootstrap resample draws the same lesions for both models, so the noise the
two share (which images happen to be in the split) cancels, and an interval that excludes
0 means the luck of the split is an unlikely explanation for the difference (at 95 %).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nitrolesion.model.dataset import default_data_dir, read_metadata
from nitrolesion.model.metrics import (
    CONFIDENCE_LEVEL, headline_figures, lesion_bootstrap, zero_width_note)
from nitrolesion.model.predictions import read_predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare two predictions CSVs written by models/evaluate.py --predictions "
                    "on the same images; prints each figure, the difference (candidate minus "
                    "baseline) and its paired 95% bootstrap confidence interval as JSON.")
    parser.add_argument("baseline", type=Path,
                        help="predictions CSV of the model to compare against")
    parser.add_argument("candidate", type=Path, help="predictions CSV of the model under test")
    parser.add_argument("--metadata", type=Path,
                        help="HAM10000-style metadata CSV with the true diagnoses and lesion ids "
                             "(default: $HAM10000_DIR or ../shared/ham10000, "
                             "HAM10000_metadata.csv)")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                        help="resamples (default 2000); whole lesions are drawn within each "
                             "diagnosis, the same ones for both models")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resampling")
    args = parser.parse_args(argv)
    if args.bootstrap < 1:
        parser.error("--bootstrap must be >= 1")
    metadata = args.metadata or default_data_dir() / "HAM10000_metadata.csv"

    try:
        baseline = read_predictions(args.baseline)
        candidate = read_predictions(args.candidate)
        records = {r.image_id: r for r in read_metadata(metadata)}
    except (ValueError, OSError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    if baseline.codes != candidate.codes:
        print(f"compare: the files have different classes: {baseline.codes} against "
              f"{candidate.codes}", file=sys.stderr)
        return 2
    if set(baseline.image_ids) != set(candidate.image_ids):
        only_a = len(set(baseline.image_ids) - set(candidate.image_ids))
        only_b = len(set(candidate.image_ids) - set(baseline.image_ids))
        print(f"compare: the files cover different images ({only_a} only in the baseline, "
              f"{only_b} only in the candidate); a paired comparison needs the same ones",
              file=sys.stderr)
        return 2
    unknown = [i for i in baseline.image_ids if i not in records]
    if unknown:
        print(f"compare: {len(unknown)} image(s) not in {metadata}, e.g. {unknown[0]}",
              file=sys.stderr)
        return 2
    codes = baseline.codes
    strange = sorted({records[i].dx for i in baseline.image_ids} - set(codes))
    if strange:
        print(f"compare: metadata has diagnosis codes the predictions do not: {strange}",
              file=sys.stderr)
        return 2

    ids = baseline.image_ids
    row_of = {image_id: n for n, image_id in enumerate(candidate.image_ids)}
    p_base = baseline.probabilities
    p_cand = candidate.probabilities[[row_of[i] for i in ids]]
    y_true = np.array([codes.index(records[i].dx) for i in ids])
    lesions = [records[i].lesion_id for i in ids]

    def difference(at: np.ndarray) -> dict[str, float]:
        base = headline_figures(y_true[at], p_base[at], codes)
        cand = headline_figures(y_true[at], p_cand[at], codes)
        return {name: cand[name] - base[name] for name in base if name in cand}

    base = headline_figures(y_true, p_base, codes)
    cand = headline_figures(y_true, p_cand, codes)
    intervals = lesion_bootstrap(difference, y_true, lesions, args.bootstrap,
                                 args.bootstrap_seed, CONFIDENCE_LEVEL)
    summary = {
        "baseline": str(args.baseline),
        "candidate": str(args.candidate),
        "n_images": len(ids),
        "lesions": len(set(lesions)),
        "same_prediction": round(float(np.mean(p_base.argmax(1) == p_cand.argmax(1))), 4),
        "confidence_intervals": {
            "level": CONFIDENCE_LEVEL,
            "method": "paired percentile bootstrap; the same lesions drawn with replacement "
                      "within each diagnosis for both models",
            "resamples": args.bootstrap,
            "seed": args.bootstrap_seed,
        },
        "figures": {
            name: {
                "baseline": round(base[name], 4),
                "candidate": round(cand[name], 4),
                "difference": round(cand[name] - base[name], 4),
                "difference_ci": [round(intervals[name][0], 4), round(intervals[name][1], 4)],
            }
            for name in base if name in intervals
        },
    }
    note = zero_width_note(
        intervals, "the two models were right and wrong on the same images for that figure, "
                   "so every resample gives the same difference; it says they agree on this "
                   "split, not that they are equal")
    if note:
        summary["confidence_intervals"]["zero_width"] = note
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
