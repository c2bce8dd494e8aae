"""Import CDD-CESM (Khaled et al., Sci Data 2022; TCIA collection CDD-CESM) into the raw layout.

The release, as downloaded from TCIA::

    Low energy images of CDD-CESM/P1_L_DM_CC.jpg ...     DM = low energy (LE, FFDM-like)
    Subtracted images of CDD-CESM/P1_L_CM_CC.jpg ...     CM = contrast (subtracted, DES)
    Radiology manual annotations.xlsx                    sheet "all", one row per image finding
    Radiology_hand_drawn_segmentations_v2.csv            hand-drawn lesion outlines -> lesion masks
    Medical reports for cases .zip / P1.docx ...         free-text reports (not imported)

Image names are ``{patient}_{side}_{type}_{view}`` (``P1_L_CM_MLO``). The sheet's columns are
``Image_name, Patient_ID, Side, Type, Age, Breast density (ACR), BIRADS, Findings, View, Tags,
Machine, Pathology Classification/ Follow up``; Type is ``DM`` or ``CESM``, density ``A``-``D``
(blank or ``_`` when not reported), and pathology ``Normal``, ``Benign`` or ``Malignant``. An image
with several findings has several rows; its label is the most severe one. Some Image_name cells
carry stray spaces, which are ignored.

Every patient has one exam, acquired in the early phase only; the study id is ``S1``.

Each sheet row of an image must say what its file name says: ``Patient_ID`` the number after
``P``, ``Side`` ``L``/``R``, ``Type`` ``DM`` for a DM file and ``CESM`` for a CM file, ``View``
``CC``/``MLO``; a DM file must lie in the low-energy folder, a CM file in the subtracted one. An
image that disagrees is rejected with the row, what it says, what it must say and the fix.

Each JPEG becomes a Digital Mammography DICOM built by the project's one writer (:mod:`.jpeg`:
pixels unchanged at 8 bits, a nominal 0.1 mm pixel spacing said to be nominal, a full-range
window, nothing invented about the acquisition); ``dciodvfy`` accepts it without errors.

Lesion outlines. ``Radiology_hand_drawn_segmentations_v2.csv`` is a VGG Image Annotator (VIA 2)
CSV export (format in :mod:`.via`): columns ``#filename, file_size, file_attributes,
region_count, region_id, region_shape_attributes, region_attributes``, one row per region;
``#filename`` is the JPEG's name (a few carry a stray space before ``.jpg``, ignored like the
sheet's), ``region_shape_attributes`` a JSON polygon (most), ellipse, circle, polyline or point,
or ``{}`` for an image without a region. An image's regions are united into one mask, rasterised
in the JPEG's pixel geometry. The DICOM keeps the JPEG's pixels as they are (``jpeg_to_dicom``
neither flips nor crops nor resizes: its Rows x Columns are the JPEG's), so the transform the
mask must follow is the identity: it is rasterised at the DICOM's Rows x Columns, in the JPEG's
coordinates, and written beside its DICOM's place in the layout (``masks/P1/S1/P1_S1_LCC_RECOMBINED.png``)
with a ``lesions.csv`` row (``source`` ``annotation``, latent values empty: nobody knows them). Points
have no area: they are skipped, an image with points only gets no mask, and the file's report row
counts both. An annotation row that cannot be used is reported with its CSV row number (header =
row 1) and the reason, and only that image loses its mask (a mask missing one of its regions
would understate the lesion); the image itself and the rest of the import go ahead:

* malformed JSON, an unknown shape or a missing/non-numeric key: ``rejected``;
* naming a file that is not in the release: ``unmatched``;
* naming an image that was not imported (its own report row says why): ``rejected``;
* regions that all lie outside their image: ``rejected``.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from virtual_biopsy.data.importers.common import (
    ImporterError,
    ImportOutcome,
    parse_acr,
    parse_age,
    relative_name,
)
from virtual_biopsy.data.importers.jpeg import MammogramTags, jpeg_to_dicom
from virtual_biopsy.data.importers.via import Region, RegionError, parse_region, rasterise
from virtual_biopsy.data.layout import LESION_LATENT_COLUMNS, image_relpath, lesion_mask_relpath
from virtual_biopsy.data.lesions import write_mask_png
from virtual_biopsy.dicom.write import write_dataset

RELEASE = "CDD-CESM"
STUDY_ID = "S1"
LOW_ENERGY_FOLDER = "Low energy images of CDD-CESM"
SUBTRACTED_FOLDER = "Subtracted images of CDD-CESM"
# TCIA has served the sheet under both names.
ANNOTATION_FILE_NAMES = ("Radiology manual annotations.xlsx", "Radiology-manual-annotations.xlsx")
ANNOTATION_SHEET = "all"
SEGMENTATION_FILE_NAME = "Radiology_hand_drawn_segmentations_v2.csv"
COL_SEGMENTED_FILE = "#filename"
COL_REGION_SHAPE = "region_shape_attributes"

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
FILE_TYPE_TO_SHEET_TYPE = {"DM": "DM", "CM": "CESM"}  # the sheet's Type column spells CM as CESM
FILE_TYPE_TO_FOLDER = {"DM": LOW_ENERGY_FOLDER, "CM": SUBTRACTED_FOLDER}
FOLDER_TO_FILE_TYPE = {folder: file_type for file_type, folder in FILE_TYPE_TO_FOLDER.items()}
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


# --- lesion outlines ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Annotation:
    """One row of the segmentation CSV that names an image: its row number, name and region."""

    csv_row: int          # header is row 1
    file_name: str        # #filename as written
    region: Region | None  # None: the image has no region ({})


@dataclass
class Outlines:
    """The segmentation CSV read: the usable annotations per image stem, the stems whose mask is
    spoiled by an unusable row (reported as it was read), and counts for the file's report row."""

    path: Path | None = None
    by_stem: dict[str, list[Annotation]] = field(default_factory=dict)
    spoiled: set[str] = field(default_factory=set)
    masks: int = 0                 # masks written
    regions: int = 0               # regions with area in them
    points_skipped: int = 0        # point regions (no area)
    point_only_images: int = 0     # images whose only regions are points: no mask

    def source(self, csv_row: int, file_name: str) -> str:
        """How the import report names one annotation row."""
        return f"{self.path.name}#row {csv_row} ({file_name})"


