"""DVC stage train_generator: one CycleGAN LE -> DES generator per fold for one view (paper 5.2).

    python -m virtual_biopsy.stages.train_generator --view CC [--root .] [--params params.yaml]

Data
    Every LE/DES pair of the view (all phases, all labels: the generation task uses every pair,
    DESIGN.md), paired by ``pair_key``. Fold k trains on its train patients, early-stops on the
    paired L1 loss of its val patients, and is evaluated on its test patients: MSE, PSNR and SSIM
    of G(LE) against the real DES image (metrics.py, per image, averaged), next to the trivial
    baseline "the LE image itself as CESM" (paper Table 3 reads against it).

Outputs
    models/generator/<VIEW>/checkpoints/fold<k>/last.pt   per-epoch checkpoint (resume after a kill)
    models/generator/<VIEW>/fold<k>.pt                    best weights of fold k (impute reads these)
    models/generator/<VIEW>/serving.pt                    the serving generator (see below)
    reports/generator/<VIEW>.json                         per-fold and mean test metrics (Table 3)
    reports/generator/figure3_<VIEW>.png                  Figure-3-like grid, one row per ACR category

Serving generator (``generator.serving_policy``)
    ``best_fold``: the fold model with the highest *validation* SSIM. Choosing on validation, not
        test, keeps the reported test metrics an unbiased estimate for the chosen model.
    ``refit``: one more generator trained on every patient except fold 0's validation patients,
        which still drive early stopping. It has seen every test patient, so its quality is the
        cross-validated mean, reported as such.
    It is registered as ``cesm-generator-<view>`` (float32 tensor (-1, 1, S, S) in and out) with
    alias ``challenger``; the gate decides about ``champion``.

MLflow: a stage run tagged with the view, one child run per fold (params, per-epoch losses, sample
grids every ``sample_every`` epochs, test metrics, weights and checkpoint), and a ``serving`` child
run that holds the registered model.

Device and processes: ``--device`` (default ``generator.device``; ``auto`` is CUDA when present).
Under ``torchrun --nproc_per_node=N`` every rank trains its share of each global batch
(``training.distributed``); only rank 0 logs to MLflow, registers the model and writes weights,
reports and figures.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from virtual_biopsy import metrics
from virtual_biopsy.atomic import atomic_path, write_json, write_torch
from virtual_biopsy.config import ACR_CATEGORIES, VIEWS, ConfigError, GeneratorConfig, Params
from virtual_biopsy.models.cyclegan import ResnetGenerator
from virtual_biopsy.paths import ProjectPaths
from virtual_biopsy.stages.common import stage_inputs, stage_parser
from virtual_biopsy.training import distributed
from virtual_biopsy.training.augment import AffineAugment
from virtual_biopsy.training.checkpoint import CheckpointError
from virtual_biopsy.training.datasets import PairedImageDataset, derive_seed, open_images
from virtual_biopsy.training.generator_trainer import (
    GeneratorTrainingResult,
    generate,
    train_cyclegan,
)
from virtual_biopsy.training.loop import EpochState, resolve_device

STAGE = "train_generator"
METRIC_NAMES = ("mse", "psnr", "ssim")
SAMPLE_ROWS = 4  # pairs shown in each per-epoch sample grid
SIGNATURE_BATCH = 2  # an export example of 2 keeps the batch dimension of the graph dynamic


class GeneratorStageError(ValueError):
    """The inputs cannot train a generator (missing files, no pairs for a view or subset)."""


# ---------------------------------------------------------------------------------------------
# Where things go
# ---------------------------------------------------------------------------------------------
def generator_dir(paths: ProjectPaths, view: str) -> Path:
    return paths.models_dir / "generator" / view


def fold_weights_path(paths: ProjectPaths, view: str, fold: int) -> Path:
    return generator_dir(paths, view) / f"fold{fold}.pt"


def serving_weights_path(paths: ProjectPaths, view: str) -> Path:
    return generator_dir(paths, view) / "serving.pt"


def checkpoint_dir(paths: ProjectPaths, view: str, name: str) -> Path:
    return generator_dir(paths, view) / "checkpoints" / name


def report_path(paths: ProjectPaths, view: str) -> Path:
    return paths.reports / "generator" / f"{view}.json"


def figure3_path(paths: ProjectPaths, view: str) -> Path:
    return paths.reports / "generator" / f"figure3_{view}.png"


# ---------------------------------------------------------------------------------------------
# Generator weight files (self-describing: impute rebuilds the network without params.yaml)
# ---------------------------------------------------------------------------------------------
def save_generator_weights(path: Path, state: dict[str, torch.Tensor], cfg: GeneratorConfig, **info: Any) -> None:
    """Write a generator's state dict with what is needed to rebuild it (architecture, size, view, fold)."""
    record = {"state_dict": state, "ngf": cfg.ngf, "n_residual_blocks": cfg.n_residual_blocks, **info}
    write_torch(path, record)


