"""What the enclave image holds: the Dockerfile's COPY list, in one place.

The development attestation authority measures exactly these files into PCR0, and the
Docker-free image test copies exactly these into a temporary folder, so a changed model or
enclave code changes the measurement and the test sees the same tree the image would.
"""

from __future__ import annotations

from pathlib import Path

from nitrolesion.limits import PROJECT_ROOT

#: Paths relative to the project root, as the Dockerfile copies them.
IMAGE_PATHS = (
    "enclave",
    "nitrolesion",
    "models/lesion_classifier.tflite",
    "models/labels.json",
)


def image_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """Every file of the enclave image under ``root``, sorted, caches excluded."""
    files: list[Path] = []
    for relative in IMAGE_PATHS:
        path = root / relative
        if path.is_dir():
            files.extend(p for p in path.rglob("*") if p.is_file()
                         and "__pycache__" not in p.parts and p.suffix != ".pyc")
        elif path.is_file():
            files.append(path)
    return sorted(files)
