"""`vbiopsy impute`: bring data/imputed up to date if needed, and write it as DICOM for a clinician.

The imputation is the impute stage's (serving.imputation): run here only when data/imputed is
missing or older than a generator or the processed data (or with ``--force``), exactly as the
stage would. ``--dicom-out DIR`` then writes each synthetic image as a DICOM file in its LE
source's patient, study and geometry (rows, columns, pixel spacing, orientation: it lies over the
LE image in a viewer), marked synthetic (serving/synthetic_cesm.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from virtual_biopsy.core.config import ConfigError, load_params
from virtual_biopsy.core.paths import ProjectPaths

COMMAND = "impute"


def run_impute_command(args: argparse.Namespace) -> int:
    # Imported here: `vbiopsy --help` builds every sub-command's parser, and these import torch.
    from virtual_biopsy.data.imputation import ImputeError
    from virtual_biopsy.data.ingest import IngestError
    from virtual_biopsy.data.sources import SourcesError, source_files
    from virtual_biopsy.dicom.synthetic import SyntheticDicomError
    from virtual_biopsy.mlops import tracking
    from virtual_biopsy.serving.imputation import (
        impute_out_of_fold,
        imputed_outputs_stale,
        write_imputed,
    )
    from virtual_biopsy.serving.synthetic_cesm import write_synthetic_dicoms
    from virtual_biopsy.training.loop import resolve_device

    paths = ProjectPaths(Path(args.root))
    try:
        params = load_params(args.params or paths.root / "params.yaml")
        if args.force or imputed_outputs_stale(paths, params):
            with tracking.stage_run(COMMAND, root=paths.root, params=params, enabled=not args.no_mlflow) as run:
                device = str(resolve_device(args.device or params.generator.device))
                synthetic, index = impute_out_of_fold(paths, params, device)
                write_imputed(paths, synthetic, index)
                run.log_metrics({"images": len(index)})
            print(f"{COMMAND}: {len(index)} synthetic CESM images -> {paths.imputed_images}")
        if args.dicom_out:
            # data/imputed names no raw file: the private sources table links each LE source to its file.
            sources = source_files(paths, params.ingest, pd.read_csv(paths.imputed_index, dtype=str)["source_image_id"])
            written = write_synthetic_dicoms(paths, paths.root / params.ingest.raw_dir, Path(args.dicom_out), sources)
            print(f"{COMMAND}: {len(written)} synthetic CESM DICOM files under {args.dicom_out}")
    except (ConfigError, ImputeError, SyntheticDicomError, SourcesError, IngestError, FileNotFoundError, ValueError,
            RuntimeError, pd.errors.ParserError) as exc:
        print(f"{COMMAND}: {exc}", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        COMMAND, help="synthetic CESM for every FFDM image (out of fold); --dicom-out writes DICOM",
        description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=".", help="project root (default: current directory)")
    parser.add_argument("--params", default=None, help="params file (default: ROOT/params.yaml)")
    parser.add_argument("--device", default=None,
                        help="torch device: auto, cpu, cuda ... (default: generator.device in params)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the outputs but log nothing to MLflow")
    parser.add_argument("--dicom-out", default=None, metavar="DIR",
                        help="write each synthetic image as a DICOM file referencing its LE source")
    parser.add_argument("--force", action="store_true", help="re-impute even if data/imputed is up to date")
    parser.set_defaults(func=run_impute_command)