def load_generator_weights(path: Path) -> tuple[ResnetGenerator, dict[str, Any]]:
    """Rebuild the generator saved by :func:`save_generator_weights`; returns (network, info)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such generator weights file (run the train_generator stage)")
    record = torch.load(path, map_location="cpu", weights_only=True)
    generator = ResnetGenerator(channels=1, ngf=int(record["ngf"]), n_residual_blocks=int(record["n_residual_blocks"]))
    generator.load_state_dict(record["state_dict"])
    generator.eval()
    info = {k: v for k, v in record.items() if k != "state_dict"}
    return generator, info


# ---------------------------------------------------------------------------------------------
# Data: pairs of one view, split by fold
# ---------------------------------------------------------------------------------------------
def view_pairs(index: pd.DataFrame, view: str) -> pd.DataFrame:
    """One row per LE/DES pair of ``view``: pair_key, patient_id, acr, label, phase, le_row, des_row.

    Every phase and label is kept. A pair key with other than exactly one LE and one DES image
    is an error naming the key (ingest's ``require_pairs`` should have rejected it).
    """
    rows = index[index["view"] == view]
    counts = rows.groupby(["pair_key", "modality"]).size().unstack(fill_value=0)
    for modality in ("FFDM", "CESM"):
        if modality not in counts:
            counts[modality] = 0
    bad = counts[(counts["FFDM"] != 1) | (counts["CESM"] != 1)]
    if len(bad):
        raise GeneratorStageError(
            f"view {view}: pair key(s) {bad.index[:3].tolist()} do not hold exactly one LE and one DES image"
        )
    le = rows[rows["modality"] == "FFDM"].set_index("pair_key")
    des = rows[rows["modality"] == "CESM"].set_index("pair_key")
    pairs = le[["patient_id", "acr", "label", "phase", "image_id"]].rename(columns={"image_id": "le_image_id"})
    pairs = pairs.assign(le_row=le["row"].astype(int), des_row=des.loc[le.index, "row"].astype(int))
    return pairs.reset_index().sort_values("pair_key", kind="stable").reset_index(drop=True)


def fold_subsets(pairs: pd.DataFrame, folds: pd.DataFrame, fold: int) -> dict[str, pd.DataFrame]:
    """The pairs of fold ``fold`` split into train/val/test by patient (folds.csv)."""
    subset_of = folds[folds["fold"] == fold].set_index("patient_id")["subset"]
    missing = sorted(set(pairs["patient_id"]) - set(subset_of.index))
    if missing:
        raise GeneratorStageError(f"fold {fold}: patient(s) {missing[:3]} have pairs but no split (rerun split)")
    subset = pairs["patient_id"].map(subset_of)
    out = {name: pairs[subset == name].reset_index(drop=True) for name in ("train", "val", "test")}
    for name, part in out.items():
        if part.empty:
            raise GeneratorStageError(f"fold {fold}: no LE/DES pairs in the {name} subset")
    return out


def paired_dataset(images: np.ndarray, pairs: pd.DataFrame, cfg: GeneratorConfig, seed: int,
                   augment: bool) -> PairedImageDataset:
    return PairedImageDataset(images, pairs["le_row"].to_numpy(), pairs["des_row"].to_numpy(),
                              augment=AffineAugment() if augment and cfg.augment else None, seed=seed)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def image_quality(real: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Mean per-image MSE, PSNR and SSIM of ``predicted`` against ``real`` (both (N, S, S))."""
    per_image = {name: [getattr(metrics, name)(r, p) for r, p in zip(real, predicted)] for name in METRIC_NAMES}
    return {name: float(np.mean(values)) for name, values in per_image.items()}


def evaluate_generator(generator: torch.nn.Module, images: np.ndarray, pairs: pd.DataFrame,
                       batch_size: int, device: str) -> tuple[dict[str, float], np.ndarray]:
    """Quality of G(LE) and of the LE-as-CESM baseline on ``pairs``; also returns G(LE)."""
    le = np.asarray(images[pairs["le_row"].to_numpy()], dtype=np.float32)
    des = np.asarray(images[pairs["des_row"].to_numpy()], dtype=np.float32)
    synthetic = generate(generator, le, batch_size=batch_size, device=device)
    quality = image_quality(des, synthetic)
    baseline = image_quality(des, le)
    return {**quality, **{f"baseline_{k}": v for k, v in baseline.items()}}, synthetic


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------
def sample_grid(le: np.ndarray, des: np.ndarray, synthetic: np.ndarray) -> np.ndarray:
    """uint8 image: one row per pair, columns LE | real DES | synthetic DES, 2 px gaps."""
    rows = []
    for a, b, c in zip(le, des, synthetic):
        gap = np.ones((a.shape[0], 2), dtype=np.float32)
        rows.append(np.concatenate([a, gap, b, gap, c], axis=1))
        rows.append(np.ones((2, rows[-1].shape[1]), dtype=np.float32))
    grid = np.concatenate(rows[:-1], axis=0)
    return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def figure3(path: Path, view: str, examples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Paper Figure 3 for one view: FFDM input | real CESM | synthetic CESM, one row per ACR category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 3, figsize=(6.6, 2.2 * len(examples)), squeeze=False)
    for row, (acr, le, des, synthetic) in enumerate(examples):
        for col, (title, image) in enumerate((("FFDM (input)", le), ("real CESM", des), ("synthetic CESM", synthetic))):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"ACR {acr}", fontsize=9)
    fig.suptitle(f"{view}: out-of-fold synthetic CESM (test patients)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def figure3_examples(test_sets: list[tuple[pd.DataFrame, np.ndarray]], images: np.ndarray
                     ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """One test pair per ACR category (early-phase lesion pairs preferred), with its out-of-fold G(LE)."""
    candidates = []
    for pairs, synthetic in test_sets:
        for i, pair in pairs.iterrows():
            candidates.append((pair, synthetic[i]))
    examples = []
    for acr in (*ACR_CATEGORIES, ""):
        matching = [(p, s) for p, s in candidates if _acr(p["acr"]) == acr]
        if not matching:
            continue
        matching.sort(key=lambda ps: (ps[0]["phase"] != "early", ps[0]["label"] not in ("malignant", "benign"),
                                      ps[0]["pair_key"]))
        pair, synthetic = matching[0]
        examples.append((acr or "n/r", images[pair["le_row"]], images[pair["des_row"]], synthetic))
    return examples


def _acr(value: Any) -> str:
    return "" if pd.isna(value) else str(value)


# ---------------------------------------------------------------------------------------------
# Training one fold
# ---------------------------------------------------------------------------------------------
@dataclass
class FoldOutcome:
    fold: int
    result: GeneratorTrainingResult
    test: dict[str, float]
    val_ssim: float
    test_pairs: pd.DataFrame
    test_synthetic: np.ndarray


def _epoch_logger(run, images: np.ndarray, val_pairs: pd.DataFrame, cfg: GeneratorConfig, device: str):
    """on_epoch_end callback: per-epoch losses, and a sample grid every ``cfg.sample_every`` epochs."""
    shown = val_pairs.head(SAMPLE_ROWS)
    le = np.asarray(images[shown["le_row"].to_numpy()], dtype=np.float32)
    des = np.asarray(images[shown["des_row"].to_numpy()], dtype=np.float32)

    def on_epoch_end(epoch: int, epoch_metrics: dict[str, float], state: EpochState) -> None:
        if run is None:
            return
        run.log_metrics({k.replace("/", "_"): v for k, v in epoch_metrics.items()}, step=epoch)
        if cfg.sample_every > 0 and ((epoch + 1) % cfg.sample_every == 0 or epoch == 0):
            synthetic = generate(state.models["generator_ab"], le, batch_size=cfg.batch_size, device=device)
            with tempfile.TemporaryDirectory() as tmp:
                png = Path(tmp) / f"epoch_{epoch:03d}.png"
                write_png(png, sample_grid(le, des, synthetic))
                run.log_artifact(png, "samples")

    return on_epoch_end


def train_with_resume(train_ds, val_ds, cfg: GeneratorConfig, seed: int, ckpt: Path, callback, device: str
                      ) -> GeneratorTrainingResult:
    """train_cyclegan, resuming from ``ckpt``; a checkpoint of another configuration is discarded.

    Under ``dvc repro`` the model folder persists between runs so that a killed run resumes; when
    params or data changed, its checkpoints belong to another run and are stale, not resumable.
    """
    try:
        return train_cyclegan(train_ds, val_ds, cfg, seed, checkpoint_dir=ckpt, on_epoch_end=callback, device=device)
    except CheckpointError as exc:
        print(f"{STAGE}: discarding stale checkpoint ({exc})", file=sys.stderr)
        shutil.rmtree(ckpt, ignore_errors=True)
        return train_cyclegan(train_ds, val_ds, cfg, seed, checkpoint_dir=ckpt, on_epoch_end=callback, device=device)


def fold_seed(seed: int, view: str, fold: int) -> int:
    return derive_seed(seed, VIEWS.index(view), fold)


def train_fold(paths: ProjectPaths, params: Params, view: str, fold: int, images: np.ndarray,
               subsets: dict[str, pd.DataFrame], run, device: str) -> FoldOutcome:
    """Train, evaluate and save the generator of one fold; log to ``run`` (None: no MLflow)."""
    cfg = params.generator
    seed = fold_seed(params.seed, view, fold)
    train_ds = paired_dataset(images, subsets["train"], cfg, seed, augment=True)
    val_ds = paired_dataset(images, subsets["val"], cfg, seed, augment=False)
    ckpt = checkpoint_dir(paths, view, f"fold{fold}")
    callback = _epoch_logger(run, images, subsets["val"], cfg, device)
    result = train_with_resume(train_ds, val_ds, cfg, seed, ckpt, callback, device)
    generator = ResnetGenerator(channels=1, ngf=cfg.ngf, n_residual_blocks=cfg.n_residual_blocks)
    generator.load_state_dict(result.generator_state)
    val_quality, _ = evaluate_generator(generator, images, subsets["val"], cfg.batch_size, device)
    test, synthetic = evaluate_generator(generator, images, subsets["test"], cfg.batch_size, device)
    weights = fold_weights_path(paths, view, fold)
    if distributed.is_main_process():
        save_generator_weights(weights, result.generator_state, cfg, view=view, fold=fold,
                               image_size=int(images.shape[1]), best_epoch=result.best_epoch)
    if run is not None:
        run.log_params({"view": view, "fold": fold, "seed": seed, "image_size": images.shape[1],
                        **{f"pairs_{k}": len(v) for k, v in subsets.items()}})
        run.log_metrics({**{f"test_{k}": v for k, v in test.items()}, "val_ssim": val_quality["ssim"],
                         "best_epoch": result.best_epoch, "best_val_l1": result.best_val_loss,
                         "epochs_run": result.epochs_run})
        run.log_artifact(weights, "weights")
        run.log_artifact(ckpt / "last.pt", "checkpoint")
    return FoldOutcome(fold, result, test, val_quality["ssim"], subsets["test"], synthetic)


# ---------------------------------------------------------------------------------------------
# Serving model
# ---------------------------------------------------------------------------------------------
def refit_subsets(pairs: pd.DataFrame, folds: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Refit policy: train on every patient except fold 0's validation patients (early stopping)."""
    val_patients = set(folds[(folds["fold"] == 0) & (folds["subset"] == "val")]["patient_id"])
    is_val = pairs["patient_id"].isin(val_patients)
    return {"train": pairs[~is_val].reset_index(drop=True), "val": pairs[is_val].reset_index(drop=True)}


def serving_generator(paths: ProjectPaths, params: Params, view: str, images: np.ndarray, pairs: pd.DataFrame,
                      folds: pd.DataFrame, outcomes: list[FoldOutcome], device: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict of the serving generator and a description of how it was chosen."""
    cfg = params.generator
    if cfg.serving_policy == "best_fold":
        best = max(outcomes, key=lambda o: o.val_ssim)
        return best.result.generator_state, {
            "policy": "best_fold", "fold": best.fold, "val_ssim": best.val_ssim,
            "test": {k: best.test[k] for k in METRIC_NAMES}, "best_epoch": best.result.best_epoch,
        }
    subsets = refit_subsets(pairs, folds)
    seed = derive_seed(params.seed, VIEWS.index(view), 1000)
    result = train_with_resume(paired_dataset(images, subsets["train"], cfg, seed, augment=True),
                               paired_dataset(images, subsets["val"], cfg, seed, augment=False),
                               cfg, seed, checkpoint_dir(paths, view, "refit"), None, device)
    return result.generator_state, {
        "policy": "refit", "fold": "refit", "best_epoch": result.best_epoch,
        # Seen every test patient: its expected quality is the cross-validated mean.
        "test": {k: float(np.mean([o.test[k] for o in outcomes])) for k in METRIC_NAMES},
        "test_is_cv_mean": True,
    }


def register_serving(run, view: str, state: dict[str, torch.Tensor], cfg: GeneratorConfig, image_size: int,
                     serving: dict[str, Any]) -> dict[str, Any]:
    """Register the serving generator as ``cesm-generator-<view>`` with alias challenger."""
    from virtual_biopsy import registry

    generator = ResnetGenerator(channels=1, ngf=cfg.ngf, n_residual_blocks=cfg.n_residual_blocks)
    generator.load_state_dict(state)
    name = registry.generator_model_name(view)
    example = np.random.default_rng(0).random((SIGNATURE_BATCH, 1, image_size, image_size), dtype=np.float32)
    tags = {
        "view": view, "policy": serving["policy"], "fold": serving["fold"], "image_size": image_size,
        "data_version": run.context.get("data_version"), "git_commit": run.context.get("git_commit"),
        "params_hash": run.context.get("params_hash"),
        **{f"test_{k}": f"{v:.6g}" for k, v in serving["test"].items()},
    }
    with run.child("serving", tags={"view": view, "policy": serving["policy"]}) as serving_run:
        version = registry.log_and_register_pytorch(
            serving_run, generator, "generator", name, example, tags,
            description=f"CycleGAN FFDM->CESM generator, {view} view; serving policy {serving['policy']}",
        )
    registry.set_alias(name, registry.CHALLENGER, version, root=run.root)
    return {"registered_model": name, "version": version, "alias": registry.CHALLENGER}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def read_inputs(paths: ProjectPaths) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    for path, stage in ((paths.processed_images, "preprocess"), (paths.processed_index, "preprocess"),
                        (paths.splits, "split")):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (run the {stage} stage first)")
    return open_images(paths.processed_images), pd.read_csv(paths.processed_index), pd.read_csv(paths.splits)


def summarize(view: str, outcomes: list[FoldOutcome], serving: dict[str, Any]) -> dict[str, Any]:
    """The report the evaluation stage builds Table 3 from."""
    per_fold = [
        {"fold": o.fold, **{k: o.test[k] for k in (*METRIC_NAMES, *(f"baseline_{m}" for m in METRIC_NAMES))},
         "best_epoch": o.result.best_epoch, "epochs_run": o.result.epochs_run, "val_ssim": o.val_ssim,
         "test_pairs": len(o.test_pairs),
         # learning curves (the fold's checkpoints are removed once the stage is done)
         "val_l1_by_epoch": [h["val/l1"] for h in o.result.history],
         "train_loss_g_by_epoch": [h["train/loss_g"] for h in o.result.history]}
        for o in outcomes
    ]
    keys = (*METRIC_NAMES, *(f"baseline_{m}" for m in METRIC_NAMES))
    stats = {k: metrics.mean_and_sem([f[k] for f in per_fold]) for k in keys}
    return {"view": view, "folds": per_fold, "mean": {k: v[0] for k, v in stats.items()},
            "sem": {k: v[1] for k, v in stats.items()}, "serving": serving}


def run_train_generator(paths: ProjectPaths, params: Params, view: str, device: str | None = None,
                        use_mlflow: bool = True) -> dict[str, Any]:
    """Train every fold of ``view``, choose and (with MLflow) register the serving model; return the report.

    ``device`` None: ``generator.device``. Under torchrun every rank calls this; only rank 0 logs,
    registers and writes files (every rank returns the report).
    """
    if view not in VIEWS:
        raise GeneratorStageError(f"unknown view {view!r}; choose from {VIEWS}")
    try:
        resolved = resolve_device(params.generator.device if device is None else device)
    except (ValueError, RuntimeError) as exc:  # unknown device string, or CUDA asked for but absent
        raise GeneratorStageError(str(exc)) from exc
    # Under torchrun: join the process group now (rank 0 alone opens the MLflow run); rank r uses GPU r.
    device = str(distributed.rank_device(resolved, distributed.init_from_env(resolved)))
    main_process = distributed.is_main_process()
    images, index, folds = read_inputs(paths)
    pairs = view_pairs(index, view)
    if pairs.empty:
        raise GeneratorStageError(f"{paths.processed_index}: no LE/DES pairs of view {view}")
    fold_ids = sorted(int(k) for k in folds["fold"].unique())
    from contextlib import nullcontext

    from virtual_biopsy import tracking

    stage = (tracking.stage_run(STAGE, root=paths.root, params=params, tags={"view": view},
                                run_name=f"{STAGE}-{view}") if use_mlflow and main_process else nullcontext(None))
    with stage as run:
        outcomes = []
        for fold in fold_ids:
            subsets = fold_subsets(pairs, folds, fold)
            child = run.child(f"fold-{fold}", tags={"view": view, "fold": fold}) if run else nullcontext(None)
            with child as fold_run:
                outcomes.append(train_fold(paths, params, view, fold, images, subsets, fold_run, device))
        state, serving = serving_generator(paths, params, view, images, pairs, folds, outcomes, device)
        if not main_process:
            return summarize(view, outcomes, serving)
        save_generator_weights(serving_weights_path(paths, view), state, params.generator, view=view,
                               fold=serving["fold"], image_size=int(images.shape[1]), policy=serving["policy"])
        if run is not None:
            serving.update(register_serving(run, view, state, params.generator, int(images.shape[1]), serving))
        report = summarize(view, outcomes, serving)
        write_json(report_path(paths, view), report)
        figure3(figure3_path(paths, view), view,
                figure3_examples([(o.test_pairs, o.test_synthetic) for o in outcomes], images))
        if run is not None:
            run.log_metrics({f"test_{k}": v for k, v in report["mean"].items()})
            run.log_artifact(report_path(paths, view), "generator")
            run.log_artifact(figure3_path(paths, view), "generator")
    # The fold checkpoints only served to resume an interrupted run (each fold's last one is
    # logged to MLflow above); removing them keeps them out of the DVC cache.
    shutil.rmtree(generator_dir(paths, view) / "checkpoints", ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--view", required=True, choices=VIEWS, help="mammographic view")
    parser.add_argument("--device", default=None,
                        help="torch device: auto, cpu, cuda, cuda:1 ... (default: generator.device in params)")
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        report = run_train_generator(paths, params, args.view, args.device, use_mlflow=not args.no_mlflow)
        main_process = distributed.is_main_process()
    except (ConfigError, GeneratorStageError, FileNotFoundError, pd.errors.ParserError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if not main_process:
        return 0
    mean, serving = report["mean"], report["serving"]
    print(f"{STAGE} {args.view}: test SSIM {mean['ssim']:.3f} (LE as CESM {mean['baseline_ssim']:.3f}), "
          f"PSNR {mean['psnr']:.2f} dB (baseline {mean['baseline_psnr']:.2f}); serving: {serving['policy']} "
          f"fold {serving['fold']}" + (f", {serving['registered_model']} v{serving['version']} @challenger"
                                       if "version" in serving else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
