"""Standard DICOM results of a virtual biopsy, for a PACS: one Structured Report per study and one
saliency object per classified image (highdicom 0.28).

What is written
    :func:`structured_report`
        An Enhanced SR holding a TID 1500 "Imaging Measurement Report": one measurement group
        (TID 1501) per breast with the finding site (Breast, laterality Left/Right), the fused
        p(malignant) (the calibrated mean over the serving folds, what the class is decided on) as
        a numeric measurement "Probability of cancer" (DCM 111047, unit UCUM ``{ratio}``, derivation
        Mean when it is a fold mean; p_F, p_C and the uncalibrated p beside it when given, told
        apart by their method code), the spread between folds as the same concept and method with
        derivation Standard Deviation / Minimum / Maximum (CID 7464: SCT 386136009, 255605001,
        56851009), the class as a qualitative evaluation "Impression" (DCM 121073) = Malignant
        (SCT 21594007) or Benign (SCT 30807003), the conformal prediction set as one qualitative
        evaluation "Class in conformal prediction set" per class in the set (Malignant / Benign)
        with its level as a measurement "Conformal prediction set level" ({ratio}), per CESM view
        whether it was imputed (SCT Yes/No), the algorithm
        (TID 4019: name = registered model name, version = registry version, parameter = alias),
        the breast's source images, and a "research use only" comment. Every source image is in
        the image library (TID 1600) and the evidence sequence.
    :func:`saliency_map`
        The Grad-CAM map of one classifier input as a FRACTIONAL Segmentation (not a Parametric
        Map, see below) in the source image's pixel grid, referencing the source image; segment
        type "Gradient-weighted class activation" (DCM 130403, CID 217 Visual Explanation).
    :func:`write_results`
        Writes the objects atomically, named ``<SR|SEG>_<SOPInstanceUID>.dcm``: no patient
        identifier in a file name.

Concepts DICOM has no code for (the qualitative evaluations "CESM CC/MLO imputed" and "Class
in conformal prediction set", the measurement "Conformal prediction set level" and the methods
"fused"/"fused uncalibrated"/"FFDM"/"CESM" of the probabilities) use the local coding scheme
``99VBIOPSY`` (PS3.16 8.2: designators beginning "99" are private), declared in each SR's
Coding Scheme Identification Sequence. The other codes come from pydicom's copy of PS3.16.

Why a Segmentation and not a Parametric Map
    The Parametric Map IOD requires the Plane Position (Patient) and Plane Orientation (Patient)
    functional groups (PS3.3 A.75); a 2-D projection mammogram has no patient coordinates
    (MG images carry no ImagePositionPatient / ImageOrientationPatient), so a map of one cannot
    pass dciodvfy without inventing geometry (dciodvfy: "Missing attribute Type 1 Required
    Element=<PlanePositionSequence>"), and highdicom 0.28.2 cannot even build one (its frame
    indexing fails without a coordinate system). The Segmentation IOD allows images without
    patient coordinates (its plane position groups are conditional on them), stores the map
    pixel for pixel in the source grid (Rows, Columns, PixelSpacing and PatientOrientation of
    the source; no Frame of Reference, see :func:`_as_projection_map`), and viewers that read
    SEG (e.g. OHIF, 3D Slicer) can overlay it. highdicom 0.28.2's own reader (``segread``)
    refuses it (it wants a SliceThickness a projection has not); pydicom reads it. The price: FRACTIONAL values are 8-bit (0..255 for 0..1), so the map is stored
    to 1/255, not as float32. Fractional type OCCUPANCY, not PROBABILITY: a Grad-CAM relevance is
    not a probability, and a per-pixel "probability" beside the report's p(malignant) would
    invite exactly that misreading.

Same inputs, same bytes: UIDs come from :func:`~virtual_biopsy.dicom.write.deterministic_uid`,
and the dates and times are the study's unless given (highdicom would stamp the wall clock).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from virtual_biopsy.dicom.write import deterministic_uid, write_dataset

LATERALITIES = ("L", "R")
CESM_VIEWS = ("CC", "MLO")
CLASSES = ("malignant", "benign")
RESEARCH_USE_ONLY = ("Research use only: computed by a machine-learning model, not a diagnosis; "
                     "imputed CESM views are synthetic, not acquired images.")

SR_SERIES_NUMBER = 9100  # series numbers of the results: far above the acquisition's
SALIENCY_SERIES_NUMBER = 9101
MANUFACTURER = "virtual-biopsy"
SOFTWARE_VERSIONS = "1"
DEVICE_SERIAL_NUMBER = "0"
FRACTIONAL_MAX = 255  # a FRACTIONAL Segmentation stores 8 bits: 255 means 1.0
RANGE_TOLERANCE = 1e-6  # saliency values this far outside [0, 1] are rounding, and are clipped

# The local coding scheme (PS3.16 8.2), declared in every SR that uses it.
LOCAL_SCHEME = "99VBIOPSY"
LOCAL_SCHEME_NAME = "virtual-biopsy local codes"

_SIDE_NAMES = {"L": "left", "R": "right"}
_FILE_PREFIX = {"SR": "SR", "SEG": "SEG"}


class DicomResultsError(ValueError):
    """An input cannot become a DICOM result; the message names the breast, image or value."""


@dataclass(frozen=True)
class ModelInfo:
    """The registered model that made the result (TID 4019 Algorithm Identification)."""

    name: str  # registered model name, e.g. virtual-biopsy-resnet18
    version: str  # registry version
    alias: str = ""  # registry alias it was served under, e.g. champion


@dataclass(frozen=True)
class BreastFinding:
    """One breast's result, in plain values (``finding_from_prediction`` makes one from predict's).

    ``p_malignant`` is the fused probability (calibrated, the mean over ``n_folds`` folds when
    given); ``p_ffdm`` / ``p_cesm`` the per-modality ones and ``p_uncalibrated`` the fused one
    before calibration, when known; ``p_fold_sd`` / ``p_fold_min`` / ``p_fold_max`` the spread of
    the folds' calibrated p; ``conformal_set`` the classes of the conformal prediction set at
    ``conformal_level``; ``imputed_cesm_views`` the CESM views that were synthetic (imputed from FFDM).
    """

    laterality: str
    p_malignant: float
    label: str
    imputed_cesm_views: tuple[str, ...] = ()
    p_ffdm: float | None = None
    p_cesm: float | None = None
    p_uncalibrated: float | None = None
    p_fold_sd: float | None = None
    p_fold_min: float | None = None
    p_fold_max: float | None = None
    n_folds: int | None = None
    conformal_set: tuple[str, ...] = ()
    conformal_level: float | None = None


@dataclass(frozen=True)
class ClassifierInfo:
    """The classifier whose Grad-CAM a saliency map is: its input's view and modality, its network."""

    view: str
    modality: str  # FFDM or CESM
    architecture: str


