"""Shared fixtures: where the ../shared data is, and a running enclave stack."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nitrolesion.model.dataset import default_data_dir, load_split  # noqa: E402
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH  # noqa: E402


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    """The HAM10000 folder ($HAM10000_DIR or ../shared/ham10000); skips when absent."""
    path = default_data_dir()
    if not (path / "HAM10000_metadata.csv").is_file() or not (path / "images").is_dir():
        pytest.skip(f"HAM10000 data not found at {path} (set HAM10000_DIR)")
    return path


@pytest.fixture(scope="session")
def test_image_paths(ham_dir) -> list[Path]:
    """A few real test-split images, one of several diagnoses."""
    return [ham_dir / "images" / f"{i}.jpg" for i in load_split("test")[:40:5]]


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
    running.stop()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, model_present):
    """One real stack per hostile-case module (tests/hostile_cases.py drives it)."""
    from hostile_cases import HostileContext, new_stack

    stack = new_stack(tmp_path_factory.mktemp("hostile"))
    try:
        yield HostileContext(stack)
    finally:
        stack.stop()
