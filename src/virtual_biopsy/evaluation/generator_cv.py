"""Cross-validating one view's LE -> DES generator: train a fold, score it on its patients, choose
the serving generator (paper 5.2, Table 3).

Fold k trains on its train patients' pairs, early-stops on the paired L1 loss of its val pairs and
is scored on its test pairs (MSE, PSNR, SSIM next to the "LE as CESM" baseline, scoring.py). The
serving generator is chosen on validation quality only (``best_fold``) or refitted (``refit``).

``run`` is the fold's tracking run (an mlops StageRun or NullRun); it is only called, never
imported, so this layer stays free of MLflow.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from virtual_biopsy.core.atomic import staged_path
from virtual_biopsy.core.config import VIEWS, GeneratorConfig, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import refit_subsets
from virtual_biopsy.evaluation.figures import sample_grid, write_png
from virtual_biopsy.evaluation.scoring import METRIC_NAMES, evaluate_generator
from virtual_biopsy.models.weights import save_generator_weights
from virtual_biopsy.training import distributed
from virtual_biopsy.training.datasets import derive_seed, generator_fold_seed, open_images, paired_dataset
from virtual_biopsy.training.executor import report_epoch
from virtual_biopsy.training.generator_trainer import (
    GeneratorTrainingResult,
    build_generator,
    generate,
    train_cyclegan,
)
from virtual_biopsy.training.loop import EpochState, resolve_device

SAMPLE_ROWS = 4  # pairs shown in each per-epoch sample grid


@dataclass
class GeneratorFold:
    """One fold's trained generator and its scores (what summarize_generator_folds reads)."""

    fold: int
    result: GeneratorTrainingResult
    test: dict[str, float]
    val_ssim: float
    test_pairs: pd.DataFrame
    test_synthetic: np.ndarray


def generator_epoch_logger(run, images: np.ndarray, val_pairs: pd.DataFrame, cfg: GeneratorConfig, device: str):
    """on_epoch_end callback: per-epoch losses, a progress line, and a sample grid every
    ``cfg.sample_every`` epochs."""
    shown = val_pairs.head(SAMPLE_ROWS)
    le = np.asarray(images[shown["le_row"].to_numpy()], dtype=np.float32)
    des = np.asarray(images[shown["des_row"].to_numpy()], dtype=np.float32)

    def on_epoch_end(epoch: int, epoch_metrics: dict[str, float], state: EpochState) -> None:
        run.log_metrics({k.replace("/", "_"): v for k, v in epoch_metrics.items()}, step=epoch)
        report_epoch(epoch, cfg.epochs, epoch_metrics)
        # A sample grid costs a forward pass and a PNG: only when the run is recorded.
        if run and cfg.sample_every > 0 and ((epoch + 1) % cfg.sample_every == 0 or epoch == 0):
            synthetic = generate(state.models["generator_ab"], le, batch_size=cfg.batch_size, device=device)
            with tempfile.TemporaryDirectory() as tmp:
                png = Path(tmp) / f"epoch_{epoch:03d}.png"
                write_png(png, sample_grid(le, des, synthetic))
                run.log_artifact(png, "samples")

    return on_epoch_end


