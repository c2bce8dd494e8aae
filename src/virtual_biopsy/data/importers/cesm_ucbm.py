"""Import CESM@UCBM (Rofena et al., Fondazione Policlinico Universitario Campus Bio-Medico) into the raw layout.

The release holds DICOM files from a GE Senographe Pristina, named as in the authors' public
code: ``<patient>_<study>_<L|R><CC|MLO>_<LOW_ENERGY|RECOMBINED>`` (``P96_76_RMLO_LOW_ENERGY``),
with or without a ``.dcm`` suffix, in any folder structure; a late-phase acquisition may carry a
``_LATE`` suffix as in this project's layout. The files are copied byte for byte. Before copying,
each is checked to be a readable mammography DICOM whose own tags (ImageLaterality/Laterality,
ViewPosition, ImageType or SeriesDescription) agree with its name.

Clinical information (biopsy result, ACR density, phase, age) comes from a table given with
``--table`` (CSV or XLSX, one row per image). Its image column holds the image name (with or
without directories and suffix); the other columns are found by name, case and spacing ignored:

    image:  image, image_name, file, filename, name
    biopsy: biopsy, biopsy_result, pathology, label, outcome   (malignant | benign | none/normal)
    acr:    acr, density, breast_density, acr_category          (a-d or 1-4; blank = not reported)
    phase:  phase, acquisition, acquisition_phase                (early | late)
    age:    age, patient_age

The project's own metadata.csv (data.layout.METADATA_COLUMNS) is such a table. Without a table,
biopsy is 'none', ACR is not reported and age is read from the DICOM PatientAge; the summary says so.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from virtual_biopsy.data.importers.common import (
    ImporterError,
    ImportOutcome,
    is_missing,
    parse_acr,
    parse_age,
    relative_name,
)
from virtual_biopsy.data.layout import image_relpath
from virtual_biopsy.dicom.cesm import MG_SOP_CLASSES, UnknownEnergyError, energy_of

RELEASE = "CESM@UCBM"
IMAGE_NAME_RE = re.compile(
    r"^(?P<patient>[A-Za-z0-9]+)_(?P<study>[A-Za-z0-9]+)_(?P<laterality>[LR])(?P<view>CC|MLO)_"
    r"(?P<energy>LOW_ENERGY|RECOMBINED)(?P<late>_LATE)?$"
)
NAME_PATTERN = "<patient>_<study>_<L|R><CC|MLO>_<LOW_ENERGY|RECOMBINED>[_LATE][.dcm]"
ENERGY_TOKEN_TO_ENERGY = {"LOW_ENERGY": "LE", "RECOMBINED": "DES"}
# Files that accompany DICOM releases and are never images.
COMPANION_SUFFIXES = (".csv", ".xlsx", ".xls", ".txt", ".md", ".pdf", ".docx", ".json", ".zip")

TABLE_COLUMNS = {
    "image": ("image", "image_name", "file", "filename", "file_name", "name"),
    "biopsy": ("biopsy", "biopsy_result", "pathology", "label", "outcome"),
    "acr": ("acr", "density", "breast_density", "acr_category", "breast_density_acr"),
    "phase": ("phase", "acquisition", "acquisition_phase"),
    "age": ("age", "patient_age"),
}
BIOPSY_VALUES = {"malignant": "malignant", "benign": "benign", "none": "none", "normal": "none", "": "none"}
PHASE_VALUES = {"early": "early", "late": "late"}


@dataclass(frozen=True)
class ImageName:
    stem: str
    patient: str
    study: str
    laterality: str
    view: str
    energy: str   # LE | DES
    late: bool


def parse_image_name(file_name: str) -> ImageName | None:
    stem = file_name[: -len(".dcm")] if file_name.lower().endswith(".dcm") else file_name
    match = IMAGE_NAME_RE.match(stem)
    if match is None:
        return None
    return ImageName(
        stem, match["patient"], match["study"], match["laterality"], match["view"],
        ENERGY_TOKEN_TO_ENERGY[match["energy"]], match["late"] is not None,
    )


# --- clinical table --------------------------------------------------------------------------

def _column_key(name: object) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


def read_table(path: Path) -> pd.DataFrame:
    """The clinical table indexed by image stem, with columns renamed to image/biopsy/acr/phase/age."""
    if not path.is_file():
        raise ImporterError(f"{path}: clinical table does not exist")
    try:
        raw = pd.read_excel(path, engine="openpyxl") if path.suffix.lower() == ".xlsx" else pd.read_csv(path, dtype=str)
    except Exception as exc:  # pandas and openpyxl raise many types for a broken file
        raise ImporterError(f"{path}: not a readable CSV/XLSX table ({exc})") from exc
    by_key = {_column_key(c): c for c in raw.columns}
    renames = {}
    for field, aliases in TABLE_COLUMNS.items():
        hit = next((by_key[a] for a in aliases if a in by_key), None)
        if hit is not None:
            renames[hit] = field
    if "image" not in renames.values():
        raise ImporterError(f"{path}: no image column (one of {TABLE_COLUMNS['image']}); columns are {list(raw.columns)}")
    table = raw.rename(columns=renames)[list(renames.values())].copy()
    table["table_row"] = raw.index + 2
    table["stem"] = table["image"].map(lambda v: Path(str(v).strip()).name.removesuffix(".dcm"))
    duplicated = table[table["stem"].duplicated(keep=False)]
    if not duplicated.empty:
        raise ImporterError(f"{path}: several rows for image(s) {sorted(set(duplicated['stem']))}")
    return table.set_index("stem")


def clinical_values(name: ImageName, row: pd.Series | None, header_age: object, where: str) -> dict:
    """Biopsy, ACR, phase and age for one image from its table row (DICOM age as a fallback)."""
    phase_from_name = "late" if name.late else "early"
    if row is None:
        return {"biopsy": "none", "acr": "", "phase": phase_from_name, "age": parse_age(header_age, where)}
    biopsy_text = "" if is_missing(row.get("biopsy")) else str(row.get("biopsy")).strip().lower()
    if biopsy_text not in BIOPSY_VALUES:
        raise ValueError(f"{where}: biopsy {row.get('biopsy')!r} is not malignant, benign or none")
    phase = phase_from_name
    if not is_missing(row.get("phase")):
        phase = PHASE_VALUES.get(str(row.get("phase")).strip().lower(), "")
        if not phase:
            raise ValueError(f"{where}: phase {row.get('phase')!r} is not early or late")
        if name.late and phase != "late":
            raise ValueError(f"{where}: the table says phase {phase} but the file name says _LATE")
    age = row.get("age")
    return {
        "biopsy": BIOPSY_VALUES[biopsy_text],
        "acr": parse_acr(row.get("acr"), where),
        "phase": phase,
        "age": parse_age(header_age if is_missing(age) else age, where),
    }


# --- DICOM checks ----------------------------------------------------------------------------

def read_checked(path: Path) -> Dataset:
    """Read a DICOM file and check it is a complete mammography image.

    Pixel data is read (deferred values are loaded on access) but not decoded: a full-field
    mammogram decodes slowly, and ingest decodes every image anyway.
    """
    try:
        ds = pydicom.dcmread(path, defer_size="1 KB")
        pixel_data = ds.PixelData if "PixelData" in ds else None
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"not a readable DICOM file ({exc})") from None
    if pixel_data is None:
        raise ValueError("DICOM file holds no Pixel Data")
    if not ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian).is_compressed:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        if len(pixel_data) < expected:
            raise ValueError(f"Pixel Data is cut short ({len(pixel_data)} of {expected} bytes)")
    modality = str(ds.get("Modality", ""))
    if modality != "MG" and str(ds.get("SOPClassUID", "")) not in MG_SOP_CLASSES:
        raise ValueError(f"Modality is {modality!r}, not MG (mammography)")
    return ds


def check_tags_match_name(ds: Dataset, name: ImageName) -> None:
    """The DICOM's own laterality, view and energy must say what the file name says."""
    laterality = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")).strip()
    if laterality not in ("L", "R"):
        raise ValueError(f"DICOM ImageLaterality/Laterality is {laterality!r}, not L or R")
    view = str(ds.get("ViewPosition", "")).strip()
    if view not in ("CC", "MLO"):
        raise ValueError(f"DICOM ViewPosition is {view!r}, not CC or MLO")
    try:
        energy = energy_of(ds)
    except UnknownEnergyError as exc:
        raise ValueError(str(exc)) from None
    for what, tag_value, name_value in (
        ("laterality", laterality, name.laterality), ("view", view, name.view), ("energy", energy, name.energy)
    ):
        if tag_value != name_value:
            raise ValueError(f"DICOM {what} is {tag_value} but the file name says {name_value}")


