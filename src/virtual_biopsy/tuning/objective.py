"""What a tuning trial searches, what it maximises, and on which images.

What is searched
    ``tune.space`` in params.yaml, keys of the ``classifier`` section: ``lr``, ``weight_decay``
    (``{low, high, log}`` floats), ``batch_size`` (a list: categorical) and ``augment_strength``
    (the AffineAugment scale, 0 = no augmentation). Everything else comes from params.yaml.

What is maximised
    The *validation* MCC or AUC (lesion level, as the train_classifier stage scores it) of the
    best-epoch model, averaged over the folds of data/splits/folds.csv. Only train and val
    patients are ever selected (:func:`tuning_folds`): the pixels of test patients are never
    read, so tuning cannot overfit the test set that the evaluate stage reports.

Pruning
    After every epoch the trial reports the fold's validation metric at step
    ``fold_position * epochs + epoch`` (steps line up across trials); Optuna's MedianPruner
    stops trials whose best value so far is below the median of completed trials at that step.
    A trial whose loss diverges (NaN) is pruned too, with the user attribute ``diverged``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from virtual_biopsy.core.config import ClassifierConfig, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.mlops.tracking import NullRun, StageRun

SEARCHABLE = ("lr", "weight_decay", "batch_size", "augment_strength")
METRICS = ("mcc", "auc")
# The value a fold contributes when its metric is undefined (val lesions of one class only):
# chance level, so an uninformative fold neither helps nor sinks a trial.
CHANCE = {"mcc": 0.0, "auc": 0.5}


class TuningError(ValueError):
    """The search space, metric or inputs cannot be tuned on."""


# ---------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------
def check_space(space: Mapping[str, Any]) -> None:
    """Every key is a searchable classifier param with a valid range or list of choices."""
    if not space:
        raise TuningError("tune.space is empty: nothing to search")
    for name, spec in space.items():
        if name not in SEARCHABLE:
            raise TuningError(f"tune.space.{name}: not searchable; choose from {SEARCHABLE}")
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise TuningError(f"tune.space.{name}: empty list of choices")
            continue
        if not isinstance(spec, Mapping) or not {"low", "high"} <= set(spec):
            raise TuningError(f"tune.space.{name}: expected {{low, high[, log]}} or a list of choices, got {spec!r}")
        low, high = float(spec["low"]), float(spec["high"])
        if not low <= high or (spec.get("log") and low <= 0):
            raise TuningError(f"tune.space.{name}: invalid range [{low}, {high}]" + (" on a log scale" if spec.get("log") else ""))
    if "batch_size" in space and not isinstance(space["batch_size"], (list, tuple)):
        raise TuningError("tune.space.batch_size: give a list of batch sizes")


def suggest(trial, space: Mapping[str, Any]) -> dict[str, Any]:
    """Draw one value per searched param from ``trial`` (Optuna's suggest API)."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, (list, tuple)):
            values[name] = trial.suggest_categorical(name, list(spec))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))
    return values


def trial_config(base: ClassifierConfig, values: Mapping[str, Any]) -> ClassifierConfig:
    """``base`` with the trial's values (augment_strength 0 switches augmentation off)."""
    cfg = dataclasses.replace(base, **{k: v for k, v in values.items() if k != "augment_strength"})
    if "augment_strength" in values:
        strength = float(values["augment_strength"])
        cfg = dataclasses.replace(cfg, augment_strength=strength, augment=strength > 0)
    return cfg


# ---------------------------------------------------------------------------------------------
# Data: train and val patients only
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuningFold:
    fold: int
    train: pd.DataFrame  # stage IMAGE_COLUMNS + row
    val: pd.DataFrame


def tuning_folds(paths: ProjectPaths, modality: str, view: str, max_folds: int | None = None
                 ) -> tuple[np.ndarray, list[TuningFold]]:
    """The memory-mapped processed images and, per fold, the train and val images of f_{modality,view}.

    The selection is the train_classifier stage's own (same images, same patient split); the
    fold's test patients are dropped here, before any pixel is read, so nothing downstream can
    reach them.
    """
    from virtual_biopsy.data.cohorts import biopsy_images, patient_subsets, read_folds, read_processed_index, split_images
    from virtual_biopsy.training.datasets import open_images

    # Real images only (data/imputed is never opened): tuning scores no synthetic CESM.
    index, folds = read_processed_index(paths), read_folds(paths)
    images = open_images(paths.processed_images)
    real = biopsy_images(index, modality, view)
    if real.empty:
        raise TuningError(f"{paths.processed_index}: no early-phase biopsied {modality} {view} images")
    selected = []
    for fold in sorted(int(k) for k in folds["fold"].unique())[:max_folds]:
        parts = split_images(real, patient_subsets(folds, fold), fold, require=("train", "val"))
        selected.append(TuningFold(fold, parts["train"], parts["val"]))
    return images, selected


