"""The project's raw-data layout and table schemas: the contract between synth, importers and ingest.

Raw layout (``data/raw``, tracked by ``data.dvc``)::

    data/raw/
      metadata.csv                      one row per image file, METADATA_COLUMNS
      contact_sheet.png                 (synthetic data only) LE/DES pairs per ACR category
      images/<patient>/<study>/<patient>_<study>_<L|R><CC|MLO>_<LOW_ENERGY|RECOMBINED>[_LATE].dcm

The file name follows the authors' public CESM code (``P96_76_RMLO_LOW_ENERGY``). DICOM tags are
authoritative for laterality, view and energy; metadata.csv supplies what a DICOM header does not
hold: the biopsy result, the ACR density and the acquisition phase.
"""
from __future__ import annotations

import re

# metadata.csv: one row per image file. ``file`` is relative to data/raw.
METADATA_COLUMNS = (
    "file",        # images/P0001/S01/P0001_S01_RCC_LOW_ENERGY.dcm
    "patient_id",  # the site's patient id (pseudonymised at ingest; never leaves ingest)
    "study_id",
    "laterality",  # L | R
    "view",        # CC | MLO
    "energy",      # LE | DES
    "phase",       # early | late
    "acr",         # a | b | c | d | empty (not reported)
    "age",         # years
    "biopsy",      # malignant | benign | none
)

# Manifest (data/interim/manifest.csv): one row per accepted image. No original identifier: ids
# are salted pseudonyms (data.ingest.pseudonymize), and the raw file of a row is found through
# the private sources table below, never through the manifest (a DVC output that `dvc push` sends).
MANIFEST_COLUMNS = (
    "image_id",       # pseudonymous SOPInstanceUID (DICOM PS3.15 replaces UIDs)
    "patient_id",     # pseudonymous id (see data.ingest.pseudonymize)
    "study_id",       # pseudonymous study key
    "laterality",     # L | R
    "view",           # CC | MLO
    "modality",       # FFDM (LE) | CESM (DES)
    "phase",          # early | late
    "label",          # malignant | benign | none
    "acr",            # a..d or empty
    "age",
    "pair_key",       # patient|study|laterality|view|phase: links LE with its DES partner
    "rows",
    "columns",
    "window_center",  # display window of the DICOM (contrast stretching uses it)
    "window_width",
    "simulated",      # True when the DICOM says it came from the embedded simulator (vbiopsy synth)
    "synthetic",      # True when the image was imputed by a CESM generator (never for raw images)
)
# Two different marks, both kept in every table and every DICOM the project writes:
# ``simulated`` -- the embedded dataset's images are simulated (DICOM ImageComments and
#   SeriesDescription say SIMULATED); ``synthetic`` -- CESM imputed from FFDM by a generator
#   (data/imputed, DICOM ImageType DERIVED\SECONDARY\SYNTHETIC). Keeping them apart lets the
#   settings C (real CESM) and Ĉ (imputed CESM) stay distinguishable on simulated data.

# Sources (data/interim/sources.csv): PRIVATE, one row per raw file. The only link from the
# pseudonymous keys back to the raw files and their original UIDs: written by ingest, read by
# preprocess and `vbiopsy impute --dicom-out` (data.sources). Not a DVC output, git-ignored, never
# logged to MLflow; it holds nothing data/raw does not (and is rebuilt from it when missing).
SOURCES_COLUMNS = (
    "file_key",          # pseudonym of the path: names the file in reports/ingest/rejected.csv
    "source_path",       # relative to the raw folder (names the site's patient)
    "image_id",          # the manifest's image_id; empty for a file not in the manifest
    "sop_instance_uid",  # the original SOPInstanceUID of a manifest image
)

ENERGY_TO_MODALITY = {"LE": "FFDM", "DES": "CESM"}
ENERGY_FILE_TOKEN = {"LE": "LOW_ENERGY", "DES": "RECOMBINED"}

FILE_NAME_RE = re.compile(
    r"^(?P<patient>[^_/]+)_(?P<study>[^_/]+)_(?P<laterality>[LR])(?P<view>CC|MLO)_"
    r"(?P<energy>LOW_ENERGY|RECOMBINED)(?P<late>_LATE)?\.dcm$"
)


def image_file_name(patient: str, study: str, laterality: str, view: str, energy: str, late: bool) -> str:
    """File name of one image in the raw layout, e.g. ``P0001_S01_RCC_LOW_ENERGY.dcm``."""
    suffix = "_LATE" if late else ""
    return f"{patient}_{study}_{laterality}{view}_{ENERGY_FILE_TOKEN[energy]}{suffix}.dcm"


def image_relpath(patient: str, study: str, laterality: str, view: str, energy: str, late: bool) -> str:
    """Path of one image relative to data/raw."""
    return f"images/{patient}/{study}/{image_file_name(patient, study, laterality, view, energy, late)}"


def pair_key(patient_id: str, study_id: str, laterality: str, view: str, phase: str) -> str:
    return f"{patient_id}|{study_id}|{laterality}|{view}|{phase}"
