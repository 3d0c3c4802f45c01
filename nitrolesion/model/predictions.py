"""The per-image predictions CSV that ``models/evaluate.py --predictions`` writes and
``models/compare.py`` reads: ``image_id, predicted, p_<code>...`` in label order, then
(from the triage on) ``malignant`` and ``refer`` (``true``/``false``)."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The triage columns after the probabilities.
TRIAGE_COLUMNS = ("malignant", "refer")


@dataclass(frozen=True)
class Predictions:
    """One model's answers on a set of images: ids, class codes and an (N, C) matrix."""

    image_ids: list[str]
    codes: list[str]
    probabilities: np.ndarray
    malignant: np.ndarray | None = None  # (N,) malignant scores, when the file has them
    refer: np.ndarray | None = None      # (N,) bool

    def predicted_codes(self) -> list[str]:
        """The most probable code for each image."""
        return [self.codes[i] for i in self.probabilities.argmax(axis=1)]


def write_predictions(path: Path, predictions: Predictions) -> None:
    """Write the CSV atomically: a failed run leaves no half-written file behind."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        triage = predictions.malignant is not None
        writer.writerow(["image_id", "predicted"] + [f"p_{c}" for c in predictions.codes]
                        + (list(TRIAGE_COLUMNS) if triage else []))
        for i, (image_id, code, row) in enumerate(zip(
                predictions.image_ids, predictions.predicted_codes(), predictions.probabilities)):
            extra = ([f"{predictions.malignant[i]:.6f}", "true" if predictions.refer[i] else "false"]
                     if triage else [])
            writer.writerow([image_id, code] + [f"{p:.6f}" for p in row] + extra)
    os.replace(tmp, path)


def read_predictions(path: Path) -> Predictions:
    """Read a predictions CSV; ``ValueError`` names the file and line of anything malformed."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            return _parse(path, reader)
        except csv.Error as exc:  # e.g. a field over csv's size limit: not a ValueError
            raise ValueError(f"{path}: not CSV ({exc})") from None


def _parse(path: Path, reader) -> Predictions:
    header = next(reader, None)
    triage = bool(header) and tuple(header[-2:]) == TRIAGE_COLUMNS
    last = len(header) - 2 if triage else len(header or [])
    if (not header or header[:2] != ["image_id", "predicted"] or last < 4
            or not all(name.startswith("p_") for name in header[2:last])):
        raise ValueError(f"{path}: not a predictions file (expected the header "
                         f"image_id,predicted,p_<code>,...[,malignant,refer]; got {header})")
    codes = [name[2:] for name in header[2:last]]
    image_ids, rows, seen, malignant, refer = [], [], set(), [], []
    for line, row in enumerate(reader, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{line}: {len(row)} fields, expected {len(header)}")
        if row[0] in seen:
            raise ValueError(f"{path}:{line}: image {row[0]} listed twice")
        try:
            values = [float(v) for v in row[2:last + (1 if triage else 0)]]
        except ValueError:
            raise ValueError(f"{path}:{line}: a probability is not a number") from None
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"{path}:{line}: probabilities must lie in [0, 1]")
        if triage:
            if row[-1] not in ("true", "false"):
                raise ValueError(f"{path}:{line}: refer must be true or false")
            malignant.append(values.pop())
            refer.append(row[-1] == "true")
        seen.add(row[0])
        image_ids.append(row[0])
        rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    if not triage:
        return Predictions(image_ids, codes, np.array(rows, dtype=np.float64))
    return Predictions(image_ids, codes, np.array(rows, dtype=np.float64),
                       np.array(malignant, dtype=np.float64), np.array(refer, dtype=bool))
