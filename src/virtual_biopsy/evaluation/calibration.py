"""Calibration of probabilities of malignancy: temperature scaling, ECE, Brier, reliability.

Pure numpy/scipy (layer 1: no MLflow, no files). Labels ``y`` are 1 malignant, 0 benign; ``p``
is the probability of malignancy.

Why temperature scaling (Guo et al. 2017) and not Platt or isotonic: a fold holds about 12
validation lesions, the 5 folds pooled about 60. Temperature scaling has one parameter ``T``,

    p_T = sigmoid(logit(p) / T),

which keeps the ranking (AUC, and at T > 0 also the 0.5 threshold: logit 0 stays 0) and only
sharpens (T < 1) or softens (T > 1) the probabilities. Platt scaling adds an intercept (two
parameters) that on ~60 lesions moves the decision threshold by noise; isotonic regression is a
step function with up to one free level per distinct validation probability and overfits badly
at this size. ``T`` is fitted by minimising the validation log-loss with a bounded 1-D search
on log T (deterministic: Brent's method within [1/100, 100]).

Serving artefact (``outputs/calibration/<arch>.json``, written by the evaluate stage)::

    {"method": "temperature",
     "fitted_on": "validation predictions of every fold's fused pipeline, pooled",
     "conformal_level": 0.9,
     "settings": {"F": {"temperature": T, "qhat": q, "n_val": n}, "C": {...}, "Ĉ": {...},
                  "F+C": {...}, "F+Ĉ": {...}}}

``qhat`` is the split-conformal threshold computed on the *calibrated* pooled validation
probabilities of that setting (:mod:`virtual_biopsy.evaluation.conformal`). Serving calls
:func:`calibrated_probability` with one ``settings`` entry, then
:func:`virtual_biopsy.evaluation.conformal.conformal_set` on the result.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy.optimize import minimize_scalar

from virtual_biopsy.evaluation.metrics import _binary_labels, _probabilities

# Probabilities are clipped this far from 0 and 1 before the logit: a network's p of exactly 0
# or 1 would otherwise give an infinite logit that no temperature can move.
EPSILON = 1e-7
LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))
CALIBRATION_METHOD = "temperature"
FITTED_ON = "validation predictions of every fold's fused pipeline, pooled"


def _labels_and_probabilities(y: object, p: object) -> tuple[np.ndarray, np.ndarray]:
    labels = _binary_labels(y, "y")
    probabilities = _probabilities(p, "p")
    if labels.shape != probabilities.shape:
        raise ValueError(f"y has {labels.size} entries but p has {probabilities.size}")
    return labels, probabilities


def _logit(p: np.ndarray) -> np.ndarray:
    clipped = np.clip(p, EPSILON, 1 - EPSILON)
    return np.log(clipped) - np.log1p(-clipped)


def _check_temperature(t: float) -> float:
    t = float(t)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {t}")
    return t


def apply_temperature(p: object, t: float) -> np.ndarray:
    """p_T = sigmoid(logit(p) / T), with p clipped to [EPSILON, 1 - EPSILON] first."""
    probabilities = _probabilities(p, "p")
    t = _check_temperature(t)
    return 1.0 / (1.0 + np.exp(-_logit(probabilities) / t))


def log_loss(y: object, p: object) -> float:
    """Mean negative log-likelihood -1/n sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)], p clipped."""
    labels, probabilities = _labels_and_probabilities(y, p)
    clipped = np.clip(probabilities, EPSILON, 1 - EPSILON)
    return float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log1p(-clipped)))


def fit_temperature(p: object, y: object) -> float:
    """The T > 0 minimising the log-loss of sigmoid(logit(p) / T) on these (validation) lesions.

    Needs both classes: on one class the log-loss falls monotonically towards T -> 0 (or the
    bound) and the fitted T would only say which class was there.
    """
    labels, probabilities = _labels_and_probabilities(y, p)
    if labels.size == 0:
        raise ValueError("fit_temperature: no lesions to fit on")
    if np.unique(labels).size < 2:
        raise ValueError(f"fit_temperature: needs benign and malignant lesions, got only label {int(labels[0])}")
    logits = _logit(probabilities)

    def loss(log_t: float) -> float:
        z = logits / math.exp(log_t)
        # log(1 + e^-z) for y=1 and log(1 + e^z) for y=0, written stably.
        return float(np.mean(np.logaddexp(0.0, np.where(labels == 1, -z, z))))

    result = minimize_scalar(loss, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def brier_score(y: object, p: object) -> float:
    """Brier score 1/n sum_i (p_i - y_i)^2 (equals sklearn.metrics.brier_score_loss)."""
    labels, probabilities = _labels_and_probabilities(y, p)
    if labels.size == 0:
        return math.nan
    return float(np.mean((probabilities - labels) ** 2))


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    # Equal-width bins [0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]: right-closed like scikit-learn's
    # calibration_curve, so that p on an edge (0.2 of a rounded score) lands in the same bin.
    interior_edges = np.linspace(0.0, 1.0, int(bins) + 1)[1:-1]
    return np.searchsorted(interior_edges, p)


def reliability_curve(y: object, p: object, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-width bin b: (mean p in b, observed malignant fraction in b, count).

    Agrees with ``sklearn.calibration.calibration_curve(y, p, n_bins=bins, strategy="uniform")``
    (which returns (fraction, mean p)) on the non-empty bins.
    """
    labels, probabilities = _labels_and_probabilities(y, p)
    index = _bin_index(probabilities, bins)
    counts = np.bincount(index, minlength=bins)
    sum_p = np.bincount(index, weights=probabilities, minlength=bins)
    sum_y = np.bincount(index, weights=labels, minlength=bins)
    filled = counts > 0
    return sum_p[filled] / counts[filled], sum_y[filled] / counts[filled], counts[filled]


def expected_calibration_error(y: object, p: object, bins: int = 10) -> float:
    """ECE = sum_b (n_b / n) |mean_{i in b} y_i - mean_{i in b} p_i| over B equal-width bins of p.

    Bins as in :func:`reliability_curve`; n_b lesions in bin b, n in all.
    """
    labels, _ = _labels_and_probabilities(y, p)
    if labels.size == 0:
        return math.nan
    mean_p, observed, counts = reliability_curve(y, p, bins)
    return float(np.sum(counts / labels.size * np.abs(observed - mean_p)))


def calibrated_probability(p: object, setting_entry: Mapping[str, object]) -> np.ndarray:
    """Apply one ``settings`` entry of the calibration artefact (its "temperature") to p."""
    if "temperature" not in setting_entry:
        raise ValueError(f"calibration entry has no 'temperature' key: keys {sorted(setting_entry)}")
    return apply_temperature(np.atleast_1d(np.asarray(p, dtype=np.float64)), float(setting_entry["temperature"]))
