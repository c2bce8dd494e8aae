"""Synthetic CESM as DICOM for the clinician: one Digital Mammography object per imputed image.

Each synthetic image is written in its LE source's patient and study, with the synthetic
ImageType of dicom/cesm.py (``IMAGE_TYPE_SYNTHETIC_DES``), a SeriesDescription starting
"SYNTHETIC CESM", a reference to the LE source in SourceImageSequence and how it was made in
DerivationDescription. Patient identity comes from the raw DICOM (never from MLflow); these
files are never logged to MLflow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.dicom.cesm import SIMULATED_MARK, SYNTHETIC_MARK
from virtual_biopsy.dicom.read import read_dataset
from virtual_biopsy.dicom.write import (
    Patient,
    Series,
    Study,
    Window,
    build_mammogram_dataset,
    deterministic_uid,
    write_dataset,
)

SYNTHETIC_SERIES_OFFSET = 1000  # series number of a synthetic series = its source's + this


class SyntheticDicomError(ValueError):
    """A synthetic image cannot be written: its LE source is missing or is not the image it was made from."""


BITS_STORED = 12


# CID 7202 "Source Image Purposes of Reference": the LE image is the input of the generator.
PURPOSE_SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")


def _age_years(ds: Dataset) -> int:
    age = str(ds.get("PatientAge", "") or "")
    return int(age[:3]) if age[:3].isdigit() and age.endswith("Y") else 0


def _chest_wall_left(ds: Dataset, laterality: str) -> bool:
    """Preprocess mirrored the image iff its chest wall was on the left (first orientation value A)."""
    orientation = [str(v) for v in (ds.get("PatientOrientation") or [])]
    return orientation[0] == "A" if orientation else laterality == "L"


def synthetic_dicom(source: Dataset, pixels01: np.ndarray, row: pd.Series) -> Dataset:
    """A synthetic CESM DICOM dataset for ``row`` (imputed index) made from its LE ``source``.

    Pixels stay in the processed geometry (square, S x S) but are mirrored back to the source's
    orientation; the pixel spacing grows by the resize factor so measurements stay true.
    """
    laterality, view = str(row["laterality"]), str(row["view"])
    pixels = np.fliplr(pixels01) if _chest_wall_left(source, laterality) else pixels01
    stored = np.round(np.clip(pixels, 0, 1) * ((1 << BITS_STORED) - 1)).astype(np.uint16)
    source_side = max(int(source.Rows), int(source.Columns))
    spacing = float((source.get("PixelSpacing") or source.get("ImagerPixelSpacing") or [0.1])[0])
    generator = f"cesm-generator-{str(row['generator_view']).lower()} fold {int(row['generator_fold'])}"
    comments = f"{SYNTHETIC_MARK} CESM imputed by {generator}; not an acquired image"
    if SIMULATED_MARK in str(source.get("ImageComments", "")).upper():
        comments += f"; source is {SIMULATED_MARK}"
    ds = build_mammogram_dataset(
        np.ascontiguousarray(stored),
        patient=Patient(patient_id=str(source.PatientID), name=str(source.get("PatientName", "")),
                        birth_date=str(source.get("PatientBirthDate", "")), age_years=_age_years(source),
                        sex=str(source.get("PatientSex", "F") or "F")),
        study=Study(instance_uid=str(source.StudyInstanceUID), study_id=str(source.get("StudyID", "")),
                    accession_number=str(source.get("AccessionNumber", "")), date=str(source.get("StudyDate", "")),
                    time=str(source.get("StudyTime", "")), description=str(source.get("StudyDescription", "")),
                    institution=str(source.get("InstitutionName", "")),
                    referring_physician=str(source.get("ReferringPhysicianName", ""))),
        series=Series(instance_uid=deterministic_uid("virtual-biopsy", "synthetic-series", source.SeriesInstanceUID,
                                                     generator),
                      number=int(source.get("SeriesNumber", 0) or 0) + SYNTHETIC_SERIES_OFFSET,
                      description=f"SYNTHETIC CESM {laterality}{view} ({generator})"),
        laterality=laterality, view=view, energy="DES", synthetic=True,
        window=Window(center=(1 << BITS_STORED) / 2, width=1 << BITS_STORED, explanation="FULL RANGE"),
        sop_instance_uid=str(row["image_id"]),
        frame_of_reference_uid=str(source.get("FrameOfReferenceUID") or deterministic_uid("for", row["image_id"])),
        pixel_spacing_mm=spacing * source_side / stored.shape[0],
        bits_stored=BITS_STORED, image_comments=comments,
    )
    if source.get("PatientOrientation"):
        ds.PatientOrientation = list(source.PatientOrientation)
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PURPOSE_SOURCE_FOR_PROCESSING
    reference.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    ds.SourceImageSequence = DicomSequence([reference])
    ds.DerivationDescription = (
        f"Synthetic recombined (CESM) image imputed from the low-energy image "
        f"{source.SOPInstanceUID} by CycleGAN {generator} (virtual-biopsy), out of fold"
    )[:1024]
    return ds


def write_synthetic_dicoms(paths: ProjectPaths, raw_dir: Path, out_dir: Path, sources: pd.DataFrame) -> list[Path]:
    """Write every imputed image as DICOM under ``out_dir``, mirroring the raw layout.

    ``sources``: for each ``source_image_id`` of the imputed index (its index), the raw file
    (``source_path``, absolute, under ``raw_dir``) and original ``sop_instance_uid``: the private
    sources table (data.sources.source_files), since data/imputed names neither.
    """
    index = pd.read_csv(paths.imputed_index, dtype={"image_id": str, "source_image_id": str})
    images = np.load(paths.imputed_images, mmap_mode="r")
    written = []
    for _, row in index.iterrows():
        source_path = Path(str(sources.at[row["source_image_id"], "source_path"]))
        source = read_dataset(source_path)
        # The file must still hold the image ingest keyed as the imputed image's source.
        if str(source.SOPInstanceUID) != str(sources.at[row["source_image_id"], "sop_instance_uid"]):
            raise SyntheticDicomError(f"{source_path}: not the imputed image's LE source {row['source_image_id']} "
                                      "(raw data changed; rerun the pipeline)")
        ds = synthetic_dicom(source, np.asarray(images[int(row["row"])]), row)
        relative = source_path.relative_to(raw_dir)
        target = out_dir / relative.parent / f"{relative.stem}_SYNTHETIC_RECOMBINED.dcm"
        written.append(write_dataset(ds, target))
    return written
