"""Observer ceilings of the test folds: what a reader who knows where the lesion is gets from the
images, and what the simulator's true uptake would give (evaluation.observer does the reading).

The observer reads the same preprocessed images the classifiers see (data/processed), on the same
lesions and folds as Table A1: each lesion is scored in the fold whose test set holds its patient,
nothing is fitted, so the ceiling per fold sits beside the classifiers' per-fold AUC. A DES image's
surround ring is taken inside its LE partner's breast region (LE > 0 is the breast exactly; DES > 0
is not, see observer.lesion_features).

Headline ceiling (chosen before any result was seen): the ``contrast`` reading (lesion mean minus
its surround) with views fused, FFDM for the F setting and CESM for C -- contrast rather than the
bare mean because an LE mass's mean intensity is mostly the density of the tissue it sits in.
Pure functions on arrays and tables (the observer_ceiling stage reads and writes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from virtual_biopsy.data.cohorts import biopsy_images
from virtual_biopsy.data.imputation import test_fold_of_patients
from virtual_biopsy.evaluation import observer

HEADLINE_FEATURE = "contrast"
HEADLINE_VIEW = observer.FUSED
SETTING_CEILING_MODALITY = {"F": "FFDM", "C": "CESM"}  # the single-modality settings a ceiling bounds
LATENT = "latent uptake"


@dataclass(frozen=True)
class Ceilings:
    """Per-fold observer AUCs, their mean ± SE, and the simulator's latent-uptake AUC per fold."""

    scores: pd.DataFrame   # observer.SCORE_COLUMNS, plus the latent rows (feature LATENT)
    table: pd.DataFrame    # observer.CEILING_COLUMNS


def observer_frame(index: pd.DataFrame, folds: pd.DataFrame, masks: np.ndarray,
                   modalities: tuple[str, ...], views: tuple[str, ...]) -> pd.DataFrame:
    """One row per real early-phase biopsied image with a lesion mask: ``row`` (into images.npy),
    ``breast_row`` (its LE partner's row: the breast region), ``lesion_id``, ``view``, ``modality``,
    ``label`` (1 malignant), ``fold`` (the test fold of its patient), ``image_id``."""
    test_fold = test_fold_of_patients(folds)
    le_rows = index[index["modality"] == "FFDM"].set_index("pair_key")["row"]
    parts = []
    for modality in modalities:
        for view in views:
            images = biopsy_images(index, modality, view)
            pair = index.set_index("image_id").loc[images["image_id"], "pair_key"].to_numpy()
            images = images.assign(breast_row=le_rows.reindex(pair).to_numpy(),
                                   fold=images["patient_id"].map(test_fold), label=images["y"])
            parts.append(images)
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if frame.empty:
        return frame
    has_mask = masks[frame["row"].to_numpy()].reshape(len(frame), -1).any(axis=1)
    frame = frame[has_mask & frame["breast_row"].notna() & frame["fold"].notna()]
    return frame.astype({"breast_row": int, "fold": int, "row": int}).reset_index(drop=True)


def latent_scores(frame: pd.DataFrame, lesions: pd.DataFrame) -> pd.DataFrame:
    """Per fold, the AUC of the simulator's true early-phase uptake of the frame's lesions
    (observer.latent_auc); empty when the lesion table has no simulator values (real data)."""
    truth = lesions.dropna(subset=["uptake"]).set_index("image_id")["uptake"]
    cesm = frame[(frame["modality"] == "CESM") & frame["image_id"].isin(truth.index)]
    if cesm.empty:
        return pd.DataFrame(columns=list(observer.SCORE_COLUMNS))
    per_lesion = cesm.assign(uptake=cesm["image_id"].map(truth)).groupby("lesion_id").agg(
        label=("label", "first"), fold=("fold", "first"), uptake=("uptake", "mean"))
    rows = []
    for fold, group in per_lesion.groupby("fold"):
        labels = group["label"].to_numpy()
        rows.append({"fold": int(fold), "modality": "CESM", "view": observer.FUSED, "feature": LATENT,
                     "auc": observer.latent_auc(labels, group["uptake"].to_numpy()),
                     "n_malignant": int((labels == 1).sum()), "n_benign": int((labels == 0).sum())})
    return pd.DataFrame(rows, columns=list(observer.SCORE_COLUMNS))


