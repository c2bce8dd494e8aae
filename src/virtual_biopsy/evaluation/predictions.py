"""The predictions contract between the train_classifier stage and the evaluation, and its reader.

``outputs/predictions/<arch>/<MODALITY>_<VIEW>.csv`` (see :func:`predictions_path`), one row per
scored image, columns :data:`PREDICTION_COLUMNS`:

===========  ==================================================================================
arch         resnet18 | resnet50 | vgg16 (as in the folder name)
modality     FFDM | CESM: the classifier f_{m,v} that scored the image (as in the file name)
view         CC | MLO (as in the file name)
fold         int, the cross-validation fold whose model scored the image
subset       val | test: the image's subset in that fold (train images are not scored)
lesion_id    patient|study|laterality: one breast's early-phase lesion; the unit of evaluation
patient_id   pseudonymous patient id (robustness draws pick patients)
acr          a | b | c | d, or empty when not reported
label        1 malignant, 0 benign (biopsy)
source       real | synthetic: CESM classifiers score the real DES image and the CESM imputed
             from the same study's LE image (paper: C and Ĉ); FFDM rows are always real
image_id     pseudonymous SOPInstanceUID of the scored image (for synthetic rows: of the LE input)
p_malignant  f_{m,v}(X) in [0, 1]
===========  ==================================================================================

Generator reports: ``reports/generator/<VIEW>.json`` (see :func:`generator_report_path`) =
``{"view": "CC", "folds": [{"fold": k, "mse", "psnr", "ssim", "baseline_ssim", "baseline_psnr"}]}``
with test-set means per fold (baseline: the LE image itself taken as the CESM estimate).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from virtual_biopsy.core.paths import ProjectPaths

PREDICTION_COLUMNS = (
    "arch", "modality", "view", "fold", "subset", "lesion_id", "patient_id", "acr",
    "label", "source", "image_id", "p_malignant",
)
SUBSETS = ("val", "test")
SOURCES = ("real", "synthetic")
GENERATOR_FOLD_KEYS = ("fold", "mse", "psnr", "ssim", "baseline_ssim", "baseline_psnr")
# Lesion-aware keys (scoring.lesion_aware_quality), present when preprocess wrote lesion masks.
GENERATOR_LESION_KEYS = tuple(f"{prefix}{k}" for prefix in ("", "baseline_") for k in (
    "breast_mse", "breast_psnr", "breast_ssim", "enhancement_error", "abs_enhancement_error",
    "contrast_ratio_real", "contrast_ratio_predicted", "contrast_ratio_share")) + ("lesion_images",)
_TEXT_COLUMNS = ("arch", "modality", "view", "subset", "lesion_id", "patient_id", "acr", "source", "image_id")


class PredictionsError(ValueError):
    """A predictions or generator-report file breaks the contract; the message names the file."""


def predictions_path(paths: ProjectPaths, arch: str, modality: str, view: str) -> Path:
    """``outputs/predictions/<arch>/<MODALITY>_<VIEW>.csv``: what train_classifier writes for f_{m,v}."""
    return paths.predictions_dir / arch / f"{modality}_{view}.csv"


def generator_report_path(paths: ProjectPaths, view: str) -> Path:
    """``reports/generator/<VIEW>.json``: per-fold test MSE/PSNR/SSIM of the view's generator."""
    return paths.reports / "generator" / f"{view}.json"