def segmented_stem(file_name: str) -> str:
    """The image stem a ``#filename`` names (``P1_L_CM_CC .jpg`` -> ``P1_L_CM_CC``)."""
    name = normalise_image_name(file_name)
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_segmentation_file(source: Path) -> Path | None:
    """The release's segmentation CSV, or None when the download has none (no lesion masks then)."""
    found = sorted(source.rglob(SEGMENTATION_FILE_NAME))
    if len(found) > 1:
        raise ImporterError(f"{source}: several segmentation files {[str(p) for p in found]}; keep one")
    return found[0] if found else None


def read_outlines(path: Path | None, outcome: ImportOutcome) -> Outlines:
    """Read the segmentation CSV, reporting each unusable row in ``outcome`` (see the module docstring)."""
    outlines = Outlines(path)
    if path is None:
        return outlines
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in (COL_SEGMENTED_FILE, COL_REGION_SHAPE) if c not in (reader.fieldnames or [])]
        if missing:
            raise ImporterError(f"{path}: lacks column(s) {missing} of a VIA CSV export; it has {reader.fieldnames}")
        for number, row in enumerate(reader, start=2):
            file_name = str(row[COL_SEGMENTED_FILE] or "")
            stem = segmented_stem(file_name)
            try:
                region = parse_region(row[COL_REGION_SHAPE] or "")
            except RegionError as exc:
                outcome.rejected(outlines.source(number, file_name), f"{exc}; no lesion mask for {stem}")
                outlines.spoiled.add(stem)
                continue
            outlines.by_stem.setdefault(stem, []).append(Annotation(number, file_name, region))
    return outlines


