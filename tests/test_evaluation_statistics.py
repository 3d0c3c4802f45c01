"""How sure the figures are: the lesion bootstrap, the predictions CSV and models/compare.py.

These run on synthetic data (no ../shared needed): the point is the statistics, not the model.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nitrolesion.model.dataset import read_metadata
from nitrolesion.model.metrics import calibration, headline_figures, lesion_bootstrap, roc_auc
from nitrolesion.model.predictions import Predictions, read_predictions, write_predictions

ROOT = Path(__file__).resolve().parents[1]
CODES3 = ["a", "b", "c"]


def strict_json(text: str):
    """Parse JSON refusing NaN/Infinity, which Python's json accepts but JSON does not."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def synthetic(n_lesions=60, images_per_lesion=3, seed=1):
    """Three classes; every image of a lesion shares its label and (nearly) its answer."""
    rng = np.random.default_rng(seed)
    y, probs, groups = [], [], []
    for lesion in range(n_lesions):
        label = lesion % 3
        right = rng.random() < 0.7
        guess = label if right else (label + 1) % 3
        for _ in range(images_per_lesion):
            p = np.full(3, 0.1) + rng.random(3) * 0.05
            p[guess] = 0.8
            probs.append(p / p.sum())
            y.append(label)
            groups.append(f"L{lesion}")
    return np.array(y), np.array(probs), groups


def test_roc_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 5, size=40).astype(float)  # many ties
        positive = rng.random(40) < 0.4
        pos, neg = scores[positive], scores[~positive]
        pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert roc_auc(positive, scores) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_headline_figures_leave_out_undefined_ones():
    y = np.array([0, 0, 0])
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    figures = headline_figures(y, probs, CODES3)
    assert figures["accuracy"] == pytest.approx(2 / 3)
    assert figures["recall_a"] == pytest.approx(2 / 3)
    assert "recall_b" not in figures and "recall_c" not in figures  # absent, not 0
    assert "macro_roc_auc" not in figures  # one class: undefined, not NaN


def test_calibration_of_honest_and_overconfident_answers():
    y = np.zeros(10, dtype=int)
    honest = np.tile([0.8, 0.2], (10, 1))
    honest[:2] = [0.2, 0.8]  # the two wrong answers are as confident as the eight right
    result = calibration(y, honest)
    assert result["expected_calibration_error"] == pytest.approx(0.0)
    assert result["bins"] == [{"range": [0.8, 0.9], "images": 10, "mean_confidence": 0.8,
                               "accuracy": 0.8}]
    sure = np.tile([1.0, 0.0], (10, 1))
    sure[:5] = [0.0, 1.0]  # certain every time, right half the time
    result = calibration(y, sure)
    assert result["expected_calibration_error"] == pytest.approx(0.5)
    assert result["bins"][0]["range"] == [0.9, 1.0]  # 1.0 lands in the last bin


def test_bootstrap_draws_whole_lesions_and_keeps_class_counts():
    y, probs, groups = synthetic()
    group_of = np.array([int(g[1:]) for g in groups])

    def check(at):
        assert np.bincount(y[at], minlength=3).tolist() == np.bincount(y, minlength=3).tolist()
        # each drawn lesion brings all 3 of its images, so per-lesion counts are multiples of 3
        assert (np.bincount(group_of[at]) % 3 == 0).all()
        return {"accuracy": float((probs[at].argmax(1) == y[at]).mean())}

    intervals = lesion_bootstrap(check, y, groups, n_resamples=200, seed=5)
    low, high = intervals["accuracy"]
    point = float((probs.argmax(1) == y).mean())
    assert low < point < high


def test_bootstrap_is_seeded():
    y, probs, groups = synthetic()

    def statistic(at):
        return headline_figures(y[at], probs[at], CODES3)

    first = lesion_bootstrap(statistic, y, groups, n_resamples=100, seed=7)
    assert lesion_bootstrap(statistic, y, groups, n_resamples=100, seed=7) == first
    assert lesion_bootstrap(statistic, y, groups, n_resamples=100, seed=8) != first
    assert set(first) == {"accuracy", "balanced_accuracy", "macro_roc_auc", "top3_accuracy",
                          "recall_a", "recall_b", "recall_c"}


def test_correlated_images_widen_the_interval():
    """Treating 4 near-copies of a lesion as 4 independent images would claim about twice
    the precision the data has; resampling lesions does not."""
    y, probs, groups = synthetic(n_lesions=90, images_per_lesion=4)

    def accuracy(at):
        return {"accuracy": float((probs[at].argmax(1) == y[at]).mean())}

    by_lesion = lesion_bootstrap(accuracy, y, groups, n_resamples=400, seed=0)["accuracy"]
    by_image = lesion_bootstrap(accuracy, y, [str(i) for i in range(len(y))],
                                n_resamples=400, seed=0)["accuracy"]
    assert (by_lesion[1] - by_lesion[0]) > 1.5 * (by_image[1] - by_image[0])


def test_bootstrap_rejects_bad_arguments():
    y, probs, groups = synthetic(n_lesions=6)
    with pytest.raises(ValueError, match="n_resamples"):
        lesion_bootstrap(lambda at: {}, y, groups, n_resamples=0)
    with pytest.raises(ValueError, match="group ids"):
        lesion_bootstrap(lambda at: {}, y, groups[:-1])
    with pytest.raises(ValueError, match="level"):
        lesion_bootstrap(lambda at: {}, y, groups, level=1.5)