def validation_score(val: pd.DataFrame, p: np.ndarray, metric: str) -> float:
    """Lesion-level validation ``metric`` (the stage's scoring); chance level when undefined."""
    from virtual_biopsy.evaluation.scoring import score_metrics

    value = score_metrics(val, p)[metric]
    return CHANCE[metric] if value is None or math.isnan(value) else float(value)


# ---------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------
@dataclass
class ClassifierObjective:
    """Mean validation ``metric`` over folds of one classifier trained with a trial's params.

    Each trial logs to a nested run ``trial-<n>`` of ``parent`` (the study's run; a NullRun
    logs nothing).
    """

    params: Params
    arch: str
    modality: str
    view: str
    metric: str
    space: Mapping[str, Any]
    images: np.ndarray
    folds: list[TuningFold]
    parent: StageRun | NullRun = field(default_factory=NullRun)
    device: str = "cpu"
    log_line: Callable[[str], None] | None = None  # per-epoch progress when not on a terminal

    def __call__(self, trial) -> float:
        import optuna

        values = suggest(trial, self.space)
        tags = {"arch": self.arch, "modality": self.modality, "view": self.view, "trial": trial.number,
                "optuna_study": trial.study.study_name}
        pruned: optuna.TrialPruned | None = None
        with self.parent.child(f"trial-{trial.number}", tags=tags) as run:
            run.log_params({**{f"classifier.{k}": v for k, v in values.items()}, "metric": self.metric,
                            "folds": len(self.folds)})
            try:
                value = self._evaluate(trial, values, run)
            except optuna.TrialPruned as exc:
                # Raised again outside the run: a pruned trial's run ends FINISHED, not FAILED.
                pruned = exc
                run.set_tags({"optuna_state": "PRUNED", "diverged": trial.user_attrs.get("diverged", False)})
            else:
                run.log_metrics({f"mean_val_{self.metric}": value})
                run.set_tags({"optuna_state": "COMPLETE"})
        if pruned is not None:
            raise pruned
        return value

    def _evaluate(self, trial, values: Mapping[str, Any], run: StageRun | NullRun) -> float:
        import optuna

        from virtual_biopsy.models.classifiers import build_classifier
        from virtual_biopsy.training import predict_proba, train_classifier
        from virtual_biopsy.training.datasets import classifier_fold_seed, labelled_dataset

        cfg = trial_config(self.params.classifier, values)
        scores = []
        for position, part in enumerate(self.folds):
            seed = classifier_fold_seed(self.params.seed, self.arch, self.modality, self.view, part.fold)
            train_ds = labelled_dataset(self.images, part.train, seed, cfg.augment, cfg.augment_strength)
            val_ds = labelled_dataset(self.images, part.val, seed, augment=False)
            val_rows = part.val["row"].to_numpy()

            def on_epoch_end(epoch: int, metrics: dict[str, float], state, part=part, position=position) -> None:
                p = predict_proba(state.models["classifier"], self.images, val_rows, cfg.batch_size, self.device)
                score = validation_score(part.val, p, self.metric)
                step = position * cfg.epochs + epoch
                run.log_metrics({f"val_{self.metric}": score, "val_loss": metrics["val/loss"],
                                 "train_loss": metrics["train/loss"]}, step=step)
                trial.report(score, step)
                if self.log_line is not None:
                    self.log_line(f"trial {trial.number} fold {part.fold} epoch {epoch + 1}/{cfg.epochs}: "
                                  f"val {self.metric} {score:.3f}")
                if trial.should_prune():
                    raise optuna.TrialPruned(f"trial {trial.number}: val {self.metric} {score:.3f} at step {step} "
                                             "is below the median of earlier trials")

            model = build_classifier(self.arch, cfg.weights_file, seed=seed)
            try:
                train_classifier(model, train_ds, val_ds, cfg, seed, on_epoch_end=on_epoch_end, device=self.device)
            except FloatingPointError as exc:  # EarlyStopping refuses a NaN validation loss
                trial.set_user_attr("diverged", True)
                raise optuna.TrialPruned(f"trial {trial.number}: {exc}") from exc
            # The trainer leaves the best-epoch weights in the model: score those, as the stage does.
            scores.append(validation_score(part.val, predict_proba(model, self.images, val_rows, cfg.batch_size,
                                                                   self.device), self.metric))
            run.log_metrics({f"fold{part.fold}_val_{self.metric}": scores[-1]})
        return float(np.mean(scores))
