"""Triage: the fitting math, the triage file the enclave loads (and refuses), the typed
prediction on the wire, and the model's feature output."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import cbor2
import numpy as np
import pytest

from harness import ENCLAVE_APP, PYTHON, ROOT, free_port, tcp_env
from nitrolesion.errors import ModelError, ProtocolError
from nitrolesion.model.calibration import (
    fit_class_gaussians, fit_temperature, ledoit_wolf_shrinkage, negative_log_likelihood,
    sensitivity_specificity, threshold_for_sensitivity)
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH, LesionModel, interpreter_class
from nitrolesion.model.labels import CODES
from nitrolesion.model.metrics import triage_figures
from nitrolesion.model.triage import (
    MALIGNANT_CODES, OOD_METHOD, Triage, load_triage, temperature_scaled, triage_path_for)
from nitrolesion.wire.messages import (
    PREDICTION_FIELDS, ResultPayload, Prediction, check_prediction, triage_text)

SHIPPED_TRIAGE = triage_path_for(DEFAULT_MODEL_PATH)
#: Model 7 as trained, before models/add_feature_output.py gave it output 1 (git history).
ORIGINAL_MODEL_COMMIT = "fc69e75"
ORIGINAL_MODEL_SHA256 = "114722e2d9fa80a2a927570a942bf9832a193f24a4fb2d5df346af9c3e7497e1"


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# -- fitting ----------------------------------------------------------------------------
def test_temperature_scaling_is_softmax_of_scaled_logits():
    logits = np.random.default_rng(1).normal(size=(20, 7)) * 3
    for temperature in (0.5, 1.0, 2.5):
        assert np.allclose(temperature_scaled(softmax(logits), temperature),
                           softmax(logits / temperature), atol=1e-12)
    # Argmax never changes, so accuracy is the same before and after.
    assert (temperature_scaled(softmax(logits), 3.0).argmax(1) == logits.argmax(1)).all()


@pytest.mark.parametrize("true_temperature", [0.6, 1.0, 2.0])
def test_fit_temperature_recovers_the_temperature_that_made_the_labels(true_temperature):
    """Labels drawn from softmax(z / T): the model's softmax(z) is mis-calibrated by T,
    and the fit finds it (within sampling error) and lowers the NLL."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(20000, 7)) * 2.5
    truth = softmax(logits / true_temperature)
    labels = np.array([rng.choice(7, p=row) for row in truth])
    fitted = fit_temperature(labels, softmax(logits))
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    assert negative_log_likelihood(labels, softmax(logits), fitted) \
        <= negative_log_likelihood(labels, softmax(logits), 1.0) + 1e-9


def test_threshold_keeps_the_asked_sensitivity_and_is_the_largest_that_does():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    positive = np.array([1, 1, 0, 1, 1, 0, 1, 0, 1, 1], dtype=bool)  # 7 positives
    for wanted in (0.5, 0.95, 1.0, 0.7):
        t = threshold_for_sensitivity(scores, positive, wanted)
        sensitivity, _ = sensitivity_specificity(scores, positive, t)
        assert sensitivity >= wanted
        above = scores[scores > t]
        if len(above):  # the next larger candidate would miss the target
            assert sensitivity_specificity(scores, positive, above.min())[0] < wanted
    assert threshold_for_sensitivity(scores, positive, 1.0) == 0.05
    assert sensitivity_specificity(scores, positive, 0.55) == (3 / 7, 2 / 3)
    with pytest.raises(ValueError, match="no positives"):
        threshold_for_sensitivity(scores, np.zeros(10, bool), 0.9)


def test_ledoit_wolf_shrinks_less_with_more_samples_and_stays_invertible():
    rng = np.random.default_rng(3)
    scales = np.linspace(0.2, 3.0, 50)  # a covariance far from the identity target
    few = rng.normal(size=(30, 50)) * scales          # fewer samples than dimensions: singular
    many = rng.normal(size=(20000, 50)) * scales
    cov_few, shrink_few = ledoit_wolf_shrinkage(few - few.mean(0))
    _, shrink_many = ledoit_wolf_shrinkage(many - many.mean(0))
    assert 0 <= shrink_many < shrink_few <= 1
    assert np.linalg.eigvalsh(cov_few).min() > 0


