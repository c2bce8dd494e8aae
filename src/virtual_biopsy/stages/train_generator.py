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
        The model folder is one set (core.atomic.atomic_dir): the weights go to a staging folder
        and replace the folder at once when every fold and the serving model are done, so a
        reader never sees folds of two runs and stale files go. The checkpoints stay in the
        model folder, where a resumed run looks for them, and leave with the replaced folder.
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

import contextlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from virtual_biopsy.core.atomic import atomic_dir, staged_path, write_json
from virtual_biopsy.core.config import VIEWS, ConfigError, GeneratorConfig, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import (
    CohortError,
    fold_subsets,
    refit_subsets,
    require_inputs,
    view_pairs,
)
from virtual_biopsy.evaluation.figures import (
    figure3,
    figure3_examples,
    sample_grid,
    write_png,
)
from virtual_biopsy.evaluation.scoring import (
    METRIC_NAMES,
    evaluate_generator,
    summarize_generator_folds,
)
from virtual_biopsy.models.cyclegan import ResnetGenerator
from virtual_biopsy.models.weights import save_generator_weights
from virtual_biopsy.stages.common import relative, stage_inputs, stage_parser
from virtual_biopsy.training import distributed
from virtual_biopsy.training.datasets import (
    derive_seed,
    generator_fold_seed,
    open_images,
    paired_dataset,
)
from virtual_biopsy.training.generator_trainer import (
    GeneratorTrainingResult,
    generate,
    train_cyclegan,
)
from virtual_biopsy.training.loop import EpochState, resolve_device

STAGE = "train_generator"
SAMPLE_ROWS = 4  # pairs shown in each per-epoch sample grid


@dataclass
class FoldOutcome:
    fold: int
    result: GeneratorTrainingResult
    test: dict[str, float]
    val_ssim: float
    test_pairs: pd.DataFrame
    test_synthetic: np.ndarray


def log_fold_inputs(run, paths: ProjectPaths, params: Params, view: str, fold: int,
                    subsets: dict[str, pd.DataFrame]) -> None:
    """The fold run's hyperparameters (the generator section) and, as MLflow datasets, the LE/DES
    pair tables it trains, early-stops and is tested on."""
    from virtual_biopsy.mlops import tracking

    run.log_params(tracking.section_params(params, "generator"))
    run.log_tables(subsets, name=f"LE/DES {view} pairs fold {fold}", targets="label",
                   source={"table": relative(paths.processed_index, paths.root),
                           "images": relative(paths.processed_images, paths.root),
                           "folds": relative(paths.splits, paths.root), "fold": fold})


def _epoch_logger(run, images: np.ndarray, val_pairs: pd.DataFrame, cfg: GeneratorConfig, device: str):
    """on_epoch_end callback: per-epoch losses, and a sample grid every ``cfg.sample_every`` epochs."""
    shown = val_pairs.head(SAMPLE_ROWS)
    le = np.asarray(images[shown["le_row"].to_numpy()], dtype=np.float32)
    des = np.asarray(images[shown["des_row"].to_numpy()], dtype=np.float32)

    def on_epoch_end(epoch: int, epoch_metrics: dict[str, float], state: EpochState) -> None:
        run.log_metrics({k.replace("/", "_"): v for k, v in epoch_metrics.items()}, step=epoch)
        # A sample grid costs a forward pass and a PNG: only when the run is recorded.
        if run and cfg.sample_every > 0 and ((epoch + 1) % cfg.sample_every == 0 or epoch == 0):
            synthetic = generate(state.models["generator_ab"], le, batch_size=cfg.batch_size, device=device)
            with tempfile.TemporaryDirectory() as tmp:
                png = Path(tmp) / f"epoch_{epoch:03d}.png"
                write_png(png, sample_grid(le, des, synthetic))
                run.log_artifact(png, "samples")

    return on_epoch_end


def train_fold(paths: ProjectPaths, params: Params, view: str, fold: int, images: np.ndarray,
               subsets: dict[str, pd.DataFrame], run, device: str, out_dir: Path | None = None) -> FoldOutcome:
    """Train, evaluate and save the generator of one fold (into ``out_dir``, the model folder's
    staging folder, when given); log to ``run``."""
    cfg = params.generator
    seed = generator_fold_seed(params.seed, view, fold)
    train_ds = paired_dataset(images, subsets["train"], cfg, seed, augment=True)
    val_ds = paired_dataset(images, subsets["val"], cfg, seed, augment=False)
    ckpt = paths.generator_checkpoint(view, f"fold{fold}")
    # The model folder outlives a run (a killed one resumes); after a change of params or data its
    # checkpoint belongs to another run: start over.
    result = train_cyclegan(train_ds, val_ds, cfg, seed, checkpoint_dir=ckpt,
                            on_epoch_end=_epoch_logger(run, images, subsets["val"], cfg, device), device=device,
                            restart_if_stale=True)
    generator = ResnetGenerator(channels=1, ngf=cfg.ngf, n_residual_blocks=cfg.n_residual_blocks)
    generator.load_state_dict(result.generator_state)
    val_quality, _ = evaluate_generator(generator, images, subsets["val"], cfg.batch_size, device)
    test, synthetic = evaluate_generator(generator, images, subsets["test"], cfg.batch_size, device)
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
    return FoldOutcome(fold, result, test, val_quality["ssim"], subsets["test"], synthetic)


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


