"""Export: the shipped form of the network (mirror views averaged in the graph), its
TFLite files (int8, dynamic-range, float16 weights), their validation scores and their
latency under the enclave's runtime.

Part of models/train.py (see its docstring for the recipe). TensorFlow and Keras are
imported inside the functions, so argument errors come before they load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nitrolesion.model.metrics import summarize
from train_data import N_CLASSES
from train_report import brief, log

MODEL_LATENCY_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "model_latency.py"

#: Mirror views the exported graph averages, by ``--tta`` name (``none`` is one view).
VIEW_COUNTS = {"flips": 4, "mirror": 2}

#: The TFLite file types exported as candidates, in the order they are written.
QUANTIZATIONS = ("int8", "dynamic_range", "float16")

#: Training images the int8 file's activation ranges are calibrated on, at most.
CALIBRATION_IMAGES = 1000


def with_flip_averaging(model, views: str = "flips", features: bool = False):
    """``model`` wrapped so it answers the mean of its probabilities over mirror images of
    the input: with ``views="flips"`` the image and its left-right, up-down and both-ways
    mirrors; with ``"mirror"`` the image and its left-right mirror (half the cost, so a
    larger input fits the latency budget). Each set is a group, so the answer does not
    change when the input is mirrored within it; training augments with the same flips,
    so every view is one the network has learned.

    With ``features`` the wrapper has a second output: the pooled backbone features
    (layer ``FEATURES_LAYER``) averaged over the same views, for out-of-distribution
    scores and calibration fitted outside training. Output 0 stays the probabilities."""
    import keras

    from train_network import FEATURES_LAYER

    n_views = VIEW_COUNTS[views]

    def make_views(images):
        width_flipped = keras.ops.flip(images, axis=2)
        if n_views == 2:
            return keras.ops.concatenate([images, width_flipped], axis=0)
        return keras.ops.concatenate(
            [images, width_flipped, keras.ops.flip(images, axis=1),
             keras.ops.flip(width_flipped, axis=1)], axis=0)

    def mean_of_views(values):
        return keras.ops.mean(
            keras.ops.reshape(values, (n_views, -1, keras.ops.shape(values)[-1])), axis=0)

    inputs = keras.Input(model.input_shape[1:], name="image")
    batch = keras.layers.Lambda(make_views, name="flip_views")(inputs)
    if not features:
        return keras.Model(inputs, keras.layers.Lambda(mean_of_views, name="mean_of_views")(
            model(batch)))
    both = keras.Model(model.input, [model.output, model.get_layer(FEATURES_LAYER).output])
    probabilities, pooled = both(batch)
    return keras.Model(inputs, [
        keras.layers.Lambda(mean_of_views, name="mean_of_views")(probabilities),
        keras.layers.Lambda(mean_of_views, name="mean_features")(pooled)])


def with_features(model):
    """The single-view ``model`` with its pooled features as a second output."""
    import keras

    from train_network import FEATURES_LAYER

    return keras.Model(model.input, [model.output, model.get_layer(FEATURES_LAYER).output])


def shipped_form(tta: str, features: bool = False) -> Callable[[object], object]:
    """The function that turns the trained network into the graph that ships: itself for
    ``tta="none"``, else wrapped by :func:`with_flip_averaging` with those views; with
    ``features``, with the pooled features as a second output (what is exported). Each
    call builds a new wrapper, as each export and validation pass does."""
    if tta == "none":
        return with_features if features else (lambda model: model)
    return lambda model: with_flip_averaging(model, tta, features)


def calibration_images(x_train: np.ndarray, seed: int) -> np.ndarray:
    """Up to :data:`CALIBRATION_IMAGES` training images, drawn without replacement."""
    rng = np.random.default_rng(seed)
    return x_train[rng.choice(len(x_train), min(CALIBRATION_IMAGES, len(x_train)),
                              replace=False)]


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader never sees a partial file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_tflite(model, quantization: str, calibration: np.ndarray | None, path: Path) -> int:
    """Write a quantized TFLite file. ``quantization`` is "int8" (full integer, calibrated
    on ``calibration``), "dynamic_range" (int8 weights, float activations) or "float16"
    (float16 weights). Input and output stay float32: the shared preprocessing produces
    [-1, 1] floats and the enclave reads probabilities. Returns the file's size."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":
        def representative():
            for i in range(len(calibration)):
                yield [calibration[i : i + 1]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    data = converter.convert()
    if len(model.outputs) > 1:
        data = order_outputs(data, [tuple(o.shape[1:]) for o in model.outputs])
    write_atomically(path, data)
    return len(data)


def order_outputs(data: bytes, shapes: list[tuple]) -> bytes:
    """The TFLite file ``data`` with its outputs listed in the order of ``shapes`` (the
    Keras model's outputs, batch dimension left out, all different). The converter orders
    a file's outputs by its own rule (TensorFlow 2.21 lists a Keras model's outputs last to
    first), and the enclave reads output 0, which must be the probabilities: so the order
    is set here and checked."""
    import tensorflow as tf
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    graph = model.subgraphs[0]
    by_shape = {tuple(int(d) for d in graph.tensors[i].shape[1:]): int(i) for i in graph.outputs}
    if sorted(by_shape) != sorted(tuple(s) for s in shapes) or len(by_shape) != len(shapes):
        raise RuntimeError(f"the file's outputs {sorted(by_shape)} are not the model's {shapes}")
    graph.outputs = [by_shape[tuple(s)] for s in shapes]
    ordered = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    interpreter = tf.lite.Interpreter(model_content=ordered)
    found = [tuple(int(d) for d in o["shape"][1:]) for o in interpreter.get_output_details()]
    if found != [tuple(s) for s in shapes]:
        raise RuntimeError(f"outputs ordered {found}, not {shapes}")
    return ordered


def tflite_predict(path: Path, x: np.ndarray) -> np.ndarray:
    """The TFLite file's probabilities for each image of ``x``, one image per call."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=2)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    probs = np.empty((len(x), N_CLASSES), dtype=np.float32)
    for i in range(len(x)):
        interpreter.set_tensor(inp, x[i : i + 1])
        interpreter.invoke()
        probs[i] = interpreter.get_tensor(out)[0]
    return probs


def runtime_latency_ms(path: Path) -> float:
    """Mean ms per 600x450 photo for ``path`` under bench/model_latency.py on one core.

    Timed in a child process with the inference runtime (ai-edge-litert), not with
    TensorFlow's own interpreter: their kernels differ (dynamic-range files ran 21 ms per
    image under TensorFlow 2.21 and 32 ms under ai-edge-litert 2.3), and the enclave runs
    the latter.
    """
    result = subprocess.run(
        [sys.executable, str(MODEL_LATENCY_SCRIPT), "--json", "--model-only", "--images", "40",
         "--model", str(path)], check=True, capture_output=True, text=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["full_mean"])


@dataclass(frozen=True)
class Candidate:
    """One exported file: where it is, its size, its validation metrics, its latency."""

    path: Path
    size_bytes: int
    val: dict  # summarize() of its validation probabilities
    ms_per_image: float


#: Timing rounds per file: the reference and the candidates are timed in turn, this many
#: times, and each keeps its fastest round (other jobs on a shared machine only add time).
LATENCY_ROUNDS = 3


def paired_latency_ms(paths: list[Path], reference: Path,
                      rounds: int = LATENCY_ROUNDS) -> tuple[list[float], float]:
    """ms per photo of each of ``paths`` and of the ``reference`` file, timed in turn
    (reference, each path, reference, ...) for ``rounds`` rounds, the fastest round of each
    kept: a ratio between figures taken minutes apart on a shared machine measures the
    load, not the models (one run here timed the same file at 19 and 53 ms)."""
    times: dict[Path, list[float]] = {path: [] for path in [reference, *paths]}
    for _ in range(rounds):
        for path in times:
            times[path].append(runtime_latency_ms(path))
    return [min(times[path]) for path in paths], min(times[reference])


def export_candidates(model, form: Callable[[object], object], calibration: np.ndarray,
                      build_dir: Path, x_val: np.ndarray, y_val: np.ndarray,
                      codes: list[str], reference: Path,
                      rounds: int = LATENCY_ROUNDS) -> tuple[dict[str, Candidate], float]:
    """Export ``form(model)`` once per :data:`QUANTIZATIONS` entry into ``build_dir``, and
    score each file on validation and time it against the ``reference`` file (the shipped
    model) in the same run (:func:`paired_latency_ms`), so the budget, a ratio to it,
    compares figures taken under the same load. Returns the candidates and the
    reference's ms per photo."""
    exported = {}
    for name in QUANTIZATIONS:
        path = build_dir / f"lesion_classifier.{name}.tflite"
        size_bytes = export_tflite(form(model), name, calibration, path)
        metrics = summarize(y_val, tflite_predict(path, x_val), codes)
        exported[name] = (path, size_bytes, metrics)
    latencies, reference_ms = paired_latency_ms([p for p, _, _ in exported.values()], reference,
                                                rounds)
    candidates = {}
    for (name, (path, size_bytes, metrics)), latency in zip(exported.items(), latencies):
        candidates[name] = Candidate(path, size_bytes, metrics, latency)
        log(f"tflite {name}: {size_bytes} bytes, {latency:.1f} ms/image "
            f"({latency / reference_ms:.2f}x {reference.name}), val {brief(metrics)}")
    log(f"reference {reference.name}: {reference_ms:.1f} ms/image (fastest of "
        f"{rounds} rounds, in turn with the candidates)")
    return candidates, reference_ms
