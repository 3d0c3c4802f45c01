"""Finding images to send (explicit paths, folders, or a default for the demo) and reading
them safely."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nitrolesion.errors import ImageFileError
from nitrolesion.limits import PROJECT_ROOT
from nitrolesion.model.dataset import default_data_dir
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


def read_image_file(path: Path, max_bytes: int = MAX_IMAGE_IN_MESSAGE, *,
                    named: bool = False) -> bytes:
    """The bytes of the image file at ``path``, checked before anything is sent.

    A file found in a folder (``named=False``) must be a regular file: a FIFO there would
    block the batch forever, waiting for a writer nobody started. A path the user named
    may also be a pipe (``--image <(curl ...)``) or a device, read like any stream. Either
    way nothing over ``max_bytes`` (by default what one message can carry; the enclave's
    own, configurable limit is enforced there) is read: the read stops one byte past it,
    so ``/dev/zero`` or a file that grows cannot fill memory.
    """
    too_large = f"at most {max_bytes} bytes fit in one message to the enclave"
    # O_NONBLOCK for folder entries: opening a FIFO must not wait for a writer. The checks
    # run on the open descriptor, so the file checked is the file read.
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if named else os.O_NONBLOCK)
    try:
        with os.fdopen(os.open(path, flags), "rb") as handle:
            info = os.fstat(handle.fileno())
            regular = stat.S_ISREG(info.st_mode)
            if not regular and not named:
                raise ImageFileError("UNREADABLE", "cannot read file: not a regular file "
                                                   "(name it on its own to read a pipe)")
            if regular and info.st_size > max_bytes:
                raise ImageFileError("TOO_LARGE", f"file is {info.st_size} bytes; {too_large}")
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ImageFileError("UNREADABLE", f"cannot read file: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ImageFileError("TOO_LARGE", f"more than {max_bytes} bytes; {too_large}")
    return data


def default_image() -> Path | None:
    """The first image in sample_images/ in sorted order, else the first in the dataset
    folder, else None.

    The repository ships seven samples there (sample_images/ATTRIBUTION.md), numbered so
    that the first in sorted order, the ``1_nv_...`` one, is the demo's default; the dataset
    folder only matters when they were removed.
    """
    for folder in (SAMPLE_IMAGES_DIR, default_data_dir() / "images"):
        if folder.is_dir():
            found = expand_images([folder])
            if found:
                return found[0]
    return None


NO_IMAGE_HELP = (
    "no image to send: pass --image PATH, or put a dermatoscopic image in sample_images/ "
    "(the repository ships seven: git checkout -- sample_images restores them), or point "
    "HAM10000_DIR at a HAM10000 folder (default ../shared/ham10000)")