def finding_from_prediction(laterality: str, prediction: Any) -> BreastFinding:
    """A :class:`BreastFinding` from predict's per-breast result (``p``, ``label``, ``synthetic``,
    ``p_ffdm``, ``p_cesm``, as serving.fused_model.BreastPrediction holds them)."""
    synthetic = getattr(prediction, "synthetic", {}) or {}
    folds = getattr(prediction, "p_folds", ()) or ()
    spread = {name: _optional_float(getattr(prediction, name, None)) if folds else None
              for name in ("p_fold_sd", "p_fold_min", "p_fold_max")}
    return BreastFinding(laterality=laterality, p_malignant=float(prediction.p), label=str(prediction.label),
                         imputed_cesm_views=tuple(v for v in CESM_VIEWS if synthetic.get(v)),
                         p_ffdm=_optional_float(getattr(prediction, "p_ffdm", None)),
                         p_cesm=_optional_float(getattr(prediction, "p_cesm", None)),
                         p_uncalibrated=_optional_float(getattr(prediction, "p_uncalibrated", None)),
                         n_folds=len(folds) or None, **spread,
                         conformal_set=tuple(getattr(prediction, "conformal_set", ()) or ()),
                         conformal_level=_optional_float(getattr(prediction, "conformal_level", None)))


def _optional_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value


# --- codes -----------------------------------------------------------------------------------------

def _local_code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, LOCAL_SCHEME, meaning)


def _dcm_code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, "DCM", meaning)


