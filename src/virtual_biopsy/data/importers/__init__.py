"""Importers: turn a public CESM release into the project's raw layout (``vbiopsy import``).

    vbiopsy import --format cdd-cesm  SRC data/raw
    vbiopsy import --format cesm-ucbm SRC data/raw [--table clinical.xlsx]
    dvc add data/raw

Each format is one module exposing ``import_release(source, out_dir, table) -> ImportOutcome``;
:data:`FORMATS` is the registry the CLI offers. Output: ``images/...dcm`` + ``metadata.csv``
(data.layout.METADATA_COLUMNS) + ``import_report.csv`` (every source file and every unmatched
spreadsheet or annotation row, with status and reason), and, for a release with lesion outlines
(CDD-CESM's hand-drawn segmentations), ``masks/...png`` + ``lesions.csv``
(data.layout.LESION_COLUMNS), written atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from virtual_biopsy.data.importers import cdd_cesm, cesm_ucbm
from virtual_biopsy.data.importers.common import Importer, ImporterError, ImportOutcome, run_import, summary

FORMATS: dict[str, Importer] = {
    "cesm-ucbm": cesm_ucbm.import_release,
    "cdd-cesm": cdd_cesm.import_release,
}

__all__ = ["FORMATS", "ImportOutcome", "ImporterError", "import_release", "register"]


def import_release(fmt: str, source: Path, dest: Path, table: Path | None = None, force: bool = False) -> ImportOutcome:
    """Import the release at ``source`` in format ``fmt`` into ``dest`` (raises ImporterError)."""
    if fmt not in FORMATS:
        raise ImporterError(f"unknown format {fmt!r}; choose from {sorted(FORMATS)}")
    return run_import(FORMATS[fmt], Path(source), Path(dest), Path(table) if table else None, force)


def _run(args: argparse.Namespace) -> int:
    try:
        outcome = import_release(args.format, args.source, args.dest, args.table, args.force)
    except ImporterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(outcome, Path(args.dest)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="turn a public CESM release (CDD-CESM, CESM@UCBM) into the raw layout",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="which release SRC holds")
    parser.add_argument("source", type=Path, metavar="SRC", help="the release folder as downloaded")
    parser.add_argument("dest", type=Path, metavar="DEST", nargs="?", default=Path("data/raw"),
                        help="raw-layout folder to write (default: data/raw)")
    parser.add_argument("--table", type=Path, default=None,
                        help="annotation/clinical table (CDD-CESM: default is the release's "
                             "'Radiology manual annotations.xlsx'; CESM@UCBM: CSV/XLSX, one row per image)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DEST")
    parser.set_defaults(func=_run)
