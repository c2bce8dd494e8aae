"""Per fold: fusion weights from validation, then the paper's settings on the test lesions.

Settings (paper 6.2): F (FFDM, CC+MLO), C (real CESM), Ĉ (CESM classifiers on imputed CESM),
F+C and F+Ĉ (eq. 8 over the two modalities). The fused pipeline is one fixed object per fold
(Algorithm 1): its weights come from real validation images only, and the *same* weights fuse
real, synthetic or mixed CESM on test. That is what makes the robustness sweep C* equal C at 0 %
synthetic and Ĉ at 100 %. Nothing here trains; test predictions never reach the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from virtual_biopsy.evaluation import metrics
from virtual_biopsy.models.fusion import FusionWeights, fuse, fusion_weights

SETTINGS = ("F", "C", "Ĉ", "F+C", "F+Ĉ")
# ASCII names for MLflow metric keys and file-friendly labels.
SETTING_SLUGS = {"F": "F", "C": "C", "Ĉ": "Chat", "F+C": "F_C", "F+Ĉ": "F_Chat", "C*": "Cstar", "F+C*": "F_Cstar"}
# Share of synthetic CESM in each setting (tags runs so like compares with like).
SETTING_SYNTHETIC_SHARE = {"F": None, "C": 0, "Ĉ": 100, "F+C": 0, "F+Ĉ": 100}
META_COLUMNS = ("lesion_id", "patient_id", "acr", "label")


def input_column(modality: str, view: str, source: str) -> str:
    """Column of a lesion table holding f_{m,v}'s probability on ``source`` images."""
    return f"{modality}|{view}|{source}"


@dataclass(frozen=True)
class FoldWeights:
    """The fused pipeline of one fold: eq. 7 weights per modality, eq. 8 weights over modalities."""

    views: dict[str, FusionWeights]
    modalities: FusionWeights | None


@dataclass(frozen=True)
class FoldData:
    """One architecture's fold: its weights and its test lesions (one row per lesion)."""

    arch: str
    fold: int
    weights: FoldWeights
    test: pd.DataFrame
    modalities: tuple[str, ...]
    views: tuple[str, ...]
    dropped_test_lesions: int
    val: pd.DataFrame | None = None  # the validation lesions the weights come from (weight_stability)


def lesion_table(rows: pd.DataFrame, where: str) -> pd.DataFrame:
    """One row per lesion: META_COLUMNS plus one probability column per (modality, view, source).

    Several images of one lesion in one view (a repeated acquisition) are averaged. ``where``
    names the slice in error messages.
    """
    conflicting = rows.groupby("lesion_id")["label"].nunique()
    conflicting = conflicting[conflicting > 1]
    if len(conflicting):
        raise ValueError(f"{where}: lesion(s) {list(conflicting.index[:5])} carry both labels")
    meta = rows.groupby("lesion_id", sort=True)[["patient_id", "acr", "label"]].first()
    keyed = rows.assign(column=rows["modality"] + "|" + rows["view"] + "|" + rows["source"])
    probs = keyed.pivot_table(index="lesion_id", columns="column", values="p_malignant", aggfunc="mean")
    table = meta.join(probs).reset_index()
    table["label"] = table["label"].astype(int)
    return table


def _column(table: pd.DataFrame, name: str) -> np.ndarray:
    return table[name].to_numpy(dtype=np.float64) if name in table else np.full(len(table), np.nan)


def _defined_mcc(labels: np.ndarray, p: np.ndarray) -> float:
    """MCC of the max-membership classes over the lesions that have a probability."""
    keep = ~np.isnan(p)
    if not keep.any():
        return float("nan")
    return metrics.mcc(labels[keep], metrics.classify(p[keep]))


def validation_weights(val: pd.DataFrame, modalities: tuple[str, ...], views: tuple[str, ...],
                       where: str) -> FoldWeights:
    """Eq. 7 and eq. 8 weights from the fold's validation lesions (real images only)."""
    labels = val["label"].to_numpy()
    view_weights: dict[str, FusionWeights] = {}
    fused: dict[str, np.ndarray] = {}
    for modality in modalities:
        per_view = {v: _column(val, input_column(modality, v, "real")) for v in views}
        empty = [v for v, p in per_view.items() if np.isnan(p).all()]
        if empty:
            raise ValueError(f"{where}: no real validation predictions for {modality} {empty}; "
                             "the fusion weights need them")
        view_weights[modality] = fusion_weights({v: _defined_mcc(labels, p) for v, p in per_view.items()})
        fused[modality] = fuse(per_view, view_weights[modality])
    modality_weights = None
    if len(modalities) > 1:
        modality_weights = fusion_weights({m: _defined_mcc(labels, p) for m, p in fused.items()})
    return FoldWeights(view_weights, modality_weights)


def modality_probability(test: pd.DataFrame, modality: str, views: tuple[str, ...], weights: FoldWeights,
                         synthetic: np.ndarray | None = None) -> np.ndarray:
    """p_m (eq. 7) per test lesion; for CESM, ``synthetic[i]`` picks lesion i's imputed images."""
    per_view = {}
    for view in views:
        real = _column(test, input_column(modality, view, "real"))
        if synthetic is None:
            per_view[view] = real
        else:
            per_view[view] = np.where(synthetic, _column(test, input_column(modality, view, "synthetic")), real)
    return fuse(per_view, weights.views[modality])


def mixed_probabilities(fold: FoldData, synthetic: np.ndarray) -> dict[str, np.ndarray]:
    """F, C* and F+C* for one assignment of synthetic CESM to test lesions (True = imputed)."""
    p_f = modality_probability(fold.test, "FFDM", fold.views, fold.weights)
    p_c = modality_probability(fold.test, "CESM", fold.views, fold.weights, synthetic)
    p_fc = fuse({"FFDM": p_f, "CESM": p_c}, fold.weights.modalities)
    return {"F": p_f, "C*": p_c, "F+C*": p_fc}


