"""DVC stage pretrain_generator: one view's CycleGAN pre-trained on the pre-training cohort (paper 5.2.1).

    python -m virtual_biopsy.stages.pretrain_generator --view CC [--root .] [--params params.yaml]
        [--device auto] [--no-mlflow]

Trains on every LE/DES pair of the view in data/pretrain/processed (import_pretrain), early-
stopping on the paired L1 of a held-out share of the cohort's patients (``pretrain.val_share``);
network sizes and losses are the generator section's, budget and rate ``pretrain``'s
(training/pretraining.py). train_generator fine-tunes from the output through
``generator.pretrained_weights`` (``models/pretrain/{view}.pt``).

Outputs
    models/pretrain/<VIEW>.pt                 the pre-trained CycleGAN (models/weights.py generator file + networks)
    models/pretrain/checkpoints/<VIEW>/       per-epoch checkpoint (resume after a kill); not a DVC output
    reports/pretrain/<VIEW>.json              pairs and patients used, epochs, best validation L1

MLflow: a stage run tagged with the view: the pretrain section and the generator sizes as params,
per-epoch losses, the report and the weights. The per-view job runs where ``executor`` says (this
process, a local worker process or a Ray task; training/executor.py) and logs to the stage run
handed over to it; this process writes the weights and the report.
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from virtual_biopsy.core.atomic import write_json
from virtual_biopsy.core.config import VIEWS, ConfigError, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import CohortError, require_inputs
from virtual_biopsy.stages.common import add_device_option, relative, stage_inputs, stage_parser
from virtual_biopsy.training import executor
from virtual_biopsy.training.datasets import open_images
from virtual_biopsy.training.pretraining import (
    PretrainError,
    describe_pretraining,
    pretrain_job,
    pretraining_config,
    save_pretrained,
)

STAGE = "pretrain_generator"
SIZE_KEYS = ("ngf", "ndf", "n_residual_blocks", "batch_size", "lambda_cycle", "lambda_identity", "lambda_paired")


def run_pretrain_generator(paths: ProjectPaths, params: Params, view: str, device: str | None = None,
                           use_mlflow: bool = True) -> dict:
    """Pre-train ``view``'s CycleGAN, write its weights and report; return the report."""
    from virtual_biopsy.mlops import tracking

    source = paths.pretrain
    require_inputs([(source.processed_images, "import_pretrain"), (source.processed_index, "import_pretrain")])
    image_size = int(np.shape(open_images(source.processed_images))[1])
    with tracking.stage_run(STAGE, root=paths.root, params=params, tags={"view": view},
                            run_name=f"{STAGE}-{view}", enabled=use_mlflow) as run:
        cfg = pretraining_config(params)
        run.log_params({**tracking.section_params(params, "pretrain"),
                        **{f"generator.{k}": getattr(cfg, k) for k in SIZE_KEYS}, "view": view,
                        "images": relative(source.processed_images, paths.root)})
        outcome = executor.run_job(
            executor.job(f"{STAGE} {view}", pretrain_job, paths, params, view, run.handover(),
                         params.generator.device if device is None else device), params.executor)
        save_pretrained(paths.pretrain_weights(view), outcome, cfg, image_size)
        report = describe_pretraining(outcome)
        write_json(paths.pretrain_report(view), report)
        run.log_metrics({"best_val_l1": report["best_val_l1"], "best_epoch": report["best_epoch"],
                         "epochs_run": report["epochs_run"]})
        run.log_artifact(paths.pretrain_report(view), "pretrain")
        run.log_artifact(paths.pretrain_weights(view), "weights")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--view", required=True, choices=VIEWS, help="mammographic view")
    add_device_option(parser, "generator")
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        report = run_pretrain_generator(paths, params, args.view, args.device, use_mlflow=not args.no_mlflow)
    except (ConfigError, CohortError, PretrainError, FileNotFoundError, pd.errors.ParserError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    print(f"{STAGE} {args.view}: {report['pairs']['train']} pairs ({report['patients']['train']} patients), "
          f"best val L1 {report['best_val_l1']:.4f} at epoch {report['best_epoch']} of {report['epochs_run']} "
          f"-> {paths.pretrain_weights(args.view)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
