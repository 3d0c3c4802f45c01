"""Inference with the shipped TFLite model: load once, few interpreters per process.

``LesionModel`` reads the model file, labels and triage file (``<model>.triage.npz``, see
nitrolesion/model/triage.py) once; ``LesionModel.new_classifier()`` gives
a :class:`Classifier` that owns one TFLite interpreter. An interpreter is not thread-safe:
one thread at a time may call :meth:`Classifier.predict_array` (the enclave's WorkerPool
gives each of its interpreters a thread of its own). Interpreters are made sparingly: each
holds ~29 MiB (~19 MiB of activations, where the widest layer is four mirror views of
96x96x96 float32, and the float16 weights expanded and packed as float32), so every extra
one costs that again (bench/worker_memory.py, bench/weight_cache.py); the enclave makes one
per CPU, at most 2 (nitrolesion/enclave/service.py).
:meth:`Classifier.preprocess`, the decoding half, needs no interpreter: any thread may run it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nitrolesion.errors import ModelError
from nitrolesion.model.labels import DEFAULT_LABELS_PATH, MODELS_DIR, Label, load_labels
from nitrolesion.model.preprocess import (
    DEFAULT_MAX_BYTES, DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS, preprocess_image)
from nitrolesion.model.triage import Triage, load_triage, triage_path_for
from nitrolesion.wire.messages import Prediction, check_prediction

DEFAULT_MODEL_PATH = MODELS_DIR / "lesion_classifier.tflite"


def interpreter_class():
    """The TFLite ``Interpreter`` class: ai-edge-litert first, then tflite-runtime.

    Raises :class:`ModelError` naming the package to install when neither is present.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise ModelError(
                "no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime)"
            ) from exc
    return Interpreter


@dataclass(frozen=True)
class ModelOutput:
    """What one run of the interpreter gives: the probabilities (output 0, normalised) and
    the penultimate features (output 1: [V, D], one row per view), or None for a model
    without them."""

    probabilities: np.ndarray
    features: np.ndarray | None


class LesionModel:
    """The model bytes, labels and triage parameters, loaded once per process."""

    def __init__(self, model_path: Path = DEFAULT_MODEL_PATH,
                 labels_path: Path = DEFAULT_LABELS_PATH,
                 triage_path: Path | None = None, *, triage: bool = True) -> None:
        """``triage_path`` defaults to the file beside the model (:func:`triage_path_for`);
        ``triage=False`` loads none (fitting one: models/fit_triage.py), and then
        :meth:`Classifier.prediction_from` refuses to answer."""
        try:
            self.model_bytes = Path(model_path).read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model file {model_path}: {exc.strerror}") from exc
        self.model_path = Path(model_path)
        self.labels: list[Label] = load_labels(labels_path)
        self.triage: Triage | None = None
        if triage:
            self.triage = load_triage(triage_path or triage_path_for(self.model_path),
                                      self.model_bytes)
        self._interpreter_class = interpreter_class()
        probe = self.new_classifier()
        self.input_size = probe.input_size

    def new_classifier(self, num_threads: int = 1) -> "Classifier":
        """A classifier with its own interpreter running on ``num_threads`` threads (use it
        from one thread at a time; see :func:`usable_cpus` for "all cores")."""
        return Classifier(self, num_threads)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the CPU count, at least 1)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no sched_getaffinity on this platform
        return os.cpu_count() or 1


def normalised(output: np.ndarray) -> np.ndarray:
    """The model's raw output row as probabilities: clipped at 0, summing to exactly 1."""
    raw = np.clip(output.astype(np.float64), 0, None)
    total = raw.sum()
    # The int8 output is quantized in steps of 1/256; renormalise so the seven
    # probabilities sum to exactly 1 for the caller.
    return raw / total if total > 0 else np.full(len(raw), 1.0 / len(raw))