def write_lesion_mask(outlines: Outlines, stem: str, relpath: str, shape: tuple[int, int], out_dir: Path,
                      outcome: ImportOutcome) -> str:
    """Write the mask of one imported image from its annotations, if it has usable ones; return a
    note for the image's report row ('' when it has no outline)."""
    rows_of_image = outlines.by_stem.get(stem, [])
    regions = [a.region for a in rows_of_image if a.region is not None]
    if stem in outlines.spoiled:
        return "no lesion mask: one of its outline rows is unusable (see the segmentation rows)"
    if not regions:
        return ""
    with_area = [r for r in regions if r.has_area]
    outlines.points_skipped += len(regions) - len(with_area)
    if not with_area:
        outlines.point_only_images += 1
        return "no lesion mask: its lesion annotations are points only (no area)"
    mask = rasterise(with_area, *shape)
    if not mask.any():
        for annotation in rows_of_image:
            reason = f"regions lie outside the image ({shape[0]} x {shape[1]} pixels); no lesion mask for {stem}"
            outcome.rejected(outlines.source(annotation.csv_row, annotation.file_name), reason)
        return "no lesion mask: its outlines lie outside the image"
    mask_relpath = lesion_mask_relpath(relpath)
    write_mask_png(out_dir / mask_relpath, mask)
    outcome.lesion({"file": relpath, "mask": mask_relpath, "source": "annotation",
                    **dict.fromkeys(LESION_LATENT_COLUMNS, "")})
    outlines.masks += 1
    outlines.regions += len(with_area)
    return f"lesion mask from {len(with_area)} outline region(s)"


def report_unused_outlines(outlines: Outlines, release_stems: set[str], imported_stems: set[str],
                           outcome: ImportOutcome) -> None:
    """Report the usable annotation rows of images that are not in the release or were not imported
    (an unusable row was reported as it was read)."""
    for stem, rows_of_image in outlines.by_stem.items():
        if stem in imported_stems:
            continue
        for annotation in rows_of_image:
            where = outlines.source(annotation.csv_row, annotation.file_name)
            if stem not in release_stems:
                outcome.unmatched(where, f"no image file named {stem}.jpg in the release")
            else:
                outcome.rejected(where, f"its image {stem}.jpg was not imported (see that file's row)")


def outlines_reason(outlines: Outlines) -> str:
    """The segmentation file's report row: what was made of it."""
    return (f"lesion outlines (VIA CSV): {outlines.masks} masks written from {outlines.regions} regions; "
            f"{outlines.points_skipped} point annotations skipped (a point has no area), leaving "
            f"{outlines.point_only_images} point-only images without a mask; unusable rows are listed "
            "in this report with their row number")


# --- one image -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SheetRule:
    """What one sheet column must say for an image: the value, the part of the file name that
    decides it, and the column's rule in words (so an error shows the spelling the sheet uses)."""

    value: str
    name_part: str
    rule: str


def sheet_rules(name: ImageName) -> dict[str, SheetRule]:
    """The sheet columns that must agree with the file name, and what each must say."""
    return {
        COL_PATIENT: SheetRule(str(name.number), name.patient, "the number after 'P' in the file name"),
        COL_SIDE: SheetRule(name.side, name.side, "'L' or 'R'"),
        COL_TYPE: SheetRule(FILE_TYPE_TO_SHEET_TYPE[name.file_type], name.file_type,
                            "DM images: 'DM', CM images: 'CESM'"),
        COL_VIEW: SheetRule(name.view, name.view, "'CC' or 'MLO'"),
    }


