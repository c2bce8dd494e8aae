"""Import CDD-CESM (Khaled et al., Sci Data 2022; TCIA collection CDD-CESM) into the raw layout.

The release, as downloaded from TCIA::

    Low energy images of CDD-CESM/P1_L_DM_CC.jpg ...     DM = low energy (LE, FFDM-like)
    Subtracted images of CDD-CESM/P1_L_CM_CC.jpg ...     CM = contrast (subtracted, DES)
    Radiology manual annotations.xlsx                    sheet "all", one row per image finding
    Radiology_hand_drawn_segmentations_v2.csv            lesion outlines (not imported)
    Medical reports for cases .zip / P1.docx ...         free-text reports (not imported)

Image names are ``{patient}_{side}_{type}_{view}`` (``P1_L_CM_MLO``). The sheet's columns are
``Image_name, Patient_ID, Side, Type, Age, Breast density (ACR), BIRADS, Findings, View, Tags,
Machine, Pathology Classification/ Follow up``; Type is ``DM`` or ``CESM``, density ``A``-``D``
(blank or ``_`` when not reported), and pathology ``Normal``, ``Benign`` or ``Malignant``. An image
with several findings has several rows; its label is the most severe one. Some Image_name cells
carry stray spaces, which are ignored.

Every patient has one exam, acquired in the early phase only; the study id is ``S1``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from virtual_biopsy.data.importers.common import (
    ImporterError,
    ImportOutcome,
    MammogramTags,
    jpeg_to_dicom,
    parse_acr,
    parse_age,
    relative_name,
    save_dicom,
)
from virtual_biopsy.data.layout import image_relpath

RELEASE = "CDD-CESM"
STUDY_ID = "S1"
LOW_ENERGY_FOLDER = "Low energy images of CDD-CESM"
SUBTRACTED_FOLDER = "Subtracted images of CDD-CESM"
# TCIA has served the sheet under both names.
ANNOTATION_FILE_NAMES = ("Radiology manual annotations.xlsx", "Radiology-manual-annotations.xlsx")
ANNOTATION_SHEET = "all"

COL_IMAGE = "Image_name"
COL_PATIENT = "Patient_ID"
COL_SIDE = "Side"
COL_TYPE = "Type"
COL_AGE = "Age"
COL_ACR = "Breast density (ACR)"
COL_VIEW = "View"
COL_PATHOLOGY = "Pathology Classification/ Follow up"
REQUIRED_COLUMNS = (COL_IMAGE, COL_PATIENT, COL_SIDE, COL_TYPE, COL_AGE, COL_ACR, COL_VIEW, COL_PATHOLOGY)

IMAGE_NAME_RE = re.compile(r"^P(?P<number>\d+)_(?P<side>[LR])_(?P<type>DM|CM)_(?P<view>CC|MLO)$")
IMAGE_SUFFIXES = (".jpg", ".jpeg")
NAME_PATTERN = "P<number>_<L|R>_<DM|CM>_<CC|MLO>.jpg"

FILE_TYPE_TO_ENERGY = {"DM": "LE", "CM": "DES"}
SHEET_TYPE_TO_FILE_TYPE = {"DM": "DM", "CESM": "CM"}
FOLDER_TO_FILE_TYPE = {LOW_ENERGY_FOLDER: "DM", SUBTRACTED_FOLDER: "CM"}
PATHOLOGY_TO_LABEL = {"malignant": "malignant", "benign": "benign", "normal": "none"}
LABEL_SEVERITY = ("none", "benign", "malignant")


@dataclass(frozen=True)
class ImageName:
    """The parts of a CDD-CESM image name."""

    stem: str
    patient: str      # P<number>
    number: int
    side: str         # L | R
    file_type: str    # DM | CM
    view: str         # CC | MLO

    @property
    def energy(self) -> str:
        return FILE_TYPE_TO_ENERGY[self.file_type]


def parse_image_name(stem: str) -> ImageName | None:
    match = IMAGE_NAME_RE.match(stem)
    if match is None:
        return None
    number = int(match["number"])
    return ImageName(stem, f"P{number}", number, match["side"], match["type"], match["view"])


def normalise_image_name(value: object) -> str:
    """Sheet Image_name as the file stem it names (the release has stray spaces in a few cells)."""
    return re.sub(r"\s+", "", str(value))


# --- annotation sheet ------------------------------------------------------------------------

def find_annotation_file(source: Path, table: Path | None) -> Path:
    """The annotation workbook: ``table`` when given, else the one file of the released name."""
    if table is not None:
        if not table.is_file():
            raise ImporterError(f"{table}: annotation spreadsheet does not exist")
        return table
    found = sorted(p for name in ANNOTATION_FILE_NAMES for p in source.rglob(name))
    if not found:
        raise ImporterError(
            f"{source}: no '{ANNOTATION_FILE_NAMES[0]}' found; download it from the CDD-CESM TCIA page "
            "or pass --table PATH"
        )
    if len(found) > 1:
        raise ImporterError(f"{source}: several annotation spreadsheets {[str(p) for p in found]}; pass --table PATH")
    return found[0]


def read_annotations(path: Path) -> pd.DataFrame:
    """Sheet 'all' with the released columns, plus ``excel_row`` and the normalised ``stem``."""
    try:
        sheets = pd.read_excel(path, sheet_name=None, engine="openpyxl")
    except Exception as exc:  # openpyxl raises several unrelated types for a broken workbook
        raise ImporterError(f"{path}: not a readable .xlsx workbook ({exc})") from exc
    if ANNOTATION_SHEET not in sheets:
        raise ImporterError(f"{path}: no sheet '{ANNOTATION_SHEET}' (sheets: {sorted(sheets)})")
    frame = sheets[ANNOTATION_SHEET]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ImporterError(f"{path}: sheet '{ANNOTATION_SHEET}' lacks column(s) {missing}; it has {list(frame.columns)}")
    frame = frame.dropna(how="all").copy()
    frame["excel_row"] = frame.index + 2  # header is row 1
    frame["stem"] = frame[COL_IMAGE].map(normalise_image_name)
    return frame


def row_source(sheet_path: Path, row: pd.Series) -> str:
    return f"{sheet_path.name}#{ANNOTATION_SHEET}!row {row['excel_row']} ({row[COL_IMAGE]})"


# --- one image -------------------------------------------------------------------------------

def check_rows_agree(name: ImageName, rows: pd.DataFrame) -> None:
    """The sheet's Patient_ID, Side, Type and View must say what the file name says."""
    for _, row in rows.iterrows():
        where = f"row {row['excel_row']}"
        sheet_type = SHEET_TYPE_TO_FILE_TYPE.get(str(row[COL_TYPE]).strip())
        found = {
            COL_PATIENT: (str(row[COL_PATIENT]).strip().removesuffix(".0"), str(name.number)),
            COL_SIDE: (str(row[COL_SIDE]).strip(), name.side),
            COL_TYPE: (sheet_type, name.file_type),
            COL_VIEW: (str(row[COL_VIEW]).strip(), name.view),
        }
        for column, (sheet_value, name_value) in found.items():
            if sheet_value != name_value:
                raise ValueError(f"sheet {where} says {column}={row[column]!r} but the file name says {name_value!r}")


