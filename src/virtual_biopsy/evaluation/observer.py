"""A location-known observer: how much malignancy signal the images carry where the lesion is.

The CNN classifiers must find the lesion themselves. This observer is told where it is (the
lesion mask) and reads one number per image, a priori and without training:

* ``mean``: the mean intensity inside the lesion;
* ``contrast``: lesion_metrics.lesion_enhancement, the lesion mean minus the mean of a ring of
  breast tissue around it.

Higher is read as more suspicious in both modalities: malignant masses are denser in LE and take
up more contrast in DES. Its lesion-level AUC per modality and view (and with views fused) is the
ceiling an intensity reading reaches; a classifier's AUC is reported as a share of it
(:func:`share_of_ceiling`). It is a ceiling for *intensity* only: a CNN also sees shape and
margin (spiculated/irregular vs round/circumscribed), so it may exceed it. :func:`latent_auc`
gives the absolute limit on the simulated data: the AUC of each lesion's true contrast uptake.

Pure functions on arrays and tables (no files, no MLflow).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from virtual_biopsy.core.config import MODALITIES, VIEWS
from virtual_biopsy.evaluation import lesion_metrics, metrics

FEATURES = ("mean", "contrast")
FUSED = "fused"
SCORE_COLUMNS = ("fold", "modality", "view", "feature", "auc", "n_malignant", "n_benign")
CEILING_COLUMNS = ("modality", "view", "feature", "auc_mean", "auc_sem", "folds", "n_malignant", "n_benign")
FRAME_COLUMNS = ("lesion_id", "view", "modality", "label", "fold")


# --- features ------------------------------------------------------------------------------------

def lesion_features(images: np.ndarray, masks: np.ndarray, rows: Sequence[int],
                    breast_from: Sequence[int] | None = None) -> pd.DataFrame:
    """The observer's reading of each listed image: columns ``row``, ``mean``, ``contrast``.

        mean     = mean(image over lesion)
        contrast = mean(image over lesion) - mean(image over ring)     (lesion_metrics.lesion_enhancement)

    ``images`` (N, S, S) and ``masks`` (N, S, S, binary, row-aligned) are the processed images and
    their lesion masks; ``rows`` the rows to read. The ring (lesion_metrics.surround_ring, default
    width) lies inside the breast region of row ``breast_from[i]``: pass the LE partner's row for
    a DES image, because DES > 0 is not the breast (its narrow display window lets air noise
    through, see lesion_metrics.breast_region). Without ``breast_from`` each image's own region
    is used, right for LE images only. A listed row without a lesion mask is a ValueError naming it.
    """
    stack, mask_stack = np.asarray(images), np.asarray(masks)
    if stack.ndim != 3:
        raise ValueError(f"images: expected a stack (N, S, S), got shape {stack.shape}")
    if mask_stack.shape != stack.shape:
        raise ValueError(f"masks: shape {mask_stack.shape} differs from the images' {stack.shape}")
    wanted = [int(r) for r in rows]
    region_rows = wanted if breast_from is None else [int(r) for r in breast_from]
    if len(region_rows) != len(wanted):
        raise ValueError(f"breast_from: {len(region_rows)} rows given for {len(wanted)} images")
    n = stack.shape[0]
    bad = [r for r in (*wanted, *region_rows) if not 0 <= r < n]
    if bad:
        raise ValueError(f"rows {sorted(set(bad))[:5]} are outside the image array (N = {n})")
    means, contrasts = [], []
    for row, region_row in zip(wanted, region_rows):
        try:
            mask = lesion_metrics.binary_mask(mask_stack[row], "masks")
            if not mask.any():
                raise ValueError("has no lesion mask (all 0): the observer needs to know where the lesion is")
            image = np.asarray(stack[row], dtype=np.float64)
            ring = lesion_metrics.surround_ring(mask, lesion_metrics.breast_region(stack[region_row]))
            means.append(float(image[mask].mean()))
            contrasts.append(lesion_metrics.lesion_enhancement(image, mask, ring))
        except ValueError as error:
            raise ValueError(f"row {row}: {error}") from error
    return pd.DataFrame({"row": np.asarray(wanted, dtype=np.int64), "mean": means, "contrast": contrasts})


# --- scores --------------------------------------------------------------------------------------

def rank_scores(values: object) -> np.ndarray:
    """Map a feature monotonically into (0, 1) so metrics.auc (which needs probabilities) takes it:

        q_i = (rank_i - 1/2) / n,   rank = mid-rank of value_i among the n values (ties share one).

    Strictly increasing in the value and tie-preserving, so every pair keeps its order and AUC
    (a rank statistic, Mann-Whitney) is the AUC of the raw feature. The q are not calibrated
    probabilities: only the AUC of the observer is used, never a 0.5 threshold.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"values: expected a 1-D array of feature values, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("values: feature values must be finite, found nan or inf")
    if arr.size == 0:
        return arr
    return (rankdata(arr, method="average") - 0.5) / arr.size


