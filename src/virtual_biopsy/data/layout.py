"""The project's raw-data layout and table schemas: the contract between synth, importers and ingest.

Raw layout (``data/raw``, tracked by ``data.dvc``)::

    data/raw/
      metadata.csv                      one row per image file, METADATA_COLUMNS
      lesions.csv                       OPTIONAL: one row per image showing an outlined lesion, LESION_COLUMNS
      contact_sheet.png                 (synthetic data only) LE/DES pairs per ACR category
      images/<patient>/<study>/<patient>_<study>_<L|R><CC|MLO>_<LOW_ENERGY|RECOMBINED>[_LATE].dcm
      masks/<patient>/<study>/<same stem as its image>.png      lesion mask of one image

The file name follows the authors' public CESM code (``P96_76_RMLO_LOW_ENERGY``). DICOM tags are
authoritative for laterality, view and energy; metadata.csv supplies what a DICOM header does not
hold: the biopsy result, the ACR density and the acquisition phase.

Lesion ground truth (``lesions.csv`` + ``masks/``) is optional: a site without outlines has no
lesions.csv, and then there is simply no lesion truth. Where it exists, every image that shows an
outlined lesion has one row, naming its mask (:func:`lesion_mask_relpath`). A mask is an 8-bit
greyscale PNG, :data:`MASK_OUTSIDE` (0) outside and :data:`MASK_INSIDE` (255) inside the lesion, of
exactly the image's stored geometry (Rows x Columns) and orientation (as the DICOM pixel data are
stored, before any flip a viewer or preprocessing applies). ``source`` says where the outline
comes from: ``simulator`` (``vbiopsy synth`` knows the truth, and also writes the lesion's latent
values) or ``annotation`` (drawn by a reader, e.g. CDD-CESM's hand-drawn segmentations; the latent
values are then empty).
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath

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
    "mask_path",         # its lesion mask, relative to the raw folder; empty when it has none
)

# lesions.csv (data/raw, optional): one row per image that shows an outlined lesion.
LESIONS_FILE = "lesions.csv"
LESION_COLUMNS = (
    "file",               # the image, as in metadata.csv: images/P0001/S01/P0001_S01_RCC_LOW_ENERGY.dcm
    "mask",               # its mask: masks/P0001/S01/P0001_S01_RCC_LOW_ENERGY.png (lesion_mask_relpath)
    "source",             # simulator | annotation (LESION_SOURCES)
    "uptake",             # DES contrast uptake of the lesion in this image's phase (phantom.lesion_uptake)
    "le_density_excess",  # LE attenuation of the mass above glandular tissue (phantom.lesion_le_contrast)
    "glandular_around",   # mean glandular map in a ring around the lesion (synthetic.GLANDULAR_RING_WIDTH)
)
LESION_SOURCES = ("simulator", "annotation")
# The lesion's latent values: floats from the simulator, empty where nobody knows them (annotations).
LESION_LATENT_COLUMNS = ("uptake", "le_density_excess", "glandular_around")
MASK_OUTSIDE, MASK_INSIDE = 0, 255  # the two values of a mask PNG

# Lesion truth after ingest (data/interim/lesions.csv, a DVC output): one row per manifest image
# with a mask, keyed by the pseudonymous image_id. No path and no patient id: the mask's raw path
# is in the private sources table (``mask_path``), like the image's own.
INTERIM_LESION_COLUMNS = ("image_id", "source", *LESION_LATENT_COLUMNS)

# Lesion truth after preprocess (data/processed/lesions.csv): one row per row of images.npy that
# has a mask in data/processed/lesion_masks.npy; ``mask_pixels`` counts its pixels at the processed size.
PROCESSED_LESION_COLUMNS = ("row", "image_id", "source", "mask_pixels", *LESION_LATENT_COLUMNS)

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


def lesion_mask_relpath(image_relpath: str) -> str:
    """Path of an image's lesion mask relative to data/raw: ``images/P/S/NAME.dcm`` -> ``masks/P/S/NAME.png``.

    The mask mirrors its image's place in the layout, so a reader finds one from the other.
    """
    parts = PurePosixPath(image_relpath).parts
    if len(parts) < 2 or parts[0] != "images":
        raise ValueError(f"{image_relpath!r} is not an image path of the raw layout (images/<patient>/<study>/<file>)")
    return PurePosixPath("masks", *parts[1:]).with_suffix(".png").as_posix()
