"""Missing-modality robustness (paper 5.3, Figure 5): C* and F+C* with n % synthetic CESM.

For each share n and draw d, ``round(n/100 * P)`` of a fold's P test *patients* are picked at
random; all their CESM images (both views) are replaced by the imputed ones, the others keep real
CESM. The fused pipeline (weights from validation) is applied unchanged. Metrics are averaged
over the draws within a fold, then reported as mean ± SEM over folds, like every other table.
n = 0 is exactly setting C (F+C), n = 100 exactly Ĉ (F+Ĉ); F is the FFDM-only reference.

Draws are seeded by (seed, fold, n, d) and not by architecture, so every architecture sees the
same patients imputed: the comparison between architectures is paired.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from virtual_biopsy.evaluation import metrics
from virtual_biopsy.evaluation.settings import FoldData, mixed_probabilities, score

ROBUSTNESS_SETTINGS = ("F", "C*", "F+C*")
METRIC_NAMES = ("auc", "gmean", "mcc")


def synthetic_patients(patients: Iterable[str], share: int, seed: int, fold: int, draw: int) -> set[str]:
    """The test patients whose CESM is imputed in one draw (``share`` percent of them, rounded)."""
    if not 0 <= share <= 100:
        raise ValueError(f"robustness share must lie in [0, 100] percent, got {share}")
    pool = sorted(set(patients))
    count = int(np.floor(share / 100 * len(pool) + 0.5))
    rng = np.random.default_rng([seed, fold, share, draw])
    return set(rng.choice(pool, size=count, replace=False).tolist()) if count else set()


def robustness_scores(folds: list[FoldData], shares: Iterable[int], draws: int, seed: int) -> pd.DataFrame:
    """Metrics per arch, fold, share, draw and setting (F, C*, F+C*)."""
    if draws < 1:
        raise ValueError(f"robustness_draws must be at least 1, got {draws}")
    if any(f.weights.modalities is None for f in folds):
        raise ValueError("the robustness sweep needs both FFDM and CESM classifiers")
    rows = []
    for fold in folds:
        labels = fold.test["label"].to_numpy()
        patients = fold.test["patient_id"].to_numpy()
        for share in shares:
            for draw in range(draws):
                chosen = synthetic_patients(patients, share, seed, fold.fold, draw)
                probs = mixed_probabilities(fold, np.isin(patients, list(chosen)))
                for setting in ROBUSTNESS_SETTINGS:
                    rows.append({"arch": fold.arch, "fold": fold.fold, "share": int(share), "draw": draw,
                                 "setting": setting, **score(labels, probs[setting])})
    return pd.DataFrame(rows)


def summarize_robustness(scores: pd.DataFrame) -> pd.DataFrame:
    """Per arch, setting, share and metric: mean ± SEM over folds of the draw-averaged metric."""
    per_fold = scores.groupby(["arch", "setting", "share", "fold"], sort=True)[list(METRIC_NAMES)].mean()
    rows = []
    for (arch, setting, share), group in per_fold.groupby(level=["arch", "setting", "share"], sort=True):
        for metric in METRIC_NAMES:
            mean, sem = metrics.mean_and_sem(group[metric].to_numpy())
            rows.append({"arch": arch, "setting": setting, "share": int(share), "metric": metric,
                         "mean": mean, "sem": sem, "n_folds": int(group[metric].notna().sum())})
    return pd.DataFrame(rows)
