"""DVC stage preprocess: paper 4.1 on every manifest image, into one memory-mappable array.

    python -m virtual_biopsy.stages.preprocess [--root .] [--params params.yaml] [--no-mlflow]

Reads data/interim/manifest.csv, data/interim/lesions.csv and the raw DICOM files and lesion
masks, found through the private data/interim/sources.csv (data/sources.py: rebuilt from data/raw
when missing); writes data/processed/images.npy (float32 (N, S, S) in [0, 1], S =
preprocess.image_size; np.load(..., mmap_mode="r")), data/processed/index.csv (manifest columns +
``row``: no raw path, no original UID), data/processed/lesion_masks.npy (uint8 (N, S, S), row-aligned,
1 inside the lesion) and data/processed/lesions.csv (one row per image with a mask). See
data/preprocess.py for the steps.
"""
from __future__ import annotations

import sys

from virtual_biopsy.core.config import ConfigError, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.ingest import IngestError
from virtual_biopsy.data.preprocess import (
    PreprocessError,
    read_interim_lesions,
    read_manifest,
    write_processed,
)
from virtual_biopsy.data.sources import SourcesError, source_files
from virtual_biopsy.stages.common import open_stage_run, stage_inputs, stage_parser

STAGE = "preprocess"


def run_preprocess(paths: ProjectPaths, params: Params) -> dict:
    """Preprocess every manifest row and its lesion mask; return counts and timing."""
    manifest = read_manifest(paths.manifest)
    lesions = read_interim_lesions(paths.interim_lesions)
    sources = source_files(paths, params.ingest, manifest["image_id"])
    return write_processed(manifest, sources, params.preprocess, paths, lesions)


def log_to_mlflow(run, summary: dict) -> None:
    run.log_metrics({f"preprocess.{k}": float(v) for k, v in summary.items()})


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        with open_stage_run(STAGE, paths, params, args) as run:
            summary = run_preprocess(paths, params)
            log_to_mlflow(run, summary)
    except (ConfigError, PreprocessError, SourcesError, IngestError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    print(f"{STAGE}: {summary['images']} images at {summary['image_size']} px in {summary['seconds']} s "
          f"-> {paths.processed_images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
