"""Inference with the shipped TFLite model: load once, one interpreter per process.

``LesionModel`` reads the model file and labels once; ``LesionModel.new_classifier()`` gives
a :class:`Classifier` that owns one TFLite interpreter. An interpreter is not thread-safe:
one thread at a time may call :meth:`Classifier.predict_array` (the enclave's WorkerPool
gives it one thread of its own), and it is given several threads (``num_threads``) rather
than made several times: each interpreter holds ~29 MiB (its activation arena, where the
widest layer is four mirror views of 96x96x96 float32, and the float16 weights expanded to
float32), so every extra one costs that again (bench/worker_memory.py).
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
class Prediction:
    """The model's answer for one image."""

    code: str
    name: str
    confidence: float
    probabilities: dict[str, float]

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most probable codes with their probabilities, best first."""
        return sorted(self.probabilities.items(), key=lambda item: -item[1])[:k]


class LesionModel:
    """The model bytes and labels, loaded once per process."""

    def __init__(self, model_path: Path = DEFAULT_MODEL_PATH,
                 labels_path: Path = DEFAULT_LABELS_PATH) -> None:
        try:
            self.model_bytes = Path(model_path).read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model file {model_path}: {exc.strerror}") from exc
        self.model_path = Path(model_path)
        self.labels: list[Label] = load_labels(labels_path)
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
        try:
            self._interpreter = model._interpreter_class(
                model_content=model.model_bytes, num_threads=num_threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{model.model_path} is not a usable TFLite model: {exc}") from exc
        inp = self._interpreter.get_input_details()[0]
        out = self._interpreter.get_output_details()[0]
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

    def predict_array(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (7, summing to 1) for one preprocessed (S, S, 3) float32 array.

        Uses the interpreter: one thread at a time."""
        # set_tensor copies into the interpreter's own buffer; no float32 copy before it
        # when the array already is one (preprocess_image gives float32).
        self._interpreter.set_tensor(self._input_index,
                                     np.asarray(pixels, dtype=np.float32)[np.newaxis])
        self._interpreter.invoke()
        return normalised(self._interpreter.get_tensor(self._output_index)[0])

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

    def prediction_from(self, probabilities: np.ndarray) -> Prediction:
        best = int(np.argmax(probabilities))
        return Prediction(
            code=self.labels[best].code,
            name=self.labels[best].name,
            confidence=float(probabilities[best]),
            probabilities={label.code: float(p) for label, p in zip(self.labels, probabilities)},
        )
