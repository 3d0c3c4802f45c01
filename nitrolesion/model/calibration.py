"""Fitting the triage parameters (models/fit_triage.py): temperature, refer threshold,
the "not a lesion" detector. Plain numpy; nothing here runs in the enclave.
"""

from __future__ import annotations

import numpy as np

from nitrolesion.model.triage import temperature_scaled


def negative_log_likelihood(y_true, probabilities, temperature: float) -> float:
    """Mean negative log-likelihood of the true classes after temperature scaling."""
    scaled = temperature_scaled(probabilities, temperature)
    picked = scaled[np.arange(len(scaled)), np.asarray(y_true, dtype=np.int64)]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def fit_temperature(y_true, probabilities, low: float = 0.05, high: float = 20.0,
                    tolerance: float = 1e-5) -> float:
    """The temperature minimising the negative log-likelihood on (y_true, probabilities).

    The NLL of temperature scaling is convex in 1/T (Guo et al. 2017), hence unimodal in
    log T: a golden-section search over [low, high] in log T finds its minimum."""
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    loss = lambda log_t: negative_log_likelihood(y_true, probabilities, float(np.exp(log_t)))  # noqa: E731
    fc, fd = loss(c), loss(d)
    while b - a > tolerance:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2.0))


def threshold_for_sensitivity(scores, is_positive, sensitivity: float) -> float:
    """The largest threshold t such that ``scores >= t`` catches at least ``sensitivity``
    of the positives: the score of the positive at that rank (ties keep it). Raises
    ValueError without positives."""
    positives = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(is_positive, dtype=bool)])
    if not len(positives):
        raise ValueError("no positives to choose a threshold on")
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError("sensitivity must be in (0, 1]")
    # Keep ceil(sensitivity * n) positives at or above t: t is the score of the
    # (n - keep)-th smallest positive.
    keep = int(np.ceil(sensitivity * len(positives) - 1e-9))
    return float(positives[len(positives) - keep])


def sensitivity_specificity(scores, is_positive, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of ``scores >= threshold``; NaN where undefined."""
    flagged = np.asarray(scores, dtype=np.float64) >= threshold
    is_positive = np.asarray(is_positive, dtype=bool)
    sensitivity = flagged[is_positive].mean() if is_positive.any() else float("nan")
    specificity = (~flagged[~is_positive]).mean() if (~is_positive).any() else float("nan")
    return float(sensitivity), float(specificity)


def ledoit_wolf_shrinkage(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """The Ledoit-Wolf (2004) shrunk covariance of centred rows (N, D) towards a scaled
    identity, and the shrinkage used. With D comparable to N the sample covariance is
    ill-conditioned; shrinking makes its inverse (the Mahalanobis metric) stable."""
    x = np.asarray(centred, dtype=np.float64)
    n, d = x.shape
    sample = x.T @ x / n
    mu = np.trace(sample) / d
    delta = np.sum((sample - mu * np.eye(d)) ** 2) / d
    # beta: how far single observations' outer products stray from the sample covariance.
    squares = (x ** 2)
    beta = (np.sum(squares.T @ squares) / n - np.sum(sample ** 2)) / (d * n)
    shrinkage = float(min(max(beta, 0.0), delta) / delta) if delta > 0 else 1.0
    return (1.0 - shrinkage) * sample + shrinkage * mu * np.eye(d), shrinkage


def fit_class_gaussians(features, y_true, n_classes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Class means (n_classes, D) and the precision (inverse of the Ledoit-Wolf shrunk
    covariance shared by all classes), and the shrinkage, from labelled features (N, D)."""
    features = np.asarray(features, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    means = np.stack([features[y_true == c].mean(axis=0) for c in range(n_classes)])
    covariance, shrinkage = ledoit_wolf_shrinkage(features - means[y_true])
    precision = np.linalg.inv(covariance)
    return means, (precision + precision.T) / 2.0, shrinkage