PROBABILITY_OF_CANCER = ("111047", "Probability of cancer")  # DCM, CID 6048
IMPRESSION = ("121073", "Impression")  # DCM
GRAD_CAM = ("130403", "Gradient-weighted class activation")  # DCM, CID 217
VISUAL_EXPLANATION = ("130401", "Visual explanation")  # DCM
_METHODS = {"fused": ("FUSED", "MCC-weighted late fusion of FFDM and CESM"),
            "fused_uncalibrated": ("FUSED_UNCAL", "MCC-weighted late fusion of FFDM and CESM, uncalibrated"),
            "ffdm": ("FFDM", "FFDM classifiers, MCC-weighted over views"),
            "cesm": ("CESM", "CESM classifiers, MCC-weighted over views")}
# CID 7464 derivations of the fused p over the serving folds' calibrated p (SCT codes)
_DERIVATIONS = {"mean": ("373098007", "Mean"), "sd": ("386136009", "Standard Deviation"),
                "min": ("255605001", "Minimum"), "max": ("56851009", "Maximum")}
CONFORMAL_MEMBER = ("CONFORMAL_CLASS", "Class in conformal prediction set")
CONFORMAL_LEVEL = ("CONFORMAL_LEVEL", "Conformal prediction set level")


def _class_code(label: str):
    return codes.SCT.Malignant if label == "malignant" else codes.SCT.Benign


def _imputed_concept(view: str):
    return _local_code(f"CESM_{view}_IMPUTED", f"CESM {view} view imputed (synthetic)")


def _coding_scheme_identification() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = LOCAL_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


# --- checks ----------------------------------------------------------------------------------------

def _check_finding(finding: BreastFinding) -> None:
    where = f"breast {finding.laterality!r}"
    if finding.laterality not in LATERALITIES:
        raise DicomResultsError(f"{where}: laterality must be one of {LATERALITIES}")
    for name in ("p_malignant", "p_ffdm", "p_cesm", "p_uncalibrated", "p_fold_sd", "p_fold_min", "p_fold_max",
                 "conformal_level"):
        value = getattr(finding, name)
        if value is not None and not (np.isfinite(value) and 0.0 <= value <= 1.0):
            raise DicomResultsError(f"{where}: {name} = {value!r} is not a probability in [0, 1]")
    if finding.label not in CLASSES:
        raise DicomResultsError(f"{where}: class {finding.label!r} is not one of {CLASSES}")
    strange = [c for c in finding.conformal_set if c not in CLASSES]
    if strange:
        raise DicomResultsError(f"{where}: conformal set classes {strange} are not among {CLASSES}")
    unknown = [v for v in finding.imputed_cesm_views if v not in CESM_VIEWS]
    if unknown:
        raise DicomResultsError(f"{where}: imputed CESM views {unknown} are not among {CESM_VIEWS}")


def _check_sources(study_sources: Sequence[Dataset]) -> None:
    if not study_sources:
        raise DicomResultsError("no source images: the report must reference the study's images")
    studies = {str(ds.StudyInstanceUID) for ds in study_sources}
    patients = {str(ds.get("PatientID", "")) for ds in study_sources}
    if len(studies) > 1 or len(patients) > 1:
        raise DicomResultsError(f"source images of {len(studies)} studies / {len(patients)} patients: "
                                "one report covers one patient's study")


def _image_laterality(ds: Dataset) -> str:
    return str(ds.get("ImageLaterality") or ds.get("Laterality") or "").upper()


def _check_saliency(source: Dataset, saliency: Any) -> np.ndarray:
    """The map as float32, refused unless 2-D in the source's stored grid, finite and in [0, 1]."""
    where = f"saliency of image {source.SOPInstanceUID}"
    array = np.asarray(saliency, dtype=np.float32)
    expected = (int(source.Rows), int(source.Columns))
    if array.shape != expected:
        raise DicomResultsError(f"{where}: shape {array.shape}, but the source image is {expected[0]} x "
                                f"{expected[1]} (rows x columns); resample the map to the source geometry first")
    if not np.isfinite(array).all():
        raise DicomResultsError(f"{where}: holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise DicomResultsError(f"{where}: values must lie in [0, 1] (normalised Grad-CAM), found [{low:.3g}, {high:.3g}]")
    return np.clip(array, 0.0, 1.0)


# --- structured report -----------------------------------------------------------------------------

def _algorithm(model: ModelInfo):
    from highdicom.sr import AlgorithmIdentification

    return AlgorithmIdentification(name=model.name, version=str(model.version),
                                   parameters=[f"alias={model.alias}"] if model.alias else None)


def _sct_code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, "SCT", meaning)