def label_of(rows: pd.DataFrame) -> str:
    """Most severe pathology over the image's findings (one row per finding)."""
    labels = []
    for _, row in rows.iterrows():
        value = str(row[COL_PATHOLOGY]).strip().lower()
        if value not in PATHOLOGY_TO_LABEL:
            raise ValueError(
                f"sheet row {row['excel_row']}: pathology {row[COL_PATHOLOGY]!r} is not Normal, Benign or Malignant"
            )
        labels.append(PATHOLOGY_TO_LABEL[value])
    return max(labels, key=LABEL_SEVERITY.index)


def single_value(rows: pd.DataFrame, column: str, parse) -> str:
    """A per-image value repeated on every finding row; rows that disagree are an error."""
    values = {parse(row[column], f"sheet row {row['excel_row']}") for _, row in rows.iterrows()}
    values.discard("")
    if len(values) > 1:
        raise ValueError(f"sheet rows disagree on {column}: {sorted(values)}")
    return values.pop() if values else ""


def check_folder(name: ImageName, path: Path) -> None:
    expected = FOLDER_TO_FILE_TYPE.get(path.parent.name)
    if expected is not None and expected != name.file_type:
        raise ValueError(f"{name.file_type} image in folder '{path.parent.name}', which holds {expected} images")


