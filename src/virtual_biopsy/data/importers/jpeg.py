"""A release's JPEG mammogram as a conformant DICOM mammogram, built by the project's one writer.

CDD-CESM ships JPEGs; ingest reads DICOM. :func:`jpeg_to_dicom` builds each image with
:func:`virtual_biopsy.dicom.write.build_mammogram_dataset`, the writer that also makes
``vbiopsy synth``'s images and the synthetic CESM, so all three get the same mandatory modules
and ``dciodvfy`` accepts them without errors (tests/test_importers.py). What a JPEG release does
not know is said or left out, never invented:

* Pixels: the JPEG's 8-bit values, unchanged, as MONOCHROME2 with BitsAllocated = BitsStored = 8.
  A single-channel baseline JPEG keeps its bytes (JPEG Baseline transfer syntax: no re-encoding,
  and the file stays the size of the JPEG); any other JPEG (colour, progressive) is decoded once
  and stored uncompressed. Lossy Image Compression says ``01`` (ISO_10918_1) either way: the
  release's images were JPEG-compressed before they reached us. The writer takes 10- to 16-bit
  pixels only, so it is given the 8-bit values as 10-bit ones (they fit) and the Image Pixel
  module is then set to 8 bits (:func:`store_jpeg_pixels`).
* Pixel spacing: the JPEGs carry none. ImagerPixelSpacing holds a nominal
  :data:`NOMINAL_PIXEL_SPACING_MM`, ImageComments says that it is nominal, and PixelSpacing (a
  calibrated spacing, with the writer's calibration description) is left out.
* Display window: none in the release; the window spans the image's own range, so contrast
  stretching is plain min-max normalisation, as the authors' loader treats these images.
* Unknown to the release: dates, birth date, accession number and equipment (Type 2: present and
  empty), age when the sheet has none (PatientAge left out, not ``000Y``), and the exposure facts
  the writer fills in for its simulated GE system (:data:`UNKNOWN_ACQUISITION_ATTRIBUTES`: Type 3,
  left out).
* Patient Orientation: the writer's display convention (chest wall on the right for a right
  breast), which is also what preprocessing assumes for an image without the tag.
* Simulated images: a JPEG whose COM segment says ``SIMULATED`` (the pre-training cohort of
  data/cdd_cesm_cohort.py) gets ImageComments starting with ``SIMULATED`` and quoting it, which
  is how the project marks simulated images (dicom.cesm.is_simulated).
* UIDs come from :func:`~virtual_biopsy.dicom.write.deterministic_uid` over the release, patient,
  study and file name: importing the same release twice gives the same bytes.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import FileDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import set_pixel_data
from pydicom.uid import JPEGBaseline8Bit

from virtual_biopsy.dicom.cesm import SIMULATED_MARK
from virtual_biopsy.dicom.write import (
    Equipment,
    Patient,
    Series,
    Study,
    Window,
    build_mammogram_dataset,
    deterministic_uid,
)

# The pitch of the 0.1 mm detectors of GE's CESM systems (Senographe Essential, Pristina) and the
# project's convention (data.synthetic: 2850 rows at 0.1 mm, the paper's images). A JPEG says
# nothing about its spacing; this value only makes the Type 1 ImagerPixelSpacing truthful as "nominal".
NOMINAL_PIXEL_SPACING_MM = 0.1
SERIES_DESCRIPTION = {"LE": "LOW ENERGY", "DES": "RECOMBINED"}
SERIES_NUMBER = {"LE": 1, "DES": 2}
WINDOW_EXPLANATION = "FULL RANGE (NO WINDOW IN RELEASE)"
JPEG_METHOD = "ISO_10918_1"  # Lossy Image Compression Method of JPEG (PS3.3 C.7.6.1.1.5.1)

# The fewest stored bits build_mammogram_dataset takes; every 8-bit value fits.
_WRITER_BITS_STORED = 10
_SOF_BASELINE = 0xC0
MAX_COMMENT_CHARS = 512  # of a JPEG's COM segment kept in ImageComments (LT holds 10240)

# Type 3 attributes the writer fills in for its simulated system (beam, positioner, implant,
# partial view, calibrated spacing) that a JPEG release does not report: removed, not guessed.
UNKNOWN_ACQUISITION_ATTRIBUTES = (
    "KVP", "AnodeTargetMaterial", "FilterMaterial", "PositionerPrimaryAngle", "BreastImplantPresent",
    "PartialView", "PixelSpacing", "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription",
)
# Nothing is known about the equipment: the Type 2 Manufacturer and DetectorType stay empty.
UNKNOWN_EQUIPMENT = Equipment(manufacturer="", model_name="", station_name="", device_serial_number="",
                              software_versions="", detector_type="", detector_id="")


@dataclass(frozen=True)
class MammogramTags:
    """What the importer knows about one image; everything else is empty or left out of the DICOM."""

    patient_id: str
    study_id: str
    laterality: str
    view: str
    energy: str          # LE | DES
    age: str             # years or ''
    source_name: str     # file name in the release, kept in ImageComments for provenance
    release: str         # e.g. CDD-CESM


# --- decoding --------------------------------------------------------------------------------

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
    comment: str = ""   # the JPEG's COM segment (printable ASCII), '' when it has none


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
            comment = jpeg_comment(image.info.get("comment", b""))
            gray = image.convert("L") if mode != "L" else image
            pixels = np.asarray(gray, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{where}: unreadable JPEG ({exc})") from None
    marker = jpeg_frame_marker(data)
    if mode == "L" and marker == _SOF_BASELINE:
        return DecodedJpeg(pixels, True, "", comment)
    why = f"{mode} JPEG" if mode != "L" else f"non-baseline JPEG (SOF 0x{marker or 0:02X})"
    return DecodedJpeg(pixels, False, f"{why} decoded to 8-bit grayscale, stored uncompressed", comment)


def jpeg_comment(value: bytes | str) -> str:
    """A JPEG COM segment as printable ASCII (DICOM's default repertoire), at most
    :data:`MAX_COMMENT_CHARS` characters."""
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return "".join(c for c in text if " " <= c <= "~").strip()[:MAX_COMMENT_CHARS]


def provenance_comment(tags: MammogramTags, comment: str) -> str:
    """ImageComments: where the image came from, the nominal spacing, and, for a JPEG whose COM
    segment says it is simulated, that first (dicom.cesm.is_simulated reads it)."""
    text = (f"Imported from {tags.release} {tags.source_name}; pixel spacing "
            f"{NOMINAL_PIXEL_SPACING_MM} mm is nominal (the JPEG carries none)")
    if SIMULATED_MARK in comment.upper():
        text = f"{SIMULATED_MARK} image (JPEG comment: {comment}); {text}"
    return text


# --- building --------------------------------------------------------------------------------

def jpeg_to_dicom(data: bytes, tags: MammogramTags, where: str) -> tuple[FileDataset, str]:
    """One JPEG mammogram as a Digital Mammography X-Ray Image (For Presentation) dataset.

    Returns the dataset (write it with dicom.write.write_dataset) and a note for the import report
    ('' when the JPEG bytes were kept). Raises ValueError naming ``where`` for an unreadable JPEG.
    """
    decoded = decode_jpeg(data, where)
    ds = build_mammogram_dataset(
        decoded.pixels.astype(np.uint16),
        patient=_patient(tags), study=_study(tags),
        series=Series(instance_uid=_uid(tags, "series", tags.patient_id, tags.study_id, tags.energy),
                      number=SERIES_NUMBER[tags.energy], description=SERIES_DESCRIPTION[tags.energy]),
        laterality=tags.laterality, view=tags.view, energy=tags.energy,
        window=full_range_window(decoded.pixels),
        sop_instance_uid=_uid(tags, "image", tags.source_name),
        # one per breast and compression: the LE and DES image of a view share it
        frame_of_reference_uid=_uid(tags, "frame", tags.patient_id, tags.study_id, tags.laterality, tags.view),
        instance_number=_instance_number(tags),
        pixel_spacing_mm=NOMINAL_PIXEL_SPACING_MM,
        bits_stored=_WRITER_BITS_STORED,
        image_comments=provenance_comment(tags, decoded.comment),
        equipment=UNKNOWN_EQUIPMENT,
    )
    store_jpeg_pixels(ds, decoded, data)
    for keyword in UNKNOWN_ACQUISITION_ATTRIBUTES:
        if keyword in ds:
            delattr(ds, keyword)
    if not tags.age:  # the writer would say 000Y
        del ds.PatientAge
    return ds, decoded.note


def store_jpeg_pixels(ds: FileDataset, decoded: DecodedJpeg, data: bytes) -> None:
    """Set the Image Pixel module to the JPEG's 8-bit pixels, its bytes kept when ``decoded`` says so.

    The writer stored the values at 10 bits; this re-stores the same values at 8 bits
    (BitsAllocated, BitsStored, HighBit, Pixel Data) and marks the image lossy-compressed.
    """
    set_pixel_data(ds, decoded.pixels, "MONOCHROME2", 8, generate_instance_uid=False)
    if decoded.keep_bytes:
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([data])
        ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = JPEG_METHOD


def full_range_window(pixels: np.ndarray) -> Window:
    """The window spanning the image's own range (the release has none; see the module docstring)."""
    low, high = int(pixels.min()), int(pixels.max())
    return Window(center=(low + high) / 2, width=max(high - low, 1), explanation=WINDOW_EXPLANATION)


def _uid(tags: MammogramTags, *parts: str) -> str:
    return deterministic_uid(tags.release, *parts)


def _patient(tags: MammogramTags) -> Patient:
    """The release's pseudonymous id as id and name; birth date unknown; age 0 is removed later."""
    return Patient(patient_id=tags.patient_id, name=f"{tags.release}^{tags.patient_id}", birth_date="",
                   age_years=int(tags.age) if tags.age else 0)


def _study(tags: MammogramTags) -> Study:
    """The one exam of a patient; the release reports no date, time, accession number or site."""
    return Study(instance_uid=_uid(tags, "study", tags.patient_id, tags.study_id), study_id=tags.study_id,
                 accession_number="", date="", time="", description=f"{tags.release} CESM", institution="")


def _instance_number(tags: MammogramTags) -> int:
    """1-4 within a series (one energy of a study): RCC, RMLO, LCC, LMLO, as synth numbers them."""
    return 1 + 2 * (tags.laterality == "L") + (tags.view == "MLO")