def read_inputs(paths: ProjectPaths) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    require_inputs([(paths.processed_images, "preprocess"), (paths.processed_index, "preprocess"),
                    (paths.splits, "split")])
    return open_images(paths.processed_images), pd.read_csv(paths.processed_index), pd.read_csv(paths.splits)


def run_train_generator(paths: ProjectPaths, params: Params, view: str, device: str | None = None,
                        use_mlflow: bool = True) -> dict[str, Any]:
    """Train every fold of ``view``, choose and (with MLflow) register the serving model; return the report.

    ``device`` None: ``generator.device``. Under torchrun every rank calls this; only rank 0 logs,
    registers and writes files (every rank returns the report).
    """
    from virtual_biopsy.mlops import registry, tracking

    if view not in VIEWS:
        raise CohortError(f"unknown view {view!r}; choose from {VIEWS}")
    try:
        resolved = resolve_device(params.generator.device if device is None else device)
    except (ValueError, RuntimeError) as exc:  # unknown device string, or CUDA asked for but absent
        raise CohortError(str(exc)) from exc
    # Under torchrun: join the process group now (rank 0 alone opens the MLflow run); rank r uses GPU r.
    device = str(distributed.rank_device(resolved, distributed.init_from_env(resolved)))
    main_process = distributed.is_main_process()
    images, index, folds = read_inputs(paths)
    pairs = view_pairs(index, view)
    if pairs.empty:
        raise CohortError(f"{paths.processed_index}: no LE/DES pairs of view {view}")
    with tracking.stage_run(STAGE, root=paths.root, params=params, tags={"view": view}, run_name=f"{STAGE}-{view}",
                            enabled=use_mlflow and main_process) as run, (
            atomic_dir(paths.generator_dir(view)) if main_process else contextlib.nullcontext()) as staged:
        outcomes = []
        for fold in sorted(int(k) for k in folds["fold"].unique()):
            subsets = fold_subsets(pairs, folds, fold)
            with run.child(f"fold-{fold}", tags={"view": view, "fold": fold}) as fold_run:
                log_fold_inputs(fold_run, paths, params, view, fold, subsets)
                outcomes.append(train_fold(paths, params, view, fold, images, subsets, fold_run, device, staged))
        state, serving = serving_generator(paths, params, view, images, pairs, folds, outcomes, device)
        if not main_process:
            return summarize_generator_folds(view, outcomes, serving)
        size = int(images.shape[1])
        save_generator_weights(staged_path(paths.serving_generator(view), paths.generator_dir(view), staged), state,
                               params.generator, view=view, fold=serving["fold"], image_size=size,
                               policy=serving["policy"])
        if run:
            generator = ResnetGenerator(channels=1, ngf=params.generator.ngf,
                                        n_residual_blocks=params.generator.n_residual_blocks)
            generator.load_state_dict(state)
            # The version number is the store's, not the run's: it goes to MLflow (the stage run's
            # registered_version tag) and the console, not into the DVC-tracked report.
            registered = registry.register_generator(run, view, generator, size, serving)
            print(f"{STAGE} {view}: {registered['registered_model']} v{registered['version']} @challenger")
        report = summarize_generator_folds(view, outcomes, serving)
        write_json(paths.generator_report(view), report)
        figure3(paths.figure3(view), view,
                figure3_examples([(o.test_pairs, o.test_synthetic) for o in outcomes], images))
        run.log_metrics({f"test_{k}": v for k, v in report["mean"].items()})
        run.log_artifact(paths.generator_report(view), "generator")
        run.log_artifact(paths.figure3(view), "generator")
    # The swap dropped the fold checkpoints with the replaced folder: they only served to resume
    # an interrupted run (each fold's last one is logged to MLflow above) and stay out of the DVC cache.
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
    except (ConfigError, CohortError, FileNotFoundError, pd.errors.ParserError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if not main_process:
        return 0
    mean, serving = report["mean"], report["serving"]
    print(f"{STAGE} {args.view}: test SSIM {mean['ssim']:.3f} (LE as CESM {mean['baseline_ssim']:.3f}), "
          f"PSNR {mean['psnr']:.2f} dB (baseline {mean['baseline_psnr']:.2f}); serving: {serving['policy']} "
          f"fold {serving['fold']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
