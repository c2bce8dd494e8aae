"""How much the fusion weights can be trusted: each weight with the validation lesions behind it.

A fusion weight is the validation MCC of one input (eq. 7 over views, eq. 8 over modalities) on
one fold's validation lesions, often a dozen. For every weight this reports the lesions per class
it rests on, a bootstrap interval of its validation MCC (validation patients resampled with
replacement, all of a drawn patient's lesions taken: lesions of one patient are not independent),
and a warning when a class has fewer than ``MIN_LESIONS_PER_CLASS`` lesions.

The fusion rule itself is the paper's and unchanged (models/fusion.py): this only says how
unstable its inputs are. Pure functions: the evaluate stage writes the table and logs the
warnings; the gate repeats them in its report.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from virtual_biopsy.evaluation import metrics
from virtual_biopsy.evaluation.settings import FoldData, input_column
from virtual_biopsy.models.fusion import fuse

# Fewer validation lesions than this in a class and an MCC moves by a large step when one lesion
# flips (with 5 benign lesions, one benign error changes specificity by 0.2): the weight is
# reported with a warning. A documented threshold, not a statistical test.
MIN_LESIONS_PER_CLASS = 10
BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_LEVEL = 0.95


def bootstrap_mcc_interval(labels: np.ndarray, p: np.ndarray, groups: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                           seed: int = 0, level: float = BOOTSTRAP_LEVEL) -> tuple[float, float, int]:
    """(low, high, resamples used) of the percentile interval of MCC over patient resamples.

    MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) on the max-membership classes
    (metrics.mcc). Resamples that hold one class only have no defined MCC and are not used; with
    none left the interval is (nan, nan, 0). Lesions without a probability are left out first.
    """
    keep = ~np.isnan(p)
    labels, predicted, groups = labels[keep].astype(np.int64), metrics.classify(p[keep]), groups[keep]
    if labels.size == 0:
        return math.nan, math.nan, 0
    codes, _ = pd.factorize(pd.Series(groups))
    n_groups = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    # counts[b, g]: how often patient g is drawn in resample b; each lesion weighs its patient's count.
    counts = np.stack([np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups) for _ in range(draws)])
    w = counts[:, codes].astype(np.float64)
    tp = (w * ((labels == 1) & (predicted == 1))).sum(axis=1)
    tn = (w * ((labels == 0) & (predicted == 0))).sum(axis=1)
    fp = (w * ((labels == 0) & (predicted == 1))).sum(axis=1)
    fn = (w * ((labels == 1) & (predicted == 0))).sum(axis=1)
    both_classes = ((tp + fn) > 0) & ((tn + fp) > 0)
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    # a defined class mix with all predictions one class: MCC 0 by formula, as metrics.mcc
    value = np.where(denominator > 0, (tp * tn - fp * fn) / np.where(denominator > 0, denominator, 1.0), 0.0)
    used = value[both_classes]
    if used.size == 0:
        return math.nan, math.nan, 0
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(used, [tail, 100 - tail])
    return float(low), float(high), int(used.size)


def _inputs(fold: FoldData) -> list[tuple[str, str, np.ndarray]]:
    """(level, input, validation probability) of every weight of the fold's fused pipeline."""
    val = fold.val
    out, fused = [], {}
    for modality, weights in fold.weights.views.items():
        per_view = {}
        for view in weights.weights:
            column = input_column(modality, view, "real")
            per_view[view] = val[column].to_numpy(dtype=np.float64) if column in val else np.full(len(val), np.nan)
            out.append((f"views:{modality}", view, per_view[view]))
        fused[modality] = fuse(per_view, weights)
    if fold.weights.modalities is not None:
        out += [("modalities", m, fused[m]) for m in fold.weights.modalities.weights]
    return out


def weight_stability(folds: list[FoldData], seed: int = 0, draws: int = BOOTSTRAP_DRAWS,
                     min_per_class: int = MIN_LESIONS_PER_CLASS) -> pd.DataFrame:
    """One row per fold and weight: arch, fold, level, input, validation_mcc, weight, the
    validation lesions it rests on (n_val_malignant, n_val_benign, n_val_patients), the MCC's
    bootstrap interval (mcc_low, mcc_high, mcc_resamples) and ``warning`` ("" when none)."""
    rows = []
    for fold in folds:
        if fold.val is None:
            raise ValueError(f"{fold.arch} fold {fold.fold}: no validation lesions kept to assess its weights")
        labels = fold.val["label"].to_numpy(dtype=np.int64)
        groups = fold.val["patient_id"].astype(str).to_numpy()
        for level, key, p in _inputs(fold):
            weights = fold.weights.views[level.split(":", 1)[1]] if level.startswith("views:") else fold.weights.modalities
            has_p = ~np.isnan(p)
            n_mal, n_ben = int((labels[has_p] == 1).sum()), int((labels[has_p] == 0).sum())
            low, high, used = bootstrap_mcc_interval(labels, p, groups, draws, seed + 1009 * fold.fold)
            thin = [name for name, n in (("malignant", n_mal), ("benign", n_ben)) if n < min_per_class]
            rows.append({
                "arch": fold.arch, "fold": fold.fold, "level": level, "input": key,
                "validation_mcc": weights.mcc[key], "weight": weights.weights[key],
                "fallback": weights.fallback or "", "n_val_malignant": n_mal, "n_val_benign": n_ben,
                "n_val_patients": int(len(set(groups[has_p]))), "mcc_low": low, "mcc_high": high,
                "mcc_resamples": used,
                "warning": (f"rests on {n_mal} malignant and {n_ben} benign validation lesions "
                            f"(fewer than {min_per_class} {' and '.join(thin)})") if thin else "",
            })
    return pd.DataFrame(rows)


def weight_warnings(table: pd.DataFrame) -> list[str]:
    """One line per weight with a warning: ``<arch> fold <k> <level> <input>: <warning>``."""
    return [f"{r['arch']} fold {r['fold']} {r['level']} {r['input']}: {r['warning']}"
            for _, r in table.iterrows() if r["warning"]]


def weight_stability_markdown(table: pd.DataFrame) -> str:
    """The weights per fold as markdown: MCC with its interval, weight, lesions per class, warning."""
    header = "| arch | fold | level | input | val MCC [95 % CI] | weight | val lesions (mal/ben) | warning |"
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for _, r in table.iterrows():
        ci = "n/a" if math.isnan(r["mcc_low"]) else f"[{r['mcc_low']:.2f}, {r['mcc_high']:.2f}]"
        lines.append(f"| {r['arch']} | {r['fold']} | {r['level']} | {r['input']} | {r['validation_mcc']:.2f} {ci} "
                     f"| {r['weight']:.2f} | {r['n_val_malignant']}/{r['n_val_benign']} | {r['warning'] or '-'} |")
    legend = (f"\nInterval: percentile bootstrap over validation patients ({BOOTSTRAP_DRAWS} resamples). A warning "
              f"marks a weight resting on fewer than {MIN_LESIONS_PER_CLASS} validation lesions of a class.\n")
    return "\n".join(lines) + "\n" + legend
