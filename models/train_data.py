"""Training data: the classes, the committed split's labels and images, the class weights
and the augmented tf.data pipeline that fine-tuning reads.

Part of models/train.py (see its docstring for the recipe). TensorFlow is imported only
inside :func:`augment_dataset`, so argument errors come before it loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nitrolesion.model.dataset import image_path, load_split, read_metadata
from nitrolesion.model.labels import CODES, load_labels
from nitrolesion.model.preprocess import preprocess_image

#: How many classes the network answers: one per HAM10000 diagnosis. Every count of
#: classes in training follows from this one (labels.CODES).
N_CLASSES = len(CODES)

#: The splits training reads. The test split is never read here.
TRAINING_SPLITS = ("train", "val")

METADATA_FILE = "HAM10000_metadata.csv"
IMAGES_FOLDER = "images"


def class_codes() -> list[str]:
    """The diagnosis codes in output order, read from models/labels.json (which
    ``load_labels`` checks against :data:`CODES`)."""
    return [label.code for label in load_labels()]


def split_labels(data_dir: Path, codes: list[str],
                 limit: int = 0) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """Image ids and class indices of the committed train and validation splits.

    ``limit`` > 0 keeps only the first ``limit`` ids of each split (smoke runs).
    """
    records = {r.image_id: r for r in read_metadata(data_dir / METADATA_FILE)}
    ids = {name: load_split(name) for name in TRAINING_SPLITS}
    if limit:
        ids = {name: v[:limit] for name, v in ids.items()}
    labels = {name: np.array([codes.index(records[i].dx) for i in ids[name]]) for name in ids}
    return ids, labels


def load_images(ids: list[str], images_dir: Path, size: int) -> np.ndarray:
    """The images ``ids`` as one float32 (N, size, size, 3) array, through the same
    ``preprocess_image`` the enclave runs."""
    out = np.empty((len(ids), size, size, 3), dtype=np.float32)
    for i, image_id in enumerate(ids):
        out[i] = preprocess_image(image_path(images_dir, image_id).read_bytes(), size)
    return out


def class_counts(labels: np.ndarray) -> np.ndarray:
    """Images per class, zeros included, in output order."""
    return np.bincount(labels, minlength=N_CLASSES)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Square-root inverse-frequency class weights (nv about 0.46, df about 3.4)."""
    counts = class_counts(labels)
    weights = np.sqrt(counts.sum() / (float(N_CLASSES) * counts))
    return {c: float(weights[c]) for c in range(N_CLASSES)}


def augment_dataset(x: np.ndarray, y: np.ndarray, batch: int, seed: int):
    """A reshuffling, augmenting tf.data pipeline over ``(x, y)``: flips, 90-degree
    rotations, zoom (a random 80-100 % crop resized back) and colour jitter."""
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

    # The pipeline holds its own copy of the images: as the 0..255 bytes they came from
    # (exact: the shared preprocessing maps bytes b to (b - 127.5) / 127.5), a quarter of
    # the float32 array's size (0.9 instead of 3.6 GB for the training split at 224px).
    pixels = np.rint(x * 127.5 + 127.5).astype(np.uint8)

    def to_unit_range(image, label):
        return (tf.cast(image, tf.float32) - 127.5) / 127.5, label

    data = tf.data.Dataset.from_tensor_slices((pixels, y)).shuffle(
        len(x), seed=seed, reshuffle_each_iteration=True).map(to_unit_range)
    return data.map(augment, num_parallel_calls=2).batch(batch).prefetch(2)
