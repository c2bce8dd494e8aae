"""A second simulated cohort, written as the CDD-CESM release is downloaded (pre-training, paper 5.2.1).

The paper pre-trains its CycleGAN on the public CDD-CESM dataset (Khaled et al. 2022) before
fine-tuning it on its own. The embedded default stands in for that release with a cohort of its
own, written in the release's layout so that the pipeline brings it in the way it would bring in
the real one, through ``vbiopsy import --format cdd-cesm`` (data/importers/cdd_cesm.py)::

    Low energy images of CDD-CESM/P1_L_DM_CC.jpg ...   DM = low energy, 8-bit grayscale JPEG
    Subtracted images of CDD-CESM/P1_L_CM_CC.jpg ...   CM = recombined (DES), 8-bit grayscale JPEG
    Radiology manual annotations.xlsx                  sheet "all", the release's columns (SHEET_COLUMNS)
    Radiology_hand_drawn_segmentations_v2.csv          one ellipse outline per lesion image (VIA CSV)
    SIMULATED.txt                                      what this folder is (the importer ignores it)

Another cohort, not another simulator. Anatomy and contrast physics are the embedded dataset's
(``synth``'s knobs, frozen; data/phantom.py). What differs (``pretrain.cohort`` in params.yaml,
:class:`~virtual_biopsy.core.config.PretrainCohortConfig`):

=============  =========  ======================================================================
knob           default    meaning
=============  =========  ======================================================================
patients       40         patients P1, P2, ... (the release numbers them without padding)
seed           20220301   the cohort's own seed: none of its breasts is one of the embedded dataset's
image_height   160        JPEG rows; columns follow ``synth.aspect_ratio``
noise_sd       0.03       quantum noise, fraction of full scale (embedded: 0.015; DES twice this)
le_gamma       0.7        LE display curve: value = (intensity / breast 99.9th percentile) ** gamma
des_contrast   1.4        DES display gain: value = 0.25 + gain * (intensity - breast median level)
jpeg_quality   85         JPEG encoder quality
=============  =========  ======================================================================

The release's acquisitions are early-phase only (one exam ``S1`` per patient), so this cohort has
no late phase. Labels follow the release's sheet: ``Malignant``, ``Benign``, ``Normal``; density
``A``-``D``, or ``_`` where it was not reported.

Marked simulated wherever it can be: each JPEG carries a COM segment starting with ``SIMULATED``
(the importer puts it into every DICOM's ImageComments, which dicom.cesm.is_simulated reads), the
sheet's Machine column says ``SIMULATED``, and SIMULATED.txt says what the folder is. Same
arguments, same bytes: all randomness comes from the cohort's seed.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import zipfile
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import openpyxl
from PIL import Image

from virtual_biopsy.core.atomic import atomic_dir
from virtual_biopsy.core.config import PretrainCohortConfig, SynthConfig
from virtual_biopsy.data import phantom
from virtual_biopsy.data.importers.cdd_cesm import (
    ANNOTATION_FILE_NAMES,
    ANNOTATION_SHEET,
    LOW_ENERGY_FOLDER,
    SEGMENTATION_FILE_NAME,
    SUBTRACTED_FOLDER,
)
from virtual_biopsy.data.synthetic import BreastRecord, draw_cohort, lesion_mask
from virtual_biopsy.dicom.cesm import SIMULATED_MARK

# The released sheet 'all' columns, in the released order.
SHEET_COLUMNS = (
    "Image_name", "Patient_ID", "Side", "Type", "Age", "Breast density (ACR)", "BIRADS", "Findings",
    "View", "Tags", "Machine", "Pathology Classification/ Follow up",
)
# The released segmentation CSV columns (a VGG Image Annotator 2 export), in the released order.
VIA_COLUMNS = ("#filename", "file_size", "file_attributes", "region_count", "region_id",
               "region_shape_attributes", "region_attributes")

MARKER_FILE = "SIMULATED.txt"
JPEG_COMMENT = f"{SIMULATED_MARK} image of the virtual-biopsy pre-training cohort (CDD-CESM layout); not a patient"
MACHINE = f"{SIMULATED_MARK} (virtual-biopsy pre-training cohort)"
FILE_TYPES = {"LE": ("DM", "DM", LOW_ENERGY_FOLDER), "DES": ("CM", "CESM", SUBTRACTED_FOLDER)}  # name, sheet Type, folder
PATHOLOGY = {"malignant": "Malignant", "benign": "Benign", "none": "Normal"}
BIRADS = {"malignant": 5, "benign": 3, "none": 1}
FINDINGS = {"malignant": "mass", "benign": "mass", "none": "No obvious abnormality"}
LE_REFERENCE_PERCENTILE = 99.9   # LE: the breast's brightest tissue maps to the top of the curve
SHEET_TIMESTAMP = datetime(2022, 3, 1)  # the workbook's created/modified stamp: fixed, not the clock
DES_BASE_LEVEL = 0.25            # DES: the unenhanced breast level's display value (air falls below 0)


class CohortError(ValueError):
    """The cohort cannot be written as asked (occupied folder holding something else ...)."""


# --- the release's tables (also what tests write their tiny releases with) ---------------------

def write_annotation_sheet(path: Path, rows: Iterable[Sequence], columns: Sequence[str] = SHEET_COLUMNS,
                           sheet: str = ANNOTATION_SHEET) -> None:
    """The annotation workbook: sheet ``sheet`` with ``columns`` and one row per ``rows`` item,
    plus the release's second sheet (mass descriptions, which the importer does not read)."""
    book = openpyxl.Workbook()
    book.active.title = sheet
    book.active.append(list(columns))
    for row in rows:
        book.active.append(list(row))
    book.create_sheet("mass_description").append(["Image_name", "Mass shape"])
    book.properties.created = SHEET_TIMESTAMP
    buffer = io.BytesIO()
    book.save(buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(reproducible_xlsx(buffer.getvalue()))


def reproducible_xlsx(data: bytes) -> bytes:
    """The workbook with the save time taken out (openpyxl stamps 'modified' and every zip entry
    with the clock), so the same rows give the same bytes and DVC sees no change where there is none."""
    stamp = SHEET_TIMESTAMP.strftime("%Y-%m-%dT%H:%M:%SZ")
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            content = source.read(info.filename)
            if info.filename == "docProps/core.xml":
                content = re.sub(rb"(<dcterms:modified[^>]*>)[^<]*(</dcterms:modified>)",
                                 rb"\g<1>" + stamp.encode() + rb"\g<2>", content)
            target.writestr(zipfile.ZipInfo(info.filename, SHEET_TIMESTAMP.timetuple()[:6]), content,
                            compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def write_segmentations(path: Path, regions: Sequence[tuple[str, dict | str]]) -> None:
    """A VIA CSV export: one row per (file name, region shape); the shape as JSON (a str as it is)."""
    per_file: dict[str, int] = {}
    for name, _ in regions:
        per_file[name] = per_file.get(name, 0) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(VIA_COLUMNS)
        seen: dict[str, int] = {}
        for name, shape in regions:
            region_id = seen.setdefault(name, 0)
            seen[name] += 1
            text = shape if isinstance(shape, str) else json.dumps(shape, separators=(",", ":"))
            writer.writerow([name, 12345, "{}", per_file[name], region_id, text, '{"lesion":"mass"}'])


# --- the scanner's look ----------------------------------------------------------------------

def jpeg_bytes(pixels: np.ndarray, quality: int, comment: str = JPEG_COMMENT) -> bytes:
    """An 8-bit grayscale baseline JPEG of ``pixels`` carrying ``comment`` in a COM segment."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "L").save(
        buffer, format="JPEG", quality=int(quality), comment=comment.encode("ascii"))
    return buffer.getvalue()


def _to_8bit(values: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)


def low_energy_8bit(intensity: np.ndarray, breast: np.ndarray, gamma: float) -> np.ndarray:
    """LE intensity -> 8 bits: scaled to the breast's bright tissue, then the gamma curve."""
    inside = intensity[breast > 0.5]
    reference = float(np.percentile(inside, LE_REFERENCE_PERCENTILE)) if inside.size else float(intensity.max())
    return _to_8bit(np.clip(intensity / max(reference, 1e-6), 0.0, 1.0) ** gamma)


def recombined_8bit(intensity: np.ndarray, breast: np.ndarray, contrast: float) -> np.ndarray:
    """DES intensity -> 8 bits: a gain around the unenhanced breast level (its median)."""
    inside = intensity[breast > 0.5]
    base = float(np.median(inside)) if inside.size else float(np.median(intensity))
    return _to_8bit(DES_BASE_LEVEL + contrast * (intensity - base))


def outline_of(mask: np.ndarray) -> dict:
    """A reader's outline of a lesion mask: the VIA ellipse spanning its extent."""
    rows, cols = np.nonzero(mask)
    return {"name": "ellipse", "cx": round(float(cols.min() + cols.max()) / 2, 1),
            "cy": round(float(rows.min() + rows.max()) / 2, 1),
            "rx": round(float(cols.max() - cols.min() + 1) / 2, 1),
            "ry": round(float(rows.max() - rows.min() + 1) / 2, 1)}


# --- the cohort ------------------------------------------------------------------------------

def cohort_synth_config(synth: SynthConfig, cohort: PretrainCohortConfig) -> SynthConfig:
    """The simulator's settings for this cohort: ``synth``'s physics, the cohort's size and noise,
    early phase only (the release has no late acquisitions)."""
    return dataclasses.replace(synth, patients=cohort.patients, image_height=cohort.image_height,
                               noise_sd=cohort.noise_sd, late_phase_share=0.0)


def image_name(record: BreastRecord, energy: str, view: str) -> str:
    """The release's stem, ``P<number>_<L|R>_<DM|CM>_<CC|MLO>``."""
    return f"P{record.patient_index + 1}_{record.laterality}_{FILE_TYPES[energy][0]}_{view}"


def sheet_row(record: BreastRecord, energy: str, view: str) -> list:
    """One row of sheet 'all' (SHEET_COLUMNS order)."""
    return [image_name(record, energy, view), record.patient_index + 1, record.laterality, FILE_TYPES[energy][1],
            record.age, record.acr_reported.upper() or "_", BIRADS[record.label], FINDINGS[record.label], view,
            "", MACHINE, PATHOLOGY[record.label]]


def _write_breast(record: BreastRecord, synth: SynthConfig, cohort: PretrainCohortConfig,
                  root: Path) -> tuple[list[list], list[tuple[str, dict]]]:
    """Write the four JPEGs of one breast; return its sheet rows and outline rows."""
    rows = synth.image_height
    cols = max(1, int(round(rows * synth.aspect_ratio)))
    side = 0 if record.laterality == "R" else 1
    sheet, outlines = [], []
    for v, view in enumerate(("CC", "MLO")):
        anatomy = phantom.render_anatomy(record.breast, view, rows, cols)
        noise_rng = np.random.default_rng([cohort.seed, 4, record.patient_index, side, v])
        intensities = {"LE": phantom.low_energy_image(anatomy, record.breast, synth, noise_rng),
                       "DES": phantom.recombined_image(anatomy, record.breast, synth, False, noise_rng)}
        pixels = {"LE": low_energy_8bit(intensities["LE"], anatomy.breast, cohort.le_gamma),
                  "DES": recombined_8bit(intensities["DES"], anatomy.breast, cohort.des_contrast)}
        outline = None
        if record.breast.mass is not None:
            outline = outline_of(phantom.to_display_orientation(lesion_mask(anatomy), record.laterality))
        for energy in ("LE", "DES"):
            stem = image_name(record, energy, view)
            display = phantom.to_display_orientation(pixels[energy], record.laterality)
            path = root / FILE_TYPES[energy][2] / f"{stem}.jpg"
            path.write_bytes(jpeg_bytes(display, cohort.jpeg_quality))
            sheet.append(sheet_row(record, energy, view))
            if outline is not None:
                outlines.append((f"{stem}.jpg", outline))
    return sheet, outlines


def check_destination(out_dir: Path) -> None:
    """Replace only a folder this module wrote (its marker file) or an empty one: the real
    release may have been put where the simulated one goes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CohortError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER_FILE).is_file():
        raise CohortError(f"{out_dir}: holds files that are not the simulated cohort (no {MARKER_FILE}); "
                          "if it is the real CDD-CESM release, set pretrain.release_dir to it and keep the "
                          "simulated one elsewhere, else empty the folder")


def marker_text(synth: SynthConfig, cohort: PretrainCohortConfig) -> str:
    return (f"{SIMULATED_MARK} DATA. Not the CDD-CESM release and not patients: a cohort of the virtual-biopsy\n"
            f"simulator (data/cdd_cesm_cohort.py) written in that release's layout, seed {cohort.seed},\n"
            f"{cohort.patients} patients, {synth.image_height} rows, noise_sd {cohort.noise_sd}, LE gamma "
            f"{cohort.le_gamma}, DES contrast {cohort.des_contrast}, JPEG quality {cohort.jpeg_quality}.\n")


def write_cohort(out_dir: Path, cohort: PretrainCohortConfig, synth: SynthConfig) -> dict:
    """Write the cohort to ``out_dir`` in the CDD-CESM release layout (atomically); return counts.

    ``synth``: the embedded dataset's section, whose anatomy and physics the cohort shares.
    """
    out_dir = Path(out_dir)
    check_destination(out_dir)
    config = cohort_synth_config(synth, cohort)
    records = draw_cohort(config, cohort.seed)
    with atomic_dir(out_dir) as tmp:
        for folder in (LOW_ENERGY_FOLDER, SUBTRACTED_FOLDER):
            (tmp / folder).mkdir()
        sheet, outlines = [], []
        for record in records:
            breast_rows, breast_outlines = _write_breast(record, config, cohort, tmp)
            sheet += breast_rows
            outlines += breast_outlines
        write_annotation_sheet(tmp / ANNOTATION_FILE_NAMES[0], sheet)
        write_segmentations(tmp / SEGMENTATION_FILE_NAME, outlines)
        (tmp / MARKER_FILE).write_text(marker_text(config, cohort))
    labels = [r.label for r in records]
    return {"patients": cohort.patients, "breasts": len(records), "images": len(sheet),
            "lesion_outlines": len(outlines), **{f"breasts_{k}": labels.count(k) for k in PATHOLOGY}}