def _probabilities(finding: BreastFinding, model: ModelInfo) -> list:
    from highdicom.sr import CodedConcept, Measurement

    unit = CodedConcept("{ratio}", "UCUM", "ratio")

    def probability(method: str, value: float, derivation: str | None = None):
        return Measurement(name=_dcm_code(*PROBABILITY_OF_CANCER), value=float(value), unit=unit,
                           method=_local_code(*_METHODS[method]), algorithm_id=_algorithm(model),
                           derivation=_sct_code(*_DERIVATIONS[derivation]) if derivation else None)

    over_folds = finding.n_folds is not None and finding.n_folds > 1
    items = [probability("fused", finding.p_malignant, "mean" if over_folds else None)]
    spread = {"sd": finding.p_fold_sd, "min": finding.p_fold_min, "max": finding.p_fold_max}
    items += [probability("fused", value, derivation) for derivation, value in spread.items() if value is not None]
    others = {"fused_uncalibrated": finding.p_uncalibrated, "ffdm": finding.p_ffdm, "cesm": finding.p_cesm}
    items += [probability(method, value, "mean" if over_folds else None)
              for method, value in others.items() if value is not None]
    if finding.conformal_level is not None:
        items.append(Measurement(name=_local_code(*CONFORMAL_LEVEL), value=float(finding.conformal_level), unit=unit,
                                 algorithm_id=_algorithm(model)))
    return items


def _evaluations(finding: BreastFinding) -> list:
    from highdicom.sr import QualitativeEvaluation

    evaluations = [QualitativeEvaluation(_dcm_code(*IMPRESSION), _class_code(finding.label))]
    evaluations += [QualitativeEvaluation(_local_code(*CONFORMAL_MEMBER), _class_code(c))
                    for c in finding.conformal_set]
    for view in CESM_VIEWS:
        answer = codes.SCT.Yes if view in finding.imputed_cesm_views else codes.SCT.No
        evaluations.append(QualitativeEvaluation(_imputed_concept(view), answer))
    return evaluations


def _comment(finding: BreastFinding):
    from highdicom.sr import RelationshipTypeValues, TextContentItem

    imputed = ", ".join(finding.imputed_cesm_views) or "none"
    folds = f" p is the calibrated mean over {finding.n_folds} fold models." if finding.n_folds else ""
    conformal = (f" Conformal set at level {finding.conformal_level:.2f}: {{{', '.join(finding.conformal_set)}}}."
                 if finding.conformal_set and finding.conformal_level is not None else "")
    return TextContentItem(name=codes.DCM.Comment, relationship_type=RelationshipTypeValues.CONTAINS,
                           value=f"{RESEARCH_USE_ONLY} Imputed CESM views: {imputed}.{folds}{conformal}")


def _measurement_group(finding: BreastFinding, sources: Sequence[Dataset], model: ModelInfo, study_uid: str):
    """TID 1501 for one breast, its images as the group's source images."""
    from highdicom.sr import (
        FindingSite,
        MeasurementsAndQualitativeEvaluations,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )

    side = _SIDE_NAMES[finding.laterality]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=deterministic_uid("virtual-biopsy", "breast-finding", study_uid, finding.laterality),
            identifier=f"{side} breast"),
        algorithm_id=_algorithm(model),
        finding_sites=[FindingSite(codes.SCT.Breast, laterality=codes.SCT.Left if finding.laterality == "L"
                                   else codes.SCT.Right)],
        measurements=_probabilities(finding, model),
        qualitative_evaluations=_evaluations(finding),
        source_images=[SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in sources],
    )
    group[0].ContentSequence.append(_comment(finding))
    return group


