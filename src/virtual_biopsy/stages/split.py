"""DVC stage split: stratified, patient-grouped K folds shared by generator and classifier stages.

    python -m virtual_biopsy.stages.split [--root .] [--params params.yaml]

Writes data/splits/folds.csv (patient_id, fold, subset), reports/split/fold_counts.csv (per fold
and subset: patients per stratum, early-phase lesion LE images per class) and
reports/split/summary.json (dvc metrics: leakage, which must be 0, folds, shares). Exits 1 when
the data cannot be split with both classes in every val and test set.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from virtual_biopsy.core.atomic import write_csv, write_json
from virtual_biopsy.core.config import ConfigError, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.splits import FoldCheck, SplitError, check_folds, make_folds
from virtual_biopsy.stages.common import open_stage_run, stage_inputs, stage_parser

STAGE = "split"


def split_reports_dir(paths: ProjectPaths) -> Path:
    return paths.reports / "split"


def summarize(folds: pd.DataFrame, check: FoldCheck, params: Params) -> dict:
    """dvc metrics: leakage count, folds, realised mean shares per subset next to the configured ones."""
    per_fold = folds.groupby(["fold", "subset"]).size().unstack(fill_value=0)
    shares = (per_fold.div(per_fold.sum(axis=1), axis=0)).mean()
    return {
        "leakage": check.leakage,
        "folds": params.split.folds,
        "patients": int(folds["patient_id"].nunique()),
        "share_train": round(float(shares.get("train", 0.0)), 4),
        "share_val": round(float(shares.get("val", 0.0)), 4),
        "share_test": round(float(shares.get("test", 0.0)), 4),
        "configured_val_share": params.split.val_share,
        # The test share is 1/folds by construction (each patient tested once); see data/splits.py.
        "configured_test_share": params.split.test_share,
    }


def run_split(paths: ProjectPaths, params: Params) -> dict:
    """Make, validate and write the folds; return the summary."""
    if not paths.manifest.exists():
        raise FileNotFoundError(f"{paths.manifest}: missing (run the ingest stage first)")
    manifest = pd.read_csv(paths.manifest)
    folds = make_folds(manifest, params.split, params.seed)
    check = check_folds(folds, manifest, params.split.folds)
    check.raise_if_invalid()
    summary = summarize(folds, check, params)
    out = split_reports_dir(paths)
    write_csv(paths.splits, folds)
    write_csv(out / "fold_counts.csv", check.counts)
    write_json(out / "summary.json", summary)
    return summary


def log_to_mlflow(run, paths: ProjectPaths, summary: dict) -> None:
    run.log_metrics({f"split.{k}": float(v) for k, v in summary.items()})
    run.log_artifact(split_reports_dir(paths) / "fold_counts.csv", "split")
    run.log_artifact(paths.splits, "split")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        with open_stage_run(STAGE, paths, params, args) as run:
            summary = run_split(paths, params)
            log_to_mlflow(run, paths, summary)
    except (ConfigError, SplitError, FileNotFoundError, pd.errors.ParserError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    print(f"{STAGE}: {summary['folds']} folds over {summary['patients']} patients, leakage {summary['leakage']}; "
          f"mean shares train/val/test {summary['share_train']}/{summary['share_val']}/{summary['share_test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
