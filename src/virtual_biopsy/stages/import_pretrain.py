"""DVC stage import_pretrain: the pre-training release, imported, ingested and preprocessed.

    python -m virtual_biopsy.stages.import_pretrain [--root .] [--params params.yaml] [--no-mlflow]

The release at ``pretrain.release_dir`` (default: the simulated one of pretrain_cohort; or the
real CDD-CESM download) goes the way any data go into this project, by the same code:

1. ``vbiopsy import --format cdd-cesm`` (data.importers.import_release) -> data/pretrain/raw
   (DICOM in the raw layout, metadata.csv, import_report.csv, lesion masks);
2. ingest (data.ingest: ingest_raw, write_outputs) -> data/pretrain/interim/manifest.csv,
   lesions.csv and reports/pretrain/ingest/{rejected.csv,summary.json}, with the ``ingest``
   section's checks (rejected share, pairs, pseudonyms);
3. preprocess (data.preprocess.write_processed, paper 4.1 at ``preprocess.image_size``) ->
   data/pretrain/processed/{images.npy,index.csv,lesion_masks.npy,lesions.csv}.

Exits 1 with a one-line message when the release cannot be imported or ingested.
"""
from __future__ import annotations

import dataclasses
import sys

from virtual_biopsy.core.config import ConfigError, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.importers import ImporterError, import_release
from virtual_biopsy.data.importers.common import IMPORTED, REJECTED, UNMATCHED
from virtual_biopsy.data.ingest import IngestError, ingest_raw, write_outputs
from virtual_biopsy.data.preprocess import PreprocessError, read_interim_lesions, read_manifest, write_processed
from virtual_biopsy.data.sources import SourcesError, source_files
from virtual_biopsy.stages.common import open_stage_run, relative, stage_inputs, stage_parser

STAGE = "import_pretrain"
RELEASE_FORMAT = "cdd-cesm"


def run_import_pretrain(paths: ProjectPaths, params: Params) -> dict[str, float]:
    """Import, ingest and preprocess the pre-training release; return counts of each step."""
    target = paths.pretrain
    outcome = import_release(RELEASE_FORMAT, paths.root / params.pretrain.release_dir, target.raw, force=True)
    ingest_cfg = dataclasses.replace(params.ingest, raw_dir=relative(target.raw, paths.root))
    ingested = ingest_raw(target.raw, ingest_cfg)
    write_outputs(ingested, target, ingest_cfg)
    manifest = read_manifest(target.manifest)
    sources = source_files(target, ingest_cfg, manifest["image_id"])
    processed = write_processed(manifest, sources, params.preprocess, target, read_interim_lesions(target.interim_lesions))
    counts = outcome.counts()
    return {"imported": counts[IMPORTED], "import_rejected": counts[REJECTED], "import_unmatched": counts[UNMATCHED],
            "accepted": ingested.summary["accepted"], "ingest_rejected": ingested.summary["rejected"],
            "patients": ingested.summary["patients"], "images": processed["images"],
            "image_size": processed["image_size"]}


def main(argv: list[str] | None = None) -> int:
    args = stage_parser(STAGE, __doc__).parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        with open_stage_run(STAGE, paths, params, args) as run:
            run.log_params({"pretrain.release_dir": params.pretrain.release_dir, "format": RELEASE_FORMAT})
            counts = run_import_pretrain(paths, params)
            run.log_metrics({f"{STAGE}.{k}": float(v) for k, v in counts.items()})
    except (ConfigError, ImporterError, IngestError, PreprocessError, SourcesError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    print(f"{STAGE}: {counts['imported']} images imported ({counts['import_rejected']} rejected), "
          f"{counts['accepted']} ingested from {counts['patients']} patients, {counts['images']} preprocessed at "
          f"{counts['image_size']} px -> {paths.pretrain.processed_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
