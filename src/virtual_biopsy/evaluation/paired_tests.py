"""Paired tests of the AUC difference between two settings on the same lesions (layer: evaluation).

A reviewer's question "is F+Ĉ really better than F?" is a paired one: both settings score the same
test lesions, so their AUCs are correlated and two separate confidence intervals say too little.
This module answers it twice, on the pooled out-of-fold test predictions (every lesion is a test
lesion in exactly one fold, so pooling the folds gives one prediction per lesion and setting):

- :func:`delong_test`, DeLong, DeLong & Clarke-Pearson (1988), computed with the fast midrank
  algorithm of Sun & Xu (2014): the asymptotic normal test of AUC_a - AUC_b.
- :func:`bootstrap_auc_difference`, a percentile interval of AUC_a - AUC_b from resampling
  *patients* with replacement: a patient's lesions stay together, so their correlation is kept
  (DeLong treats lesions as independent).

:func:`paired_comparisons` runs both for :data:`PAIRS` per architecture on the evaluation stage's
long probability table, and :func:`paired_comparisons_markdown` formats the result.

Pure numpy / scipy / pandas: no files, no MLflow, no printing. Undefined values are
``float('nan')``, never a silent 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

# (setting_a, setting_b): the differences the paper claims, tested as AUC_a - AUC_b.
PAIRS: tuple[tuple[str, str], ...] = (("F+Ĉ", "F"), ("F+C", "C"), ("Ĉ", "F"), ("C", "F"))

PAIRED_COLUMNS = (
    "arch", "setting_a", "setting_b", "n_lesions", "n_patients", "auc_a", "auc_b", "auc_difference",
    "delong_se", "delong_z", "delong_p", "boot_low", "boot_high", "boot_level", "boot_n_used",
)
REQUIRED_COLUMNS = ("arch", "fold", "setting", "lesion_id", "patient_id", "label", "p")

# A variance of the difference at most this share of var(AUC_a) + var(AUC_b) is rounding noise
# around an exact 0 (the structural components of a and b differ by a constant).
_ZERO_VARIANCE_RTOL = 1e-12
# Bootstrap replicates are processed in chunks of at most this many (replicate x row) weights.
_CHUNK_CELLS = 1_000_000


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's paired test of AUC_a - AUC_b (see :func:`delong_test`)."""

    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    se: float  # sqrt(var(difference))
    z: float
    p_value: float  # two-sided
    n_malignant: int
    n_benign: int


@dataclass(frozen=True)
class BootstrapInterval:
    """Percentile bootstrap interval of AUC_a - AUC_b (see :func:`bootstrap_auc_difference`)."""

    difference: float  # on the full data
    low: float
    high: float
    level: float
    n_boot: int
    n_used: int  # resamples holding both classes; the others are skipped

    @property
    def n_skipped(self) -> int:
        """Resamples left out because they held one lesion class only (no AUC)."""
        return self.n_boot - self.n_used


# --- input checks --------------------------------------------------------------------------------
def _labels(y: object) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"y_true: expected a 1-D array of labels, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not np.isin(arr, (0, 1)).all():
        bad = pd.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(f"y_true: labels must be 0 (benign) or 1 (malignant), found {list(bad)}")
    arr = arr.astype(np.int64)
    if not (arr == 1).any() or not (arr == 0).any():
        held = "no lesions" if arr.size == 0 else "only malignant lesions" if (arr == 1).all() else "only benign lesions"
        raise ValueError(f"y_true holds {held}: an AUC needs both malignant (1) and benign (0) lesions")
    return arr


def _scores(p: object, name: str, n: int) -> np.ndarray:
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected numeric probabilities ({err})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of probabilities, got shape {arr.shape}")
    if arr.size != n:
        raise ValueError(f"{name} has {arr.size} values, y_true {n}")
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise ValueError(f"{name}: probabilities must be finite, found {bad} nan or inf value(s)")
    return arr


