"""The private link from pseudonymous keys back to the raw files: ``data/interim/sources.csv``.

Nothing the pipeline publishes names a raw file or carries an original UID: the raw layout names
folders and files after the site's patient id, and DICOM PS3.15 replaces UIDs, so the manifest
keys images by a salted pseudonym and the rejected report keys files by one (data.ingest). The
stages that must open a raw file (preprocess, and ``vbiopsy impute --dicom-out``, which writes
each synthetic image in its source's study) look it up here.

Where it lives, and why there
    Beside the manifest, but it is not a DVC output (``dvc push`` never sends it; the ingest
    stage's outs are the manifest and the reports) and ``/data/interim/`` is git-ignored; no stage
    logs it to MLflow. It holds nothing ``data/raw`` does not (paths and UIDs of files there), so
    it is as private as the raw data beside it. A clone that pulled the pipeline outputs with
    ``dvc pull`` has no sources table: :func:`source_files` then rebuilds it from ``data/raw``
    (local wherever preprocessing can run) with the ingest stage's own code, and refuses when the
    rebuilt table does not hold the manifest's images (raw data changed since ingest).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from virtual_biopsy.core.atomic import write_csv
from virtual_biopsy.core.config import IngestConfig
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.layout import SOURCES_COLUMNS


class SourcesError(ValueError):
    """An image of the pipeline cannot be traced back to its raw file."""


def read_sources(path: Path) -> pd.DataFrame | None:
    """The sources table as strings, or None when there is none (or not of this schema)."""
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return table if all(c in table.columns for c in SOURCES_COLUMNS) else None


def rebuild_sources(paths: ProjectPaths, cfg: IngestConfig) -> pd.DataFrame:
    """Rebuild (and write) the sources table from the raw data with the ingest stage's code."""
    from virtual_biopsy.data.ingest import ingest_raw  # reads every raw file: only when needed

    table = ingest_raw(paths.root / cfg.raw_dir, cfg).sources
    write_csv(paths.sources, table)
    return table


def source_files(paths: ProjectPaths, cfg: IngestConfig, image_ids: Iterable[str]) -> pd.DataFrame:
    """``source_path`` (absolute), ``sop_instance_uid`` and ``mask_path`` (absolute; empty when the
    image has no lesion mask) of each of ``image_ids``, in that order (indexed by image id);
    rebuilds the table from the raw data when it lacks one of them."""
    wanted = [str(i) for i in image_ids]

    def lookup(table: pd.DataFrame | None) -> pd.DataFrame | None:
        if table is None:
            return None
        known = table[table["image_id"] != ""].set_index("image_id")
        if not set(wanted) <= set(known.index):
            return None
        return known.loc[wanted, ["source_path", "sop_instance_uid", "mask_path"]]

    found = lookup(read_sources(paths.sources))
    if found is None:
        found = lookup(rebuild_sources(paths, cfg))
    if found is None:
        raise SourcesError(f"{paths.manifest}: images that the raw data under {paths.root / cfg.raw_dir} no longer "
                           "holds (raw data changed since ingest); rerun the ingest stage")
    raw = paths.root / cfg.raw_dir
    return found.assign(source_path=[str(raw / p) for p in found["source_path"]],
                        mask_path=[str(raw / p) if p else "" for p in found["mask_path"]])
