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
The model folder is one set (core.atomic.atomic_dir): fold weights and val_mcc.json go to a staging
folder that replaces the folder at once when every fold is done, so a reader never sees folds of two
runs and stale files go. The checkpoints stay in the model folder, where a resumed run looks for
them, and leave with the replaced folder.

MLflow: a stage run tagged arch/modality/view and one child run per fold (params, per-epoch
losses and validation AUC/MCC, best epoch, final val/test metrics, the weights file).

Fold jobs (``executor`` in params, training.executor): this process opens each fold's run, hands
it to the fold's job (here, in a local process or as a Ray task), and ends it with the job's
outcome; the outputs are the same whichever executor ran the jobs. Under torchrun the folds run
in this process, one after another.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any

import pandas as pd

from virtual_biopsy.core.atomic import atomic_dir, staged_path, write_csv, write_json
from virtual_biopsy.core.config import ARCHITECTURES, MODALITIES, VIEWS, ConfigError, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import (
    SCORED_SUBSETS,
    SUBSETS,
    Classifier,
    CohortError,
    biopsy_images,
    patient_subsets,
    read_folds,
    read_imputed_index,
    read_processed_index,
    split_images,
    synthetic_images,
)
from virtual_biopsy.evaluation.classifier_cv import FoldEpochCallback, classifier_fold_job
from virtual_biopsy.evaluation.predictions import predictions_path
from virtual_biopsy.evaluation.scoring import summarize_classifier_folds
from virtual_biopsy.models.classifiers import WeightsFileError
from virtual_biopsy.stages.common import add_device_option, relative, stage_inputs, stage_parser
from virtual_biopsy.training import distributed, executor

STAGE = "train_classifier"

def log_fold_inputs(run, paths: ProjectPaths, params: Params, which: Classifier, fold: int,
                    real: dict[str, pd.DataFrame], synthetic: dict[str, pd.DataFrame]) -> None:
    """The fold run's hyperparameters (the classifier section) and, as MLflow datasets, the image
    tables it trains, early-stops and is scored on (real; synthetic CESM it is also scored on)."""
    from virtual_biopsy.mlops import tracking

    run.log_params(tracking.section_params(params, "classifier"))
    where = {"fold": fold, "folds": relative(paths.splits, paths.root)}
    run.log_tables(real, name=f"{which.modality}-{which.view} fold {fold}", targets="y",
                   source={"table": relative(paths.processed_index, paths.root),
                           "images": relative(paths.processed_images, paths.root), **where})
    run.log_tables({k: v for k, v in synthetic.items() if k in SCORED_SUBSETS}, targets="y",
                   name=f"synthetic {which.modality}-{which.view} fold {fold}",
                   source={"table": relative(paths.imputed_index, paths.root),
                           "images": relative(paths.imputed_images, paths.root), **where})


def run_train_classifier(paths: ProjectPaths, params: Params, arch: str, modality: str, view: str,
                         device: str = "cpu", use_mlflow: bool = True,
                         epoch_callback: FoldEpochCallback | None = None) -> dict[str, Any]:
    """Train every fold of f_{modality,view}; write weights, val_mcc.json and predictions; return the summary.

    ``epoch_callback(fold, epoch, metrics)`` runs after every epoch (see
    :data:`virtual_biopsy.evaluation.classifier_cv.FoldEpochCallback`).
    """
    from virtual_biopsy.mlops import tracking

    which = Classifier(arch, modality, view)
    requested = device
    # Under torchrun: join the process group first; only rank 0 logs to MLflow and writes files.
    device, main_process = distributed.setup_device(device)
    index, folds = read_processed_index(paths), read_folds(paths)
    real = biopsy_images(index, modality, view)
    if real.empty:
        raise CohortError(f"{paths.processed_index}: no early-phase biopsied {modality} {view} images")
    synthetic = real.iloc[:0]
    if modality == "CESM":
        synthetic = synthetic_images(read_imputed_index(paths), index, view)
    # torchrun ranks train each fold together, and a callback into this process cannot travel:
    # then the folds run here, one after another.
    in_process = distributed.is_distributed() or epoch_callback is not None
    config = executor.effective_config(params.executor, in_process=in_process)
    with tracking.stage_run(STAGE, root=paths.root, params=params, tags={**which.tags, "executor": config.kind},
                            run_name=f"{STAGE} {which.label}", enabled=use_mlflow and main_process) as run, (
            atomic_dir(paths.classifier_dir(arch, modality, view)) if main_process
            else contextlib.nullcontext()) as staged, run.open_children() as children:
        jobs, fold_runs = [], []
        for fold in sorted(int(k) for k in folds["fold"].unique()):
            patients = patient_subsets(folds, fold)
            real_parts = split_images(real, patients, fold, require=SUBSETS)
            synthetic_parts = split_images(synthetic, patients, fold, require=())
            fold_run = children.start(f"{which.label} fold {fold}", tags={**which.tags, "fold": fold})
            log_fold_inputs(fold_run, paths, params, which, fold, real_parts, synthetic_parts)
            fold_runs.append(fold_run)
            jobs.append(executor.job(
                f"{STAGE} {which.label} fold {fold}", classifier_fold_job, paths=paths, params=params, which=which,
                fold=fold, real=real_parts, synthetic=synthetic_parts, run=fold_run.handover(),
                device=device if in_process else requested, out_dir=staged, epoch_callback=epoch_callback))
        outcomes = executor.run_jobs(jobs, config, on_done=lambda i, error: children.end(fold_runs[i], error))
        summary = {**which.tags, **summarize_classifier_folds(outcomes)}
        if not main_process:
            return summary
        write_json(staged_path(paths.val_mcc(arch, modality, view), paths.classifier_dir(arch, modality, view), staged),
                   summary)
        write_csv(predictions_path(paths, arch, modality, view),
                  pd.concat([o.predictions for o in outcomes], ignore_index=True))
        run.log_metrics({f"mean_{k}": v for k, v in summary["mean"].items()})
        run.log_artifact(staged_path(paths.val_mcc(arch, modality, view), paths.classifier_dir(arch, modality, view),
                                     staged), STAGE)
        run.log_artifact(predictions_path(paths, arch, modality, view), STAGE)
    # The swap dropped the fold checkpoints (full optimiser state, ~180 MB for resnet18) with the
    # replaced folder: they only served to resume an interrupted run and stay out of the DVC cache.
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES, help="network architecture")
    parser.add_argument("--modality", required=True, choices=MODALITIES, help="FFDM (LE) or CESM (DES)")
    parser.add_argument("--view", required=True, choices=VIEWS, help="mammographic view")
    add_device_option(parser, "classifier")
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        summary = run_train_classifier(paths, params, args.arch, args.modality, args.view,
                                       args.device or params.classifier.device, use_mlflow=not args.no_mlflow)
        main_process = distributed.is_main_process()
    except (ConfigError, CohortError, WeightsFileError, FileNotFoundError, pd.errors.ParserError) as exc:
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
