"""Temperature scaling, ECE, Brier and reliability curves: agree with scikit-learn, fail clearly."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from virtual_biopsy.evaluation import calibration

SEEDS = range(8)


def _random_case(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, n), 0, 1)
    return y, p


def _overconfident_case(seed: int, n: int = 400, sharpen: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """True p from a logistic model; reported p = sigmoid(sharpen * logit(true p)), overconfident."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(0, 1.2, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    return y, 1 / (1 + np.exp(-sharpen * true_logit))


@pytest.mark.parametrize("seed", SEEDS)
def test_brier_score_equals_sklearn(seed: int) -> None:
    y, p = _random_case(seed)
    assert calibration.brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bins", [5, 10])
def test_reliability_curve_equals_sklearn_calibration_curve_on_filled_bins(seed: int, bins: int) -> None:
    y, p = _random_case(seed)
    p = np.round(p, 1)  # probabilities on bin edges must land in the same bin as scikit-learn's
    mean_p, observed, counts = calibration.reliability_curve(y, p, bins)
    sk_observed, sk_mean_p = calibration_curve(y, p, n_bins=bins, strategy="uniform")
    np.testing.assert_allclose(mean_p, sk_mean_p, atol=1e-12)
    np.testing.assert_allclose(observed, sk_observed, atol=1e-12)
    assert counts.sum() == y.size


def test_ece_is_the_count_weighted_gap_between_observed_fraction_and_mean_p() -> None:
    # Bin [0.2, 0.3): p = 0.2, 0.2, observed 1/2 -> gap 0.3; bin [0.9, 1]: p = 0.9, 1.0, observed 1 -> gap 0.05.
    y = np.array([0, 1, 1, 1])
    p = np.array([0.2, 0.2, 0.9, 1.0])
    assert calibration.expected_calibration_error(y, p, bins=10) == pytest.approx(0.5 * 0.3 + 0.5 * 0.05)


def test_ece_is_zero_for_probabilities_equal_to_observed_fractions() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p = np.array([0.25, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75])
    assert calibration.expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_fitted_temperature_undoes_overconfidence_and_lowers_ece(seed: int) -> None:
    y, p = _overconfident_case(seed)
    t = calibration.fit_temperature(p, y)
    assert 2.0 < t < 4.5  # the sharpening factor was 3
    calibrated = calibration.apply_temperature(p, t)
    assert calibration.expected_calibration_error(y, calibrated) < calibration.expected_calibration_error(y, p)
    assert calibration.log_loss(y, calibrated) < calibration.log_loss(y, p)


def test_fitted_temperature_minimises_validation_log_loss_on_a_grid() -> None:
    y, p = _random_case(4)
    t = calibration.fit_temperature(p, y)
    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 400))
    best_on_grid = min(calibration.log_loss(y, calibration.apply_temperature(p, g)) for g in grid)
    assert calibration.log_loss(y, calibration.apply_temperature(p, t)) <= best_on_grid + 1e-9


def test_temperature_keeps_the_ranking_and_the_half_threshold() -> None:
    y, p = _random_case(5)
    for t in (0.3, 1.0, 4.0):
        scaled = calibration.apply_temperature(p, t)
        assert (np.argsort(scaled, kind="stable") == np.argsort(p, kind="stable")).all()
        assert ((scaled >= 0.5) == (p >= 0.5)).all()
    np.testing.assert_allclose(calibration.apply_temperature(p, 1.0), np.clip(p, 1e-7, 1 - 1e-7), atol=1e-12)


def test_fit_temperature_is_deterministic() -> None:
    y, p = _random_case(6)
    assert calibration.fit_temperature(p, y) == calibration.fit_temperature(p.copy(), y.copy())


def test_calibrated_probability_applies_the_artefact_entry() -> None:
    p = np.array([0.1, 0.6, 0.95])
    entry = {"temperature": 2.0, "qhat": 0.7, "n_val": 60}
    np.testing.assert_allclose(calibration.calibrated_probability(p, entry), calibration.apply_temperature(p, 2.0))
    assert calibration.calibrated_probability(0.6, entry).shape == (1,)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: calibration.fit_temperature([0.2, 0.7], [0, 1, 1]), "y has 3 entries but p has 2"),
        (lambda: calibration.fit_temperature([0.2, 1.3], [0, 1]), r"must lie in \[0, 1\]"),
        (lambda: calibration.fit_temperature([0.2, 0.7, 0.9], [1, 1, 1]), "needs benign and malignant"),
        (lambda: calibration.fit_temperature([], []), "no lesions"),
        (lambda: calibration.brier_score([0, 2], [0.1, 0.2]), "labels must be 0"),
        (lambda: calibration.expected_calibration_error([0, 1], [0.1, 0.2], bins=0), "bins must be a positive"),
        (lambda: calibration.apply_temperature([0.5], 0.0), "temperature must be a finite number > 0"),
        (lambda: calibration.apply_temperature([0.5], float("nan")), "temperature must be a finite number > 0"),
        (lambda: calibration.calibrated_probability([0.5], {"qhat": 0.5}), "no 'temperature' key"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