def test_class_gaussians_score_near_points_low_and_far_points_high():
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(3), 400)
    centres = np.array([[0, 0, 0, 0], [5, 0, 0, 0], [0, 5, 0, 0]], float)
    features = centres[y] + rng.normal(size=(1200, 4))
    means, precision, _ = fit_class_gaussians(features, y, 3)
    assert np.allclose(means, centres, atol=0.2)
    triage = Triage("0" * 64, 1.0, 0.5, MALIGNANT_CODES, OOD_METHOD, 20.0, means, precision)
    near, far = triage.ood_scores(np.array([[5.1, 0.2, 0, 0], [0, 0, 30, 0]]))
    assert near < 2 < 100 < far


def small_triage(**changes) -> Triage:
    values = dict(model_sha256="0" * 64, temperature=1.0, refer_threshold=0.5,
                  malignant_classes=MALIGNANT_CODES, ood_method=OOD_METHOD, ood_threshold=10.0,
                  class_means=np.zeros((7, 2)), precision=np.eye(2))
    values.update(changes)
    return Triage(**values)


def probabilities_with(malignant: float) -> np.ndarray:
    p = np.zeros(7)
    p[CODES.index("mel")] = malignant
    p[CODES.index("nv")] = 1 - malignant
    return p


@pytest.mark.parametrize("malignant, features, refer, reason", [
    (0.2, [[1.0, 1.0]], False, None),
    (0.5, [[1.0, 1.0]], True, "malignant"),             # at the threshold: referred
    (0.9, [[1.0, 1.0], [-1.0, -1.0]], True, "malignant"),  # views averaged: [0, 0]
    (0.2, [[4.0, 0.0]], True, "not_a_lesion"),          # distance 16 > 10
    (0.9, [[4.0, 0.0]], True, "not_a_lesion"),          # not a lesion wins over the score
    (0.2, [[np.nan, 0.0]], True, "not_a_lesion"),       # broken features: fail closed
])
def test_assess_refers_for_the_right_reason(malignant, features, refer, reason):
    assessment = small_triage().assess(probabilities_with(malignant), np.array(features))
    assert (assessment.refer, assessment.refer_reason) == (refer, reason)
    assert assessment.malignant == pytest.approx(malignant)


