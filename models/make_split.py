"""Write the lesion-disjoint, class-stratified train/val/test split as lists of image ids.

    python models/make_split.py [--data DIR]

The result is committed under models/splits/; rerunning with the same metadata and seed
reproduces it byte for byte.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from nitrolesion.model.dataset import SPLITS_DIR, default_data_dir, make_split, read_metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir(),
                        help="HAM10000 folder with HAM10000_metadata.csv (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--out", type=Path, default=SPLITS_DIR)
    args = parser.parse_args(argv)

    records = read_metadata(args.data / "HAM10000_metadata.csv")
    split = make_split(records, seed=args.seed)
    dx_of = {r.image_id: r.dx for r in records}
    lesion_of = {r.image_id: r.lesion_id for r in records}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, ids in split.items():
        header = f"# {name}: {len(ids)} HAM10000 image ids, lesion-disjoint, seed {args.seed}\n"
        (args.out / f"{name}.txt").write_text(header + "\n".join(ids) + "\n", encoding="utf-8")
        counts = Counter(dx_of[i] for i in ids)
        lesions = len({lesion_of[i] for i in ids})
        print(f"{name:5s} images={len(ids):5d} lesions={lesions:5d} " +
              " ".join(f"{k}={counts[k]}" for k in sorted(counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
