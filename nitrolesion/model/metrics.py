"""Classification metrics in plain numpy, shared by training and models/evaluate.py.

Kept dependency-free (no scikit-learn) because evaluate.py runs in the inference
environment. ROC-AUC uses the rank-sum (Mann-Whitney U) form with ties averaged.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def _rank_average(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
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
        "macro_roc_auc": float(np.nanmean(aucs)),
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
