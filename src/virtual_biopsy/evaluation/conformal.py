"""Split conformal prediction sets for benign / malignant (pure numpy; layer 1).

Score (LAC, Sadinle et al. 2019): s_i = 1 - p(true class of i), with p(malignant) = p and
p(benign) = 1 - p. On n validation lesions the threshold is

    qhat = the ceil((n + 1) * level)-th smallest of s_1..s_n,

the ceil((n + 1) * level) / n empirical quantile of the scores. It is taken as that order
statistic directly: numpy's ``np.quantile(s, k / n, method="higher")`` interpolates on
positions (n - 1) * k / n and returns the (k + 1)-th smallest instead, one rank too high
(over-covering); MAPIE 1.6.0 uses ``method="lower"``, which is the k-th. When k exceeds n,
qhat = 1 and every set holds both classes. The set of a test breast is {k : 1 - p(k) <= qhat}. For exchangeable
validation and test lesions P(true class in set) >= level (finite-sample guarantee).

LAC sets can be empty (both p(k) < 1 - qhat, only possible when qhat < 0.5). A breast must get
an answer, so an empty set is replaced by the more probable class (malignant on a tie, the safer
error for a biopsy decision): this only adds classes to sets, so coverage can only go up
(conservative). MAPIE's ``SplitConformalClassifier(conformity_score="lac")`` gives the same
sets except that it leaves those empty (tested).

Serving reads ``qhat`` from the calibration artefact (see
:mod:`virtual_biopsy.evaluation.calibration`) and calls :func:`conformal_set`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from virtual_biopsy.evaluation.metrics import _binary_labels, _probabilities

BENIGN_SET = ("benign",)
MALIGNANT_SET = ("malignant",)
BOTH_SET = ("benign", "malignant")
SET_KINDS = {"benign": BENIGN_SET, "malignant": MALIGNANT_SET, "both": BOTH_SET}


def _check_level(level: float) -> float:
    level = float(level)
    if not 0 < level < 1:
        raise ValueError(f"conformal level must lie strictly between 0 and 1, got {level}")
    return level


def conformity_scores(p: object, y: object) -> np.ndarray:
    """s_i = 1 - p(true class): 1 - p_i for malignant, p_i for benign lesions."""
    probabilities = _probabilities(p, "p")
    labels = _binary_labels(y, "y")
    if labels.shape != probabilities.shape:
        raise ValueError(f"y has {labels.size} entries but p has {probabilities.size}")
    return np.where(labels == 1, 1.0 - probabilities, probabilities)


def conformal_quantile(p_val: object, y_val: object, level: float) -> float:
    """qhat: the ceil((n + 1) * level)-th smallest validation score (1 when that exceeds n)."""
    level = _check_level(level)
    scores = conformity_scores(p_val, y_val)
    n = scores.size
    if n == 0:
        raise ValueError("conformal_quantile: no validation lesions")
    # Rounded first so that float noise (20 * 0.9 = 18.000000000000004) cannot add a rank.
    rank = math.ceil(round((n + 1) * level, 9))
    if rank > n:
        return 1.0
    return float(np.sort(scores)[rank - 1])


def prediction_sets(p: object, qhat: float) -> list[tuple[str, ...]]:
    """Per breast ("benign",), ("malignant",) or ("benign", "malignant"); never empty."""
    probabilities = _probabilities(p, "p")
    qhat = float(qhat)
    if not 0 <= qhat <= 1:
        raise ValueError(f"qhat must lie in [0, 1], got {qhat}")
    has_malignant = 1.0 - probabilities <= qhat
    has_benign = probabilities <= qhat
    sets = []
    for p_i, m, b in zip(probabilities, has_malignant, has_benign):
        if m and b:
            sets.append(BOTH_SET)
        elif m or b:
            sets.append(MALIGNANT_SET if m else BENIGN_SET)
        else:  # empty LAC set: the more probable class, so that every breast gets an answer
            sets.append(MALIGNANT_SET if p_i >= 0.5 else BENIGN_SET)
    return sets


def coverage(sets: Sequence[Sequence[str]], y: object) -> float:
    """Share of lesions whose true class is in their set: 1/n sum_i [class(y_i) in set_i]."""
    labels = _binary_labels(y, "y")
    if len(sets) != labels.size:
        raise ValueError(f"{len(sets)} prediction sets but {labels.size} labels")
    if labels.size == 0:
        return math.nan
    names = np.where(labels == 1, "malignant", "benign")
    return float(np.mean([name in s for name, s in zip(names, sets)]))


def set_size_shares(sets: Sequence[Sequence[str]]) -> dict[str, float]:
    """Shares of sets that are {benign}, {malignant} and {benign, malignant} (keys of SET_KINDS)."""
    if not sets:
        return {kind: math.nan for kind in SET_KINDS}
    as_tuples = [tuple(s) for s in sets]
    return {kind: as_tuples.count(value) / len(as_tuples) for kind, value in SET_KINDS.items()}


def conformal_set(p_calibrated: float, setting_entry: Mapping[str, object]) -> tuple[str, ...]:
    """The prediction set of one breast from its calibrated p and one artefact entry ("qhat")."""
    if "qhat" not in setting_entry:
        raise ValueError(f"calibration entry has no 'qhat' key: keys {sorted(setting_entry)}")
    return prediction_sets(np.atleast_1d(np.asarray(p_calibrated, dtype=np.float64)), float(setting_entry["qhat"]))[0]
