"""Scoring one trained model: lesion-level AUC/MCC/G-mean of a classifier, MSE/PSNR/SSIM of a generator.

Formulas live in evaluation.metrics; this module applies them to the project's tables.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from virtual_biopsy.evaluation import lesion_metrics, metrics
from virtual_biopsy.evaluation.predictions import PREDICTION_COLUMNS
from virtual_biopsy.training.generator_trainer import generate


def lesion_scores(frame: pd.DataFrame, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) per lesion: images of one lesion are averaged, as the evaluation does."""
    per_lesion = frame.assign(p=p).groupby("lesion_id", sort=True).agg(y=("y", "first"), p=("p", "mean"))
    return per_lesion["y"].to_numpy(), per_lesion["p"].to_numpy()


def score_metrics(frame: pd.DataFrame, p: np.ndarray) -> dict[str, float]:
    """Lesion-level AUC, MCC and G-mean of the max-membership classes (metrics.py)."""
    y, q = lesion_scores(frame, p)
    classes = metrics.classify(q)
    return {"auc": metrics.auc(y, q), "mcc": metrics.mcc(y, classes), "gmean": metrics.gmean(y, classes)}


def prediction_rows(frame: pd.DataFrame, p: np.ndarray, arch: str, fold: int, subset: str) -> pd.DataFrame:
    """Rows of the predictions file (PREDICTION_COLUMNS) for the images of ``frame``."""
    return pd.DataFrame({
        "arch": arch, "modality": frame["modality"].to_numpy(), "view": frame["view"].to_numpy(), "fold": fold,
        "subset": subset, "lesion_id": frame["lesion_id"].to_numpy(), "patient_id": frame["patient_id"].to_numpy(),
        "acr": frame["acr"].to_numpy(), "label": frame["y"].to_numpy(), "source": frame["source"].to_numpy(),
        "image_id": frame["image_id"].to_numpy(), "p_malignant": p,
    }, columns=list(PREDICTION_COLUMNS))


METRIC_NAMES = ("mse", "psnr", "ssim")
# Lesion-aware quality (lesion_metrics.lesion_quality): breast-only MSE/PSNR/SSIM and, in the lesion,
# the enhancement error and contrast ratios; reported for G(LE) and the LE baseline alike.
LESION_METRIC_NAMES = tuple(k for k in lesion_metrics.LESION_QUALITY_KEYS if k != "lesion_images")