# --- the release -----------------------------------------------------------------------------

def import_image(path: Path, name: ImageName, row: pd.Series | None, out_dir: Path) -> tuple[str, dict]:
    ds = read_checked(path)
    check_tags_match_name(ds, name)
    values = clinical_values(name, row, ds.get("PatientAge"), path.name)
    relpath = image_relpath(name.patient, name.study, name.laterality, name.view, name.energy,
                            late=values["phase"] == "late")
    target = out_dir / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)  # byte for byte: the DICOM is the original acquisition
    meta = {"file": relpath, "patient_id": name.patient, "study_id": name.study, "laterality": name.laterality,
            "view": name.view, "energy": name.energy, **values}
    return relpath, meta


def import_release(source: Path, out_dir: Path, table: Path | None = None) -> ImportOutcome:
    """Copy every CESM@UCBM DICOM under ``source`` into ``out_dir`` (raw layout), reporting each file."""
    clinical = read_table(table) if table is not None else None
    outcome = ImportOutcome()
    seen: dict[str, str] = {}
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        source_name = relative_name(path, source)
        if table is not None and path.resolve() == table.resolve():
            outcome.ignored(source_name, "clinical table: biopsy, density, phase and age were read from it")
            continue
        if path.suffix.lower() in COMPANION_SUFFIXES or path.name.startswith("."):
            outcome.ignored(source_name, "not an image of this release")
            continue
        name = parse_image_name(path.name)
        if name is None:
            outcome.rejected(source_name, f"file name does not follow {NAME_PATTERN}")
            continue
        if name.stem in seen:
            outcome.rejected(source_name, f"duplicate of {seen[name.stem]}")
            continue
        seen[name.stem] = source_name
        row = None
        if clinical is not None:
            if name.stem not in clinical.index:
                outcome.rejected(source_name, f"no row for {name.stem} in {table.name}")
                continue
            row = clinical.loc[name.stem]
        try:
            relpath, meta = import_image(path, name, row, out_dir)
        except ValueError as exc:
            outcome.rejected(source_name, str(exc))
            continue
        note = "" if clinical is not None else "no clinical table: biopsy none, ACR not reported"
        outcome.imported(source_name, relpath, meta, note)
    if clinical is not None:
        for stem, row in clinical[~clinical.index.isin(seen.keys())].iterrows():
            outcome.unmatched(f"{table.name}!row {row['table_row']} ({stem})", f"no image file named {stem} in the release")
    return outcome