def observer_ceilings(images: np.ndarray, masks: np.ndarray, index: pd.DataFrame, folds: pd.DataFrame,
                      lesions: pd.DataFrame, modalities: tuple[str, ...], views: tuple[str, ...]) -> Ceilings:
    """Every observer reading of the test folds and its ceiling table (empty without masks)."""
    frame = observer_frame(index, folds, masks, modalities, views)
    if frame.empty:
        return Ceilings(pd.DataFrame(columns=list(observer.SCORE_COLUMNS)),
                        pd.DataFrame(columns=list(observer.CEILING_COLUMNS)))
    features = observer.lesion_features(images, masks, frame["row"].to_numpy(), frame["breast_row"].to_numpy())
    frame = frame.merge(features, on="row", how="left", validate="one_to_one")
    scores = pd.concat([observer.observer_scores(frame, feature) for feature in observer.FEATURES]
                       + [latent_scores(frame, lesions)], ignore_index=True)
    return Ceilings(scores, observer.ceiling_table(scores))


def headline_ceiling(table: pd.DataFrame, setting: str) -> tuple[float, float]:
    """(mean, SE) AUC of the headline ceiling of ``setting`` (F or C); nan when not computed."""
    modality = SETTING_CEILING_MODALITY[setting]
    row = table[(table["modality"] == modality) & (table["view"] == HEADLINE_VIEW)
                & (table["feature"] == HEADLINE_FEATURE)]
    if row.empty:
        return math.nan, math.nan
    return float(row["auc_mean"].iloc[0]), float(row["auc_sem"].iloc[0])


def ceiling_shares(table: pd.DataFrame, headline: dict) -> pd.DataFrame:
    """Per architecture and single-modality setting: the pipeline's test AUC, its headline
    ceiling and the chance-corrected share (observer.share_of_ceiling)."""
    rows = []
    for arch, per_setting in headline.items():
        for setting in SETTING_CEILING_MODALITY:
            auc = (per_setting.get(setting) or {}).get("auc")
            ceiling, ceiling_sem = headline_ceiling(table, setting)
            auc = math.nan if auc is None else float(auc)
            rows.append({"arch": arch, "setting": setting, "auc": auc, "ceiling_auc": ceiling,
                         "ceiling_sem": ceiling_sem, "share": observer.share_of_ceiling(auc, ceiling)
                         if not (math.isnan(auc) or math.isnan(ceiling)) else math.nan})
    return pd.DataFrame(rows, columns=["arch", "setting", "auc", "ceiling_auc", "ceiling_sem", "share"])


def _cell(mean: float, sem: float) -> str:
    return "n/a" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * sem:.1f}"


def ceilings_markdown(table: pd.DataFrame) -> str:
    """Ceiling rows as a markdown table: AUC (%) mean ± SE over test folds, n lesions per class."""
    if table.empty:
        return "No lesion masks: no observer ceiling computed.\n"
    lines = ["| modality | view | observer reads | AUC (%) | folds | malignant | benign |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for _, r in table.iterrows():
        lines.append(f"| {r['modality']} | {r['view']} | {r['feature']} | {_cell(r['auc_mean'], r['auc_sem'])} "
                     f"| {int(r['folds'])} | {int(r['n_malignant'])} | {int(r['n_benign'])} |")
    return "\n".join(lines) + "\n"


def shares_markdown(shares: pd.DataFrame) -> str:
    """The pipeline's F and C AUCs beside their ceilings and the chance-corrected share."""
    lines = ["| architecture | setting | AUC (%) | ceiling AUC (%) | share of ceiling |", "| --- | --- | --- | --- | --- |"]
    for _, r in shares.iterrows():
        share = "n/a" if math.isnan(r["share"]) else f"{100 * r['share']:.0f} %"
        auc = "n/a" if math.isnan(r["auc"]) else f"{100 * r['auc']:.1f}"
        lines.append(f"| {r['arch']} | {r['setting']} | {auc} | {_cell(r['ceiling_auc'], r['ceiling_sem'])} | {share} |")
    return "\n".join(lines) + "\n"


def ceiling_metrics(table: pd.DataFrame) -> dict[str, float]:
    """MLflow metrics ``ceiling.<modality>.<view>.<feature>_auc`` (and ``_sem``)."""
    out: dict[str, float] = {}
    for _, r in table.iterrows():
        key = f"ceiling.{r['modality']}.{r['view']}.{str(r['feature']).replace(' ', '_')}"
        if not math.isnan(r["auc_mean"]):
            out[f"{key}_auc"] = float(r["auc_mean"])
            out[f"{key}_auc_sem"] = float(r["auc_sem"]) if not math.isnan(r["auc_sem"]) else 0.0
    return out