def read_predictions_file(path: Path, arch: str, modality: str, view: str) -> pd.DataFrame:
    """Read one predictions CSV and check it against the contract (errors name the file)."""
    if not path.exists():
        raise PredictionsError(f"{path}: no such predictions file (run the train_classifier stage first)")
    try:
        frame = pd.read_csv(path, dtype={c: "string" for c in _TEXT_COLUMNS}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PredictionsError(f"{path}: not a readable CSV ({exc})") from exc
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise PredictionsError(f"{path}: missing column(s) {missing}; expected {list(PREDICTION_COLUMNS)}")
    frame = frame[list(PREDICTION_COLUMNS)].copy()
    _check_values(frame, path, arch, modality, view)
    frame["fold"] = frame["fold"].astype(int)
    frame["label"] = frame["label"].astype(int)
    frame["p_malignant"] = frame["p_malignant"].astype(float)
    for column in _TEXT_COLUMNS:
        frame[column] = frame[column].astype(str)
    return frame


def _check_values(frame: pd.DataFrame, path: Path, arch: str, modality: str, view: str) -> None:
    def bad(why: str) -> None:
        raise PredictionsError(f"{path}: {why}")

    if frame.empty:
        bad("holds no predictions")
    for column, expected in (("arch", arch), ("modality", modality), ("view", view)):
        found = sorted(set(frame[column]) - {expected})
        if found:
            bad(f"column {column} must be {expected!r} (from the file's path), found {found}")
    for column, allowed in (("subset", SUBSETS), ("source", SOURCES)):
        found = sorted(set(frame[column]) - set(allowed))
        if found:
            bad(f"column {column} must be one of {allowed}, found {found}")
    if modality == "FFDM" and (frame["source"] != "real").any():
        bad("FFDM predictions must all have source 'real'")
    for column in ("fold", "label", "p_malignant"):
        if pd.to_numeric(frame[column], errors="coerce").isna().any():
            bad(f"column {column} holds empty or non-numeric values")
    if not frame["label"].astype(float).isin((0, 1)).all():
        bad("column label must be 1 (malignant) or 0 (benign)")
    if (frame["fold"].astype(float) % 1 != 0).any():
        bad("column fold must hold integers")
    p = frame["p_malignant"].astype(float)
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        bad("column p_malignant must lie in [0, 1]")
    if (frame["lesion_id"] == "").any() or (frame["patient_id"] == "").any():
        bad("columns lesion_id and patient_id must not be empty")


def load_predictions(paths: ProjectPaths, architectures: Iterable[str], modalities: Iterable[str],
                     views: Iterable[str]) -> pd.DataFrame:
    """All predictions of the configured classifiers as one frame (PREDICTION_COLUMNS)."""
    frames = [
        read_predictions_file(predictions_path(paths, arch, modality, view), arch, modality, view)
        for arch in architectures for modality in modalities for view in views
    ]
    return pd.concat(frames, ignore_index=True)


def load_generator_reports(paths: ProjectPaths, views: Iterable[str]) -> dict[str, list[dict[str, float]]]:
    """Per-view list of per-fold generator metrics, checked against the contract."""
    reports: dict[str, list[dict[str, float]]] = {}
    for view in views:
        path = generator_report_path(paths, view)
        if not path.exists():
            raise PredictionsError(f"{path}: no such generator report (run the train_generator stage first)")
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PredictionsError(f"{path}: not valid JSON ({exc})") from exc
        folds = report.get("folds") if isinstance(report, dict) else None
        if not folds or not isinstance(folds, list):
            raise PredictionsError(f"{path}: needs a non-empty list under 'folds'")
        for i, entry in enumerate(folds):
            missing = [k for k in GENERATOR_FOLD_KEYS if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise PredictionsError(f"{path}: folds[{i}] lacks {missing}")
        reports[view] = [{k: float(entry[k]) for k in (*GENERATOR_FOLD_KEYS, *GENERATOR_LESION_KEYS)
                          if k in GENERATOR_FOLD_KEYS or entry.get(k) is not None} for entry in folds]
    return reports


def load_ceilings(paths: ProjectPaths) -> pd.DataFrame | None:
    """The observer_ceiling stage's table (evaluation.ceilings), or None when that stage has not run
    (an evaluation of a project without it has no ceiling rows; the DVC pipeline always runs it)."""
    path = paths.ceilings_dir / "ceilings.csv"
    if not path.exists():
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()

