"""Hostile and unusual images, sent through a real attested session to a real enclave.

Refused images get a sealed per-image BAD_IMAGE with the exact reason, and the reference
image sent next on the same session is still classified correctly; odd but valid images
(animated GIF, 1 x 1, 16-bit, CMYK, EXIF-rotated) are classified exactly as the in-process
classifier does. The images are synthesized in tests/hostile_cases.py with Pillow.
"""

from __future__ import annotations

import pytest

from hostile_cases import IMAGE_CASES, case_id, check_case


@pytest.mark.parametrize("case", IMAGE_CASES, ids=case_id)
def test_hostile_image(hostile, case):
    check_case(hostile, case)