def _labels(values: object, name: str) -> np.ndarray:
    """1-D labels, 1 malignant and 0 benign, as int64."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of labels, got shape {arr.shape}")
    known = np.isin(arr, (0, 1))
    if not known.all():
        raise ValueError(f"{name}: labels must be 0 (benign) or 1 (malignant), found {pd.unique(arr[~known])[:5].tolist()}")
    return arr.astype(np.int64)


def _check_frame(frame: pd.DataFrame, feature: str) -> None:
    missing = [c for c in (*FRAME_COLUMNS, feature) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame: missing column(s) {missing}; needs {[*FRAME_COLUMNS, feature]}")
    if frame.empty:
        raise ValueError("frame: no images")
    for column, allowed in (("view", VIEWS), ("modality", MODALITIES)):
        unknown = sorted(set(frame[column].astype(str)) - set(allowed))
        if unknown:
            raise ValueError(f"frame: {column} must be one of {list(allowed)}, found {unknown}")
    _labels(frame["label"].to_numpy(), "frame: label")
    values = pd.to_numeric(frame[feature], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"frame: feature {feature!r} must be finite numbers, found nan, inf or text")
    labels = frame.groupby("lesion_id")["label"].nunique()
    if (labels > 1).any():
        raise ValueError(f"frame: lesion(s) {labels[labels > 1].index.tolist()[:5]} have both labels")
    folds = frame.groupby("lesion_id")["fold"].nunique()
    if (folds > 1).any():
        raise ValueError(f"frame: lesion(s) {folds[folds > 1].index.tolist()[:5]} are in several folds; "
                         "folds must partition the lesions")


def _auc_row(fold, modality: str, view: str, feature: str, labels: np.ndarray, values: np.ndarray) -> dict:
    return {"fold": fold, "modality": modality, "view": view, "feature": feature,
            "auc": metrics.auc(labels, rank_scores(values)),
            "n_malignant": int((labels == 1).sum()), "n_benign": int((labels == 0).sum())}


def observer_scores(frame: pd.DataFrame, feature: str) -> pd.DataFrame:
    """Lesion-level AUC of the observer reading ``feature``, per fold, modality and view.

    ``frame``: one row per image with ``lesion_id, view, modality, label (1 malignant, 0 benign),
    fold`` and the ``feature`` column (e.g. :func:`lesion_features`' ``mean`` or ``contrast``).

    1. Images of one lesion, modality and view are averaged (in the early phase there is one
       image each; a repeated acquisition is averaged as the evaluation averages probabilities).
    2. Views are fused by the equal-weight mean of the CC and MLO values,

           v_fused = (v_CC + v_MLO) / 2,

       the observer analogue of the pipeline's late fusion over views (eq. 7) with no validation
       MCC to weigh by; a lesion with one view keeps that view's value (as fusion.fuse
       renormalises over the inputs a lesion has).
    3. AUC (metrics.auc) of the values mapped by :func:`rank_scores`, equal to the AUC of the raw
       values since AUC is rank-invariant.

    The direction is fixed a priori (higher = malignant) and nothing is fitted, on any fold, so
    there is no train/test leakage: each fold's AUC is computed on its own lesions only, folds
    are never pooled. Returns SCORE_COLUMNS, view one of CC, MLO, fused; auc nan where a fold has
    one class only (metrics.undefined_reason).
    """
    _check_frame(frame, feature)
    per_view = (frame.assign(value=frame[feature].astype(np.float64))
                .groupby(["fold", "modality", "lesion_id", "view"], sort=True)
                .agg(label=("label", "first"), value=("value", "mean")).reset_index())
    rows = []
    for (fold, modality), group in per_view.groupby(["fold", "modality"], sort=True):
        for view in VIEWS:
            one = group[group["view"] == view]
            if not one.empty:
                rows.append(_auc_row(fold, modality, view, feature,
                                     one["label"].to_numpy(np.int64), one["value"].to_numpy()))
        fused = group.groupby("lesion_id", sort=True).agg(label=("label", "first"), value=("value", "mean"))
        rows.append(_auc_row(fold, modality, FUSED, feature,
                             fused["label"].to_numpy(np.int64), fused["value"].to_numpy()))
    return pd.DataFrame(rows, columns=list(SCORE_COLUMNS))


def ceiling_table(scores: pd.DataFrame) -> pd.DataFrame:
    """The observer's ceiling: mean ± SE over folds (metrics.mean_and_sem) of the AUC.

    ``scores``: rows of :func:`observer_scores` (several features may be concatenated). One row
    per modality, view and feature with ``auc_mean``, ``auc_sem``, ``folds`` (folds where the AUC
    is defined) and the lesions per class summed over folds.
    """
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns]
    if missing:
        raise ValueError(f"scores: missing column(s) {missing}; expected observer_scores() output")
    rows = []
    for (modality, view, feature), group in scores.groupby(["modality", "view", "feature"], sort=True):
        mean, sem = metrics.mean_and_sem(group["auc"].to_numpy(np.float64))
        rows.append({"modality": modality, "view": view, "feature": feature, "auc_mean": mean, "auc_sem": sem,
                     "folds": int(group["auc"].notna().sum()), "n_malignant": int(group["n_malignant"].sum()),
                     "n_benign": int(group["n_benign"].sum())})
    return pd.DataFrame(rows, columns=list(CEILING_COLUMNS))


def share_of_ceiling(pipeline_auc: float, ceiling_auc: float) -> float:
    """Share of the observer's above-chance discrimination a classifier reaches:

        share = (AUC_pipeline - 0.5) / (AUC_ceiling - 0.5).

    Chance-corrected rather than AUC_pipeline / AUC_ceiling, because AUC 0.5 is no
    discrimination at all: a coin (0.5) against a ceiling of 0.9 is share 0, not 0.56. 1: the
    classifier matches the location-known observer; above 1 it uses more than intensity (shape,
    margin); below 0 it is worse than chance. nan when either AUC is nan or the ceiling is not
    above 0.5 (no signal to take a share of).
    """
    values = {"pipeline_auc": pipeline_auc, "ceiling_auc": ceiling_auc}
    for name, value in values.items():
        v = float(value)
        if not math.isnan(v) and not 0 <= v <= 1:
            raise ValueError(f"{name}: an AUC must lie in [0, 1], got {value}")
    pipeline, ceiling = float(pipeline_auc), float(ceiling_auc)
    if math.isnan(pipeline) or math.isnan(ceiling) or ceiling <= 0.5:
        return math.nan
    return (pipeline - 0.5) / (ceiling - 0.5)


def latent_auc(labels: object, uptake: object) -> float:
    """AUC of the simulator's true contrast uptake per lesion (phantom Mass.uptake).

    Not read from images: the best any observer of enhancement could do on the simulated data,
    the limit behind :func:`observer_scores`' ``contrast`` on DES. Malignant masses are drawn
    with a higher mean uptake (SynthConfig.malignant_enhancement vs benign_enhancement) with a
    spread, so the classes overlap and this is below 1. Same mapping as the observer
    (:func:`rank_scores`, higher = malignant); nan when one class is missing.
    """
    y = _labels(labels, "labels")
    u = np.asarray(uptake, dtype=np.float64)
    if u.shape != y.shape:
        raise ValueError(f"uptake: {u.size} values for {y.size} labels (shape {u.shape} vs {y.shape})")
    return metrics.auc(y, rank_scores(u))
