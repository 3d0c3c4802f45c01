"""Triage: calibrated probabilities, a malignancy score, a refer flag, a "not a lesion" flag.

The parameters are fitted to one model file by models/fit_triage.py and shipped beside it
(``<model>.triage.npz``, measured into PCR0 with the model). :func:`load_triage` refuses a
file fitted to another model (its SHA-256 differs) or one that is malformed, so the enclave
never applies one model's threshold to another model's scores.

What a result gains (:meth:`Triage.assess`):

- the probabilities, temperature-scaled: ``softmax(log p / T)``. The model outputs the mean
  of its views' softmax probabilities, so this is temperature scaling of the log of that
  mean (exact temperature scaling of the logits for a one-view model);
- ``malignant``: the sum of the calibrated probabilities of the malignant classes
  (mel + bcc + akiec);
- ``not_a_lesion``: the penultimate features (averaged over views) are farther from every
  class's mean than the fitted threshold, in the Mahalanobis distance of a shared
  (shrunk) covariance (Lee et al. 2018);
- ``refer``: true when either holds; ``refer_reason`` says which ("not_a_lesion" first: a
  score computed on a photo that is not a lesion means nothing).
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from nitrolesion.errors import ModelError
from nitrolesion.model.labels import CODES

#: The file format written by models/fit_triage.py; another value is refused.
TRIAGE_FORMAT = "nitrolesion-triage/2"
#: The one out-of-distribution method this runtime implements.
OOD_METHOD = "mahalanobis-tied-min"
#: What ``refer_reason`` may be (besides None).
REFER_MALIGNANT = "malignant"
REFER_NOT_A_LESION = "not_a_lesion"
REFER_REASONS = (REFER_MALIGNANT, REFER_NOT_A_LESION)
#: The diagnoses summed into ``malignant`` (issue 21: mel + bcc + akiec).
MALIGNANT_CODES = ("akiec", "bcc", "mel")
#: Upper bound on the feature width we accept (a 16 MB model cannot need more), so a
#: hostile or broken file cannot make us allocate a huge precision matrix.
MAX_FEATURES = 4096


def triage_path_for(model_path: Path) -> Path:
    """Where a model's triage file lives: beside it, ``<stem>.triage.npz``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".triage.npz")


@dataclass(frozen=True, eq=False)
class Assessment:
    """Triage of one image."""

    probabilities: np.ndarray  # calibrated, in label order, summing to 1
    malignant: float
    ood_score: float
    refer: bool
    refer_reason: str | None