def structured_report(study_sources: Sequence[Dataset], breasts: Iterable[BreastFinding] | Mapping[str, BreastFinding],
                      model: ModelInfo, *, content_date: str | None = None, content_time: str | None = None,
                      instance_number: int = 1) -> Dataset:
    """The study's TID 1500 measurement report (an Enhanced SR) for ``breasts``.

    ``study_sources``: the datasets the prediction read (one patient's study; their Patient and
    Study modules are copied, so the SR files into the same PACS study). Each breast's group
    references the sources of its laterality; a breast without one is refused. ``content_date``
    / ``content_time`` (DICOM DA/TM) default to the study's.
    """
    from highdicom.sr import EnhancedSR, MeasurementReport, ObservationContext, ObserverContext
    from highdicom.sr.templates import DeviceObserverIdentifyingAttributes

    findings = list(breasts.values()) if isinstance(breasts, Mapping) else list(breasts)
    if not findings:
        raise DicomResultsError("no breast results: the report needs at least one breast")
    for finding in findings:
        _check_finding(finding)
    _check_sources(study_sources)
    study_uid = str(study_sources[0].StudyInstanceUID)
    groups = []
    for finding in sorted(findings, key=lambda f: f.laterality):
        sources = [ds for ds in study_sources if _image_laterality(ds) == finding.laterality]
        if not sources:
            raise DicomResultsError(f"breast {finding.laterality!r}: no source image of that laterality among "
                                    f"the {len(study_sources)} given")
        groups.append(_measurement_group(finding, sources, model, study_uid))
    device = DeviceObserverIdentifyingAttributes(
        uid=deterministic_uid("virtual-biopsy", "device", model.name, model.version),
        name=model.name, manufacturer_name=MANUFACTURER, model_name=f"{model.name} v{model.version}")
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device)),
        procedure_reported=codes.SCT.Mammography,
        imaging_measurements=groups,
        referenced_images=list(study_sources))
    first = study_sources[0]
    date, time = content_date or str(first.get("StudyDate", "")), content_time or str(first.get("StudyTime", ""))
    sr = EnhancedSR(
        evidence=list(study_sources), content=report[0],
        series_instance_uid=deterministic_uid("virtual-biopsy", "sr-series", study_uid, model.name, model.version),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=deterministic_uid("virtual-biopsy", "sr", study_uid, model.name, model.version, model.alias),
        instance_number=instance_number, manufacturer=MANUFACTURER,
        series_description=f"AI RESULT virtual biopsy {model.name} v{model.version} (research use only)"[:64],
        content_date=date or None, content_time=time or None,
    )
    sr.CodingSchemeIdentificationSequence = [_coding_scheme_identification()]
    _pin_creation_time(sr, date, time)
    return sr


def _pin_creation_time(ds: Dataset, date: str, time: str) -> None:
    """Replace highdicom's wall-clock InstanceCreationDate/Time and ContributionDateTime (of the
    Contributing Equipment items it adds for itself) by the content's, so the same inputs give
    the same bytes."""
    if date:
        ds.InstanceCreationDate = date
    if time:
        ds.InstanceCreationTime = time
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item and date:
            item.ContributionDateTime = f"{date}{time}"


# --- saliency --------------------------------------------------------------------------------------

def _segment(classifier: ClassifierInfo, model: ModelInfo, laterality: str):
    from highdicom import AlgorithmIdentificationSequence
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription

    parameters = {"view": classifier.view, "modality": classifier.modality, "architecture": classifier.architecture}
    if model.alias:
        parameters["alias"] = model.alias
    return SegmentDescription(
        segment_number=1,
        segment_label=f"Grad-CAM {classifier.modality} {classifier.view} {classifier.architecture}"[:64],
        segmented_property_category=_dcm_code(*VISUAL_EXPLANATION),
        segmented_property_type=_dcm_code(*GRAD_CAM),
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=AlgorithmIdentificationSequence(
            name=model.name, family=codes.DCM.ArtificialIntelligence, version=str(model.version),
            parameters=parameters),
        anatomic_regions=[codes.SCT.LeftBreast if laterality == "L" else codes.SCT.RightBreast],
    )


def _pin_dimension_organization(ds: Dataset, uid: str) -> None:
    """highdicom draws a random DimensionOrganizationUID; put a derived one everywhere it occurs."""
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = uid
    for item in ds.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = uid


def _as_projection_map(seg: Dataset, source: Dataset) -> None:
    """Make ``seg`` the Segmentation IOD's case without a Frame of Reference (PS3.3 A.51).

    A projection mammogram has no patient-space geometry to share: its Frame of Reference only
    groups images of one compression. With it, the IOD asks for a SliceThickness that a projection
    does not have; without it, the map is tied to its source pixel for pixel by the Derivation
    Image Sequence (Spatial Locations Preserved = YES), and, as for the source, Patient Orientation
    (General Image, 2C) says which way its rows and columns run.
    """
    for keyword in ("FrameOfReferenceUID", "PositionReferenceIndicator"):
        if keyword in seg:
            delattr(seg, keyword)
    if source.get("PatientOrientation"):
        seg.PatientOrientation = list(source.PatientOrientation)


