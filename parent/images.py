"""Finding images to send (explicit paths, folders, or a default for the demo) and reading
them safely."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nitrolesion.model.dataset import PROJECT_ROOT, default_data_dir
from nitrolesion.wire.messages import MAX_IMAGE_IN_MESSAGE

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


class ImageFileError(Exception):
    """A local file that is not sent; ``code`` is the batch row's error code:
    ``UNREADABLE`` (missing, not a regular file, no permission) or ``TOO_LARGE``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_image_file(path: Path, max_bytes: int = MAX_IMAGE_IN_MESSAGE) -> bytes:
    """The bytes of the image file at ``path``, checked before anything is sent.

    Only regular files: a FIFO would block the batch forever and ``/dev/zero`` would fill
    memory. Nothing over ``max_bytes`` (by default what one message can carry; the
    enclave's own, configurable limit is enforced there) is read whole: the read stops one
    byte past the limit, which also catches a file that grows after it was measured.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the checks below run on
        # the open descriptor, so the file checked is the file read.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ImageFileError("UNREADABLE", "cannot read file: not a regular file")
            if info.st_size > max_bytes:
                raise ImageFileError("TOO_LARGE", f"file is {info.st_size} bytes; at most "
                                                  f"{max_bytes} bytes fit in one message to "
                                                  "the enclave")
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ImageFileError("UNREADABLE", f"cannot read file: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ImageFileError("TOO_LARGE", f"file grew past {max_bytes} bytes while being read")
    return data


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
