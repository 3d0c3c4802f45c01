"""The test-split prediction cache (tests/prediction_cache.py) cannot make the accuracy
regression pass on stale answers: its key follows the model, the prediction code, the
split and its images, and a hit is checked against live answers first."""

from __future__ import annotations

import json

import numpy as np
import pytest

import prediction_cache
from prediction_cache import ROOT, cache_key, prediction_sources, split_probabilities

CODES = ("a", "b")


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A model file, a labels file, six images (three per class) and an empty cache."""
    monkeypatch.setattr(prediction_cache, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv(prediction_cache.FULL_EVALUATION_ENV, raising=False)
    model, labels = tmp_path / "model.tflite", tmp_path / "labels.json"
    model.write_bytes(b"model v1")
    labels.write_text("[]")
    images = []
    for number in range(6):
        path = tmp_path / f"img{number}.jpg"
        path.write_bytes(bytes([number]) * 10)
        images.append((f"id{number}", path))
    dx_of = {image_id: CODES[number % 2] for number, (image_id, _) in enumerate(images)}
    return model, labels, images, dx_of


class Model:
    """A stand-in classifier: answers from the image's first byte, counts its calls."""

    def __init__(self, shift: float = 0.0) -> None:
        self.calls = 0
        self.shift = shift

    def __call__(self, data: bytes) -> list[float]:
        self.calls += 1
        p = (data[0] + 1) / 10 + self.shift
        return [p, 1 - p]


def run(world, model: Model, per_class: int = 1):
    model_path, labels, images, dx_of = world
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prediction_cache, "SPOT_CHECK_PER_CLASS", per_class)
        return split_probabilities(model, model_path, labels, images, dx_of, CODES)


def test_the_prediction_code_is_in_the_key():
    sources = {p.relative_to(ROOT).as_posix() for p in prediction_sources()}
    assert {"nitrolesion/model/classifier.py", "nitrolesion/model/preprocess.py",
            "nitrolesion/model/labels.py", "nitrolesion/errors.py"} <= sources


def test_key_follows_model_labels_images_and_order(world):
    model, labels, images, _ = world
    before = cache_key(model, labels, images)
    assert cache_key(model, labels, images) == before
    assert cache_key(model, labels, images[::-1]) != before
    assert cache_key(model, labels, images[:-1]) != before
    for path in (model, labels, images[0][1]):
        original = path.read_bytes()
        path.write_bytes(original + b"x")
        assert cache_key(model, labels, images) != before, path.name
        path.write_bytes(original)
    assert cache_key(model, labels, images) == before


def test_hit_reclassifies_only_the_stratified_subset(world):
    first, second = Model(), Model()
    fresh, how = run(world, first)
    assert first.calls == 6 and how.startswith("all 6 images classified")
    cached, how = run(world, second)
    assert second.calls == 2 and "2 of 6 images re-classified live" in how  # one per class
    assert np.array_equal(cached, fresh)


def test_changed_model_file_misses_the_cache(world):
    run(world, Model())
    world[0].write_bytes(b"model v2")
    changed = Model(shift=0.05)
    probabilities, how = run(world, changed)
    assert changed.calls == 6 and how.startswith("all 6")
    assert probabilities[0, 0] == pytest.approx(0.15)


def test_answers_that_differ_from_the_cache_reclassify_everything(world):
    """Something outside the key changed the answers: the spot check sees it."""
    run(world, Model())
    drifted = Model(shift=0.01)
    with pytest.warns(UserWarning, match="differ from the model's live answers"):
        probabilities, how = run(world, drifted)
    assert drifted.calls == 2 + 6 and how.startswith("all 6")
    assert probabilities[0, 0] == pytest.approx(0.11)
    again = Model(shift=0.01)
    run(world, again)
    assert again.calls == 2  # the fresh answers replaced the stale ones


def test_unreadable_or_foreign_cache_files_are_ignored(world):
    model, labels, images, _ = world
    run(world, Model())
    (cache_file,) = prediction_cache.CACHE_DIR.glob("test-split-*.json")
    stored = json.loads(cache_file.read_text())
    for broken in ("{", json.dumps({**stored, "ids": stored["ids"][::-1]}),
                   json.dumps({**stored, "probabilities": stored["probabilities"][:-1]})):
        cache_file.write_text(broken)
        counting = Model()
        run(world, counting)
        assert counting.calls == 6


def test_full_evaluation_ignores_the_cache(world, monkeypatch):
    run(world, Model())
    monkeypatch.setenv(prediction_cache.FULL_EVALUATION_ENV, "1")
    counting = Model()
    run(world, counting)
    assert counting.calls == 6