def test_triage_figures_count_the_flag_as_a_screen():
    y = np.array([CODES.index(c) for c in ("mel", "mel", "bcc", "akiec", "nv", "nv", "bkl", "df")])
    refer = np.array([1, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
    malignant = np.array([0.9, 0.2, 0.8, 0.7, 0.6, 0.1, 0.05, 0.3])
    figures = triage_figures(y, malignant, refer, CODES)
    assert figures["refer_sensitivity"] == 3 / 4
    assert figures["refer_specificity"] == 3 / 4
    assert figures["melanoma_sensitivity"] == 1 / 2
    assert figures["malignant_roc_auc"] == pytest.approx(14 / 16)


# -- the triage file --------------------------------------------------------------------
def test_shipped_triage_file_belongs_to_the_shipped_model(model_present):
    triage = load_triage(SHIPPED_TRIAGE, DEFAULT_MODEL_PATH.read_bytes())
    assert triage.model_sha256 == hashlib.sha256(DEFAULT_MODEL_PATH.read_bytes()).hexdigest()
    assert triage.malignant_classes == ("akiec", "bcc", "mel")
    assert 0 < triage.refer_threshold < 1 and triage.temperature > 0 and triage.ood_threshold > 0
    loaded = LesionModel().triage  # what the enclave's LesionModel loads by default
    assert (loaded.model_sha256, loaded.refer_threshold, loaded.ood_threshold) \
        == (triage.model_sha256, triage.refer_threshold, triage.ood_threshold)


def test_triage_file_round_trips(tmp_path):
    saved = small_triage(model_sha256=hashlib.sha256(b"model").hexdigest(), temperature=0.8,
                         precision=np.array([[2.0, 0.5], [0.5, 1.0]]))
    saved.save(tmp_path / "t.npz")
    got = load_triage(tmp_path / "t.npz", b"model")
    assert (got.model_sha256, got.temperature, got.refer_threshold, got.ood_threshold,
            got.malignant_classes, got.ood_method) == (
        saved.model_sha256, 0.8, 0.5, 10.0, MALIGNANT_CODES, OOD_METHOD)
    assert np.array_equal(got.precision, saved.precision)
    assert np.array_equal(got.class_means, saved.class_means)


def test_round_trip_refuses_another_models_file(tmp_path):
    small_triage().save(tmp_path / "t.npz")
    with pytest.raises(ModelError, match=r"fitted to model sha256 0000000000000000\.\.\., not this model"):
        load_triage(tmp_path / "t.npz", b"another model")


@pytest.mark.parametrize("change, message", [
    ({"temperature": 0.0}, "temperature = 0.0 is outside"),
    ({"temperature": float("nan")}, "temperature = nan is outside"),
    ({"refer_threshold": 1.5}, "refer_threshold = 1.5 is outside"),
    ({"malignant_classes": ("mel", "xyz")}, "are not distinct codes"),
    ({"ood_method": "energy"}, "OOD method 'energy'"),
    ({"precision": np.eye(3)}, "precision has shape"),
    ({"class_means": np.full((7, 2), np.inf)}, "not finite"),
])
def test_malformed_triage_file_is_refused(tmp_path, change, message):
    path = tmp_path / "t.npz"
    small_triage(model_sha256=hashlib.sha256(b"m").hexdigest(), **change).save(path)
    with pytest.raises(ModelError, match=message):
        load_triage(path, b"m")


@pytest.fixture
def model_copy(tmp_path, model_present):
    """The shipped model and its triage file copied to a folder of their own."""
    model = tmp_path / "lesion_classifier.tflite"
    shutil.copy(DEFAULT_MODEL_PATH, model)
    shutil.copy(SHIPPED_TRIAGE, triage_path_for(model))
    return model


def test_model_with_a_tampered_or_foreign_triage_file_does_not_load(model_copy):
    assert LesionModel(model_copy).triage is not None
    triage = triage_path_for(model_copy)
    data = bytearray(triage.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the zip: its CRC fails
    triage.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="is not usable"):
        LesionModel(model_copy)
    triage.unlink()
    with pytest.raises(ModelError, match="no triage file .* fit one with models/fit_triage.py"):
        LesionModel(model_copy)
    shutil.copy(SHIPPED_TRIAGE, triage)
    model_copy.write_bytes(model_copy.read_bytes() + b"\0")  # another model, same name
    with pytest.raises(ModelError, match="was fitted to model sha256"):
        LesionModel(model_copy)


def test_enclave_refuses_to_start_with_a_foreign_triage_file(model_copy, tmp_path):
    """The real enclave process, given a model whose triage file was fitted to another
    model, says why in one line and exits 1 instead of serving unchecked thresholds."""
    model_copy.write_bytes(model_copy.read_bytes() + b"\0")
    run = subprocess.run(
        [PYTHON, str(ENCLAVE_APP), "3", str(free_port()), str(free_port()),
         "--dev-attestation", str(tmp_path / "dev"), "--model", str(model_copy)],
        env=tcp_env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 1, run.stderr
    assert "enclave: cannot start:" in run.stderr and "was fitted to model sha256" in run.stderr
    assert "refit it with models/fit_triage.py" in run.stderr


# -- the feature output -----------------------------------------------------------------
def original_model(tmp_path):
    """Model 7 as trained, from git history; skips when the history is not there."""
    try:
        data = subprocess.run(["git", "show", f"{ORIGINAL_MODEL_COMMIT}:models/lesion_classifier.tflite"],
                              cwd=ROOT, capture_output=True, timeout=60, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"model 7 before its feature output is not in this clone's history: {exc}")
    assert hashlib.sha256(data).hexdigest() == ORIGINAL_MODEL_SHA256
    path = tmp_path / "model7_original.tflite"
    path.write_bytes(data)
    return path


def test_feature_output_keeps_the_probabilities_bit_identical(tmp_path, test_image_paths, model_present):
    """models/add_feature_output.py only added output 1: on real images the shipped file's
    output 0 equals the original model's to the bit, and output 1 is the [4, 1280] pool
    the classifier head reads."""
    Interpreter = interpreter_class()
    before = Interpreter(model_path=str(original_model(tmp_path)))
    after = Interpreter(model_path=str(DEFAULT_MODEL_PATH))
    for interpreter in (before, after):
        interpreter.allocate_tensors()
    assert len(before.get_output_details()) == 1 and len(after.get_output_details()) == 2
    assert [t["name"] for t in before.get_tensor_details()] \
        == [t["name"] for t in after.get_tensor_details()]
    classifier = LesionModel().new_classifier()
    for path in test_image_paths:
        pixels = classifier.preprocess(path.read_bytes())[np.newaxis]
        outputs = []
        for interpreter in (before, after):
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
            interpreter.invoke()
            outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy())
        assert np.array_equal(outputs[0], outputs[1]), path.name
        features = after.get_tensor(after.get_output_details()[1]["index"])
        assert features.shape == (4, 1280) and (features >= 0).all()  # ReLU6 then mean


# -- the wire ---------------------------------------------------------------------------
WIRE = {"code": "mel", "name": "Melanoma", "confidence": 0.6,
        "probabilities": {"mel": 0.6, "nv": 0.3, "bcc": 0.1}, "malignant": 0.7,
        "refer": True, "refer_reason": "malignant"}


def test_typed_prediction_decodes_sorts_and_round_trips():
    prediction = check_prediction(WIRE)
    assert isinstance(prediction, Prediction)
    assert prediction.top(2) == [("mel", 0.6), ("nv", 0.3)]
    assert prediction.to_wire() == WIRE and tuple(WIRE) == PREDICTION_FIELDS
    payload = ResultPayload(4, prediction=WIRE)  # a map is decoded strictly on the way in
    assert ResultPayload.decode(payload.encode()) == payload
    assert payload.prediction == prediction
    assert check_prediction(dict(WIRE, refer=False, refer_reason=None)).triage_text() == "malignant 0.70"
    assert triage_text(0.3, True, "not_a_lesion") == "malignant 0.30 REFER (not a lesion)"
    assert prediction.triage_text() == "malignant 0.70 REFER"


@pytest.mark.parametrize("change, message", [
    ({"malignant": -0.1}, "'malignant': expected a probability"),
    ({"malignant": True}, "'malignant': expected a probability"),
    ({"malignant": None}, "'malignant': expected a probability"),
    ({"refer": "yes"}, "'refer': expected true or false"),
    ({"refer": 1}, "'refer': expected true or false"),
    ({"refer_reason": None}, "refer_reason"),
    ({"refer_reason": "MALIGNANT"}, "refer_reason"),
    ({"refer": False}, "expected null when refer is false"),
    ({"refer": False, "refer_reason": "not_a_lesion"}, "expected null when refer is false"),
])
def test_strict_decoder_refuses_malformed_triage_fields(change, message):
    with pytest.raises(ProtocolError, match=message):
        check_prediction(dict(WIRE, **change))
    body = cbor2.dumps({"request": 1, "result": dict(WIRE, **change)})
    with pytest.raises(ProtocolError, match=message):
        ResultPayload.decode(body)


@pytest.mark.parametrize("field", ["malignant", "refer", "refer_reason"])
def test_strict_decoder_refuses_a_missing_or_extra_field(field):
    missing = {k: v for k, v in WIRE.items() if k != field}
    with pytest.raises(ProtocolError, match="expected fields"):
        check_prediction(missing)
    with pytest.raises(ProtocolError, match="expected fields"):
        check_prediction(dict(WIRE, extra=1))


def test_predictions_file_carries_the_triage_columns(tmp_path):
    """evaluate.py --predictions: malignant and refer after the probabilities, read back
    by compare.py's reader; a file without them still reads (older files)."""
    from nitrolesion.model.predictions import Predictions, read_predictions, write_predictions

    probabilities = np.array([[0.7, 0.3], [0.2, 0.8]])
    path = tmp_path / "p.csv"
    write_predictions(path, Predictions(["A", "B"], ["mel", "nv"], probabilities,
                                        np.array([0.7, 0.2]), np.array([True, False])))
    assert path.read_text().splitlines()[0] == "image_id,predicted,p_mel,p_nv,malignant,refer"
    back = read_predictions(path)
    assert back.codes == ["mel", "nv"] and np.allclose(back.probabilities, probabilities)
    assert np.allclose(back.malignant, [0.7, 0.2]) and back.refer.tolist() == [True, False]
    path.write_text(path.read_text().replace(",true", ",yes"))
    with pytest.raises(ValueError, match=r"p.csv:2: refer must be true or false"):
        read_predictions(path)
    write_predictions(path, Predictions(["A"], ["mel", "nv"], probabilities[:1]))
    assert read_predictions(path).malignant is None


def test_fit_triage_without_the_test_split_refuses_a_cache(tmp_path):
    """--no-test never reads the test split; a --cache holds every split's outputs, so the
    two together are a usage error, before any model runs."""
    run = subprocess.run([PYTHON, str(ROOT / "models" / "fit_triage.py"), "--no-test",
                          "--cache", str(tmp_path / "outputs.npz")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2
    assert "--cache holds every split's outputs; it cannot be used with --no-test" in run.stderr
    assert not (tmp_path / "outputs.npz").exists()
