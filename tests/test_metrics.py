"""The project's metrics agree with scikit-learn / scikit-image and handle degenerate groups."""
from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import (
    mean_squared_error,
    peak_signal_noise_ratio,
    structural_similarity,
)
from sklearn.metrics import confusion_matrix, matthews_corrcoef, roc_auc_score

from virtual_biopsy.evaluation import metrics

SEEDS = range(12)


def _random_case(seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    # Rounded probabilities create ties, which AUC must count as one half.
    p = np.round(np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.3, n), 0, 1), 1)
    return y, p


def _sklearn_gmean(y: np.ndarray, y_pred: np.ndarray) -> float:
    tn, fp, fn, tp = confusion_matrix(y, y_pred, labels=[0, 1]).ravel()
    return math.sqrt(tp / (tp + fn) * tn / (tn + fp))


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_equals_sklearn_with_ties(seed: int) -> None:
    y, p = _random_case(seed)
    assert metrics.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_mcc_and_gmean_equal_sklearn(seed: int) -> None:
    y, p = _random_case(seed)
    y_pred = metrics.classify(p)
    assert metrics.mcc(y, y_pred) == pytest.approx(matthews_corrcoef(y, y_pred), abs=1e-9)
    assert metrics.gmean(y, y_pred) == pytest.approx(_sklearn_gmean(y, y_pred), abs=1e-9)


@pytest.mark.parametrize("constant", [0, 1])
def test_mcc_is_zero_like_sklearn_when_predictions_hold_one_class(constant: int) -> None:
    y, _ = _random_case(3)
    y_pred = np.full_like(y, constant)
    assert metrics.mcc(y, y_pred) == matthews_corrcoef(y, y_pred) == 0.0
    assert metrics.gmean(y, y_pred) == pytest.approx(_sklearn_gmean(y, y_pred), abs=1e-9) == 0.0


@pytest.mark.parametrize(("label", "reason"), [(1, "only malignant lesions"), (0, "only benign lesions")])
def test_single_class_truth_makes_auc_and_gmean_undefined_with_reason(label: int, reason: str) -> None:
    y = np.full(10, label)
    p = np.linspace(0, 1, 10)
    y_pred = metrics.classify(p)
    assert math.isnan(metrics.auc(y, p))
    assert math.isnan(metrics.gmean(y, y_pred))
    assert metrics.mcc(y, y_pred) == matthews_corrcoef(y, y_pred) == 0.0
    assert metrics.undefined_reason(y) == reason
    assert metrics.undefined_reason([]) == "no lesions"
    assert metrics.undefined_reason([0, 1]) is None


def test_classify_applies_max_membership_with_ties_to_malignant() -> None:
    assert metrics.classify([0.0, 0.49, 0.5, 0.51, 1.0]).tolist() == [0, 0, 1, 1, 1]


def test_confusion_counts_malignant_as_positive() -> None:
    c = metrics.confusion([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert (c.tp, c.fn, c.tn, c.fp) == (2, 1, 1, 1)
    assert c.recall == pytest.approx(2 / 3) and c.specificity == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metrics.auc([0, 1, 2], [0.1, 0.2, 0.3]), "labels must be 0"),
        (lambda: metrics.auc([0, 1], [0.1, 1.2]), r"lie in \[0, 1\]"),
        (lambda: metrics.auc([0, 1], [0.1, float("nan")]), "finite"),
        (lambda: metrics.mcc([0, 1, 1], [0, 1]), "3 entries"),
        (lambda: metrics.classify([[0.2, 0.3]]), "1-D"),
        (lambda: metrics.ssim(np.zeros((5, 5)), np.zeros((5, 5))), "at least 7x7"),
        (lambda: metrics.mse(np.zeros((8, 8)), np.zeros((8, 9))), "differ in shape"),
        (lambda: metrics.psnr(np.zeros((8, 8)), np.ones((8, 8)), data_range=0), "positive"),
    ],
)
def test_bad_inputs_raise_errors_that_say_why(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def _image_pair(seed: int, shape: tuple[int, int] = (37, 29)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(shape)
    y_hat = np.clip(y + rng.normal(0, 0.1, shape), 0, 1)
    return y, y_hat


@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_equal_skimage(seed: int) -> None:
    y, y_hat = _image_pair(seed)
    assert metrics.mse(y, y_hat) == pytest.approx(mean_squared_error(y, y_hat), abs=1e-12)
    assert metrics.psnr(y, y_hat) == pytest.approx(peak_signal_noise_ratio(y, y_hat, data_range=1), abs=1e-6)
    assert metrics.ssim(y, y_hat) == pytest.approx(structural_similarity(y, y_hat, data_range=1), abs=1e-6)


def test_identical_images_have_ssim_one_and_infinite_psnr() -> None:
    y, _ = _image_pair(0)
    assert metrics.ssim(y, y) == pytest.approx(1.0)
    assert metrics.psnr(y, y) == math.inf


def test_mean_and_sem_skip_undefined_folds() -> None:
    mean, sem = metrics.mean_and_sem([0.6, float("nan"), 0.8, 0.7])
    assert mean == pytest.approx(0.7)
    assert sem == pytest.approx(np.std([0.6, 0.8, 0.7], ddof=1) / math.sqrt(3))
    assert math.isnan(metrics.mean_and_sem([0.5])[1])
    assert all(math.isnan(v) for v in metrics.mean_and_sem([float("nan")]))
