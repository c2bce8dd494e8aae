"""Build and write standard-conformant Digital Mammography X-Ray "for presentation" objects.

One function builds the dataset (:func:`build_mammogram_dataset`), one writes it
(:func:`write_dataset`). Everything the caller does not pass is fixed, so the same inputs give the
same bytes: there is no wall-clock time and no random UID anywhere; UIDs come from
:func:`deterministic_uid`, a name-based UUID under the ``2.25`` root (PS3.5 B.2).

The dataset carries every Type 1 and Type 2 attribute of the mandatory modules of the IOD
(PS3.3 A.26.2): Patient, General Study, Patient Study, General Series, DX Series, Mammography
Series, Frame of Reference, General Equipment, General Acquisition, General Image, Image Pixel,
Contrast/Bolus, DX Anatomy Imaged, DX Image, DX Detector, X-Ray Acquisition Dose, X-Ray Filtration,
Mammography Image, VOI LUT, Acquisition Context and SOP Common. ``dciodvfy`` (dicom3tools) accepts
the result without errors (tests/test_dicom_write.py).

LE and DES images of one CESM exposure differ in their own tags as on a GE SenoBright system:
ImageType (``ORIGINAL\\PRIMARY\\\\LOW_ENERGY`` vs ``DERIVED\\PRIMARY\\\\RECOMBINED``),
SeriesDescription, the filter (rhodium/silver for the low-energy beam, copper for the high-energy
beam that the recombined image is made from), kVp, and a display window that is wide for LE and
narrow for DES.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from virtual_biopsy.core.atomic import atomic_path
from virtual_biopsy.dicom.cesm import (
    DIGITAL_MG_FOR_PRESENTATION,
    IMAGE_TYPE_DES,
    IMAGE_TYPE_LE,
    IMAGE_TYPE_SYNTHETIC_DES,
)

# Name-based UUIDs (RFC 4122 version 5) in this namespace become the project's UIDs.
_UID_NAMESPACE = uuid.UUID("5b0e8a1e-3c41-5d4a-9f2e-7a6c1d0b2e47")

# Pseudo-implementation UID and version name of the writer (File Meta Information).
IMPLEMENTATION_VERSION_NAME = "VBIOPSY_1"

# Codes of the Mammography Image module (PS3.16 CID 4014 view, CID 4031 region, CID 4015 modifier).
_VIEW_CODES = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}
_BREAST_CODE = ("76752008", "Breast")

# (0020,0020) Patient Orientation as a mammography system writes it: the first value is the
# direction of increasing columns, the second of increasing rows (PS3.3 C.8.11.7.1.1). Right
# breasts are displayed with the chest wall on the right (columns run towards Posterior), left
# breasts with the chest wall on the left (columns run towards Anterior).
_PATIENT_ORIENTATION = {
    ("R", "CC"): ["P", "L"],
    ("L", "CC"): ["A", "R"],
    ("R", "MLO"): ["P", "F"],
    ("L", "MLO"): ["A", "F"],
}

# X-ray beam of each image: the LE image is the low-energy exposure; the recombined image is
# computed from it and the high-energy exposure, whose copper-filtered beam it reports.
_BEAM = {
    "LE": {"kvp": 29.0, "filter": "RHODIUM", "anode": "RHODIUM"},
    "DES": {"kvp": 45.0, "filter": "COPPER", "anode": "RHODIUM"},
}

ENERGIES = ("LE", "DES")
LATERALITIES = ("L", "R")
VIEWS = ("CC", "MLO")


class DicomBuildError(ValueError):
    """An input cannot become a valid mammography DICOM object."""


@dataclass(frozen=True)
class Patient:
    """Patient module values. ``birth_date`` is ``YYYYMMDD``; ``age_years`` becomes PatientAge."""

    patient_id: str
    name: str
    birth_date: str
    age_years: int
    sex: str = "F"


@dataclass(frozen=True)
class Study:
    """General Study module values; ``date``/``time`` are DICOM DA/TM strings."""

    instance_uid: str
    study_id: str
    accession_number: str
    date: str
    time: str
    description: str = "CESM BILATERAL"
    institution: str = "Virtual Biopsy Simulation Site"
    referring_physician: str = ""


@dataclass(frozen=True)
class Series:
    """General Series values of one series (one energy of one breast and phase)."""

    instance_uid: str
    number: int
    description: str


@dataclass(frozen=True)
class Window:
    """Display window (VOI LUT module): linear, centre and width in stored-value units."""

    center: float
    width: float
    explanation: str = ""

    def __post_init__(self) -> None:
        if not self.width >= 1:
            raise DicomBuildError(f"window width must be at least 1, got {self.width}")


@dataclass(frozen=True)
class Equipment:
    """General Equipment and DX Detector values."""

    manufacturer: str = "Virtual Biopsy Simulator"
    model_name: str = "vbiopsy synth"
    station_name: str = "SIM01"
    device_serial_number: str = "0001"
    software_versions: str = "1.0"
    detector_type: str = "DIRECT"
    detector_id: str = "DET0001"


def deterministic_uid(*parts: object) -> str:
    """A valid DICOM UID ``2.25.<uuid as integer>`` that depends only on ``parts``.

    ``pydicom.uid.generate_uid(prefix=None)`` ignores its entropy sources and returns a random
    UID, so the project derives a name-based (version 5) UUID instead: same parts, same UID,
    at most 44 characters.
    """
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def image_type_for(energy: str, synthetic: bool = False) -> list[str]:
    """ImageType of an LE, DES or generator-imputed DES image (see dicom.cesm)."""
    if energy not in ENERGIES:
        raise DicomBuildError(f"energy must be one of {ENERGIES}, got {energy!r}")
    if synthetic:
        if energy != "DES":
            raise DicomBuildError("only DES (recombined) images can be synthetic")
        return list(IMAGE_TYPE_SYNTHETIC_DES)
    return list(IMAGE_TYPE_LE if energy == "LE" else IMAGE_TYPE_DES)


def _code_item(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _check_pixels(pixels: np.ndarray, bits_stored: int) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2:
        raise DicomBuildError(f"pixels must be a 2-D array, got {type(pixels).__name__} "
                              f"with shape {getattr(pixels, 'shape', None)}")
    if pixels.dtype != np.uint16:
        raise DicomBuildError(f"pixels must be uint16, got {pixels.dtype}")
    if bits_stored not in (10, 12, 14, 16):
        raise DicomBuildError(f"bits_stored must be 10, 12, 14 or 16, got {bits_stored}")
    top = int(pixels.max()) if pixels.size else 0
    if top >= 1 << bits_stored:
        raise DicomBuildError(f"pixel value {top} does not fit in {bits_stored} stored bits")


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_MG_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = deterministic_uid("virtual-biopsy", "implementation", IMPLEMENTATION_VERSION_NAME)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _set_patient_and_study(ds: Dataset, patient: Patient, study: Study) -> None:
    # Patient, Patient Study
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{int(patient.age_years):03d}Y"
    # General Study
    ds.StudyInstanceUID = study.instance_uid
    ds.StudyDate = study.date
    ds.StudyTime = study.time
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.description


def _set_series_and_equipment(ds: Dataset, series: Series, study: Study, equipment: Equipment,
                              laterality: str, frame_of_reference_uid: str) -> None:
    # General Series, DX Series, Mammography Series
    ds.Modality = "MG"
    ds.SeriesInstanceUID = series.instance_uid
    ds.SeriesNumber = series.number
    ds.SeriesDate = study.date
    ds.SeriesTime = study.time
    ds.SeriesDescription = series.description
    # (0020,0060) Laterality stays absent: ImageLaterality carries it (General Series 2C rule)
    ds.BodyPartExamined = "BREAST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    # Frame of Reference: one per breast and compression (shared by its LE and DES image)
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = equipment.manufacturer
    ds.InstitutionName = study.institution
    ds.StationName = equipment.station_name
    ds.ManufacturerModelName = equipment.model_name
    ds.DeviceSerialNumber = equipment.device_serial_number
    ds.SoftwareVersions = equipment.software_versions


def _set_image_pixel(ds: Dataset, pixels: np.ndarray, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


def _set_dx_image(ds: Dataset, energy: str, synthetic: bool) -> None:
    ds.ImageType = image_type_for(energy, synthetic)
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1  # higher value = more attenuation = brighter
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.QualityControlImage = "NO"


def _set_anatomy_and_view(ds: Dataset, laterality: str, view: str) -> None:
    # DX Anatomy Imaged, Mammography Image
    ds.ImageLaterality = laterality
    ds.AnatomicRegionSequence = DicomSequence([_code_item(*_BREAST_CODE)])
    view_item = _code_item(*_VIEW_CODES[view])
    view_item.ViewModifierCodeSequence = DicomSequence([])
    ds.ViewCodeSequence = DicomSequence([view_item])
    ds.ViewPosition = view
    ds.PatientOrientation = _PATIENT_ORIENTATION[(laterality, view)]
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.PositionerPrimaryAngle = 0 if view == "CC" else (45 if laterality == "R" else -45)
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"


def _set_detector_and_exposure(ds: Dataset, equipment: Equipment, energy: str,
                               pixel_spacing_mm: float) -> None:
    spacing = [round(float(pixel_spacing_mm), 6)] * 2
    # DX Detector
    ds.DetectorType = equipment.detector_type
    ds.DetectorID = equipment.detector_id
    ds.ImagerPixelSpacing = spacing
    ds.PixelSpacing = spacing
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Simulated detector, no magnification"
    # X-Ray Acquisition Dose, X-Ray Filtration
    beam = _BEAM[energy]
    ds.KVP = beam["kvp"]
    ds.AnodeTargetMaterial = beam["anode"]
    ds.FilterMaterial = beam["filter"]


def _set_voi_lut(ds: Dataset, window: Window) -> None:
    ds.WindowCenter = round(float(window.center), 2)
    ds.WindowWidth = round(float(window.width), 2)
    if window.explanation:
        ds.WindowCenterWidthExplanation = window.explanation
    ds.VOILUTFunction = "LINEAR"


def build_mammogram_dataset(
    pixels: np.ndarray,
    *,
    patient: Patient,
    study: Study,
    series: Series,
    laterality: str,
    view: str,
    energy: str,
    window: Window,
    sop_instance_uid: str,
    frame_of_reference_uid: str,
    instance_number: int = 1,
    acquisition_number: int = 1,
    content_date: str | None = None,
    content_time: str | None = None,
    pixel_spacing_mm: float = 0.1,
    bits_stored: int = 12,
    synthetic: bool = False,
    image_comments: str = "",
    contrast_agent: str = "IODINE",
    equipment: Equipment = Equipment(),
) -> FileDataset:
    """Return a Digital Mammography X-Ray Image Storage - For Presentation dataset.

    ``pixels`` (uint16, rows x columns, values below ``2**bits_stored``) become MONOCHROME2 pixel
    data; ``energy`` is ``"LE"`` or ``"DES"``; ``synthetic=True`` marks a generator-imputed DES
    image (ImageType ``DERIVED\\SECONDARY\\\\RECOMBINED\\SYNTHETIC``). Content date and time
    default to the study's. Raises :class:`DicomBuildError` naming the offending value.
    """
    if laterality not in LATERALITIES:
        raise DicomBuildError(f"laterality must be one of {LATERALITIES}, got {laterality!r}")
    if view not in VIEWS:
        raise DicomBuildError(f"view must be one of {VIEWS}, got {view!r}")
    _check_pixels(pixels, bits_stored)
    if not pixel_spacing_mm > 0:
        raise DicomBuildError(f"pixel_spacing_mm must be positive, got {pixel_spacing_mm}")

    ds = FileDataset("", Dataset(), file_meta=_file_meta(sop_instance_uid), preamble=b"\0" * 128)
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DIGITAL_MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = content_date or study.date
    ds.InstanceCreationTime = content_time or study.time
    _set_patient_and_study(ds, patient, study)
    _set_series_and_equipment(ds, series, study, equipment, laterality, frame_of_reference_uid)
    # General Acquisition, General Image
    ds.AcquisitionNumber = acquisition_number
    ds.AcquisitionDate = content_date or study.date
    ds.AcquisitionTime = content_time or study.time
    ds.InstanceNumber = instance_number
    ds.ContentDate = content_date or study.date
    ds.ContentTime = content_time or study.time
    if image_comments:
        ds.ImageComments = image_comments
    # Contrast/Bolus: both images of a CESM exposure are taken after the iodine injection
    ds.ContrastBolusAgent = contrast_agent
    ds.AcquisitionContextSequence = DicomSequence([])
    _set_image_pixel(ds, pixels, bits_stored)
    _set_dx_image(ds, energy, synthetic)
    _set_anatomy_and_view(ds, laterality, view)
    _set_detector_and_exposure(ds, equipment, energy, pixel_spacing_mm)
    _set_voi_lut(ds, window)
    return ds


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble + File Meta), atomically; return the path."""
    path = Path(path)
    with atomic_path(path, suffix=".dcm") as tmp:
        dcmwrite(tmp, ds, enforce_file_format=True)
    return path