def test_predictions_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=5)
    path = tmp_path / "p.csv"
    write_predictions(path, Predictions([f"I{i}" for i in range(5)], CODES3, probs))
    back = read_predictions(path)
    assert back.image_ids == [f"I{i}" for i in range(5)] and back.codes == CODES3
    assert np.allclose(back.probabilities, probs, atol=1e-6)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["predicted"] for r in rows] == [CODES3[i] for i in probs.argmax(1)]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("reader, text, message", [
    (read_predictions, "id,guess,a\n", "not a predictions file"),
    (read_predictions, "image_id,predicted,p_a,p_b\nI1,a,0.5\n", ":2: 3 fields"),
    (read_predictions, "image_id,predicted,p_a,p_b\nI1,a,0.5,x\n",
     ":2: a probability is not a number"),
    (read_predictions, "image_id,predicted,p_a,p_b\nI1,a,0.5,nan\n",
     ":2: probabilities must lie"),
    (read_predictions, "image_id,predicted,p_a,p_b\nI1,a,0.5,0.5\nI1,a,0.5,0.5\n",
     ":3: image I1 listed twice"),
    (read_predictions, "image_id,predicted,p_a,p_b\n", "no predictions"),
    (read_predictions, "image_id,predicted,p_a,p_b\nI1,a,0.5,\"" + "x" * 200_000 + "\n",
     "not CSV .field larger"),
    (read_metadata, "lesion_id,image_id\nL1,I1\n", "missing column"),
    (read_metadata, "lesion_id,image_id,dx\nL1,I1\n", ":2: too few fields"),
    (read_metadata, "lesion_id,image_id,dx\nL1,I1,\"" + "x" * 200_000 + "\n",
     "not CSV .field larger"),
], ids=lambda value: getattr(value, "__name__", None))
def test_malformed_csv_files_are_named(tmp_path, reader, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        reader(path)


@settings(max_examples=300, deadline=None, database=None, print_blob=True)
@given(st.binary(max_size=400))
def test_any_bytes_read_as_predictions_or_a_value_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "p.csv"
    path.write_bytes(b"image_id,predicted,p_a,p_b\n" + data)
    try:
        predictions = read_predictions(path)
    except ValueError:
        return
    assert predictions.probabilities.shape == (len(predictions.image_ids), 2)


def write_case(tmp_path, y, groups, probs, name):
    ids = [f"IMG{i:04d}" for i in range(len(y))]
    path = tmp_path / name
    write_predictions(path, Predictions(ids, CODES3, probs))
    return path, ids


def run_compare(*args):
    return subprocess.run([sys.executable, str(ROOT / "models" / "compare.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture
def compare_case(tmp_path):
    y, probs, groups = synthetic(n_lesions=60, images_per_lesion=2)
    base, ids = write_case(tmp_path, y, groups, probs, "base.csv")
    metadata = tmp_path / "meta.csv"
    with open(metadata, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lesion_id", "image_id", "dx"])
        writer.writerows([g, i, CODES3[label]] for g, i, label in zip(groups, ids, y))
    return tmp_path, y, probs, groups, base, metadata


def test_compare_identical_models_differ_by_nothing(compare_case):
    tmp_path, y, probs, groups, base, metadata = compare_case
    same, _ = write_case(tmp_path, y, groups, probs, "same.csv")
    run = run_compare(base, same, "--metadata", metadata, "--bootstrap", "200")
    assert run.returncode == 0, run.stderr
    summary = strict_json(run.stdout)
    assert summary["same_prediction"] == 1.0
    for figure in summary["figures"].values():
        assert figure["difference"] == 0 and figure["difference_ci"] == [0, 0]
    assert summary["confidence_intervals"]["zero_width"]["figures"] == list(summary["figures"])


def test_compare_finds_a_real_improvement(compare_case):
    tmp_path, y, probs, groups, base, metadata = compare_case
    better = np.full_like(probs, 0.1)
    better[np.arange(len(y)), y] = 0.8  # the candidate is right on every image
    cand, _ = write_case(tmp_path, y, groups, better, "better.csv")
    run = run_compare(base, cand, "--metadata", metadata, "--bootstrap", "300")
    assert run.returncode == 0, run.stderr
    accuracy = strict_json(run.stdout)["figures"]["accuracy"]
    assert accuracy["candidate"] == 1.0
    assert accuracy["difference"] == pytest.approx(1.0 - accuracy["baseline"], abs=1e-4)
    low, high = accuracy["difference_ci"]
    assert 0 < low <= accuracy["difference"] <= high
    # with 3 classes top-3 is always right for both: only that difference is a point
    assert strict_json(run.stdout)["confidence_intervals"]["zero_width"]["figures"] == [
        "top3_accuracy"]


def test_compare_refuses_files_about_different_images(compare_case):
    tmp_path, y, probs, groups, base, metadata = compare_case
    fewer = tmp_path / "fewer.csv"
    write_predictions(fewer, Predictions([f"IMG{i:04d}" for i in range(10)], CODES3, probs[:10]))
    run = run_compare(base, fewer, "--metadata", metadata)
    assert run.returncode == 2
    assert "different images" in run.stderr and "110 only in the baseline" in run.stderr
    run = run_compare(base, tmp_path / "absent.csv", "--metadata", metadata)
    assert run.returncode == 2 and "absent.csv" in run.stderr
