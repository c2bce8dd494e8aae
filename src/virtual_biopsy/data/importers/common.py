"""What every importer shares: the report of every source file, the atomic write of the raw
layout, and the minimal DICOM wrapping of a JPEG mammogram.

An importer reads a public release and fills an :class:`ImportOutcome` while writing images
(and the lesion masks of a release with outlines) into a temporary folder; :func:`run_import`
turns that folder into ``data/raw`` in one rename, together with ``metadata.csv``,
``import_report.csv`` and, when masks were written, ``lesions.csv``. Nothing is dropped silently:
every source file gets a report row (imported, rejected, ignored), every spreadsheet row that
names no image gets one (unmatched), and so does every annotation row that cannot be used.

DICOM building lives here only until a shared writer exists in ``virtual_biopsy.dicom``; it
writes the few tags that ingest and preprocessing read, nothing clinical it cannot know.
"""
from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, ExplicitVRLittleEndian, generate_uid

from virtual_biopsy.core.atomic import atomic_dir, write_csv
from virtual_biopsy.data.layout import LESION_COLUMNS, LESIONS_FILE, METADATA_COLUMNS
from virtual_biopsy.dicom.cesm import DIGITAL_MG_FOR_PRESENTATION, IMAGE_TYPE_DES, IMAGE_TYPE_LE

REPORT_COLUMNS = ("source", "status", "reason", "destination")
IMPORTED, REJECTED, UNMATCHED, IGNORED = "imported", "rejected", "unmatched", "ignored"
REPORT_NAME = "import_report.csv"
METADATA_NAME = "metadata.csv"

SERIES_DESCRIPTION = {"LE": "LOW ENERGY", "DES": "RECOMBINED"}


class ImporterError(ValueError):
    """The release cannot be imported at all (wrong paths, missing table, nothing usable)."""


@dataclass
class ImportOutcome:
    """Everything one importer run produced: metadata rows of written images, lesions.csv rows of
    written masks (data.layout.LESION_COLUMNS) and report rows."""

    metadata: list[dict] = field(default_factory=list)
    report: list[dict] = field(default_factory=list)
    lesions: list[dict] = field(default_factory=list)

    def lesion(self, row: dict) -> None:
        """Record the lesions.csv row of a mask the importer wrote."""
        self.lesions.append(row)

    def imported(self, source: str, destination: str, row: dict, note: str = "") -> None:
        self.metadata.append(row)
        self.report.append({"source": source, "status": IMPORTED, "reason": note, "destination": destination})

    def rejected(self, source: str, reason: str) -> None:
        self.report.append({"source": source, "status": REJECTED, "reason": reason, "destination": ""})

    def unmatched(self, source: str, reason: str) -> None:
        self.report.append({"source": source, "status": UNMATCHED, "reason": reason, "destination": ""})

    def ignored(self, source: str, reason: str) -> None:
        self.report.append({"source": source, "status": IGNORED, "reason": reason, "destination": ""})

    def counts(self) -> Counter:
        return Counter(row["status"] for row in self.report)


# An importer reads ``source`` (and an optional table path) and writes images under the folder it
# is given, relative paths as in data.layout.image_relpath.
Importer = Callable[[Path, Path, "Path | None"], ImportOutcome]


# --- destination and atomic write ------------------------------------------------------------

