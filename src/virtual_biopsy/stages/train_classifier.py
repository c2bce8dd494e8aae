"""DVC stage train_classifier: the classifier f_{m,v} of one architecture, modality and view, per fold.

    python -m virtual_biopsy.stages.train_classifier --arch resnet18 --modality CESM --view CC \
        [--root .] [--params params.yaml] [--device cpu] [--no-mlflow]

Data (paper 5.1, Table 2)
    The virtual-biopsy images: early-phase images with a biopsy result (malignant or benign) of
    exactly this modality and view; a classifier never sees another modality or view. The unit
    of evaluation is the lesion, ``lesion_id = patient|study|laterality`` (one breast's early
    acquisition). Fold k (data/splits/folds.csv) trains on its train patients, early-stops and
    computes its fusion weight (validation MCC) on its val patients, and is scored on its val
    and test patients. Train, val and test patient sets are checked to be disjoint: no test
    patient ever reaches training, early stopping or the fusion weights.

Synthetic CESM (paper setting Ĉ)
    CESM classifiers also score the imputed CESM (data/imputed, written by the impute stage) of
    their val and test lesions' LE images: each imputed row is joined on ``source_image_id`` to
    its LE image, whose lesion, label and patient it inherits. The model is the one trained on
    real CESM; it never trains on synthetic images.

Outputs (atomic)
    models/classifier/<arch>/<MOD>_<VIEW>/checkpoints/fold<k>/last.pt   per-epoch checkpoint (resume)
    models/classifier/<arch>/<MOD>_<VIEW>/fold<k>.pt                    best weights of fold k
    models/classifier/<arch>/<MOD>_<VIEW>/val_mcc.json                  per-fold validation MCC/AUC
    outputs/predictions/<arch>/<MOD>_<VIEW>.csv                         PREDICTION_COLUMNS

MLflow: a stage run tagged arch/modality/view and one child run per fold (params, per-epoch
losses and validation AUC/MCC, best epoch, final val/test metrics, the weights file).
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from virtual_biopsy import metrics
from virtual_biopsy.atomic import write_csv, write_json, write_text, write_torch
from virtual_biopsy.config import (
    ARCHITECTURES,
    MODALITIES,
    VIEWS,
    ClassifierConfig,
    ConfigError,
    Params,
)
from virtual_biopsy.evaluation.predictions import PREDICTION_COLUMNS, predictions_path
from virtual_biopsy.models.classifiers import WeightsFileError, build_classifier
from virtual_biopsy.paths import ProjectPaths
from virtual_biopsy.stages.common import stage_inputs, stage_parser
from virtual_biopsy.training.augment import AffineAugment
from virtual_biopsy.training.checkpoint import CheckpointError
from virtual_biopsy.training.classifier_trainer import (
    ClassifierTrainingResult,
    predict_proba,
    train_classifier,
)
from virtual_biopsy.training import distributed
from virtual_biopsy.training.datasets import LabelledImageDataset, derive_seed, open_images
from virtual_biopsy.training.loop import EpochState, resolve_device

STAGE = "train_classifier"
BIOPSY_LABELS = {"malignant": 1, "benign": 0}
VIRTUAL_BIOPSY_PHASE = "early"
SUBSETS = ("train", "val", "test")
SCORED_SUBSETS = ("val", "test")
INPUTS_KEY_FILE = "inputs.sha256"  # beside last.pt: which images the checkpoint was trained on
# Columns an image table carries through this stage (besides the array row).
IMAGE_COLUMNS = ("image_id", "patient_id", "lesion_id", "acr", "y", "modality", "view", "source")


class ClassifierStageError(ValueError):
    """The inputs cannot train this classifier (missing files, no images for a subset, a leak)."""


# ---------------------------------------------------------------------------------------------
# Where things go
# ---------------------------------------------------------------------------------------------
def classifier_dir(paths: ProjectPaths, arch: str, modality: str, view: str) -> Path:
    """``models/classifier/<arch>/<MOD>_<VIEW>``: everything this stage keeps for f_{m,v}."""
    return paths.models_dir / "classifier" / arch / f"{modality}_{view}"


def fold_weights_path(paths: ProjectPaths, arch: str, modality: str, view: str, fold: int) -> Path:
    return classifier_dir(paths, arch, modality, view) / f"fold{fold}.pt"


def checkpoint_dir(paths: ProjectPaths, arch: str, modality: str, view: str, fold: int) -> Path:
    return classifier_dir(paths, arch, modality, view) / "checkpoints" / f"fold{fold}"


def val_mcc_path(paths: ProjectPaths, arch: str, modality: str, view: str) -> Path:
    """Per-fold validation MCC: the fusion weights (paper eq. 7) of the registered pipeline."""
    return classifier_dir(paths, arch, modality, view) / "val_mcc.json"


def imputed_images_path(paths: ProjectPaths) -> Path:
    return paths.imputed_dir / "images.npy"


def imputed_index_path(paths: ProjectPaths) -> Path:
    return paths.imputed_dir / "index.csv"


# ---------------------------------------------------------------------------------------------
# Weight files (self-describing; ``build_classifier(arch, weights_file=...)`` reads them too)
# ---------------------------------------------------------------------------------------------
def save_classifier_weights(path: Path, state: dict[str, torch.Tensor], **info: Any) -> None:
    """Write a state dict under ``state_dict`` with what identifies it (arch, modality, view, fold ...)."""
    write_torch(path, {"state_dict": state, **info})


def load_classifier(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the classifier saved by :func:`save_classifier_weights`; returns (network in eval mode, info)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such classifier weights file (run the {STAGE} stage)")
    record = torch.load(path, map_location="cpu", weights_only=True)
    model = build_classifier(str(record["arch"]))
    model.load_state_dict(record["state_dict"])
    model.eval()
    return model, {k: v for k, v in record.items() if k != "state_dict"}


# ---------------------------------------------------------------------------------------------
# Data: the virtual-biopsy images of one modality and view
# ---------------------------------------------------------------------------------------------
def lesion_ids(frame: pd.DataFrame) -> pd.Series:
    """``patient|study|laterality``: one breast's early acquisition, the unit the paper evaluates."""
    return frame["patient_id"].astype(str) + "|" + frame["study_id"].astype(str) + "|" + frame["laterality"].astype(str)