def image_quality(real: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Mean per-image MSE, PSNR and SSIM of ``predicted`` against ``real`` (both (N, S, S))."""
    per_image = {name: [getattr(metrics, name)(r, p) for r, p in zip(real, predicted)] for name in METRIC_NAMES}
    return {name: float(np.mean(values)) for name, values in per_image.items()}


def lesion_aware_quality(real: np.ndarray, predicted: np.ndarray, le: np.ndarray, masks: np.ndarray
                         ) -> dict[str, float]:
    """lesion_metrics.lesion_quality of ``predicted`` and of the LE baseline (``baseline_`` keys)
    against ``real``; the breast is where LE > 0, the lesion where ``masks`` (the DES rows') is 1."""
    ours = lesion_metrics.lesion_quality(real, predicted, le, masks)
    baseline = lesion_metrics.lesion_quality(real, le, le, masks)
    return {**{k: float(ours[k]) for k in LESION_METRIC_NAMES}, "lesion_images": int(ours["lesion_images"]),
            **{f"baseline_{k}": float(baseline[k]) for k in LESION_METRIC_NAMES}}


def evaluate_generator(generator: torch.nn.Module, images: np.ndarray, pairs: pd.DataFrame,
                       batch_size: int, device: str, masks: np.ndarray | None = None
                       ) -> tuple[dict[str, float], np.ndarray]:
    """Quality of G(LE) and of the LE-as-CESM baseline on ``pairs``; also returns G(LE).

    With ``masks`` (data/processed/lesion_masks.npy, row-aligned with ``images``) the lesion-aware
    metrics are added (:func:`lesion_aware_quality`)."""
    le = np.asarray(images[pairs["le_row"].to_numpy()], dtype=np.float32)
    des = np.asarray(images[pairs["des_row"].to_numpy()], dtype=np.float32)
    synthetic = generate(generator, le, batch_size=batch_size, device=device)
    quality = image_quality(des, synthetic)
    baseline = image_quality(des, le)
    out = {**quality, **{f"baseline_{k}": v for k, v in baseline.items()}}
    if masks is not None:
        out |= lesion_aware_quality(des, synthetic, le, np.asarray(masks[pairs["des_row"].to_numpy()]))
    return out, synthetic


def summarize_classifier_folds(outcomes) -> dict:
    """val_mcc.json's body: per-fold validation MCC (the fusion weights) and AUC, with test metrics
    beside, and their means. ``outcomes`` have ``fold``, ``val``, ``test`` and ``result`` (best_epoch, epochs_run)."""
    per_fold = [{"fold": o.fold, "val_mcc": o.val["mcc"], "val_auc": o.val["auc"], "test_mcc": o.test["mcc"],
                 "test_auc": o.test["auc"], "best_epoch": o.result.best_epoch, "epochs_run": o.result.epochs_run}
                for o in outcomes]
    return {"folds": per_fold,
            "mean": {k: metrics.mean_and_sem([f[k] for f in per_fold])[0]
                     for k in ("val_mcc", "val_auc", "test_mcc", "test_auc")}}


def summarize_generator_folds(view: str, outcomes, serving: dict) -> dict:
    """The generator report (reports/generator/<VIEW>.json) the evaluation stage builds Table 3 from.

    ``outcomes`` have ``fold``, ``test`` (METRIC_NAMES and their ``baseline_``), ``val_ssim``,
    ``test_pairs`` and ``result`` (best_epoch, epochs_run, history).
    """
    keys = (*METRIC_NAMES, *(f"baseline_{m}" for m in METRIC_NAMES))
    if all(m in o.test for o in outcomes for m in LESION_METRIC_NAMES):
        keys += (*LESION_METRIC_NAMES, *(f"baseline_{m}" for m in LESION_METRIC_NAMES), "lesion_images")
    per_fold = [
        {"fold": o.fold, **{k: o.test[k] for k in keys},
         "best_epoch": o.result.best_epoch, "epochs_run": o.result.epochs_run, "val_ssim": o.val_ssim,
         "test_pairs": len(o.test_pairs),
         # learning curves (the fold's checkpoints are removed once the stage is done)
         "val_l1_by_epoch": [h["val/l1"] for h in o.result.history],
         "train_loss_g_by_epoch": [h["train/loss_g"] for h in o.result.history]}
        for o in outcomes
    ]
    stats = {k: metrics.mean_and_sem([f[k] for f in per_fold]) for k in keys}
    return {"view": view, "folds": per_fold, "mean": {k: v[0] for k, v in stats.items()},
            "sem": {k: v[1] for k, v in stats.items()}, "serving": serving}


def score_classifier_fold(model, images: np.ndarray, imputed: np.ndarray | None, real: dict[str, pd.DataFrame],
                          synthetic: dict[str, pd.DataFrame], arch: str, fold: int, batch_size: int, device: str
                          ) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """One fold's classifier on its val and test images: the prediction rows (real, and imputed CESM
    when given) and per-subset lesion-level scores (``auc``, ``mcc``, ``gmean``, ``*_synthetic``)."""
    from virtual_biopsy.data.cohorts import SCORED_SUBSETS
    from virtual_biopsy.training.classifier_trainer import predict_proba

    parts, scores = [], {}
    for subset in SCORED_SUBSETS:
        p = predict_proba(model, images, real[subset]["row"].to_numpy(), batch_size, device)
        parts.append(prediction_rows(real[subset], p, arch, fold, subset))
        scores[subset] = score_metrics(real[subset], p)
        if imputed is not None and not synthetic[subset].empty:
            p_syn = predict_proba(model, imputed, synthetic[subset]["row"].to_numpy(), batch_size, device)
            parts.append(prediction_rows(synthetic[subset], p_syn, arch, fold, subset))
            scores[subset].update({f"{k}_synthetic": v for k, v in score_metrics(synthetic[subset], p_syn).items()})
    return pd.concat(parts, ignore_index=True), scores
