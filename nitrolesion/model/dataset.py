"""HAM10000 on disk: where it is, its metadata, and the committed lesion-disjoint split.

The data is never part of the project: it is read from ``$HAM10000_DIR`` or, by default,
``../shared/ham10000`` beside the project root. The split files under ``models/splits/``
hold image ids only.
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from nitrolesion.limits import MODELS_DIR, PROJECT_ROOT

SPLITS_DIR = MODELS_DIR / "splits"
SPLIT_NAMES = ("train", "val", "test")

#: Column names of HAM10000_metadata.csv that we use.
METADATA_COLUMNS = ("lesion_id", "image_id", "dx")


def default_data_dir() -> Path:
    """``$HAM10000_DIR`` if set, else ``../shared/ham10000`` next to the project root."""
    configured = os.environ.get("HAM10000_DIR")
    if configured:
        return Path(configured).expanduser()
    return PROJECT_ROOT.parent / "shared" / "ham10000"


@dataclass(frozen=True)
class Record:
    """One row of the metadata file."""

    image_id: str
    lesion_id: str
    dx: str


def read_metadata(csv_path: Path) -> list[Record]:
    """Read a HAM10000-style metadata CSV (columns lesion_id, image_id, dx at least)."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        try:
            missing = [c for c in METADATA_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)}")
            records = []
            for row in reader:
                if None in (row["image_id"], row["lesion_id"], row["dx"]):
                    raise ValueError(f"{csv_path}:{reader.line_num}: too few fields")
                records.append(Record(row["image_id"], row["lesion_id"], row["dx"]))
            return records
        except csv.Error as exc:  # e.g. a field over csv's size limit: not a ValueError
            raise ValueError(f"{csv_path}: not CSV ({exc})") from None


def image_path(images_dir: Path, image_id: str) -> Path:
    """The image file for ``image_id`` (``.jpg`` first, then ``.png``)."""
    jpg = images_dir / f"{image_id}.jpg"
    if jpg.exists():
        return jpg
    png = images_dir / f"{image_id}.png"
    return png if png.exists() else jpg


def make_split(
    records: list[Record], fractions=(0.70, 0.15, 0.15), seed: int = 20261128
) -> dict[str, list[str]]:
    """Split image ids so that no lesion spans two parts and each class keeps its proportions.

    Lesions (not images) are shuffled per class with a seeded RNG and dealt to train / val /
    test by cumulative image count, so every image of a lesion lands in the same part.
    """
    by_class: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        by_class[record.dx][record.lesion_id].append(record.image_id)
    rng = random.Random(seed)
    parts: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for dx in sorted(by_class):
        lesions = sorted(by_class[dx])
        rng.shuffle(lesions)
        total = sum(len(by_class[dx][lesion]) for lesion in lesions)
        edges = (fractions[0] * total, (fractions[0] + fractions[1]) * total)
        seen = 0
        for lesion in lesions:
            images = sorted(by_class[dx][lesion])
            name = "train" if seen < edges[0] else "val" if seen < edges[1] else "test"
            parts[name].extend(images)
            seen += len(images)
    return {name: sorted(ids) for name, ids in parts.items()}


def load_split(name: str, splits_dir: Path = SPLITS_DIR) -> list[str]:
    """Image ids of split ``name`` (train, val or test) as committed."""
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
    text = (splits_dir / f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