def check_destination(dest: Path, force: bool) -> None:
    """Refuse to replace a non-empty destination unless ``force``: data/raw may hold real data."""
    if dest.exists() and not dest.is_dir():
        raise ImporterError(f"{dest}: destination exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ImporterError(f"{dest}: destination is not empty; pass --force to replace it")


def check_source(source: Path) -> None:
    if not source.is_dir():
        raise ImporterError(f"{source}: source release folder does not exist or is not a folder")


def run_import(importer: Importer, source: Path, dest: Path, table: Path | None, force: bool) -> ImportOutcome:
    """Run ``importer`` into a temporary folder and rename it onto ``dest`` when anything was imported.

    When nothing could be imported the destination is left untouched and :class:`ImporterError`
    names the most common reasons, so the user sees why without opening a report.
    """
    source, dest = Path(source), Path(dest)
    check_source(source)
    check_destination(dest, force)
    with atomic_dir(dest) as tmp:
        outcome = importer(source, tmp, table)
        if not outcome.metadata:
            raise ImporterError(f"{source}: no image could be imported. {top_reasons(outcome)}")
        metadata = pd.DataFrame(outcome.metadata, columns=list(METADATA_COLUMNS)).sort_values("file")
        write_csv(tmp / METADATA_NAME, metadata)
        if outcome.lesions:  # optional in the layout: a release without outlines has none
            lesions = pd.DataFrame(outcome.lesions, columns=list(LESION_COLUMNS)).sort_values("file")
            write_csv(tmp / LESIONS_FILE, lesions)
        write_csv(tmp / REPORT_NAME, pd.DataFrame(outcome.report, columns=list(REPORT_COLUMNS)))
    return outcome


def top_reasons(outcome: ImportOutcome, limit: int = 3) -> str:
    """The most frequent rejection reasons, with the numbers in them folded so alike ones group."""
    reasons = Counter(
        re.sub(r"\d+", "N", row["reason"]) for row in outcome.report if row["status"] in (REJECTED, UNMATCHED)
    )
    if not reasons:
        return "The source folder holds no image file of this release."
    return "Most common reasons: " + "; ".join(f"{n} x {why}" for why, n in reasons.most_common(limit))


def summary(outcome: ImportOutcome, dest: Path) -> str:
    """Human summary printed by the CLI, ending with the next step."""
    counts = outcome.counts()
    masks = f" with {len(outcome.lesions)} lesion masks ({LESIONS_FILE})" if outcome.lesions else ""
    lines = [
        f"imported {counts[IMPORTED]} images into {dest}{masks}",
        f"rejected {counts[REJECTED]} files or annotations, {counts[UNMATCHED]} spreadsheet or annotation rows "
        f"named no image, ignored {counts[IGNORED]} companion files; every one is listed in {dest / REPORT_NAME}",
    ]
    if counts[REJECTED] or counts[UNMATCHED]:
        lines.append("warning: " + top_reasons(outcome))
    lines.append(f"next: dvc add {dest}  (then commit {dest}.dvc)")
    return "\n".join(lines)


# --- small shared parsers --------------------------------------------------------------------

def relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def is_missing(value: object) -> bool:
    """True for an empty spreadsheet cell (NaN, None, blank, or the release's '_' placeholder)."""
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return str(value).strip() in ("", "_", "-", "nan", "NaN")


def parse_age(value: object, where: str) -> str:
    """Age in whole years as text ('' when not reported); DICOM '056Y' style accepted."""
    if is_missing(value):
        return ""
    text = str(value).strip().upper().removesuffix("Y")
    try:
        age = float(text)
    except ValueError:
        raise ValueError(f"{where}: age {value!r} is not a number") from None
    if not 0 < age < 130:
        raise ValueError(f"{where}: age {value!r} is outside 0-130 years")
    return str(int(age))


def parse_acr(value: object, where: str) -> str:
    """ACR density category a-d ('' when not reported); accepts 'A', 'acr c', '3'."""
    if is_missing(value):
        return ""
    text = str(value).strip().upper().replace("ACR", "").strip().removesuffix(".0")
    letter = {"1": "A", "2": "B", "3": "C", "4": "D"}.get(text, text)
    if letter not in ("A", "B", "C", "D"):
        raise ValueError(f"{where}: breast density {value!r} is not an ACR category (A, B, C, D)")
    return letter.lower()


# --- JPEG -> DICOM ---------------------------------------------------------------------------

_SOF_BASELINE = 0xC0


def jpeg_frame_marker(data: bytes) -> int | None:
    """The start-of-frame marker (0xC0 baseline, 0xC2 progressive, ...) of a JPEG stream, or None.

    Pillow reports progressive but not extended-sequential frames; only SOF0 may be stored under
    the JPEG Baseline transfer syntax, so the marker is read here exactly.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        pos += 2 + length
    return None


@dataclass(frozen=True)
class DecodedJpeg:
    """A JPEG's pixels as 8-bit grayscale, and whether its bytes can be kept as they are."""

    pixels: np.ndarray  # uint8 (rows, columns)
    keep_bytes: bool    # single-channel baseline: encapsulate without re-encoding
    note: str           # why the bytes were not kept, for the report ('' when kept)


def decode_jpeg(data: bytes, where: str) -> DecodedJpeg:
    """Decode a JPEG fully (a truncated file fails here) and decide how to store it.

    Single-channel baseline JPEGs are kept byte for byte (MONOCHROME2, lossless wrapping).
    Three-channel JPEGs are decoded and stored as uncompressed 8-bit MONOCHROME2: a mammogram is
    grayscale, CDD-CESM's colour JPEGs carry the same value in every channel, and Pillow's luma
    conversion returns that value unchanged, while YBR_FULL_422 would make every consumer convert.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                raise ValueError(f"{where}: not a JPEG file (Pillow reads it as {image.format})")
            image.load()
            mode = image.mode
            gray = image.convert("L") if mode != "L" else image
            pixels = np.asarray(gray, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{where}: unreadable JPEG ({exc})") from None
    marker = jpeg_frame_marker(data)
    if mode == "L" and marker == _SOF_BASELINE:
        return DecodedJpeg(pixels, True, "")
    why = f"{mode} JPEG" if mode != "L" else f"non-baseline JPEG (SOF 0x{marker or 0:02X})"
    return DecodedJpeg(pixels, False, f"{why} decoded to 8-bit grayscale, stored uncompressed")


@dataclass(frozen=True)
class MammogramTags:
    """What the importer knows about one image; everything else is left out of the DICOM."""

    patient_id: str
    study_id: str
    laterality: str
    view: str
    energy: str          # LE | DES
    age: str             # years or ''
    source_name: str     # file name in the release, kept in ImageComments for provenance
    release: str         # e.g. CDD-CESM


def jpeg_to_dicom(data: bytes, tags: MammogramTags, where: str) -> tuple[Dataset, str]:
    """Wrap one JPEG mammogram as a Digital Mammography X-Ray Image (For Presentation) object.

    UIDs are derived from the release name and file name, so importing the same release twice
    gives the same bytes (data.dvc then sees no change). The display window is the image's full
    range: the release has none, and the authors' loader normalises these images by plain min-max.
    Returns the dataset and a note for the report ('' when the JPEG bytes were kept).
    """
    decoded = decode_jpeg(data, where)
    ds = _mammogram_header(tags, decoded.pixels)
    if decoded.keep_bytes:
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR = "OB"
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = decoded.pixels.tobytes()
        ds["PixelData"].VR = "OW"
    return ds, decoded.note


def _uid(tags: MammogramTags, *parts: str) -> str:
    return generate_uid(entropy_srcs=[tags.release, *parts])


def _mammogram_header(tags: MammogramTags, pixels: np.ndarray) -> Dataset:
    study_uid = _uid(tags, "study", tags.patient_id, tags.study_id)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DIGITAL_MG_FOR_PRESENTATION
    ds.SOPClassUID = DIGITAL_MG_FOR_PRESENTATION
    ds.SOPInstanceUID = _uid(tags, "image", tags.source_name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = _uid(tags, "series", tags.patient_id, tags.study_id, tags.energy)
    ds.Modality = "MG"
    ds.PatientID = tags.patient_id
    ds.PatientName = tags.patient_id
    ds.PatientSex = "F"
    if tags.age:
        ds.PatientAge = f"{int(tags.age):03d}Y"
    ds.StudyID = tags.study_id
    ds.SeriesNumber = 1 if tags.energy == "LE" else 2
    ds.InstanceNumber = 1
    ds.ImageType = list(IMAGE_TYPE_LE if tags.energy == "LE" else IMAGE_TYPE_DES)
    ds.SeriesDescription = SERIES_DESCRIPTION[tags.energy]
    ds.ImageLaterality = tags.laterality
    ds.ViewPosition = tags.view
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    # The release's JPEGs are lossy whichever way they are stored here.
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.ImageComments = f"Imported from {tags.release} {tags.source_name}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    low, high = int(pixels.min()), int(pixels.max())
    ds.WindowCenter = (low + high) / 2
    ds.WindowWidth = max(high - low, 1)
    ds.VOILUTFunction = "LINEAR"
    return ds


def save_dicom(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