class Classifier:
    """One TFLite interpreter over a :class:`LesionModel`; not thread-safe."""

    def __init__(self, model: LesionModel, num_threads: int = 1) -> None:
        self.labels = model.labels
        self.triage = model.triage
        try:
            self._interpreter = model._interpreter_class(
                model_content=model.model_bytes, num_threads=num_threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{model.model_path} is not a usable TFLite model: {exc}") from exc
        inp = self._interpreter.get_input_details()[0]
        outputs = self._interpreter.get_output_details()
        out = outputs[0]
        shape = tuple(int(d) for d in inp["shape"])
        if len(shape) != 4 or shape[0] != 1 or shape[1] != shape[2] or shape[3] != 3:
            raise ModelError(f"expected model input shape (1, S, S, 3), got {shape}")
        if tuple(int(d) for d in out["shape"]) != (1, len(self.labels)):
            raise ModelError(f"expected model output shape (1, {len(self.labels)}), got {tuple(out['shape'])}")
        if inp["dtype"] != np.float32:
            raise ModelError(f"expected float32 model input, got {inp['dtype']}")
        self.input_size = shape[1]
        self._input_index = inp["index"]
        self._output_index = out["index"]
        # Output 1, when present, is the features (models/add_feature_output.py).
        self._features_index = outputs[1]["index"] if len(outputs) > 1 else None
        if self.triage is not None and self._features_index is None:
            raise ModelError(f"{model.model_path} has no feature output (output 1), which its "
                             "triage file needs: add it with models/add_feature_output.py")

    def predict_array(self, pixels: np.ndarray) -> ModelOutput:
        """The model's output for one preprocessed (S, S, 3) float32 array: probabilities
        (7, summing to 1) and the features.

        Uses the interpreter: one thread at a time."""
        # set_tensor copies into the interpreter's own buffer; no float32 copy before it
        # when the array already is one (preprocess_image gives float32).
        self._interpreter.set_tensor(self._input_index,
                                     np.asarray(pixels, dtype=np.float32)[np.newaxis])
        self._interpreter.invoke()
        features = (None if self._features_index is None
                    else self._interpreter.get_tensor(self._features_index).copy())
        return ModelOutput(normalised(self._interpreter.get_tensor(self._output_index)[0]),
                           features)

    def classify(self, image: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Prediction:
        """Preprocess encoded image bytes and classify them.

        The limits are preprocess_image's; ``max_decoded_bytes`` bounds the decode's peak
        memory (``decoded_bytes_estimate(image, self.input_size)`` says how much it will be).

        Raises :class:`~nitrolesion.errors.ImageError` for input that is not an acceptable image.
        """
        return self.prediction_from(self.predict_array(self.preprocess(
            image, max_bytes=max_bytes, max_pixels=max_pixels,
            max_decoded_bytes=max_decoded_bytes)))

    def preprocess(self, image: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> np.ndarray:
        """The first half of :meth:`classify`: ``preprocess_image`` at this model's input
        size. Touches no interpreter, so any thread may call it while another one runs
        :meth:`predict_array`. Raises :class:`~nitrolesion.errors.ImageError`."""
        return preprocess_image(image, self.input_size, max_bytes=max_bytes,
                                max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes)

    def prediction_from(self, output: ModelOutput) -> Prediction:
        """The prediction for one :meth:`predict_array` output: calibrated probabilities,
        the malignancy score and the refer flag (nitrolesion/model/triage.py), as the
        wire's :class:`~nitrolesion.wire.messages.Prediction`, built by the same strict
        decoder the receiving side runs, so the enclave never seals one it would refuse.

        Raises :class:`ModelError` for a model loaded without triage."""
        if self.triage is None or output.features is None:
            raise ModelError("no triage for this model: predictions need its triage file "
                             "and feature output")
        assessment = self.triage.assess(output.probabilities, output.features)
        probabilities = assessment.probabilities
        best = int(np.argmax(probabilities))
        return check_prediction({
            "code": self.labels[best].code,
            "name": self.labels[best].name,
            "confidence": float(probabilities[best]),
            "probabilities": {label.code: float(p) for label, p in zip(self.labels, probabilities)},
            "malignant": assessment.malignant,
            "refer": assessment.refer,
            "refer_reason": assessment.refer_reason,
        })