def cell_text(value: object) -> str:
    """A sheet cell as it reads in the spreadsheet: blank -> '', a number read as 3.0 -> '3'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip().removesuffix(".0")


def check_rows_agree(name: ImageName, rows: pd.DataFrame, file_name: str) -> None:
    """The sheet's Patient_ID, Side, Type and View must say what the file name says.

    The error names the row, what it says, the value it must say for this file and the fix.
    """
    for _, row in rows.iterrows():
        for column, rule in sheet_rules(name).items():
            said = cell_text(row[column])
            if said != rule.value:
                raise ValueError(
                    f"sheet row {row['excel_row']} says {column}={said!r}; for a file named {file_name} "
                    f"({rule.name_part} in its name) the sheet must say {column}={rule.value!r} ({rule.rule}); "
                    "correct the cell, or the file name if the sheet is right"
                )


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
    """A DM image must lie in the low-energy folder and a CM image in the subtracted one."""
    expected = FOLDER_TO_FILE_TYPE.get(path.parent.name)
    if expected is not None and expected != name.file_type:
        raise ValueError(
            f"{name.file_type} image in folder '{path.parent.name}', which holds {expected} images; move it to "
            f"'{FILE_TYPE_TO_FOLDER[name.file_type]}', or correct its name if the folder is right"
        )


def import_image(path: Path, name: ImageName, rows: pd.DataFrame,
                 out_dir: Path) -> tuple[str, dict, str, tuple[int, int]]:
    """Write one image as DICOM; return its relative path, its metadata row, a report note and its
    stored shape (rows, columns: the JPEG's, unchanged)."""
    check_folder(name, path)
    check_rows_agree(name, rows, path.name)
    age = single_value(rows, COL_AGE, parse_age)
    acr = single_value(rows, COL_ACR, parse_acr)
    biopsy = label_of(rows)
    tags = MammogramTags(name.patient, STUDY_ID, name.side, name.view, name.energy, age, path.name, RELEASE)
    dataset, note = jpeg_to_dicom(path.read_bytes(), tags, path.name)
    relpath = image_relpath(name.patient, STUDY_ID, name.side, name.view, name.energy, late=False)
    write_dataset(dataset, out_dir / relpath)
    row = {
        "file": relpath, "patient_id": name.patient, "study_id": STUDY_ID, "laterality": name.side,
        "view": name.view, "energy": name.energy, "phase": "early", "acr": acr, "age": age, "biopsy": biopsy,
    }
    return relpath, row, note, (int(dataset.Rows), int(dataset.Columns))


# --- the release -----------------------------------------------------------------------------

def companion_reason(path: Path, sheet_path: Path) -> str:
    if path == sheet_path:
        return "annotation spreadsheet: labels, density and age were read from it"
    if path.suffix.lower() in (".docx", ".zip"):
        return "medical report: free text, not imported"
    if "segmentation" in path.name.lower():
        return f"not the release's lesion outlines ({SEGMENTATION_FILE_NAME}): not read"
    return "not an image of this release"


def import_release(source: Path, out_dir: Path, table: Path | None = None) -> ImportOutcome:
    """Import every CDD-CESM JPEG under ``source`` into ``out_dir`` (raw layout), reporting each file."""
    sheet_path = find_annotation_file(source, table)
    sheet = read_annotations(sheet_path)
    rows_by_stem = dict(tuple(sheet.groupby("stem")))
    outcome = ImportOutcome()
    outlines = read_outlines(find_segmentation_file(source), outcome)
    seen: dict[str, str] = {}
    release_stems: set[str] = set()  # every image file's stem, whether its name parses or not
    imported: set[str] = set()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        source_name = relative_name(path, source)
        if path == outlines.path:
            continue  # reported below, with what was made of it
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            outcome.ignored(source_name, companion_reason(path, sheet_path))
            continue
        release_stems.add(normalise_image_name(path.stem))
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
            relpath, row, note, shape = import_image(path, name, rows, out_dir)
        except ValueError as exc:
            outcome.rejected(source_name, str(exc))
            continue
        mask_note = write_lesion_mask(outlines, name.stem, relpath, shape, out_dir, outcome)
        outcome.imported(source_name, relpath, row, "; ".join(n for n in (note, mask_note) if n))
        imported.add(name.stem)
    for _, row in sheet[~sheet["stem"].isin(seen.keys())].iterrows():
        outcome.unmatched(row_source(sheet_path, row), f"no image file named {row['stem']}.jpg in the release")
    if outlines.path is not None:
        report_unused_outlines(outlines, release_stems, imported, outcome)
        outcome.ignored(relative_name(outlines.path, source), outlines_reason(outlines))
    return outcome
