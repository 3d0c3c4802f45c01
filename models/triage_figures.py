"""The model card's triage figures, drawn with matplotlib (fitting environment only):
the ROC curve of malignant vs benign with the refer operating point, a reliability diagram
before and after temperature scaling, and the confusion matrix. Used by fit_triage.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nitrolesion.model.labels import CODES
from nitrolesion.model.metrics import confusion_matrix
from nitrolesion.model.triage import MALIGNANT_CODES


def roc_points(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0)."""
    order = np.argsort(-scores, kind="mergesort")
    scores, is_positive = scores[order], is_positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(is_positive)[last]
    fp = np.cumsum(~is_positive)[last]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def reliability(y: np.ndarray, probabilities: np.ndarray, bins: int = 10):
    """(bin centres, accuracy, mean confidence, count) of the top probability."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = [(b, correct[index == b].mean(), confidence[index == b].mean(), (index == b).sum())
            for b in range(bins) if (index == b).any()]
    return tuple(np.array(column) for column in zip(*rows))


def draw_all(folder: Path, test, refer_threshold: float, report: dict) -> None:
    """Write triage_roc.png, triage_reliability.png and triage_confusion.png in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    y, raw, calibrated, malignant, refer = test
    is_malignant = np.isin(y, [CODES.index(c) for c in MALIGNANT_CODES])
    figures = report["splits"]["test"]["figures"]
    title = f"test split ({len(y)} images), model sha256 {report['model_sha256'][:12]}"

    fpr, tpr = roc_points(is_malignant, malignant)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot(fpr, tpr, label=f"malignant score (AUC {figures['malignant_roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.plot(1 - figures["refer_specificity"], figures["refer_sensitivity"], "o", color="crimson",
            label=f"refer (threshold {refer_threshold:.3f}): sens {figures['refer_sensitivity']:.2f}, "
                  f"spec {figures['refer_specificity']:.2f}")
    ax.set_xlabel("1 - specificity (benign referred)")
    ax.set_ylabel("sensitivity (malignant referred)")
    ax.set_title("Malignant (mel+bcc+akiec) vs benign\n" + title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "triage_roc.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for name, probabilities, key in (("before", raw, "ece_before"), ("after", calibrated, "ece_after")):
        _, accuracy, confidence, _ = reliability(y, probabilities)
        ece = report["splits"]["test"][key]
        ax.plot(confidence, accuracy, "o-", label=f"{name} temperature scaling (ECE {ece:.3f})")
    ax.set_xlabel("mean top probability in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"Reliability, T = {report['temperature']:.3f}\n" + title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "triage_reliability.png", dpi=100)
    plt.close(fig)

    matrix = confusion_matrix(y, calibrated.argmax(axis=1), len(CODES))
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(CODES)):
        for j in range(len(CODES)):
            ax.text(j, i, f"{matrix[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center",
                    fontsize=7, color="white" if shares[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(CODES)), CODES)
    ax.set_yticks(range(len(CODES)), CODES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true diagnosis")
    ax.set_title("Confusion matrix (row shares)\n" + title, fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "triage_confusion.png", dpi=100)
    plt.close(fig)
