"""Split conformal sets: same threshold and sets as MAPIE's LAC, never empty, coverage >= level."""
from __future__ import annotations

import math

import numpy as np
import pytest
from mapie.classification import SplitConformalClassifier
from sklearn.base import BaseEstimator, ClassifierMixin

from virtual_biopsy.core.config import SynthConfig
from virtual_biopsy.data.synthetic import draw_cohort
from virtual_biopsy.evaluation import conformal


class _FixedProbabilities(ClassifierMixin, BaseEstimator):
    """A prefit classifier whose one feature is already p(malignant), so MAPIE sees our p."""

    def fit(self, X, y):
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X):
        p = np.asarray(X, dtype=float)[:, 0]
        return np.c_[1 - p, p]

    def predict(self, X):
        return (np.asarray(X, dtype=float)[:, 0] >= 0.5).astype(int)


def _random_case(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.3, n), 0, 1)


def _mapie(p_val: np.ndarray, y_val: np.ndarray, level: float) -> SplitConformalClassifier:
    estimator = _FixedProbabilities().fit(p_val[:, None], y_val)
    return SplitConformalClassifier(
        estimator, confidence_level=level, conformity_score="lac", prefit=True,
    ).conformalize(p_val[:, None], y_val)


def _as_tuple(row: np.ndarray) -> tuple[str, ...]:
    return tuple(name for name, inside in zip(("benign", "malignant"), row) if inside)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n", "level"), [(30, 0.8), (57, 0.9), (60, 0.9), (120, 0.95)])
def test_threshold_and_sets_equal_mapie_lac_except_that_empty_sets_get_the_likelier_class(
    seed: int, n: int, level: float,
) -> None:
    y_val, p_val = _random_case(seed, n)
    p_test = np.random.default_rng(seed + 100).uniform(0, 1, 200)
    qhat = conformal.conformal_quantile(p_val, y_val, level)
    mapie = _mapie(p_val, y_val, level)
    _, mapie_sets = mapie.predict_set(p_test[:, None])
    ours = conformal.prediction_sets(p_test, qhat)
    for p, row, mine in zip(p_test, mapie_sets[:, :, 0], ours):
        expected = _as_tuple(row) or (("malignant",) if p >= 0.5 else ("benign",))
        assert mine == expected, (p, qhat)


def test_threshold_is_the_ceil_n_plus_one_level_th_smallest_score() -> None:
    # Scores 1 - p(true class): 0.1, 0.2, ..., 0.9 for nine malignant lesions.
    p = 1 - np.arange(1, 10) / 10
    y = np.ones(9, dtype=int)
    assert conformal.conformal_quantile(p, y, 0.8) == pytest.approx(0.8)  # ceil(10 * 0.8) = 8th
    assert conformal.conformal_quantile(p, y, 0.75) == pytest.approx(0.8)  # ceil(7.5) = 8th
    assert conformal.conformal_quantile(p, y, 0.9) == pytest.approx(0.9)  # ceil(9.0) = 9th, not 10th
    assert conformal.conformal_quantile(p, y, 0.95) == 1.0  # rank 10 > n: every set holds both classes
    assert conformal.prediction_sets([0.01, 0.99], 1.0) == [("benign", "malignant")] * 2


def test_sets_are_never_empty_and_take_the_more_probable_class() -> None:
    # qhat 0.3: a class is in the set when its p >= 0.7, so p = 0.4 and 0.6 have empty LAC sets.
    assert conformal.prediction_sets([0.4, 0.6, 0.5, 0.8, 0.1], 0.3) == [
        ("benign",), ("malignant",), ("malignant",), ("malignant",), ("benign",)]
    assert conformal.prediction_sets([0.4, 0.5, 0.6], 0.7) == [("benign", "malignant")] * 3


def _generated_lesions(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lesions of the project's synthetic cohort, p from their DES uptake by a fixed logistic score."""
    cohort = draw_cohort(SynthConfig(patients=300), seed=seed)
    masses = [record.breast.mass for record in cohort if record.breast.mass is not None]
    y = np.array([mass.label == "malignant" for mass in masses], dtype=int)
    uptake = np.array([mass.uptake for mass in masses])
    return y, 1 / (1 + np.exp(-(uptake - 0.42) / 0.08))


@pytest.mark.parametrize("level", [0.8, 0.9])
def test_coverage_on_generated_lesions_meets_the_level_over_random_splits(level: float) -> None:
    y, p = _generated_lesions(seed=11)
    rng = np.random.default_rng(0)
    n_val = 60  # the size of the project's pooled validation lesions
    coverages, lac_coverages = [], []
    for _ in range(300):
        order = rng.permutation(y.size)
        val, test = order[:n_val], order[n_val:]
        qhat = conformal.conformal_quantile(p[val], y[val], level)
        coverages.append(conformal.coverage(conformal.prediction_sets(p[test], qhat), y[test]))
        lac_coverages.append(np.mean(conformal.conformity_scores(p[test], y[test]) <= qhat))
    # Plain LAC sets: level <= E[coverage] <= level + 1/(n + 1) (no ties); 300 splits put the
    # mean within ~0.005 of its expectation.
    assert level - 0.01 <= np.mean(lac_coverages) <= level + 1 / (n_val + 1) + 0.01
    # Filling empty sets with the likelier class only adds coverage (conservative).
    assert np.all(np.array(coverages) >= np.array(lac_coverages))


def test_coverage_and_set_size_shares_count_sets() -> None:
    sets = [("benign",), ("malignant",), ("benign", "malignant"), ("malignant",)]
    assert conformal.coverage(sets, [0, 0, 1, 1]) == 0.75
    assert conformal.set_size_shares(sets) == {"benign": 0.25, "malignant": 0.5, "both": 0.25}
    assert math.isnan(conformal.coverage([], []))


def test_conformal_set_reads_qhat_from_the_artefact_entry() -> None:
    entry = {"temperature": 1.3, "qhat": 0.6, "n_val": 60}
    assert conformal.conformal_set(0.9, entry) == ("malignant",)
    assert conformal.conformal_set(0.5, entry) == ("benign", "malignant")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: conformal.conformal_quantile([0.2, 0.7], [0, 1, 1], 0.9), "y has 3 entries but p has 2"),
        (lambda: conformal.conformal_quantile([0.2, 0.7], [0, 1], 1.0), "strictly between 0 and 1"),
        (lambda: conformal.conformal_quantile([], [], 0.9), "no validation lesions"),
        (lambda: conformal.conformal_quantile([0.2, -0.1], [0, 1], 0.9), r"must lie in \[0, 1\]"),
        (lambda: conformal.prediction_sets([0.5], 1.5), r"qhat must lie in \[0, 1\]"),
        (lambda: conformal.coverage([("benign",)], [0, 1]), "1 prediction sets but 2 labels"),
        (lambda: conformal.conformal_set(0.5, {"temperature": 1.0}), "no 'qhat' key"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