def import_image(path: Path, name: ImageName, rows: pd.DataFrame, out_dir: Path) -> tuple[str, dict, str]:
    """Write one image as DICOM; return its relative path, its metadata row and a report note."""
    check_folder(name, path)
    check_rows_agree(name, rows)
    age = single_value(rows, COL_AGE, parse_age)
    acr = single_value(rows, COL_ACR, parse_acr)
    biopsy = label_of(rows)
    tags = MammogramTags(name.patient, STUDY_ID, name.side, name.view, name.energy, age, path.name, RELEASE)
    dataset, note = jpeg_to_dicom(path.read_bytes(), tags, path.name)
    relpath = image_relpath(name.patient, STUDY_ID, name.side, name.view, name.energy, late=False)
    save_dicom(dataset, out_dir / relpath)
    row = {
        "file": relpath, "patient_id": name.patient, "study_id": STUDY_ID, "laterality": name.side,
        "view": name.view, "energy": name.energy, "phase": "early", "acr": acr, "age": age, "biopsy": biopsy,
    }
    return relpath, row, note


# --- the release -----------------------------------------------------------------------------

def companion_reason(path: Path, sheet_path: Path) -> str:
    if path == sheet_path:
        return "annotation spreadsheet: labels, density and age were read from it"
    if path.suffix.lower() in (".docx", ".zip"):
        return "medical report: free text, not imported"
    if "segmentation" in path.name.lower():
        return "lesion segmentation outlines: not used by this pipeline"
    return "not an image of this release"


def import_release(source: Path, out_dir: Path, table: Path | None = None) -> ImportOutcome:
    """Import every CDD-CESM JPEG under ``source`` into ``out_dir`` (raw layout), reporting each file."""
    sheet_path = find_annotation_file(source, table)
    sheet = read_annotations(sheet_path)
    rows_by_stem = dict(tuple(sheet.groupby("stem")))
    outcome = ImportOutcome()
    seen: dict[str, str] = {}
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        source_name = relative_name(path, source)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            outcome.ignored(source_name, companion_reason(path, sheet_path))
            continue
        name = parse_image_name(path.stem)
        if name is None:
            outcome.rejected(source_name, f"file name does not follow {NAME_PATTERN}")
            continue
        if name.stem in seen:
            outcome.rejected(source_name, f"duplicate of {seen[name.stem]}")
            continue
        seen[name.stem] = source_name
        rows = rows_by_stem.get(name.stem)
        if rows is None:
            outcome.rejected(source_name, f"no row for {name.stem} in {sheet_path.name} sheet '{ANNOTATION_SHEET}'")
            continue
        try:
            relpath, row, note = import_image(path, name, rows, out_dir)
        except ValueError as exc:
            outcome.rejected(source_name, str(exc))
            continue
        outcome.imported(source_name, relpath, row, note)
    for _, row in sheet[~sheet["stem"].isin(seen.keys())].iterrows():
        outcome.unmatched(row_source(sheet_path, row), f"no image file named {row['stem']}.jpg in the release")
    return outcome
