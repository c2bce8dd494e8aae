"""Cross-validating one classifier f_{m,v}: train a fold, save its weights, score it on its val and
test lesions (paper 5.1, Table 2).

The fold trains on its train patients' images, early-stops on its val patients', and is scored on
val (its fusion weight, the validation MCC) and test, on real images and, for CESM, on the imputed
CESM of the same lesions (setting Ĉ). It never trains on synthetic images.

``run`` is the fold's tracking run (an mlops StageRun or NullRun); it is only called, never
imported, so this layer stays free of MLflow.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from virtual_biopsy.core.atomic import staged_path
from virtual_biopsy.core.config import Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import SCORED_SUBSETS, Classifier, check_single_input
from virtual_biopsy.evaluation.scoring import score_classifier_fold, score_metrics
from virtual_biopsy.models.classifiers import build_classifier
from virtual_biopsy.models.weights import save_classifier_weights
from virtual_biopsy.training.checkpoint import discard_stale_checkpoint, inputs_key
from virtual_biopsy.training.classifier_trainer import (
    ClassifierTrainingResult,
    predict_proba,
    train_classifier,
)
from virtual_biopsy.training.datasets import classifier_fold_seed, labelled_dataset, open_images
from virtual_biopsy.training.executor import report_epoch
from virtual_biopsy.training.loop import EpochState, resolve_device

FoldEpochCallback = Callable[[int, int, dict[str, float]], None]
"""``(fold, epoch, metrics)`` after each epoch's checkpoint is saved; raising stops training
(a time budget, Optuna pruning) and the next run of the stage resumes from that checkpoint."""


@dataclass
class ClassifierFold:
    """One fold's trained classifier and its scores (what summarize_classifier_folds reads)."""

    fold: int
    result: ClassifierTrainingResult
    predictions: pd.DataFrame
    val: dict[str, float]
    test: dict[str, float]


def classifier_epoch_logger(run, images: np.ndarray, val: pd.DataFrame, batch_size: int, device: str, fold: int,
                            extra: FoldEpochCallback | None, epochs: int = 0):
    """on_epoch_end: per-epoch losses, learning rate and validation AUC/MCC (lesion level), a
    progress line (of ``epochs``), then ``extra``."""

    def on_epoch_end(epoch: int, epoch_metrics: dict[str, float], state: EpochState) -> None:
        shown = dict(epoch_metrics)
        if run:  # scoring the validation set costs a forward pass: only when it is recorded
            p = predict_proba(state.models["classifier"], images, val["row"].to_numpy(), batch_size, device)
            scores = score_metrics(val, p)
            shown.update(val_auc=scores["auc"], val_mcc=scores["mcc"])
            run.log_metrics({**{k.replace("/", "_"): v for k, v in epoch_metrics.items()},
                             "val_auc": scores["auc"], "val_mcc": scores["mcc"]}, step=epoch)
        report_epoch(epoch, epochs, shown)
        if extra is not None:
            extra(fold, epoch, epoch_metrics)

    return on_epoch_end


def train_classifier_fold(paths: ProjectPaths, params: Params, which: Classifier, fold: int, images: np.ndarray,
                          real: dict[str, pd.DataFrame], synthetic: dict[str, pd.DataFrame],
                          imputed: np.ndarray | None, run, device: str,
                          epoch_callback: FoldEpochCallback | None = None,
                          out_dir: Path | None = None) -> ClassifierFold:
    """Train, save and score the classifier of one fold; log to ``run``. The weights go to
    ``out_dir`` (the model folder's staging folder; None: no file, as on ranks other than 0)."""
    cfg = params.classifier
    seed = classifier_fold_seed(params.seed, which.arch, which.modality, which.view, fold)
    for frame in (*real.values(), *synthetic.values()):
        check_single_input(frame, which.modality, which.view)
    model = build_classifier(which.arch, cfg.weights_file, seed=seed)
    ckpt = paths.classifier_checkpoint(which.arch, which.modality, which.view, fold)
    discard_stale_checkpoint(ckpt, inputs_key(images, real["train"], real["val"]))
    # The model folder outlives a run (a killed one resumes); after a change of params its
    # checkpoint belongs to another run: start over.
    result = train_classifier(
        model, labelled_dataset(images, real["train"], seed, cfg.augment, cfg.augment_strength),
        labelled_dataset(images, real["val"], seed, False), cfg, seed, checkpoint_dir=ckpt,
        on_epoch_end=classifier_epoch_logger(run, images, real["val"], cfg.batch_size, device, fold, epoch_callback,
                                             cfg.epochs),
        device=device, restart_if_stale=True,
    )
    weights = paths.classifier_weights(which.arch, which.modality, which.view, fold)
    if out_dir is not None:
        weights = staged_path(weights, paths.classifier_dir(which.arch, which.modality, which.view), out_dir)
        save_classifier_weights(weights, result.state, arch=which.arch, modality=which.modality, view=which.view,
                                fold=fold, image_size=int(images.shape[1]), best_epoch=result.best_epoch)
    predictions, scores = score_classifier_fold(model, images, imputed, real, synthetic, which.arch, fold,
                                                cfg.batch_size, device)
    run.log_params({**which.tags, "fold": fold, "seed": seed, "image_size": images.shape[1],
                    **{f"images_{k}": len(v) for k, v in real.items()},
                    **{f"synthetic_images_{k}": len(v) for k, v in synthetic.items() if k in SCORED_SUBSETS}})
    run.log_metrics({"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                     "epochs_run": result.epochs_run,
                     **{f"{subset}_{k}": v for subset, s in scores.items() for k, v in s.items()}})
    run.log_artifact(weights, "weights")
    return ClassifierFold(fold, result, predictions, scores["val"], scores["test"])


def classifier_fold_job(paths: ProjectPaths, params: Params, which: Classifier, fold: int,
                        real: dict[str, pd.DataFrame], synthetic: dict[str, pd.DataFrame], run, device: str,
                        out_dir: Path | None = None, epoch_callback: FoldEpochCallback | None = None
                        ) -> ClassifierFold:
    """:func:`train_classifier_fold` as a fold job (training.executor) that may run in another process:
    it opens the processed (and, for CESM, imputed) images memory-mapped from their files, resolves
    ``device`` where it runs, and logs to ``run``, a handed-over run (``attach()`` gives the handle)."""
    images = open_images(paths.processed_images)
    imputed = open_images(paths.imputed_images) if which.modality == "CESM" else None
    return train_classifier_fold(paths, params, which, fold, images, real, synthetic, imputed, run.attach(),
                                 str(resolve_device(device)), epoch_callback, out_dir)