def saliency_map(source: Dataset, saliency: Any, *, model: ModelInfo, classifier: ClassifierInfo,
                 instance_number: int = 1, content_date: str | None = None,
                 content_time: str | None = None) -> Dataset:
    """The Grad-CAM map ``saliency`` of ``source`` as a FRACTIONAL Segmentation (module docstring).

    ``saliency``: values in [0, 1], already in the source's stored grid (``source.Rows x
    source.Columns``, the source's orientation); stored to 1/255. ``classifier`` names the input
    (view, modality) and network the map explains; ``source`` is the image that input was made from
    (an acquired image, or a synthetic CESM object written by predict ``--out``).
    """
    from highdicom.seg import Segmentation, SegmentationFractionalTypeValues, SegmentationTypeValues

    values = _check_saliency(source, saliency)
    laterality = _image_laterality(source)
    if laterality not in LATERALITIES:
        raise DicomResultsError(f"image {source.SOPInstanceUID}: laterality {laterality!r} is not one of {LATERALITIES}")
    source_uid = str(source.SOPInstanceUID)
    key = (model.name, model.version, classifier.modality, classifier.view, classifier.architecture)
    date, time = content_date or str(source.get("StudyDate", "")), content_time or str(source.get("StudyTime", ""))
    seg = Segmentation(
        source_images=[source], pixel_array=values[np.newaxis, :, :, np.newaxis],
        segmentation_type=SegmentationTypeValues.FRACTIONAL,
        fractional_type=SegmentationFractionalTypeValues.OCCUPANCY, max_fractional_value=FRACTIONAL_MAX,
        segment_descriptions=[_segment(classifier, model, laterality)],
        series_instance_uid=deterministic_uid("virtual-biopsy", "saliency-series", source.StudyInstanceUID, *key[:2]),
        series_number=SALIENCY_SERIES_NUMBER,
        sop_instance_uid=deterministic_uid("virtual-biopsy", "saliency", source_uid, *key),
        instance_number=instance_number, manufacturer=MANUFACTURER, manufacturer_model_name=model.name[:64],
        software_versions=SOFTWARE_VERSIONS, device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label=f"GRADCAM_{classifier.modality}_{classifier.view}".upper()[:16],
        content_description=f"Grad-CAM relevance 0-1 of {classifier.architecture} {classifier.modality} "
                            f"{classifier.view}; research use only"[:64],
        omit_empty_frames=False,
        series_description=f"AI SALIENCY Grad-CAM {model.name} v{model.version} (research use only)"[:64],
        content_date=date or None, content_time=time or None,
    )
    _as_projection_map(seg, source)
    _pin_dimension_organization(seg, deterministic_uid("virtual-biopsy", "dimension-organization", source_uid, *key))
    _pin_creation_time(seg, date, time)
    return seg


def saliency_values(seg: Dataset) -> np.ndarray:
    """A saliency Segmentation's map back as float32 in [0, 1] (stored value / MaximumFractionalValue)."""
    pixels = np.asarray(seg.pixel_array, dtype=np.float32)
    return pixels.reshape(int(seg.Rows), int(seg.Columns)) / float(seg.MaximumFractionalValue)


# --- writing ---------------------------------------------------------------------------------------

def result_file_name(ds: Dataset) -> str:
    """``<SR|SEG>_<SOPInstanceUID>.dcm``: from UIDs only, so no patient identifier is in the name."""
    modality = str(ds.get("Modality", ""))
    if modality not in _FILE_PREFIX:
        raise DicomResultsError(f"object {ds.get('SOPInstanceUID')}: modality {modality!r} is not a result this "
                                f"module writes ({', '.join(_FILE_PREFIX)})")
    return f"{_FILE_PREFIX[modality]}_{ds.SOPInstanceUID}.dcm"


def write_results(out_dir: str | Path, datasets: Iterable[Dataset]) -> list[Path]:
    """Write each result object into ``out_dir`` atomically (dicom.write.write_dataset); return the paths.

    Two objects with the same SOP Instance UID are refused before anything is written.
    """
    datasets = list(datasets)
    names = [result_file_name(ds) for ds in datasets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DicomResultsError(f"{out_dir}: several objects would be written as {repeated} (same SOP Instance UID)")
    out_dir = Path(out_dir)
    return [write_dataset(ds, out_dir / name) for ds, name in zip(datasets, names)]
