"""Shared fixtures: where the ../shared data is, and a running enclave stack.

Hypothesis profiles (property tests in test_frames.py, test_message_decoding.py,
test_preprocess.py, test_attestation_fuzz.py, ...):

* ``ci``: chosen when the environment variable CI is set (our CI sets CI=true).
  Derandomized: every run draws the same examples, so a red CI run is red again on rerun;
  a failure prints its ``@reproduce_failure`` blob.
* ``dev``: the default otherwise (``python3 dev.py test``, plain pytest). Derandomized
  like ``ci``, so a local run is reproducible too.
* ``explore``: random examples, 10x as many, failures kept in .hypothesis/ and replayed
  first on the next run. Only on request::

      .venv/bin/python -m pytest tests/test_preprocess.py --hypothesis-profile=explore
      HYPOTHESIS_PROFILE=explore python3 dev.py test

  The command-line flag wins over the environment variable, which wins over CI.
  It raises the default number of examples; a test that sets its own max_examples keeps it
  unless it asks for ``max(N, settings.default.max_examples)`` as test_preprocess.py does.

A bug found by ``explore`` becomes an explicit regression test (like the mutated TIFFs in
test_preprocess.py), since derandomized runs are not guaranteed to draw it again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

#: Derandomized runs: same examples every run; no timing-based failures (deadline, the
#: too_slow health check), which would make a shared CI runner's result depend on its load.
_DETERMINISTIC = dict(derandomize=True, database=None, deadline=None, print_blob=True,
                      suppress_health_check=[HealthCheck.too_slow])
# Each on top of Hypothesis' "default" profile, not the current one: with CI set, Hypothesis
# has already loaded its own "ci" profile, and ours must not inherit from whichever it is.
_BASE = settings.get_profile("default")
settings.register_profile("ci", _BASE, **_DETERMINISTIC)
settings.register_profile("dev", _BASE, **_DETERMINISTIC)
#: 10x Hypothesis' default of 100 examples per test: minutes, not hours, for the suite.
EXPLORE_EXAMPLES = 1000
settings.register_profile("explore", _BASE, derandomize=False, max_examples=EXPLORE_EXAMPLES,
                          print_blob=True)


def hypothesis_profile(environ=os.environ) -> str:
    """The profile to load: $HYPOTHESIS_PROFILE if set, else "ci" when $CI is set, else "dev"."""
    if environ.get("HYPOTHESIS_PROFILE"):
        return environ["HYPOTHESIS_PROFILE"]
    return "ci" if environ.get("CI", "").lower() not in ("", "0", "false") else "dev"


# Loaded here, before any test module builds its @settings; hypothesis' pytest plugin then
# loads --hypothesis-profile, if given, on top.
settings.load_profile(hypothesis_profile())

ROOT = Path(__file__).resolve().parents[1]

from nitrolesion.model.dataset import default_data_dir
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH


#: The committed sample images (sample_images/ATTRIBUTION.md): test-split images, one per
#: diagnosis. Tests that need a few real images use these, so they run on every clone.
SAMPLE_IMAGES_DIR = ROOT / "sample_images"
SAMPLE_IMAGE_COUNT = 7


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    """The HAM10000 folder ($HAM10000_DIR or ../shared/ham10000); skips when absent.

    Only for tests that need the whole dataset (the split, accuracy on the test split,
    evaluate.py); a few images come from ``test_image_paths`` instead.
    """
    path = default_data_dir()
    if not (path / "HAM10000_metadata.csv").is_file() or not (path / "images").is_dir():
        pytest.skip(f"HAM10000 data not found at {path} (set HAM10000_DIR)")
    return path


@pytest.fixture(scope="session")
def test_image_paths() -> list[Path]:
    """The committed sample images in sorted order (nv first, then one of each other
    diagnosis), all from the test split.

    The same images whether or not ../shared is present, so every clone runs the same checks.
    """
    paths = sorted(SAMPLE_IMAGES_DIR.glob("*.jpg"))
    if len(paths) != SAMPLE_IMAGE_COUNT:
        pytest.fail(f"expected {SAMPLE_IMAGE_COUNT} committed images in {SAMPLE_IMAGES_DIR}, "
                    f"found {len(paths)}")
    return paths


#: Crop boxes (left, top, right, bottom as fractions) for ``many_image_paths``: each gives
#: the model a different picture of the same lesion, hence a different answer.
_CROPS = [(0.0, 0.0, 0.85, 0.85), (0.15, 0.0, 1.0, 0.85), (0.0, 0.15, 0.85, 1.0),
          (0.15, 0.15, 1.0, 1.0), (0.1, 0.1, 0.9, 0.9), (0.0, 0.0, 0.7, 0.7),
          (0.3, 0.0, 1.0, 0.7), (0.0, 0.3, 0.7, 1.0), (0.3, 0.3, 1.0, 1.0)]


@pytest.fixture(scope="session")
def many_image_paths(test_image_paths, tmp_path_factory) -> list[Path]:
    """70 real-photo JPEGs for tests that need many different images (concurrency, batches):
    the 7 samples, then 9 crops and a quarter turn of each, written to a temporary folder.

    Derived rather than read from ../shared so these tests run on every clone. Ordered round
    by round (all originals, then every sample's first crop, ...) so neighbours are different
    lesions. A quarter turn, unlike a mirror image, changes the shipped model's answer (it
    averages the mirror views).
    """
    from PIL import Image

    folder = tmp_path_factory.mktemp("many-images")
    originals = [Image.open(path).convert("RGB") for path in test_image_paths]
    paths = list(test_image_paths)
    for number, box in enumerate(_CROPS + [None]):
        for source, image in zip(test_image_paths, originals):
            if box is None:
                variant, tag = image.transpose(Image.Transpose.ROTATE_90), "turned"
            else:
                width, height = image.size
                variant = image.crop((round(box[0] * width), round(box[1] * height),
                                      round(box[2] * width), round(box[3] * height)))
                tag = f"crop{number}"
            target = folder / f"{source.stem}-{tag}.jpg"
            variant.save(target, format="JPEG", quality=90)
            paths.append(target)
    return paths


@pytest.fixture(scope="session")
def rsa_key():
    """``rsa_key(bits)``: a pycryptodome RSA key of ``bits`` whose primes come from OpenSSL
    (via cryptography), as generate_keypair makes its 3072-bit keys: pycryptodome's own
    prime search took 1-7 s for one 4096-bit key, at random."""
    from Crypto.PublicKey import RSA
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    def make(bits: int):
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        return RSA.import_key(private.private_bytes(serialization.Encoding.DER,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return make


@pytest.fixture(scope="session")
def model_present() -> Path:
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.fail(f"the shipped model {DEFAULT_MODEL_PATH} is missing")
    return DEFAULT_MODEL_PATH


@pytest.fixture
def stack(tmp_path, model_present):
    """parent server + enclave app as real processes over TCP loopback."""
    from harness import EnclaveStack

    running = EnclaveStack(tmp_path)
    yield running
    running.stop(wait=False)


@pytest.fixture(scope="session")
def hostile(tmp_path_factory, model_present):
    """One real stack for the three hostile-case modules (tests/hostile_cases.py drives it),
    as scripts/robustness_report.py runs every case against one: each case ends by proving
    the stack still serves, and the log checks then cover every case (~1 s saved per module)."""
    from hostile_cases import HostileContext, new_stack

    stack = new_stack(tmp_path_factory.mktemp("hostile"))
    try:
        yield HostileContext(stack)
    finally:
        stack.stop(wait=False)


def pytest_sessionfinish(session, exitstatus):
    """Reap the stacks fixtures stopped without waiting (harness.EnclaveStack.stop)."""
    harness = sys.modules.get("harness")
    if harness is not None:
        harness.wait_for_stopped()