def _is_synthetic(frame: pd.DataFrame) -> pd.Series:
    if "synthetic" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["synthetic"].astype(str).str.lower().isin(("true", "1"))


def biopsy_images(index: pd.DataFrame, modality: str, view: str) -> pd.DataFrame:
    """Real early-phase images with a malignant/benign label of exactly ``modality`` and ``view``.

    Returns IMAGE_COLUMNS plus ``row`` (into data/processed/images.npy), sorted by image id so
    the order, and with it training, does not depend on the order of the index file.
    """
    keep = (
        (index["modality"] == modality)
        & (index["view"] == view)
        & (index["phase"] == VIRTUAL_BIOPSY_PHASE)
        & index["label"].isin(tuple(BIOPSY_LABELS))
        & ~_is_synthetic(index)
    )
    images = index[keep].copy()
    images["lesion_id"] = lesion_ids(images)
    images["y"] = images["label"].map(BIOPSY_LABELS).astype(int)
    images["source"] = "real"
    images = images.sort_values("image_id", kind="stable").reset_index(drop=True)
    check_single_input(images, modality, view)
    return images[[*IMAGE_COLUMNS, "row"]]


def synthetic_images(imputed: pd.DataFrame, index: pd.DataFrame, view: str) -> pd.DataFrame:
    """Imputed CESM of the virtual-biopsy LE images of ``view``, carrying their LE image's lesion.

    Joined on ``source_image_id`` -> the LE image; lesion, label, patient and ACR come from that
    LE image (the imputed index repeats them, and a disagreement is an error), and ``image_id``
    is the LE input's, as the predictions contract asks. ``row`` indexes data/imputed/images.npy.
    """
    le = biopsy_images(index, "FFDM", view).set_index("image_id")
    rows = imputed[imputed["source_image_id"].isin(le.index)].copy()
    if rows.empty:
        return pd.DataFrame(columns=[*IMAGE_COLUMNS, "row"])
    if not (_is_synthetic(rows).all() and (rows["modality"] == "CESM").all() and (rows["view"] == view).all()):
        raise ClassifierStageError(f"imputed index: rows made from {view} LE images must be synthetic CESM of view {view}")
    source = le.loc[rows["source_image_id"]]
    disagree = rows["patient_id"].astype(str).to_numpy() != source["patient_id"].astype(str).to_numpy()
    if disagree.any():
        raise ClassifierStageError(
            f"imputed index: synthetic image(s) of {rows['source_image_id'][disagree].tolist()[:3]} name another "
            "patient than their LE source (rerun impute)"
        )
    out = pd.DataFrame({
        "image_id": rows["source_image_id"].to_numpy(),
        "patient_id": source["patient_id"].to_numpy(),
        "lesion_id": source["lesion_id"].to_numpy(),
        "acr": source["acr"].to_numpy(),
        "y": source["y"].to_numpy(),
        "modality": "CESM",
        "view": view,
        "source": "synthetic",
        "row": rows["row"].astype(int).to_numpy(),
    })
    return out.sort_values("image_id", kind="stable").reset_index(drop=True)