def setting_probabilities(fold: FoldData) -> dict[str, np.ndarray]:
    """The paper's settings (those the configured modalities allow) per test lesion."""
    n = len(fold.test)
    if fold.modalities == ("FFDM",):
        return {"F": modality_probability(fold.test, "FFDM", fold.views, fold.weights)}
    if fold.modalities == ("CESM",):
        return {
            "C": modality_probability(fold.test, "CESM", fold.views, fold.weights, np.zeros(n, bool)),
            "Ĉ": modality_probability(fold.test, "CESM", fold.views, fold.weights, np.ones(n, bool)),
        }
    real = mixed_probabilities(fold, np.zeros(n, bool))
    imputed = mixed_probabilities(fold, np.ones(n, bool))
    return {"F": real["F"], "C": real["C*"], "Ĉ": imputed["C*"], "F+C": real["F+C*"], "F+Ĉ": imputed["F+C*"]}


def _has_every_input(table: pd.DataFrame, modalities: tuple[str, ...], views: tuple[str, ...]) -> np.ndarray:
    """Lesions with at least one view of every input a setting needs (so all settings see the same lesions)."""
    keep = np.ones(len(table), bool)
    needs = [(m, "real") for m in modalities] + ([("CESM", "synthetic")] if "CESM" in modalities else [])
    for modality, source in needs:
        have = np.zeros(len(table), bool)
        for view in views:
            have |= ~np.isnan(_column(table, input_column(modality, view, source)))
        keep &= have
    return keep


def prepare_folds(predictions: pd.DataFrame, modalities: tuple[str, ...], views: tuple[str, ...]) -> list[FoldData]:
    """Split the predictions into per-(arch, fold) weights (from val) and test lesion tables."""
    order = [m for m in ("FFDM", "CESM") if m in modalities]
    if not order:
        raise ValueError(f"no known modality among {modalities}")
    if "CESM" in order and not ((predictions["modality"] == "CESM") & (predictions["source"] == "synthetic")).any():
        raise ValueError("no predictions on synthetic CESM: run the impute and train_classifier stages")
    folds = []
    for (arch, fold), rows in predictions.groupby(["arch", "fold"], sort=True):
        where = f"predictions of {arch} fold {fold}"
        val_rows = rows[(rows["subset"] == "val") & (rows["source"] == "real")]
        test_rows = rows[rows["subset"] == "test"]
        if val_rows.empty or test_rows.empty:
            raise ValueError(f"{where}: need both val and test rows, found subsets {sorted(set(rows['subset']))}")
        val = lesion_table(val_rows, where)
        weights = validation_weights(val, tuple(order), views, where)
        test = lesion_table(test_rows, where)
        keep = _has_every_input(test, tuple(order), views)
        if not keep.any():
            raise ValueError(f"{where}: no test lesion has predictions for every modality")
        folds.append(FoldData(arch, int(fold), weights, test[keep].reset_index(drop=True),
                              tuple(order), views, int((~keep).sum()), val))
    return folds


def score(labels: np.ndarray, p: np.ndarray) -> dict[str, object]:
    """AUC, G-mean and MCC of one lesion group; all nan with a reason when it holds one class.

    MCC is 0 by formula for a single-class group (metrics.mcc), which would read as "chance";
    reports need "undefined" there (paper 6.2, ACR a), so it is nan here too.
    """
    labels = np.asarray(labels, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    reason = metrics.undefined_reason(labels)
    result: dict[str, object] = {"n_lesions": int(labels.size), "n_malignant": int(labels.sum()),
                                 "undefined_reason": reason or ""}
    if reason:
        return result | {"auc": np.nan, "gmean": np.nan, "mcc": np.nan}
    predicted = metrics.classify(p)
    return result | {"auc": metrics.auc(labels, p), "gmean": metrics.gmean(labels, predicted),
                     "mcc": metrics.mcc(labels, predicted)}


def lesion_probabilities(folds: list[FoldData]) -> pd.DataFrame:
    """Long table: arch, fold, setting, lesion meta, p (the fused probability of every test lesion)."""
    frames = []
    for fold in folds:
        meta = fold.test[list(META_COLUMNS)]
        for setting, p in setting_probabilities(fold).items():
            frames.append(meta.assign(arch=fold.arch, fold=fold.fold, setting=setting, p=p))
    frame = pd.concat(frames, ignore_index=True)
    return frame[["arch", "fold", "setting", *META_COLUMNS, "p"]]


def fold_scores(probabilities: pd.DataFrame) -> pd.DataFrame:
    """AUC, G-mean, MCC per arch, fold and setting on the test lesions."""
    rows = [
        {"arch": arch, "fold": fold, "setting": setting, **score(g["label"].to_numpy(), g["p"].to_numpy())}
        for (arch, fold, setting), g in probabilities.groupby(["arch", "fold", "setting"], sort=False)
    ]
    return pd.DataFrame(rows)


def weights_table(folds: list[FoldData]) -> pd.DataFrame:
    """Every fold's validation MCCs and fusion weights (what the fused pipeline used, and why)."""
    rows = []
    for fold in folds:
        levels = [(f"views:{m}", w) for m, w in fold.weights.views.items()]
        if fold.weights.modalities is not None:
            levels.append(("modalities", fold.weights.modalities))
        for level, w in levels:
            for key, weight in w.weights.items():
                rows.append({"arch": fold.arch, "fold": fold.fold, "level": level, "input": key,
                             "validation_mcc": w.mcc[key], "weight": weight,
                             "fallback": w.fallback or "", "note": w.describe()})
    return pd.DataFrame(rows)
