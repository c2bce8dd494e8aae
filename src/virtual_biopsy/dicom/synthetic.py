"""Synthetic CESM as DICOM for the clinician: one Digital Mammography object per imputed image.

Each synthetic image is written in its LE source's patient, study, frame of reference and
geometry: the pixels it is given are already in the source's stored geometry (same Rows and
Columns, same orientation: data/source_geometry.py puts a processed image back there), and it
takes over the source's PixelSpacing / ImagerPixelSpacing, ImageLaterality and
PatientOrientation, so it lies pixel for pixel over the LE image in a viewer and measures like it.
It is marked synthetic: the ImageType of dicom/cesm.py (``IMAGE_TYPE_SYNTHETIC_DES``), a
SeriesDescription starting "SYNTHETIC CESM", ImageComments saying it is not an acquired image, a
reference to the LE source in SourceImageSequence and how it was made in DerivationDescription.

Intensity: the generator's output is in [0, 1], the scale preprocess gives a DES image's display
window (contrast stretch, then min-max). It is stored as ``round(value * 4095)`` on 12 bits, with
the window (centre 2048, width 4096: stored 0 black, 4095 white, PS3.3 C.11.2.1.2.1) that shows
it as the generator made it, explained as ``GENERATOR_WINDOW.explanation``.

Patient identity comes from the raw DICOM (never from MLflow); these files are never logged to
MLflow.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from virtual_biopsy.dicom.cesm import SIMULATED_MARK, SYNTHETIC_MARK
from virtual_biopsy.dicom.write import (
    Patient,
    Series,
    Study,
    Window,
    build_mammogram_dataset,
    deterministic_uid,
)

SYNTHETIC_SERIES_OFFSET = 1000  # series number of a synthetic series = its source's + this


class SyntheticDicomError(ValueError):
    """A synthetic image cannot be written: its LE source is missing, unreadable, not the image it
    was made from, or of another geometry than its pixels. Messages name image ids, never paths
    (the raw layout names folders after the site's patient id)."""


BITS_STORED = 12
# [0, 1] -> stored 0 .. 4095; this linear window maps exactly that range onto black .. white.
GENERATOR_WINDOW = Window(center=(1 << BITS_STORED) / 2, width=1 << BITS_STORED,
                          explanation="FULL RANGE = GENERATOR OUTPUT 0..1")

# Pixel spacing attributes taken over from the LE source (DX Detector module, PS3.3 C.8.11.4 and
# the Basic Pixel Spacing Calibration macro): the synthetic image has the source's pixel grid.
SPACING_KEYWORDS = ("ImagerPixelSpacing", "PixelSpacing", "PixelSpacingCalibrationType",
                    "PixelSpacingCalibrationDescription")

# CID 7202 "Source Image Purposes of Reference": the LE image is the input of the generator.
PURPOSE_SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")


def _age_years(ds: Dataset) -> int:
    age = str(ds.get("PatientAge", "") or "")
    return int(age[:3]) if age[:3].isdigit() and age.endswith("Y") else 0


def stored_values(pixels01: np.ndarray) -> np.ndarray:
    """The generator's [0, 1] image as 12-bit stored values (``round(value * 4095)``, clipped)."""
    top = (1 << BITS_STORED) - 1
    return np.ascontiguousarray(np.round(np.clip(pixels01, 0.0, 1.0) * top).astype(np.uint16))


def _source_spacing_mm(source: Dataset, image_id: str) -> float:
    """The source's row spacing (ImagerPixelSpacing, else PixelSpacing), for the writer's Type 1 value."""
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = source.get(keyword)
        if value:
            return float(value[0])
    raise SyntheticDicomError(f"synthetic image {image_id}: its LE source has neither ImagerPixelSpacing nor "
                              "PixelSpacing, so the size of its pixels is unknown")


def _copy_spacing(source: Dataset, ds: Dataset) -> None:
    """Give ``ds`` exactly the source's spacing attributes (drop those the source does not have)."""
    for keyword in SPACING_KEYWORDS:
        if source.get(keyword) not in (None, ""):
            setattr(ds, keyword, source[keyword].value)
        elif keyword in ds and keyword != "ImagerPixelSpacing":  # Type 1: the writer's value stays
            delattr(ds, keyword)


def _check_pixels(source: Dataset, pixels01: np.ndarray, image_id: str) -> None:
    """The pixels must be finite and already in the source's stored geometry (rows x columns)."""
    if not np.isfinite(pixels01).all():
        raise SyntheticDicomError(f"synthetic image {image_id}: its pixels hold NaN or infinite values")
    stored = (int(source.Rows), int(source.Columns))
    if pixels01.shape != stored:
        raise SyntheticDicomError(f"synthetic image {image_id}: pixels of shape {pixels01.shape}, but its LE source is "
                                  f"{stored[0]} x {stored[1]} (rows x columns); put them back into the source's "
                                  "geometry first (data.source_geometry.to_source_geometry)")


def _source_reference(source: Dataset) -> DicomSequence:
    """SourceImageSequence: the LE image, as the input of an image processing operation."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PURPOSE_SOURCE_FOR_PROCESSING
    reference.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return DicomSequence([reference])


def synthetic_dicom(source: Dataset, pixels01: np.ndarray, row: pd.Series) -> Dataset:
    """A synthetic CESM DICOM dataset for ``row`` (imputed index) made from its LE ``source``.

    ``pixels01``: the generator's output in [0, 1], already in the source's stored geometry
    (``source.Rows x source.Columns``, the source's orientation); anything else is refused.
    """
    laterality, view, image_id = str(row["laterality"]), str(row["view"]), str(row["image_id"])
    _check_pixels(source, pixels01, image_id)
    generator = f"cesm-generator-{str(row['generator_view']).lower()} fold {int(row['generator_fold'])}"
    comments = f"{SYNTHETIC_MARK} CESM imputed by {generator}; not an acquired image"
    if SIMULATED_MARK in str(source.get("ImageComments", "")).upper():
        comments += f"; source is {SIMULATED_MARK}"
    ds = build_mammogram_dataset(
        stored_values(pixels01),
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
        window=GENERATOR_WINDOW,
        sop_instance_uid=image_id,
        frame_of_reference_uid=str(source.get("FrameOfReferenceUID") or deterministic_uid("for", image_id)),
        pixel_spacing_mm=_source_spacing_mm(source, image_id),
        bits_stored=BITS_STORED, image_comments=comments,
    )
    _copy_spacing(source, ds)
    if source.get("PatientOrientation"):
        ds.PatientOrientation = list(source.PatientOrientation)
    ds.SourceImageSequence = _source_reference(source)
    ds.DerivationDescription = (
        f"Synthetic recombined (CESM) image imputed from the low-energy image "
        f"{source.SOPInstanceUID} by CycleGAN {generator} (virtual-biopsy), out of fold, "
        "and resized back to the low-energy image's geometry"
    )[:1024]
    return ds