def _inputs(y_true: object, p_a: object, p_b: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = _labels(y_true)
    return y, _scores(p_a, "p_a", y.size), _scores(p_b, "p_b", y.size)


def _group_codes(groups: object, n: int) -> tuple[np.ndarray, int]:
    arr = np.asarray(groups, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"groups: expected a 1-D array of patient ids, got shape {arr.shape}")
    if arr.size != n:
        raise ValueError(f"groups has {arr.size} values, y_true {n}")
    codes, uniques = pd.factorize(pd.Series(arr, dtype=object))
    if (codes < 0).any():
        raise ValueError(f"groups: {int((codes < 0).sum())} missing patient id(s) (None or nan)")
    return codes.astype(np.int64), len(uniques)


# --- AUC by midranks -----------------------------------------------------------------------------
def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC: (sum of the malignant lesions' midranks - m(m+1)/2) / (m n)."""
    m = int(y.sum())
    n = y.size - m
    return float((_midranks(s)[y == 1].sum() - m * (m + 1) / 2.0) / (m * n))


# --- DeLong --------------------------------------------------------------------------------------
def delong_test(y_true: object, p_a: object, p_b: object) -> DeLongResult:
    """DeLong's test of AUC_a = AUC_b for two predictors scored on the same lesions.

    With X_1..X_m the scores of the m malignant lesions, Y_1..Y_n those of the n benign ones and
    the Mann-Whitney kernel psi(x, y) = 1 if x > y, 1/2 if x = y, 0 if x < y (ties count one half):

        AUC      = 1/(m n) sum_i sum_j psi(X_i, Y_j)
        V10(X_i) = 1/n sum_j psi(X_i, Y_j)          (structural component of a malignant lesion)
        V01(Y_j) = 1/m sum_i psi(X_i, Y_j)          (structural component of a benign lesion)
        S10      = 2x2 sample covariance (ddof 1) of (V10_a, V10_b) over the m malignant lesions
        S01      = 2x2 sample covariance (ddof 1) of (V01_a, V01_b) over the n benign lesions
        S        = S10 / m + S01 / n
        var(AUC_a - AUC_b) = [1, -1] S [1, -1]^T,   se = sqrt(var)
        z        = (AUC_a - AUC_b) / se,            p = 2 (1 - Phi(|z|))  (two-sided)

    The components come from midranks (Sun & Xu 2014, fast DeLong, O((m+n) log(m+n))): with
    T_z the midranks of a predictor's scores among all lesions, T_x among the malignant ones
    only and T_y among the benign ones only,

        AUC = (sum_i T_z(X_i) - m(m+1)/2) / (m n),
        V10(X_i) = (T_z(X_i) - T_x(X_i)) / n,     V01(Y_j) = 1 - (T_z(Y_j) - T_y(Y_j)) / m.

    Zero variance: when var = 0 (up to rounding, var <= 1e-12 (S_aa + S_bb)), e.g. for identical
    predictors, there is no normal approximation. If the difference is 0 as well the data show no
    difference at all: z = 0, p = 1. Otherwise (both components differ by a constant, e.g. one
    predictor perfect and the other perfectly inverted) a difference exists but DeLong's variance
    estimate is degenerate, so z and p are nan rather than an infinite z and p = 0. With fewer
    than two lesions of a class, a sample covariance is undefined: se, z and p are nan.

    Scores need not be calibrated (any finite numbers; only their order matters). Raises
    ValueError naming the argument for arrays of different lengths, labels other than 0/1, a
    class missing from ``y_true`` or nan / inf scores.
    """
    y, a, b = _inputs(y_true, p_a, p_b)
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    aucs, v10, v01 = [], [], []
    for s in (a, b):
        x, yb = s[pos], s[~pos]
        tz = _midranks(np.concatenate([x, yb]))
        tx, ty = _midranks(x), _midranks(yb)
        aucs.append(float((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)))
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    auc_a, auc_b = aucs
    difference = auc_a - auc_b
    if m < 2 or n < 2:
        se = z = p_value = math.nan
    else:
        s_matrix = np.cov(np.vstack(v10)) / m + np.cov(np.vstack(v01)) / n
        contrast = np.array([1.0, -1.0])
        var = float(contrast @ s_matrix @ contrast)
        if var <= _ZERO_VARIANCE_RTOL * float(s_matrix[0, 0] + s_matrix[1, 1]):
            se = 0.0
            z, p_value = (0.0, 1.0) if difference == 0 else (math.nan, math.nan)
        else:
            se = math.sqrt(var)
            z = difference / se
            p_value = float(min(1.0, 2.0 * norm.sf(abs(z))))
    return DeLongResult(auc_a=auc_a, auc_b=auc_b, difference=difference, se=se, z=z, p_value=p_value,
                        n_malignant=m, n_benign=n)


# --- patient bootstrap ---------------------------------------------------------------------------
def _weighted_aucs(s: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of scores s for each row of ``weights`` (replicates x lesions: times a lesion is drawn).

    AUC_w = sum_i sum_j w_i w_j psi(X_i, Y_j) / (sum_i w_i * sum_j w_j), computed by tie groups of
    the sorted scores: a malignant lesion's weight times the weight of benign lesions below it
    plus half the benign weight tied with it (weighted midranks). nan where a class has weight 0.
    """
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    w = weights[:, order]
    malignant = y[order] == 1
    g_pos = np.add.reduceat(np.where(malignant, w, 0.0), starts, axis=1)
    g_neg = np.add.reduceat(np.where(malignant, 0.0, w), starts, axis=1)
    below = np.cumsum(g_neg, axis=1) - g_neg
    u = (g_pos * (below + 0.5 * g_neg)).sum(axis=1)
    denominator = g_pos.sum(axis=1) * g_neg.sum(axis=1)
    return np.divide(u, denominator, out=np.full(u.shape, np.nan), where=denominator > 0)


def bootstrap_auc_difference(
    y_true: object,
    p_a: object,
    p_b: object,
    groups: object,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapInterval:
    """Percentile interval of AUC_a - AUC_b from a bootstrap over patients (``groups``).

    Each of the ``n_boot`` resamples draws G patients with replacement from the G unique values of
    ``groups`` (numbered in order of first appearance; one
    ``default_rng(seed).integers(0, G, size=(n_boot, G))`` call, so a seed gives the same
    interval) and takes all rows of every drawn patient, a patient drawn c times contributing its
    rows c times:

        D*_r = AUC_a(resample r) - AUC_b(resample r)
        [low, high] = [q_{(1-level)/2}, q_{(1+level)/2}] of the D*_r  (numpy.quantile, linear)

    Resampling patients rather than lesions keeps the correlation between a patient's lesions
    (and both breasts); treating correlated lesions as independent gives too narrow an interval.
    A resample holding one lesion class only has no AUC: it is skipped, and ``n_used`` counts the
    others (low and high are nan when none is left). ``difference`` is AUC_a - AUC_b on the full
    data. AUCs are Mann-Whitney AUCs with ties counting one half, computed by weighted midranks,
    vectorised over the resamples.

    Raises ValueError naming the argument for the input problems of :func:`delong_test`, a
    ``groups`` of the wrong length or with missing ids, n_boot < 1 or level outside (0, 1).
    """
    y, a, b = _inputs(y_true, p_a, p_b)
    codes, n_groups = _group_codes(groups, y.size)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not (isinstance(level, (int, float, np.floating)) and 0.0 < float(level) < 1.0):
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    n_boot, level = int(n_boot), float(level)
    difference = _auc(y, a) - _auc(y, b)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    chunk = max(1, _CHUNK_CELLS // max(y.size, n_groups))
    diffs = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        block = draws[start:start + chunk]
        rows = np.arange(block.shape[0])[:, None] * n_groups
        counts = np.bincount((block + rows).ravel(), minlength=block.shape[0] * n_groups)
        weights = counts.reshape(block.shape[0], n_groups)[:, codes].astype(np.float64)
        diffs[start:start + block.shape[0]] = _weighted_aucs(a, y, weights) - _weighted_aucs(b, y, weights)
    used = diffs[~np.isnan(diffs)]
    if used.size:
        low, high = (float(v) for v in np.quantile(used, [(1.0 - level) / 2.0, (1.0 + level) / 2.0]))
    else:
        low = high = math.nan
    return BootstrapInterval(difference=difference, low=low, high=high, level=level, n_boot=n_boot,
                             n_used=int(used.size))


# --- per architecture and pair -------------------------------------------------------------------
def _setting_rows(rows: pd.DataFrame, arch: object, setting: str) -> pd.DataFrame:
    """One setting's rows of one arch indexed by (fold, lesion_id), checked for pooled use."""
    keyed = rows.set_index(["fold", "lesion_id"])
    duplicated = keyed.index[keyed.index.duplicated()]
    if len(duplicated):
        raise ValueError(f"arch {arch}, setting {setting}: {len(duplicated)} duplicate (fold, lesion_id) row(s), "
                         f"e.g. {list(duplicated[:3])}")
    folds_per_lesion = rows.groupby("lesion_id")["fold"].nunique()
    repeated = folds_per_lesion[folds_per_lesion > 1]
    if len(repeated):
        raise ValueError(f"arch {arch}, setting {setting}: {len(repeated)} lesion(s) are test lesions in several "
                         f"folds, e.g. {list(repeated.index[:3])}; pooled out-of-fold predictions need each once")
    return keyed


def _aligned(rows: pd.DataFrame, arch: object, setting_a: str, setting_b: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    a = _setting_rows(rows[rows["setting"] == setting_a], arch, setting_a)
    b = _setting_rows(rows[rows["setting"] == setting_b], arch, setting_b)
    only_a, only_b = a.index.difference(b.index), b.index.difference(a.index)
    if len(only_a) or len(only_b):
        raise ValueError(
            f"arch {arch}: settings {setting_a} and {setting_b} score different lesions "
            f"({len(only_a)} only in {setting_a}, e.g. {list(only_a[:3])}; "
            f"{len(only_b)} only in {setting_b}, e.g. {list(only_b[:3])}); a paired test needs the same lesions")
    b = b.loc[a.index]
    for column in ("label", "patient_id"):
        differs = a[column].to_numpy() != b[column].to_numpy()
        if differs.any():
            raise ValueError(f"arch {arch}: settings {setting_a} and {setting_b} disagree on {column} for "
                             f"{int(differs.sum())} lesion(s), e.g. {list(a.index[differs][:3])}")
    return a, b


def paired_comparisons(
    probabilities: pd.DataFrame,
    pairs: Sequence[tuple[str, str]] = PAIRS,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """DeLong test and patient-bootstrap interval of AUC_a - AUC_b per architecture and pair.

    ``probabilities`` is the evaluation stage's long table (arch, fold, setting, lesion_id,
    patient_id, label, p, ...). For every arch (in order of appearance) and every pair
    (setting_a, setting_b) of ``pairs`` whose two settings both occur for that arch, the two
    settings' rows are aligned on (fold, lesion_id) and all folds pooled (out-of-fold
    predictions, one per lesion); then :func:`delong_test` and :func:`bootstrap_auc_difference`
    (groups = patient_id, the same ``n_boot``, ``seed``, ``level`` for every comparison) run on
    them. Pairs with a setting missing for an arch are skipped.

    Returns one row per comparison with the columns of :data:`PAIRED_COLUMNS`. Raises ValueError
    when a column is missing, or naming the arch and settings when the two settings score
    different lesions, disagree on a lesion's label or patient, or hold a lesion twice.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in probabilities.columns]
    if missing:
        raise ValueError(f"probabilities: missing column(s) {missing}")
    checked_pairs = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"pairs: each entry must be a (setting_a, setting_b) pair, got {pair!r}")
        checked_pairs.append((pair[0], pair[1]))
    out = []
    for arch in pd.unique(probabilities["arch"]):
        rows = probabilities[probabilities["arch"] == arch]
        present = set(rows["setting"])
        for setting_a, setting_b in checked_pairs:
            if setting_a not in present or setting_b not in present:
                continue
            a, b = _aligned(rows, arch, setting_a, setting_b)
            y = a["label"].to_numpy()
            test = delong_test(y, a["p"].to_numpy(), b["p"].to_numpy())
            boot = bootstrap_auc_difference(y, a["p"].to_numpy(), b["p"].to_numpy(), a["patient_id"].to_numpy(),
                                            n_boot=n_boot, seed=seed, level=level)
            out.append({
                "arch": arch, "setting_a": setting_a, "setting_b": setting_b, "n_lesions": len(a),
                "n_patients": int(a["patient_id"].nunique()), "auc_a": test.auc_a, "auc_b": test.auc_b,
                "auc_difference": test.difference, "delong_se": test.se, "delong_z": test.z,
                "delong_p": test.p_value, "boot_low": boot.low, "boot_high": boot.high,
                "boot_level": boot.level, "boot_n_used": boot.n_used,
            })
    return pd.DataFrame(out, columns=list(PAIRED_COLUMNS))


# --- markdown ------------------------------------------------------------------------------------
def _percent(value: float, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100.0 * value:+.1f}" if sign else f"{100.0 * value:.1f}"


def _p_value(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:#.3g}"


def _level_label(levels: pd.Series) -> str:
    values = sorted({float(v) for v in levels if pd.notna(v)})
    if len(values) != 1:
        return "CI"
    return f"{100.0 * values[0]:g} % CI"


def paired_comparisons_markdown(table: pd.DataFrame) -> str:
    """The table of :func:`paired_comparisons` as markdown, one row per comparison.

    AUCs in percent with one decimal; the difference AUC_a - AUC_b in percentage points with its
    patient-bootstrap interval; DeLong's two-sided p with 3 significant digits ("< 0.001" below
    that); "n/a" where a value is undefined.
    """
    level = _level_label(table["boot_level"]) if len(table) else "95 % CI"
    header = ["arch", "comparison", "AUC a", "AUC b", f"difference ({level}, patient bootstrap)", "DeLong p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for _, r in table.iterrows():
        difference = (f"{_percent(r['auc_difference'], sign=True)} "
                      f"({_percent(r['boot_low'], sign=True)} to {_percent(r['boot_high'], sign=True)})")
        cells = [str(r["arch"]), f"{r['setting_a']} vs {r['setting_b']}", _percent(r["auc_a"]),
                 _percent(r["auc_b"]), difference, _p_value(r["delong_p"])]
        lines.append("| " + " | ".join(cells) + " |")
    legend = ("\nAUCs in % on the pooled out-of-fold test lesions; difference = AUC a - AUC b in percentage "
              "points with a percentile interval from resampling patients with replacement; DeLong p: "
              "two-sided DeLong test of equal AUCs on the same lesions (lesions taken as independent).\n")
    return "\n".join(lines) + "\n" + legend