def check_single_input(images: pd.DataFrame, modality: str, view: str) -> None:
    """A classifier f_{m,v} sees images of modality m and view v only (paper 5.1): fail loudly otherwise."""
    for column, expected in (("modality", modality), ("view", view)):
        found = sorted(set(images[column].astype(str)) - {expected})
        if found:
            raise ClassifierStageError(f"classifier {modality}-{view} was given {column} {found}; it sees {expected} only")


def patient_subsets(folds: pd.DataFrame, fold: int) -> dict[str, set[str]]:
    """Patient ids of fold ``fold``'s train, val and test subsets, checked to be disjoint."""
    of_fold = folds[folds["fold"] == fold]
    subsets = {name: set(of_fold.loc[of_fold["subset"] == name, "patient_id"].astype(str)) for name in SUBSETS}
    check_disjoint_patients(subsets, fold)
    return subsets


def check_disjoint_patients(subsets: dict[str, set[str]], fold: int) -> None:
    """No patient in two subsets: test patients never train, early-stop or weight the fusion."""
    for i, a in enumerate(SUBSETS):
        for b in SUBSETS[i + 1:]:
            shared = subsets[a] & subsets[b]
            if shared:
                raise ClassifierStageError(f"fold {fold}: patient(s) {sorted(shared)[:3]} are in both {a} and {b}")