def train_generator_fold(paths: ProjectPaths, params: Params, view: str, fold: int, images: np.ndarray,
                         subsets: dict[str, pd.DataFrame], run, device: str,
                         out_dir: Path | None = None, masks: np.ndarray | None = None) -> GeneratorFold:
    """Train, score and save the generator of one fold (into ``out_dir``, the model folder's
    staging folder, when given); log to ``run``. Only the main process writes the weights.
    ``masks`` (lesion masks row-aligned with ``images``) add the lesion-aware test metrics."""
    cfg = params.generator.for_view(view, paths.root)  # pretrained_weights of this view ({view})
    seed = generator_fold_seed(params.seed, view, fold)
    train_ds = paired_dataset(images, subsets["train"], cfg, seed, augment=True)
    val_ds = paired_dataset(images, subsets["val"], cfg, seed, augment=False)
    ckpt = paths.generator_checkpoint(view, f"fold{fold}")
    # The model folder outlives a run (a killed one resumes); after a change of params or data its
    # checkpoint belongs to another run: start over.
    result = train_cyclegan(train_ds, val_ds, cfg, seed, checkpoint_dir=ckpt,
                            on_epoch_end=generator_epoch_logger(run, images, subsets["val"], cfg, device),
                            device=device, restart_if_stale=True)
    generator = trained_generator(cfg, result.generator_state)
    val_quality, _ = evaluate_generator(generator, images, subsets["val"], cfg.batch_size, device)
    test, synthetic = evaluate_generator(generator, images, subsets["test"], cfg.batch_size, device, masks=masks)
    weights = paths.generator_weights(view, fold)
    if out_dir is not None:
        weights = staged_path(weights, paths.generator_dir(view), out_dir)
    if distributed.is_main_process():
        save_generator_weights(weights, result.generator_state, cfg, view=view, fold=fold,
                               image_size=int(images.shape[1]), best_epoch=result.best_epoch)
    run.log_params({"view": view, "fold": fold, "seed": seed, "image_size": images.shape[1],
                    **{f"pairs_{k}": len(v) for k, v in subsets.items()}})
    run.log_metrics({**{f"test_{k}": v for k, v in test.items()}, "val_ssim": val_quality["ssim"],
                     "best_epoch": result.best_epoch, "best_val_l1": result.best_val_loss,
                     "epochs_run": result.epochs_run})
    run.log_artifact(weights, "weights")
    run.log_artifact(ckpt / "last.pt", "checkpoint")
    return GeneratorFold(fold, result, test, val_quality["ssim"], subsets["test"], synthetic)


def generator_fold_job(paths: ProjectPaths, params: Params, view: str, fold: int, subsets: dict[str, pd.DataFrame],
                       run, device: str, out_dir: Path | None = None) -> GeneratorFold:
    """:func:`train_generator_fold` as a fold job (training.executor) that may run in another process:
    it opens the processed images and lesion masks memory-mapped from their files, resolves
    ``device`` where it runs, and logs to ``run``, a handed-over run (``attach()`` gives the handle)."""
    images = open_images(paths.processed_images)
    masks = np.load(paths.processed_lesion_masks, mmap_mode="r")
    return train_generator_fold(paths, params, view, fold, images, subsets, run.attach(), str(resolve_device(device)),
                                out_dir, masks=masks)


def trained_generator(cfg: GeneratorConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The LE -> DES generator of ``cfg`` holding ``state``."""
    generator = build_generator(cfg)
    generator.load_state_dict(state)
    return generator


def serving_generator(paths: ProjectPaths, params: Params, view: str, images: np.ndarray, pairs: pd.DataFrame,
                      folds: pd.DataFrame, outcomes: list[GeneratorFold], device: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict of the serving generator and a description of how it was chosen.

    ``best_fold``: the fold with the highest *validation* SSIM; choosing on validation, not test,
    keeps the reported test metrics an unbiased estimate for the chosen model. ``refit``: one more
    generator trained on every patient but fold 0's val patients (which still early-stop it); it
    has seen every test patient, so its quality is reported as the cross-validated mean.
    """
    cfg = params.generator.for_view(view, paths.root)  # pretrained_weights of this view ({view})
    if cfg.serving_policy == "best_fold":
        best = max(outcomes, key=lambda o: o.val_ssim)
        return best.result.generator_state, {
            "policy": "best_fold", "fold": best.fold, "val_ssim": best.val_ssim,
            "test": {k: best.test[k] for k in METRIC_NAMES}, "best_epoch": best.result.best_epoch,
        }
    subsets = refit_subsets(pairs, folds)
    seed = derive_seed(params.seed, VIEWS.index(view), 1000)
    result = train_cyclegan(paired_dataset(images, subsets["train"], cfg, seed, augment=True),
                            paired_dataset(images, subsets["val"], cfg, seed, augment=False), cfg, seed,
                            checkpoint_dir=paths.generator_checkpoint(view, "refit"), device=device,
                            restart_if_stale=True)
    return result.generator_state, {
        "policy": "refit", "fold": "refit", "best_epoch": result.best_epoch,
        # Seen every test patient: its expected quality is the cross-validated mean.
        "test": {k: float(np.mean([o.test[k] for o in outcomes])) for k in METRIC_NAMES},
        "test_is_cv_mean": True,
    }
