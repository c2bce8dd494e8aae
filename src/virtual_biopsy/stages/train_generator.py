"""DVC stage train_generator: one CycleGAN LE -> DES generator per fold for one view (paper 5.2).

    python -m virtual_biopsy.stages.train_generator --view CC [--root .] [--params params.yaml]

Data
    Every LE/DES pair of the view (all phases, all labels: the generation task uses every pair,
    DESIGN.md), paired by ``pair_key``. Fold k trains on its train patients, early-stops on the
    paired L1 loss of its val patients, and is evaluated on its test patients: MSE, PSNR and SSIM
    of G(LE) against the real DES image (metrics.py, per image, averaged), next to the trivial
    baseline "the LE image itself as CESM" (paper Table 3 reads against it).

Initial weights (paper 5.2.1: pre-trained, then fine-tuned)
    ``generator.pretrained_weights`` with ``{view}`` replaced by the view, relative to the project
    root: by default models/pretrain/<VIEW>.pt of the pretrain_generator stage; null trains from
    scratch. Every fold (and a refit) starts from it (training.generator_trainer.load_pretrained).

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

Fold jobs (``executor`` in params, training.executor): this process opens each fold's run, hands
it to the fold's job (here, in a local process or as a Ray task), and ends it with the job's
outcome; the outputs are the same whichever executor ran the jobs. The serving model (a refit)
trains here, after the folds.

Device and processes: ``--device`` (default ``generator.device``; ``auto`` is CUDA when present).
Under ``torchrun --nproc_per_node=N`` every rank trains its share of each global batch
(``training.distributed``); only rank 0 logs to MLflow, registers the model and writes weights,
reports and figures.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np
import pandas as pd

from virtual_biopsy.core.atomic import atomic_dir, staged_path, write_json
from virtual_biopsy.core.config import VIEWS, ConfigError, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import CohortError, fold_subsets, require_inputs, view_pairs
from virtual_biopsy.evaluation.figures import figure3, figure3_examples
from virtual_biopsy.evaluation.generator_cv import generator_fold_job, serving_generator, trained_generator
from virtual_biopsy.evaluation.scoring import summarize_generator_folds
from virtual_biopsy.models.weights import WeightsFileError, save_generator_weights
from virtual_biopsy.stages.common import add_device_option, relative, stage_inputs, stage_parser
from virtual_biopsy.training import distributed, executor
from virtual_biopsy.training.datasets import open_images

STAGE = "train_generator"


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


def read_inputs(paths: ProjectPaths) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Processed images, their row-aligned lesion masks, the index and the folds."""
    require_inputs([(paths.processed_images, "preprocess"), (paths.processed_index, "preprocess"),
                    (paths.processed_lesion_masks, "preprocess"), (paths.splits, "split")])
    return (open_images(paths.processed_images), np.load(paths.processed_lesion_masks, mmap_mode="r"),
            pd.read_csv(paths.processed_index), pd.read_csv(paths.splits))


def run_train_generator(paths: ProjectPaths, params: Params, view: str, device: str | None = None,
                        use_mlflow: bool = True) -> dict[str, Any]:
    """Train every fold of ``view``, choose and (with MLflow) register the serving model; return the report.

    ``device`` None: ``generator.device``. Under torchrun every rank calls this; only rank 0 logs,
    registers and writes files (every rank returns the report).
    """
    from virtual_biopsy.mlops import registry, tracking

    if view not in VIEWS:
        raise CohortError(f"unknown view {view!r}; choose from {VIEWS}")
    requested = params.generator.device if device is None else device
    # Under torchrun: join the process group now (rank 0 alone opens the MLflow run); rank r uses GPU r.
    device, main_process = distributed.setup_device(requested)
    images, masks, index, folds = read_inputs(paths)
    pairs = view_pairs(index, view)
    if pairs.empty:
        raise CohortError(f"{paths.processed_index}: no LE/DES pairs of view {view}")
    # torchrun ranks train each fold together: then the folds run here, one after another.
    in_process = distributed.is_distributed()
    config = executor.effective_config(params.executor, in_process=in_process)
    with tracking.stage_run(STAGE, root=paths.root, params=params, tags={"view": view, "executor": config.kind},
                            run_name=f"{STAGE}-{view}", enabled=use_mlflow and main_process) as run, (
            atomic_dir(paths.generator_dir(view)) if main_process else contextlib.nullcontext()) as staged, \
            run.open_children() as children:
        jobs, fold_runs = [], []
        for fold in sorted(int(k) for k in folds["fold"].unique()):
            subsets = fold_subsets(pairs, folds, fold)
            fold_run = children.start(f"fold-{fold}", tags={"view": view, "fold": fold})
            log_fold_inputs(fold_run, paths, params, view, fold, subsets)
            fold_runs.append(fold_run)
            jobs.append(executor.job(
                f"{STAGE} {view} fold {fold}", generator_fold_job, paths=paths, params=params, view=view, fold=fold,
                subsets=subsets, run=fold_run.handover(), device=device if in_process else requested, out_dir=staged))
        outcomes = executor.run_jobs(jobs, config, on_done=lambda i, error: children.end(fold_runs[i], error))
        state, serving = serving_generator(paths, params, view, images, pairs, folds, outcomes, device)
        if not main_process:
            return summarize_generator_folds(view, outcomes, serving)
        size = int(images.shape[1])
        save_generator_weights(staged_path(paths.serving_generator(view), paths.generator_dir(view), staged), state,
                               params.generator, view=view, fold=serving["fold"], image_size=size,
                               policy=serving["policy"])
        if run:
            generator = trained_generator(params.generator, state)
            # The version number is the store's, not the run's: it goes to MLflow (the stage run's
            # registered_version tag) and the console, not into the DVC-tracked report.
            registered = registry.register_generator(run, view, generator, size, serving)
            print(f"{STAGE} {view}: {registered['registered_model']} v{registered['version']} @challenger")
        report = summarize_generator_folds(view, outcomes, serving)
        write_json(paths.generator_report(view), report)
        figure3(paths.figure3(view), view,
                figure3_examples([(o.test_pairs, o.test_synthetic) for o in outcomes], images, masks))
        run.log_metrics({f"test_{k}": v for k, v in report["mean"].items()})
        run.log_artifact(paths.generator_report(view), "generator")
        run.log_artifact(paths.figure3(view), "generator")
    # The swap dropped the fold checkpoints with the replaced folder: they only served to resume
    # an interrupted run (each fold's last one is logged to MLflow above) and stay out of the DVC cache.
    return report


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--view", required=True, choices=VIEWS, help="mammographic view")
    add_device_option(parser, "generator")
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        report = run_train_generator(paths, params, args.view, args.device, use_mlflow=not args.no_mlflow)
        main_process = distributed.is_main_process()
    except (ConfigError, CohortError, FileNotFoundError, WeightsFileError, pd.errors.ParserError) as exc:
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
