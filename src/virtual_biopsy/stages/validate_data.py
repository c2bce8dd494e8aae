"""DVC stage validate_data: great-expectations suites over the manifest and the processed images.

    python -m virtual_biopsy.stages.validate_data [--root .] [--params params.yaml]

Writes reports/validation/results.json (every expectation: name, suite, severity, success,
observed value, examples), reports/validation/metrics.json (dvc metrics: evaluated, passed,
critical_failed, warning_failed) and GX Data Docs under reports/validation/data_docs/, logs them
to the stage's MLflow run and the verdict to the pipeline's parent run, and exits 1 naming the
failed critical expectations when any fails (warnings are recorded, the pipeline goes on).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from virtual_biopsy.core.atomic import write_json
from virtual_biopsy.core.config import ConfigError, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.quality import (
    QualityError,
    QualityReport,
    image_stats,
    validate,
)
from virtual_biopsy.stages.common import open_stage_run, stage_inputs, stage_parser

STAGE = "validate_data"


def validation_dir(paths: ProjectPaths) -> Path:
    return paths.reports / "validation"


def read_inputs(paths: ProjectPaths) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Manifest, processed index and the memory-mapped image array; errors name the missing file."""
    for path in (paths.manifest, paths.processed_index, paths.processed_images):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (run the ingest and preprocess stages first)")
    try:
        images = np.load(paths.processed_images, mmap_mode="r")
    except ValueError as exc:
        raise QualityError(f"{paths.processed_images}: not a readable .npy array ({exc})") from exc
    return pd.read_csv(paths.manifest), pd.read_csv(paths.processed_index), images


def run_validation(paths: ProjectPaths, params: Params) -> QualityReport:
    """Validate, write the reports and Data Docs; return the report (the caller decides the exit)."""
    manifest, index, images = read_inputs(paths)
    out = validation_dir(paths)
    report = validate(manifest, image_stats(images), params.validate_data, params.preprocess.image_size,
                      processed_index=index, docs_dir=out / "data_docs")
    write_json(out / "results.json", report.to_json())
    write_json(out / "metrics.json", report.metrics())
    return report


def quality_metrics(report: QualityReport) -> dict[str, float]:
    return {f"data_quality.{k}": float(v) for k, v in report.metrics().items()}


def log_to_mlflow(run, paths: ProjectPaths, report: QualityReport) -> None:
    """Stage run: metrics, results and Data Docs."""
    out = validation_dir(paths)
    run.log_metrics(quality_metrics(report))
    run.log_artifact(out / "results.json", "validation")
    run.log_artifacts(out / "data_docs", "validation/data_docs")


def log_verdict_to_parent(paths: ProjectPaths, params: Params, report: QualityReport) -> None:
    """Parent run: the verdict and its metrics (the gate reads them there)."""
    from virtual_biopsy.mlops import tracking

    out = validation_dir(paths)
    tracking.log_to_parent(paths.root, params, metrics=quality_metrics(report),
                           tags={"data_quality": "passed" if report.passed else "failed"},
                           artifacts={"validation": out / "results.json"})


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        with open_stage_run(STAGE, paths, params, args) as run:
            report = run_validation(paths, params)
            log_to_mlflow(run, paths, report)
    except (ConfigError, QualityError, FileNotFoundError, pd.errors.ParserError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    if not args.no_mlflow:
        log_verdict_to_parent(paths, params, report)
    metrics = report.metrics()
    print(f"{STAGE}: {metrics['passed']}/{metrics['evaluated']} expectations passed, "
          f"{metrics['warning_failed']} warning(s); Data Docs: {validation_dir(paths) / 'data_docs' / 'index.html'}")
    for outcome in report.warning_failures:
        print(f"  warning {outcome.suite}.{outcome.name}: {outcome.description}; examples {outcome.examples}")
    if not report.passed:
        print(f"{STAGE}: {report.failure_message()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
