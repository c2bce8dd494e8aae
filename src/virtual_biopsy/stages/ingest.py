"""DVC stage ingest: every file under data/raw/images becomes a manifest row or a rejected row.

    python -m virtual_biopsy.stages.ingest [--root .] [--params params.yaml] [--no-mlflow]

Writes data/interim/manifest.csv (data.layout.MANIFEST_COLUMNS), data/interim/lesions.csv (the
lesion truth of data/raw/lesions.csv keyed by image id, data.layout.INTERIM_LESION_COLUMNS; header
only without one), reports/ingest/rejected.csv (file, reason) and reports/ingest/summary.json
(counts; dvc metrics). Exits 1 with a one-line message when the raw folder cannot be ingested, its
lesions.csv cannot be used (nothing is written then), or more than ingest.max_rejected_share of
the files is rejected (the reports are still written, so the reasons are at hand).
"""
from __future__ import annotations

import sys

from virtual_biopsy.core.config import ConfigError, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.ingest import (
    IngestError,
    IngestResult,
    ingest_raw,
    summary_path,
    write_outputs,
)
from virtual_biopsy.stages.common import open_stage_run, stage_inputs, stage_parser

STAGE = "ingest"


def run_ingest(paths: ProjectPaths, params: Params) -> IngestResult:
    """Ingest ``root/ingest.raw_dir`` and write the manifest and reports."""
    result = ingest_raw(paths.root / params.ingest.raw_dir, params.ingest)
    write_outputs(result, paths, params.ingest)
    return result


def log_to_mlflow(run, paths: ProjectPaths, params: Params, result: IngestResult) -> None:
    """Counts as metrics; rejected report, summary and the raw contact sheet (if any) as artifacts."""
    counts = {k: v for k, v in result.summary.items() if isinstance(v, (int, float))}
    counts.update({f"rejected_{k}": v for k, v in result.summary["rejected_by_kind"].items()})
    run.log_metrics({f"ingest.{k}": float(v) for k, v in counts.items()})
    run.log_artifact(paths.rejected, STAGE)
    run.log_artifact(summary_path(paths), STAGE)
    contact_sheet = paths.root / params.ingest.raw_dir / "contact_sheet.png"
    if contact_sheet.exists():
        run.log_artifact(contact_sheet, STAGE)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        with open_stage_run(STAGE, paths, params, args) as run:
            result = run_ingest(paths, params)
            log_to_mlflow(run, paths, params, result)
    except (ConfigError, IngestError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    s = result.summary
    print(f"{STAGE}: {s['accepted']} of {s['files']} files accepted ({s['patients']} patients, {s['pairs']} pair keys); "
          f"{s['rejected']} rejected, reasons in {paths.rejected}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