def split_images(images: pd.DataFrame, patients: dict[str, set[str]], fold: int, require: tuple[str, ...]
                 ) -> dict[str, pd.DataFrame]:
    """``images`` by subset; the subsets in ``require`` must not be empty."""
    unassigned = sorted(set(images["patient_id"].astype(str)) - set().union(*patients.values()))
    if unassigned:
        raise ClassifierStageError(f"fold {fold}: patient(s) {unassigned[:3]} have images but no split (rerun split)")
    out = {name: images[images["patient_id"].astype(str).isin(ids)].reset_index(drop=True)
           for name, ids in patients.items()}
    for name in require:
        if out[name].empty:
            raise ClassifierStageError(f"fold {fold}: no virtual-biopsy images in the {name} subset")
    return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def lesion_scores(frame: pd.DataFrame, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) per lesion: images of one lesion are averaged, as the evaluation does."""
    per_lesion = frame.assign(p=p).groupby("lesion_id", sort=True).agg(y=("y", "first"), p=("p", "mean"))
    return per_lesion["y"].to_numpy(), per_lesion["p"].to_numpy()


def score_metrics(frame: pd.DataFrame, p: np.ndarray) -> dict[str, float]:
    """Lesion-level AUC, MCC and G-mean of the max-membership classes (metrics.py)."""
    y, q = lesion_scores(frame, p)
    classes = metrics.classify(q)
    return {"auc": metrics.auc(y, q), "mcc": metrics.mcc(y, classes), "gmean": metrics.gmean(y, classes)}


# ---------------------------------------------------------------------------------------------
# One fold
# ---------------------------------------------------------------------------------------------
@dataclass
class FoldOutcome:
    fold: int
    result: ClassifierTrainingResult
    predictions: pd.DataFrame
    val: dict[str, float]
    test: dict[str, float]


def fold_seed(seed: int, arch: str, modality: str, view: str, fold: int) -> int:
    """Each (arch, modality, view, fold) draws its own, reproducible random stream."""
    return derive_seed(seed, ARCHITECTURES.index(arch), MODALITIES.index(modality), VIEWS.index(view), fold)


def labelled_dataset(images: np.ndarray, frame: pd.DataFrame, seed: int, augment: bool,
                     strength: float = 1.0) -> LabelledImageDataset:
    """Images of ``frame`` with labels ``y``; paper 5.1 augmentation scaled by ``strength`` when ``augment``."""
    transform = AffineAugment(strength) if augment and strength > 0 else None
    return LabelledImageDataset(images, frame["row"].to_numpy(), frame["y"].to_numpy(), augment=transform, seed=seed)


FoldEpochCallback = Callable[[int, int, dict[str, float]], None]
"""``(fold, epoch, metrics)`` after each epoch's checkpoint is saved; raising stops training
(a time budget, Optuna pruning) and the next run of the stage resumes from that checkpoint."""


def _epoch_logger(run, images: np.ndarray, val: pd.DataFrame, batch_size: int, device: str, fold: int,
                  extra: FoldEpochCallback | None):
    """on_epoch_end: per-epoch losses, learning rate and validation AUC/MCC (lesion level), then ``extra``."""

    def on_epoch_end(epoch: int, epoch_metrics: dict[str, float], state: EpochState) -> None:
        if run is not None:
            p = predict_proba(state.models["classifier"], images, val["row"].to_numpy(), batch_size, device)
            scores = score_metrics(val, p)
            run.log_metrics({**{k.replace("/", "_"): v for k, v in epoch_metrics.items()},
                             "val_auc": scores["auc"], "val_mcc": scores["mcc"]}, step=epoch)
        if extra is not None:
            extra(fold, epoch, epoch_metrics)

    return on_epoch_end


def inputs_key(images: np.ndarray, train: pd.DataFrame, val: pd.DataFrame) -> str:
    """Hash of the exact images a fold trains and early-stops on: ids and pixels.

    The trainer's checkpoint fingerprint covers config, seed and data *sizes*; a change of
    preprocessing (another image size or window) keeps the sizes and would otherwise resume,
    or return as finished, a model trained on other pixels.
    """
    digest = hashlib.sha256()
    for frame in (train, val):
        digest.update("\n".join(frame["image_id"].astype(str)).encode())
        digest.update(np.ascontiguousarray(images[np.sort(frame["row"].to_numpy())]).tobytes())
    return digest.hexdigest()


def discard_stale_checkpoint(ckpt: Path, key: str) -> None:
    """Remove ``ckpt`` unless it was written for the inputs ``key``; then record ``key`` in it."""
    key_file = ckpt / INPUTS_KEY_FILE
    if ckpt.exists() and (not key_file.is_file() or key_file.read_text().strip() != key):
        print(f"{STAGE}: discarding checkpoint {ckpt} of other input images", file=sys.stderr)
        shutil.rmtree(ckpt)
    write_text(key_file, key + "\n")


def train_with_resume(model: torch.nn.Module, train_ds, val_ds, cfg: ClassifierConfig, seed: int, ckpt: Path,
                      callback, device: str) -> ClassifierTrainingResult:
    """train_classifier, resuming from ``ckpt``; a checkpoint of another configuration is discarded.

    The model folder persists between ``dvc repro`` runs so that a killed run resumes; after a
    change of params or data its checkpoints belong to another run and are stale.
    """
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        return train_classifier(model, train_ds, val_ds, cfg, seed, checkpoint_dir=ckpt, on_epoch_end=callback,
                                device=device)
    except CheckpointError as exc:
        print(f"{STAGE}: discarding stale checkpoint ({exc})", file=sys.stderr)
        for stale in ckpt.glob("*.pt"):
            stale.unlink()
        model.load_state_dict(initial)
        return train_classifier(model, train_ds, val_ds, cfg, seed, checkpoint_dir=ckpt, on_epoch_end=callback,
                                device=device)


def prediction_rows(frame: pd.DataFrame, p: np.ndarray, arch: str, fold: int, subset: str) -> pd.DataFrame:
    """Rows of the predictions file (PREDICTION_COLUMNS) for the images of ``frame``."""
    return pd.DataFrame({
        "arch": arch, "modality": frame["modality"].to_numpy(), "view": frame["view"].to_numpy(), "fold": fold,
        "subset": subset, "lesion_id": frame["lesion_id"].to_numpy(), "patient_id": frame["patient_id"].to_numpy(),
        "acr": frame["acr"].to_numpy(), "label": frame["y"].to_numpy(), "source": frame["source"].to_numpy(),
        "image_id": frame["image_id"].to_numpy(), "p_malignant": p,
    }, columns=list(PREDICTION_COLUMNS))


@dataclass(frozen=True)
class Classifier:
    """Which f_{m,v} this stage trains."""

    arch: str
    modality: str
    view: str

    @property
    def label(self) -> str:
        return f"{self.arch} {self.modality}-{self.view}"

    @property
    def tags(self) -> dict[str, str]:
        return {"arch": self.arch, "modality": self.modality, "view": self.view}


def train_fold(paths: ProjectPaths, params: Params, which: Classifier, fold: int, images: np.ndarray,
               real: dict[str, pd.DataFrame], synthetic: dict[str, pd.DataFrame], imputed: np.ndarray | None,
               run, device: str, epoch_callback: FoldEpochCallback | None = None) -> FoldOutcome:
    """Train, save and score the classifier of one fold; log to ``run`` (None: no MLflow)."""
    cfg = params.classifier
    seed = fold_seed(params.seed, which.arch, which.modality, which.view, fold)
    for frame in (*real.values(), *synthetic.values()):
        check_single_input(frame, which.modality, which.view)
    model = build_classifier(which.arch, cfg.weights_file, seed=seed)
    ckpt = checkpoint_dir(paths, which.arch, which.modality, which.view, fold)
    discard_stale_checkpoint(ckpt, inputs_key(images, real["train"], real["val"]))
    result = train_with_resume(
        model, labelled_dataset(images, real["train"], seed, cfg.augment, cfg.augment_strength),
        labelled_dataset(images, real["val"], seed, False),
        cfg, seed, ckpt,
        _epoch_logger(run, images, real["val"], cfg.batch_size, device, fold, epoch_callback), device,
    )
    weights = fold_weights_path(paths, which.arch, which.modality, which.view, fold)
    save_classifier_weights(weights, result.state, arch=which.arch, modality=which.modality, view=which.view,
                            fold=fold, image_size=int(images.shape[1]), best_epoch=result.best_epoch)
    parts, scores = [], {}
    for subset in SCORED_SUBSETS:
        p = predict_proba(model, images, real[subset]["row"].to_numpy(), cfg.batch_size, device)
        parts.append(prediction_rows(real[subset], p, which.arch, fold, subset))
        scores[subset] = score_metrics(real[subset], p)
        if imputed is not None and not synthetic[subset].empty:
            p_syn = predict_proba(model, imputed, synthetic[subset]["row"].to_numpy(), cfg.batch_size, device)
            parts.append(prediction_rows(synthetic[subset], p_syn, which.arch, fold, subset))
            scores[subset].update({f"{k}_synthetic": v for k, v in score_metrics(synthetic[subset], p_syn).items()})
    if run is not None:
        run.log_params({**which.tags, "fold": fold, "seed": seed, "image_size": images.shape[1],
                        **{f"images_{k}": len(v) for k, v in real.items()},
                        **{f"synthetic_images_{k}": len(v) for k, v in synthetic.items() if k in SCORED_SUBSETS}})
        run.log_metrics({"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                         "epochs_run": result.epochs_run,
                         **{f"{subset}_{k}": v for subset, s in scores.items() for k, v in s.items()}})
        run.log_artifact(weights, "weights")
    return FoldOutcome(fold, result, pd.concat(parts, ignore_index=True), scores["val"], scores["test"])


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def _require(paths_and_stages: list[tuple[Path, str]]) -> None:
    for path, stage in paths_and_stages:
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (run the {stage} stage first)")


def read_inputs(paths: ProjectPaths, modality: str) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame,
                                                            np.ndarray | None, pd.DataFrame | None]:
    """Processed images and index, folds, and (for CESM) the imputed images and index."""
    _require([(paths.processed_images, "preprocess"), (paths.processed_index, "preprocess"), (paths.splits, "split")])
    text = {"image_id": str, "patient_id": str, "study_id": str, "source_image_id": str}
    index = pd.read_csv(paths.processed_index, dtype=text, keep_default_na=False)
    folds = pd.read_csv(paths.splits, dtype={"patient_id": str})
    if modality != "CESM":
        return open_images(paths.processed_images), index, folds, None, None
    _require([(imputed_images_path(paths), "impute"), (imputed_index_path(paths), "impute")])
    imputed_index = pd.read_csv(imputed_index_path(paths), dtype=text, keep_default_na=False)
    return (open_images(paths.processed_images), index, folds, open_images(imputed_images_path(paths)),
            imputed_index)


def summarize(which: Classifier, outcomes: list[FoldOutcome]) -> dict[str, Any]:
    """val_mcc.json: per-fold validation MCC (the fusion weights) and AUC, with test metrics beside."""
    per_fold = [{"fold": o.fold, "val_mcc": o.val["mcc"], "val_auc": o.val["auc"], "test_mcc": o.test["mcc"],
                 "test_auc": o.test["auc"], "best_epoch": o.result.best_epoch, "epochs_run": o.result.epochs_run}
                for o in outcomes]
    return {**which.tags, "folds": per_fold,
            "mean": {k: metrics.mean_and_sem([f[k] for f in per_fold])[0]
                     for k in ("val_mcc", "val_auc", "test_mcc", "test_auc")}}


def run_train_classifier(paths: ProjectPaths, params: Params, arch: str, modality: str, view: str,
                         device: str = "cpu", use_mlflow: bool = True,
                         epoch_callback: FoldEpochCallback | None = None) -> dict[str, Any]:
    """Train every fold of f_{modality,view}; write weights, val_mcc.json and predictions; return the summary.

    ``epoch_callback(fold, epoch, metrics)`` runs after every epoch (see :data:`FoldEpochCallback`).
    """
    for value, allowed, name in ((arch, ARCHITECTURES, "architecture"), (modality, MODALITIES, "modality"),
                                 (view, VIEWS, "view")):
        if value not in allowed:
            raise ClassifierStageError(f"unknown {name} {value!r}; choose from {allowed}")
    which = Classifier(arch, modality, view)
    try:
        resolved = resolve_device(device)
    except (ValueError, RuntimeError) as exc:  # unknown device string, or CUDA asked for but absent
        raise ClassifierStageError(str(exc)) from exc
    # Under torchrun: join the process group first; only rank 0 logs to MLflow and writes files.
    device = str(distributed.rank_device(resolved, distributed.init_from_env(resolved)))
    main_process = distributed.is_main_process()
    images, index, folds, imputed, imputed_index = read_inputs(paths, modality)
    real = biopsy_images(index, modality, view)
    if real.empty:
        raise ClassifierStageError(f"{paths.processed_index}: no early-phase biopsied {modality} {view} images")
    synthetic = synthetic_images(imputed_index, index, view) if imputed_index is not None else None
    from virtual_biopsy import tracking

    stage = (tracking.stage_run(STAGE, root=paths.root, params=params, tags=which.tags,
                                run_name=f"{STAGE} {which.label}") if use_mlflow and main_process
             else nullcontext(None))
    with stage as run:
        outcomes = []
        for fold in sorted(int(k) for k in folds["fold"].unique()):
            patients = patient_subsets(folds, fold)
            real_parts = split_images(real, patients, fold, require=SUBSETS)
            synthetic_parts = (split_images(synthetic, patients, fold, require=()) if synthetic is not None
                               else {name: real.iloc[:0] for name in SUBSETS})
            child = (run.child(f"{which.label} fold {fold}", tags={**which.tags, "fold": fold}) if run
                     else nullcontext(None))
            with child as fold_run:
                outcomes.append(train_fold(paths, params, which, fold, images, real_parts, synthetic_parts, imputed,
                                           fold_run, device, epoch_callback))
        summary = summarize(which, outcomes)
        if not main_process:
            return summary
        write_json(val_mcc_path(paths, arch, modality, view), summary)
        predictions = pd.concat([o.predictions for o in outcomes], ignore_index=True)
        write_csv(predictions_path(paths, arch, modality, view), predictions)
        if run is not None:
            run.log_metrics({f"mean_{k}": v for k, v in summary["mean"].items()})
            run.log_artifact(val_mcc_path(paths, arch, modality, view), STAGE)
            run.log_artifact(predictions_path(paths, arch, modality, view), STAGE)
    # Every fold finished: its checkpoints (full optimiser state, ~180 MB for resnet18) only served
    # to resume an interrupted run. Removing them keeps them out of the DVC cache.
    shutil.rmtree(classifier_dir(paths, arch, modality, view) / "checkpoints", ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES, help="network architecture")
    parser.add_argument("--modality", required=True, choices=MODALITIES, help="FFDM (LE) or CESM (DES)")
    parser.add_argument("--view", required=True, choices=VIEWS, help="mammographic view")
    parser.add_argument("--device", default=None,
                        help="torch device: auto, cpu, cuda, cuda:1 ... (default: classifier.device in params)")
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        summary = run_train_classifier(paths, params, args.arch, args.modality, args.view,
                                       args.device or params.classifier.device, use_mlflow=not args.no_mlflow)
        main_process = distributed.is_main_process()
    except (ConfigError, ClassifierStageError, WeightsFileError, FileNotFoundError, pd.errors.ParserError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if not main_process:
        return 0
    mean = summary["mean"]
    print(f"{STAGE} {args.arch} {args.modality}-{args.view}: val MCC {mean['val_mcc']:.3f}, "
          f"test AUC {mean['test_auc']:.3f}, test MCC {mean['test_mcc']:.3f} over {len(summary['folds'])} folds "
          f"-> {predictions_path(paths, args.arch, args.modality, args.view)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
