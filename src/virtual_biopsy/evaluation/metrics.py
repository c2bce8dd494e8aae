"""Metrics of the paper as pure numpy functions (layer 1: no MLflow, no files).

Classification (paper 5.1.2): :func:`auc`, :func:`gmean` (eq. 5), :func:`mcc` (eq. 6) on
lesion labels ``y_true`` (1 malignant, 0 benign) and either probabilities of malignancy or
classes from :func:`classify` (max membership rule, paper 3.1).

Image quality (paper 5.2.2): :func:`mse` (eq. 10), :func:`psnr` (eq. 11), :func:`ssim` (eq. 12),
for images scaled to [0, 1] as the preprocess stage writes them.

Aggregation: :func:`mean_and_sem` (mean and standard error over cross-validation folds).

Undefined values are ``float('nan')``, never a silent 0: a lesion group holding one class only
has no ROC curve, and :func:`undefined_reason` says why in words for the reports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter

MALIGNANT = 1
BENIGN = 0

# SSIM constants of Wang et al. (2004) and skimage's defaults.
SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary confusion matrix, malignant (1) being the positive class."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.tn + self.fp

    @property
    def recall(self) -> float:
        """TP / (TP + FN); nan when there is no malignant lesion."""
        return self.tp / self.positives if self.positives else math.nan

    @property
    def specificity(self) -> float:
        """TN / (TN + FP); nan when there is no benign lesion."""
        return self.tn / self.negatives if self.negatives else math.nan


def _binary_labels(y: object, name: str) -> np.ndarray:
    """Validate a 1-D array of 0/1 labels (bools accepted) and return it as int64."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of labels, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(f"{name}: labels must be 0 (benign) or 1 (malignant), found {bad.tolist()}")
    return arr.astype(np.int64)


def _probabilities(p: object, name: str = "p") -> np.ndarray:
    """Validate a 1-D array of probabilities in [0, 1] (no nan) and return it as float64."""
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of probabilities, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: probabilities must be finite, found nan or inf")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"{name}: probabilities must lie in [0, 1], found range [{arr.min()}, {arr.max()}]")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"y_true has {a.size} entries but the predictions have {b.size}")


def classify(p: object, threshold: float = 0.5) -> np.ndarray:
    """Max membership rule (paper 3.1): malignant (1) when p >= threshold, else benign (0).

    With two classes p(malignant) >= p(benign) = 1 - p exactly when p >= 0.5; ties go to
    malignant, the safer error for a biopsy decision.
    """
    return (_probabilities(p) >= threshold).astype(np.int64)


def confusion(y_true: object, y_pred: object) -> Confusion:
    """Binary confusion counts with malignant (1) as the positive class."""
    t = _binary_labels(y_true, "y_true")
    q = _binary_labels(y_pred, "y_pred")
    _same_length(t, q)
    return Confusion(
        tp=int(np.sum((t == 1) & (q == 1))),
        fp=int(np.sum((t == 0) & (q == 1))),
        tn=int(np.sum((t == 0) & (q == 0))),
        fn=int(np.sum((t == 1) & (q == 0))),
    )


def undefined_reason(y_true: object) -> str | None:
    """Why class-dependent metrics are undefined for these labels, or None when both classes occur.

    AUC needs both classes (no ROC curve otherwise); G-mean needs both (recall or specificity is
    0/0); MCC is then always 0 and says nothing (paper 6.2, ACR a).
    """
    t = _binary_labels(y_true, "y_true")
    if t.size == 0:
        return "no lesions"
    if (t == 1).all():
        return "only malignant lesions"
    if (t == 0).all():
        return "only benign lesions"
    return None


def auc(y_true: object, p: object) -> float:
    """Area under the ROC curve (paper 5.1.2), by the Mann-Whitney statistic.

    AUC = P(p_malignant > p_benign) + 0.5 * P(p_malignant = p_benign), over all pairs of one
    malignant and one benign lesion; this equals the trapezoidal area under the ROC curve
    (sklearn's roc_auc_score). Returns nan when one class is missing (see undefined_reason).
    """
    t = _binary_labels(y_true, "y_true")
    s = _probabilities(p)
    _same_length(t, s)
    if undefined_reason(t) is not None:
        return math.nan
    # Mid-ranks handle ties exactly as the 0.5 term above.
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mid, counts)
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    u = ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def gmean(y_true: object, y_pred: object) -> float:
    """Geometric mean of recall and specificity (paper eq. 5).

        G-mean = sqrt(Recall * Specificity),
        Recall = TP / (TP + FN),  Specificity = TN / (TN + FP).

    Returns nan when one class is missing from ``y_true`` (one factor is 0/0).
    """
    c = confusion(y_true, y_pred)
    if not c.positives or not c.negatives:
        return math.nan
    return math.sqrt(c.recall * c.specificity)


