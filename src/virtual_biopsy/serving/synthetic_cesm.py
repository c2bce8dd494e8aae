"""Synthetic CESM written as DICOM over its LE source: ``vbiopsy impute --dicom-out`` and ``predict --out``.

A generator makes CESM in the processed geometry (``S x S``, chest wall on the right). Before it
becomes a DICOM object it is put back into its LE source's stored geometry
(data/source_geometry.py: resize back, crop the padding, mirror back), so the object
(dicom/synthetic.py) has the source's rows, columns, pixel spacing and orientation and lies over
the LE image in a viewer.

The cohort export reads each LE source through the private sources table and refuses, naming
image ids (never paths, which carry the site's patient ids), a source that is missing, unreadable,
no longer the image ingest listed, or of another size than the manifest recorded (the raw data
changed since the pipeline ran: its synthetic image would not lie over the file there now).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.source_geometry import SourceGeometry, to_source_geometry
from virtual_biopsy.dicom.read import DicomReadError, read_dataset
from virtual_biopsy.dicom.synthetic import SyntheticDicomError, synthetic_dicom
from virtual_biopsy.dicom.write import write_dataset

SYNTHETIC_SUFFIX = "_SYNTHETIC_RECOMBINED"  # file name of a synthetic image: its LE source's stem + this


def synthetic_cesm_dicom(source: Dataset, processed: np.ndarray, row: pd.Series) -> Dataset:
    """The synthetic CESM DICOM of ``row`` (``laterality``, ``view``, ``generator_view``,
    ``generator_fold``, ``image_id``) from the generator's processed-geometry output ``processed``
    (``S x S`` in [0, 1]), in the geometry of its LE ``source``."""
    geometry = SourceGeometry.of_dataset(source, str(row["laterality"]))
    return synthetic_dicom(source, to_source_geometry(processed, geometry), row)


def _refuse(row: pd.Series, reason: str) -> SyntheticDicomError:
    """The error for imputed-index ``row``: it names the synthetic and the LE image id, never a path."""
    return SyntheticDicomError(f"synthetic image {row['image_id']} (LE source {row['source_image_id']}): {reason}")


def read_le_source(row: pd.Series, source_path: Path, sop_instance_uid: str) -> Dataset:
    """The LE source of imputed-index ``row``, read from ``source_path``; it must still be the image
    ingest listed there (``sop_instance_uid``) with the manifest's ``rows`` x ``columns``."""
    if not source_path.is_file():
        raise _refuse(row, "the LE source file is missing from the raw data (raw data changed since ingest); "
                           "rerun the pipeline")
    try:
        source = read_dataset(source_path)
    except (OSError, InvalidDicomError, DicomReadError) as exc:
        raise _refuse(row, f"the LE source file cannot be read ({type(exc).__name__}); rerun the pipeline") from None
    if str(source.get("SOPInstanceUID", "")) != sop_instance_uid:
        raise _refuse(row, "the file listed for it now holds another image, not the imputed image's LE source "
                           "(raw data changed since ingest); rerun the pipeline")
    stored, listed = (int(source.Rows), int(source.Columns)), (int(row["rows"]), int(row["columns"]))
    if stored != listed:
        raise _refuse(row, f"the LE source is {stored[0]} x {stored[1]} pixels but the manifest says "
                           f"{listed[0]} x {listed[1]} (rows x columns; raw data changed since ingest); "
                           "rerun the pipeline")
    return source


def synthetic_path(source_path: Path, raw_dir: Path, out_dir: Path) -> Path:
    """Where the synthetic image of ``source_path`` goes: the raw layout mirrored under ``out_dir``."""
    relative = source_path.relative_to(raw_dir)
    return out_dir / relative.parent / f"{relative.stem}{SYNTHETIC_SUFFIX}.dcm"


def write_synthetic_dicoms(paths: ProjectPaths, raw_dir: Path, out_dir: Path, sources: pd.DataFrame) -> list[Path]:
    """Write every imputed image as DICOM under ``out_dir``, mirroring the raw layout; return the paths.

    ``sources``: for each ``source_image_id`` of the imputed index (its index), the raw file
    (``source_path``, absolute, under ``raw_dir``) and original ``sop_instance_uid``: the private
    sources table (data.sources.source_files), since data/imputed names neither.
    """
    index = pd.read_csv(paths.imputed_index, dtype={"image_id": str, "source_image_id": str})
    images = np.load(paths.imputed_images, mmap_mode="r")
    written = []
    for _, row in index.iterrows():
        source_path = Path(str(sources.at[row["source_image_id"], "source_path"]))
        source = read_le_source(row, source_path, str(sources.at[row["source_image_id"], "sop_instance_uid"]))
        ds = synthetic_cesm_dicom(source, np.asarray(images[int(row["row"])]), row)
        written.append(write_dataset(ds, synthetic_path(source_path, raw_dir, out_dir)))
    return written
