"""The model's class labels: HAM10000 diagnosis codes in output order, with readable names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nitrolesion.errors import ModelError
from nitrolesion.limits import MODELS_DIR

DEFAULT_LABELS_PATH = MODELS_DIR / "labels.json"

#: The seven HAM10000 diagnoses, in the alphabetical order the model's outputs use.
CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


@dataclass(frozen=True)
class Label:
    """One output of the model."""

    index: int
    code: str
    name: str


def load_labels(path: Path = DEFAULT_LABELS_PATH) -> list[Label]:
    """Read labels.json; raises :class:`ModelError` unless it lists exactly :data:`CODES` in order."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
        labels = [Label(int(e["index"]), str(e["code"]), str(e["name"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ModelError(f"cannot read labels file {path}: {exc}") from exc
    got = tuple(label.code for label in labels)
    if got != CODES or [label.index for label in labels] != list(range(len(CODES))):
        raise ModelError(f"labels file {path}: expected codes {CODES} indexed 0..6, got {got}")
    return labels