@dataclass(frozen=True, eq=False)
class Triage:
    """Parameters fitted to one model (see the module docstring)."""

    model_sha256: str
    temperature: float
    refer_threshold: float
    malignant_classes: tuple[str, ...]
    ood_method: str
    ood_threshold: float
    class_means: np.ndarray   # (classes, D) float64
    precision: np.ndarray     # (D, D) symmetric; float32 as shipped (half the memory and time)

    @property
    def feature_dim(self) -> int:
        return int(self.class_means.shape[1])

    def calibrate(self, probabilities: np.ndarray) -> np.ndarray:
        """``softmax(log p / T)`` row-wise; zeros stay zero (log 0 is -inf)."""
        return temperature_scaled(probabilities, self.temperature)

    def malignant_score(self, calibrated: np.ndarray) -> np.ndarray:
        """Sum of the malignant classes' calibrated probabilities (any leading shape)."""
        columns = [CODES.index(code) for code in self.malignant_classes]
        return np.clip(np.asarray(calibrated)[..., columns].sum(axis=-1), 0.0, 1.0)

    @cached_property
    def _mean_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """(P mu_c for each class as columns (D, C), mu_c' P mu_c (C,)): the parts of the
        distance that do not depend on the image, computed once."""
        # In P's own dtype (P is symmetric: mu P = (P mu)'), without a float64 copy of P.
        projected = (self.class_means.astype(self.precision.dtype) @ self.precision).T
        projected = projected.astype(np.float64)
        return projected, np.einsum("cd,dc->c", self.class_means, projected)

    def ood_scores(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, one per row of
        ``features`` (N, D)."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if features.shape[1] != self.feature_dim:
            raise ModelError(f"features have {features.shape[1]} columns; the triage file "
                             f"was fitted on {self.feature_dim}")
        # (f - mu)' P (f - mu) = f'Pf - 2 f'P mu + mu'P mu: one product with P per image
        # instead of one per class (7x less work), in P's precision (float32 as shipped:
        # the rounding, ~1e-6 of a distance, is far below the threshold's resolution).
        # einsum without optimize runs numpy's own single-threaded loop, not BLAS: a
        # multi-threaded BLAS spins its threads on a busy 2-CPU enclave (measured: 4.6 ms
        # of CPU per image against 0.4 ms), taking the cores the interpreter runs on.
        projected, constant = self._mean_terms
        weighted = np.einsum("nd,de->ne", features.astype(self.precision.dtype), self.precision,
                             optimize=False).astype(np.float64)
        quadratic = np.einsum("nd,nd->n", weighted, features)
        distances = (quadratic[:, np.newaxis] - 2.0 * np.einsum("nd,dc->nc", features, projected,
                                                                 optimize=False) + constant)
        return np.maximum(distances, 0.0).min(axis=1)

    def assess(self, probabilities: np.ndarray, features: np.ndarray) -> Assessment:
        """Triage one image from the model's probabilities (7) and features ([V, D] or [D];
        averaged over views)."""
        calibrated = self.calibrate(np.asarray(probabilities, dtype=np.float64)[np.newaxis])[0]
        malignant = float(self.malignant_score(calibrated))
        view_mean = np.asarray(features, dtype=np.float64).reshape(-1, self.feature_dim).mean(axis=0)
        ood = float(self.ood_scores(view_mean[np.newaxis])[0])
        if not ood <= self.ood_threshold:  # NaN (a broken feature vector) is not a lesion either
            reason = REFER_NOT_A_LESION
        elif malignant >= self.refer_threshold:
            reason = REFER_MALIGNANT
        else:
            reason = None
        return Assessment(calibrated, malignant, ood, reason is not None, reason)

    def save(self, path: Path) -> None:
        """Write the triage file (``np.savez``; read back with :func:`load_triage`).

        The precision matrix is symmetric, so only its upper triangle is stored (half the
        file: the model, not its triage, is the repository's one large file)."""
        with open(path, "wb") as out:
            np.savez(out, format=np.array(TRIAGE_FORMAT),
                     model_sha256=np.array(self.model_sha256),
                     temperature=np.float64(self.temperature),
                     refer_threshold=np.float64(self.refer_threshold),
                     malignant_classes=np.array(self.malignant_classes),
                     ood_method=np.array(self.ood_method),
                     ood_threshold=np.float64(self.ood_threshold),
                     class_means=self.class_means.astype(np.float64),
                     # float32 as the runtime uses it; rebuilt exactly by load_triage
                     precision_upper=self.precision.astype(np.float32)[
                         np.triu_indices(len(self.precision))])


def temperature_scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise ``softmax(log p / T)`` of probability rows (N, K)."""
    p = np.asarray(probabilities, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logits = np.log(p) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def _scalar(entries, name: str, low: float, high: float) -> float:
    value = float(entries[name])
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"{name} = {value} is outside [{low}, {high}]")
    return value


def load_triage(path: Path, model_bytes: bytes) -> Triage:
    """Read a triage file and check it belongs to ``model_bytes``.

    Raises :class:`ModelError` saying what is wrong: missing or unreadable file, another
    format or method, a value out of range, or a file fitted to a different model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no triage file {path} beside the model: fit one with "
                         "models/fit_triage.py (it holds the calibration and refer thresholds)")
    try:
        with np.load(path, allow_pickle=False) as entries:
            if str(entries["format"]) != TRIAGE_FORMAT:
                raise ValueError(f"format {str(entries['format'])[:40]!r}, expected {TRIAGE_FORMAT!r}")
            method = str(entries["ood_method"])
            if method != OOD_METHOD:
                raise ValueError(f"OOD method {method[:40]!r} is not {OOD_METHOD!r}")
            malignant = tuple(str(code) for code in entries["malignant_classes"])
            if not malignant or len(set(malignant)) != len(malignant) or not set(malignant) <= set(CODES):
                raise ValueError(f"malignant classes {malignant} are not distinct codes of {CODES}")
            means = np.asarray(entries["class_means"], dtype=np.float64)
            upper = np.asarray(entries["precision_upper"])
            if upper.dtype not in (np.float32, np.float64):
                raise ValueError(f"precision has dtype {upper.dtype}")
            if means.ndim != 2 or not 0 < means.shape[1] <= MAX_FEATURES or not means.shape[0]:
                raise ValueError(f"class_means has shape {means.shape}")
            width = means.shape[1]
            if upper.shape != (width * (width + 1) // 2,):
                raise ValueError(f"precision has shape {upper.shape}, not the upper triangle of "
                                 f"a {width}x{width} matrix for {width} features")
            precision = np.zeros((width, width), dtype=upper.dtype)
            precision[np.triu_indices(width)] = upper
            precision = np.triu(precision) + np.triu(precision, 1).T
            if not (np.isfinite(means).all() and np.isfinite(precision).all()):
                raise ValueError("class_means or precision is not finite")
            triage = Triage(
                model_sha256=str(entries["model_sha256"]),
                temperature=_scalar(entries, "temperature", 0.05, 20.0),
                refer_threshold=_scalar(entries, "refer_threshold", 0.0, 1.0),
                malignant_classes=malignant,
                ood_method=method,
                ood_threshold=_scalar(entries, "ood_threshold", 0.0, float("inf")),
                class_means=means,
                precision=precision)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise ModelError(f"triage file {path} is not usable: {exc}") from exc
    actual = hashlib.sha256(model_bytes).hexdigest()
    if triage.model_sha256 != actual:
        raise ModelError(f"triage file {path} was fitted to model sha256 "
                         f"{triage.model_sha256[:16]}..., not this model ({actual[:16]}...): "
                         "refit it with models/fit_triage.py")
    return triage