def mcc(y_true: object, y_pred: object) -> float:
    """Matthews correlation coefficient (paper eq. 6).

        MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))

    When the denominator is 0 (one class in the truth or in the predictions) the value is 0.0,
    as scikit-learn's matthews_corrcoef returns; reports mark single-class groups "undefined"
    themselves (undefined_reason), because there 0 carries no information.
    """
    c = confusion(y_true, y_pred)
    denominator = math.sqrt(
        float(c.tp + c.fp) * float(c.tp + c.fn) * float(c.tn + c.fp) * float(c.tn + c.fn)
    )
    if denominator == 0:
        return 0.0
    return (c.tp * c.tn - c.fp * c.fn) / denominator


def _image_pair(y: object, y_hat: object) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(y, dtype=np.float64)
    b = np.asarray(y_hat, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 2:
        raise ValueError(f"expected 2-D grey-level images, got shape {a.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("images hold nan or inf")
    return a, b


def mse(y: object, y_hat: object) -> float:
    """Mean squared error (paper eq. 10): MSE = 1/(k h) * sum_ij (y_ij - y_hat_ij)^2."""
    a, b = _image_pair(y, y_hat)
    return float(np.mean((a - b) ** 2))


def psnr(y: object, y_hat: object, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (paper eq. 11): PSNR = 10 log10(R^2 / MSE).

    The paper writes R = max(y), the target's maximum. We use R = ``data_range``, the largest
    possible pixel value (1 for the [0, 1] images of this project), as skimage's
    peak_signal_noise_ratio(data_range=1) does: the peak then does not depend on how bright one
    target image happens to be, so PSNRs of different images are comparable. Identical images
    give inf.
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    error = mse(y, y_hat)
    if error == 0:
        return math.inf
    return float(10.0 * np.log10(data_range**2 / error))


def ssim(y: object, y_hat: object, data_range: float = 1.0) -> float:
    """Mean structural similarity (paper eq. 12, Wang et al. 2004):

        SSIM = (2 mu_y mu_yh + B1)(2 sigma_y,yh + B2) / ((mu_y^2 + mu_yh^2 + B1)(sigma_y^2 + sigma_yh^2 + B2))

    computed in every 7x7 window, B1 = (0.01 R)^2, B2 = (0.03 R)^2, R = ``data_range``, and
    averaged over the windows that lie fully inside the image. Conventions are skimage's
    structural_similarity defaults so the two agree: uniform (box) window, reflect padding at the
    border, sample (co)variances (factor 49/48), a 3-pixel border strip left out of the mean.
    """
    a, b = _image_pair(y, y_hat)
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")

    def local_mean(img: np.ndarray) -> np.ndarray:
        return uniform_filter(img, size=SSIM_WINDOW, mode="reflect")

    n = SSIM_WINDOW**2
    sample = n / (n - 1)  # unbiased (sample) estimate of the local (co)variances
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = sample * (local_mean(a * a) - mu_a**2)
    var_b = sample * (local_mean(b * b) - mu_b**2)
    cov_ab = sample * (local_mean(a * b) - mu_a * mu_b)
    b1 = (SSIM_K1 * data_range) ** 2
    b2 = (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_a * mu_b + b1) * (2 * cov_ab + b2)) / ((mu_a**2 + mu_b**2 + b1) * (var_a + var_b + b2))
    pad = (SSIM_WINDOW - 1) // 2
    return float(index[pad:-pad, pad:-pad].mean(dtype=np.float64))


def mean_and_sem(values: object) -> tuple[float, float]:
    """Mean and standard error of the mean over folds: SEM = sd(values, ddof=1) / sqrt(n).

    nan values (a metric undefined in some fold) are left out, so the mean is over the folds
    where it is defined. With one value the SEM is nan (no spread to estimate); with none both are.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, math.nan
    return mean, float(arr.std(ddof=1) / math.sqrt(arr.size))
