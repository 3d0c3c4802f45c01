"""Classification metrics in plain numpy, shared by training and models/evaluate.py.

Kept dependency-free (no scikit-learn) because evaluate.py runs in the inference
environment. ROC-AUC uses the rank-sum (Mann-Whitney U) form with ties averaged.
``lesion_bootstrap`` gives confidence intervals for any of these figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from nitrolesion.model.triage import MALIGNANT_CODES


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def _rank_average(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]  # exclusive
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary labels ``is_positive``."""
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rank_average(np.asarray(scores, dtype=np.float64))
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def summarize(y_true, probabilities, codes: list[str]) -> dict:
    """Every figure the model card reports, for true labels and a (N, C) probability matrix."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n_classes = len(codes)
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    recall = np.divide(np.diag(matrix), support, out=np.zeros(n_classes), where=support > 0)
    precision = np.divide(np.diag(matrix), predicted, out=np.zeros(n_classes), where=predicted > 0)
    top3 = np.argsort(-probabilities, axis=1)[:, :3]
    aucs = [roc_auc(y_true == c, probabilities[:, c]) for c in range(n_classes)]
    present = [c for c in range(n_classes) if support[c] > 0]
    return {
        "n_images": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()),
        "balanced_accuracy": float(np.mean([recall[c] for c in present])),
        "macro_roc_auc": float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan"),
        "top3_accuracy": float((top3 == y_true[:, None]).any(axis=1).mean()),
        "per_class": {
            code: {
                "support": int(support[c]),
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "roc_auc": aucs[c],
            }
            for c, code in enumerate(codes)
        },
        "confusion_matrix": {"labels": list(codes), "rows_true_cols_predicted": matrix.tolist()},
    }


def calibration(y_true, probabilities, n_bins: int = 10) -> dict:
    """How far the top probability is from how often it is right.

    Images are binned by their top probability (``n_bins`` equal-width bins over [0, 1]);
    the expected calibration error is the image-weighted mean gap between a bin's mean
    confidence and its accuracy (0 is perfect; 0.05 means a "0.90" is right about 85 or
    95 % of the time). Empty bins are left out of ``bins``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    # A confidence of exactly 1.0 belongs in the last bin, not an extra one.
    index = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    bins, error = [], 0.0
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        if not count:
            continue
        mean_confidence = float(confidence[members].mean())
        accuracy = float(correct[members].mean())
        error += count * abs(mean_confidence - accuracy)
        bins.append({"range": [b / n_bins, (b + 1) / n_bins], "images": count,
                     "mean_confidence": round(mean_confidence, 4),
                     "accuracy": round(accuracy, 4)})
    return {"expected_calibration_error": error / len(y_true), "bins": bins}


def headline_figures(y_true, probabilities, codes: Sequence[str]) -> dict[str, float]:
    """The figures the targets and the model card quote, flat: accuracy, balanced accuracy,
    macro ROC-AUC, top-3 accuracy and ``recall_<code>`` per class. Figures that are not
    defined on these images (the recall of an absent class; ROC-AUC with one class) are
    left out rather than reported as 0 or NaN."""
    summary = summarize(y_true, probabilities, list(codes))
    figures = {key: summary[key] for key in
               ("accuracy", "balanced_accuracy", "macro_roc_auc", "top3_accuracy")}
    if np.isnan(figures["macro_roc_auc"]):
        del figures["macro_roc_auc"]
    for code, row in summary["per_class"].items():
        if row["support"]:
            figures[f"recall_{code}"] = row["recall"]
    return figures


#: Two-sided level of the confidence intervals evaluate.py and compare.py report.
CONFIDENCE_LEVEL = 0.95


def zero_width_note(intervals: dict[str, tuple[float, float]], meaning: str) -> dict | None:
    """``{"figures": [...], "meaning": meaning}`` for the intervals that collapsed to a
    point (the sample's limit, not certainty), or None if none did."""
    collapsed = [name for name, (low, high) in intervals.items() if low == high]
    return {"figures": collapsed, "meaning": meaning} if collapsed else None


def lesion_bootstrap(
    statistic: Callable[[np.ndarray], dict[str, float]],
    y_true,
    groups: Sequence[str],
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = CONFIDENCE_LEVEL,
) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals for every figure ``statistic`` returns.

    ``statistic(indices)`` computes its figures on the images at ``indices`` (an index array
    with repeats). Images of one lesion are not independent, so each resample draws whole
    groups (lesions), with replacement, separately within each diagnosis: every resample
    keeps each class's number of lesions, so a class with 14 images never vanishes from a
    resample and per-class recall stays defined. A group's diagnosis is that of its first
    image (a HAM10000 lesion has one). Returns ``{name: (low, high)}``.
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    if not 0.0 < level < 1.0:
        raise ValueError("level must be between 0 and 1")
    y_true = np.asarray(y_true)
    if len(groups) != len(y_true):
        raise ValueError(f"{len(groups)} group ids for {len(y_true)} images")
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    strata: dict[int, list[np.ndarray]] = {}
    for indices in members.values():
        strata.setdefault(int(y_true[indices[0]]), []).append(np.array(indices))
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        chosen = [stratum[k] for stratum in strata.values()
                  for k in rng.integers(0, len(stratum), size=len(stratum))]
        for name, value in statistic(np.concatenate(chosen)).items():
            draws.setdefault(name, []).append(value)
    tail = (1.0 - level) / 2.0 * 100.0
    return {name: (float(np.nanpercentile(values, tail)),
                   float(np.nanpercentile(values, 100.0 - tail)))
            for name, values in draws.items()}


def triage_figures(y_true, malignant, refer, codes: Sequence[str]) -> dict[str, float]:
    """The refer flag as a malignant-vs-benign screen, flat: ``refer_sensitivity`` (share
    of malignant images referred), ``refer_specificity`` (share of benign ones not
    referred), ``melanoma_sensitivity`` (share of melanomas referred) and
    ``malignant_roc_auc`` (of the ``malignant`` score). Figures with no image to count
    are left out."""
    y_true = np.asarray(y_true, dtype=np.int64)
    refer = np.asarray(refer, dtype=bool)
    is_malignant = np.isin(y_true, [list(codes).index(code) for code in MALIGNANT_CODES])
    is_melanoma = y_true == list(codes).index("mel")
    figures = {}
    if is_malignant.any():
        figures["refer_sensitivity"] = float(refer[is_malignant].mean())
    if (~is_malignant).any():
        figures["refer_specificity"] = float((~refer[~is_malignant]).mean())
    if is_melanoma.any():
        figures["melanoma_sensitivity"] = float(refer[is_melanoma].mean())
    auc = roc_auc(is_malignant, np.asarray(malignant, dtype=np.float64))
    if not np.isnan(auc):
        figures["malignant_roc_auc"] = auc
    return figures
