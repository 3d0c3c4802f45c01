"""Finding images to send: explicit paths, folders, or a default for the demo."""

from __future__ import annotations

from pathlib import Path

from nitrolesion.model.dataset import PROJECT_ROOT, default_data_dir

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
SAMPLE_IMAGES_DIR = PROJECT_ROOT / "sample_images"


def expand_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, non-recursive)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            # not is_dir() rather than is_file(): a dangling symlink is kept, so the batch
            # reports it as unreadable instead of silently skipping it.
            out.extend(sorted(p for p in path.iterdir()
                              if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(path)
    return out


def default_image() -> Path | None:
    """The first image in sample_images/, else the first in the dataset folder, else None."""
    for folder in (SAMPLE_IMAGES_DIR, default_data_dir() / "images"):
        if folder.is_dir():
            found = expand_images([folder])
            if found:
                return found[0]
    return None


NO_IMAGE_HELP = (
    "no image to send: pass --image PATH, or put a dermatoscopic image in sample_images/ "
    "(python sample_images/fetch_isic.py downloads a few CC-0 ISIC images), or point "
    "HAM10000_DIR at a HAM10000 folder (default ../shared/ham10000)")
