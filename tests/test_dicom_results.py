"""DICOM results (serving/dicom_results.py): the study's TID 1500 SR and the Grad-CAM Segmentation.

One tiny simulated study (the project's generator, 2 patients, 64 px) with made-up predictions and
a smooth made-up saliency; each object is checked by dciodvfy and read back with pydicom.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_checks import dciodvfy_iod_errors, needs_dciodvfy

from virtual_biopsy.serving.dicom_results import (
    BreastFinding,
    ClassifierInfo,
    DicomResultsError,
    ModelInfo,
    finding_from_prediction,
    saliency_map,
    saliency_values,
    structured_report,
    write_results,
)

MODEL = ModelInfo(name="virtual-biopsy-resnet18", version="3", alias="champion")
CLASSIFIER = ClassifierInfo(view="CC", modality="CESM", architecture="resnet18")
FINDINGS = (BreastFinding("L", 0.83, "malignant", imputed_cesm_views=("CC",), p_ffdm=0.61, p_cesm=0.9,
                          p_uncalibrated=0.78, p_fold_sd=0.04, p_fold_min=0.77, p_fold_max=0.88, n_folds=5,
                          conformal_set=("benign", "malignant"), conformal_level=0.9),
            BreastFinding("R", 0.12, "benign", conformal_set=("benign",), conformal_level=0.9))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The early-phase images of one simulated patient's study, as read from disk."""
    from virtual_biopsy.core.config import SynthConfig
    from virtual_biopsy.data.synthetic import synthesize

    raw = tmp_path_factory.mktemp("results") / "raw"
    synthesize(raw, SynthConfig(patients=2, image_height=64), seed=7)
    files = sorted((raw / "images" / "P0001").rglob("*.dcm"))
    return [pydicom.dcmread(path) for path in files if "LATE" not in path.name]


def smooth_saliency(source) -> np.ndarray:
    """A Gaussian bump in [0, 1] over the source's stored grid."""
    rows, columns = np.mgrid[0:int(source.Rows), 0:int(source.Columns)]
    bump = np.exp(-((rows - source.Rows / 3) ** 2 + (columns - source.Columns / 2) ** 2) / (2 * 8.0 ** 2))
    return (bump / bump.max()).astype(np.float32)


def cc_source(study, laterality="L"):
    return next(ds for ds in study if ds.ImageLaterality == laterality and ds.ViewPosition == "CC")


def groups_by_laterality(sr) -> dict[str, pydicom.Dataset]:
    """The TID 1501 measurement groups of a read-back SR, by the laterality of their finding site."""
    root = sr.ContentSequence
    container = next(item for item in root if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    groups = {}
    for group in container.ContentSequence:
        site = next(i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "363698007")
        side = site.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning
        groups[{"Left": "L", "Right": "R"}[side]] = group
    return groups


def walk(items):
    """Every content item of an SR content tree, depth first."""
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def items_named(group, code_value: str) -> list:
    return [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code_value]


@needs_dciodvfy
def test_structured_report_passes_dciodvfy(study, tmp_path):
    [path] = write_results(tmp_path, [structured_report(study, FINDINGS, MODEL)])
    assert dciodvfy_iod_errors(path, "EnhancedSR") == []


def test_structured_report_reads_back_probability_class_laterality_and_sources(study, tmp_path):
    [path] = write_results(tmp_path, [structured_report(study, FINDINGS, MODEL)])
    sr = pydicom.dcmread(path)
    groups = groups_by_laterality(sr)
    assert sorted(groups) == ["L", "R"]
    for finding in FINDINGS:
        group = groups[finding.laterality]
        fused = next(i for i in items_named(group, "111047")
                     if i.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "FUSED")
        assert float(fused.MeasuredValueSequence[0].NumericValue) == pytest.approx(finding.p_malignant)
        [impression] = items_named(group, "121073")
        assert impression.ConceptCodeSequence[0].CodeMeaning.lower() == finding.label
        imputed = {v: items_named(group, f"CESM_{v}_IMPUTED")[0].ConceptCodeSequence[0].CodeMeaning
                   for v in ("CC", "MLO")}
        assert imputed == {v: "Yes" if v in finding.imputed_cesm_views else "No" for v in ("CC", "MLO")}
        referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items_named(group, "121112")}
        assert referenced == {str(ds.SOPInstanceUID) for ds in study if ds.ImageLaterality == finding.laterality}
        assert "Research use only" in items_named(group, "121106")[0].TextValue


def _content_codes(item) -> dict[str, str]:
    """concept code value -> value code of a measurement's modifiers (method, derivation)."""
    return {c.ConceptNameCodeSequence[0].CodeValue: c.ConceptCodeSequence[0].CodeValue
            for c in item.get("ContentSequence", []) if "ConceptCodeSequence" in c}


def test_structured_report_carries_the_fold_spread_and_the_conformal_set(study, tmp_path):
    [path] = write_results(tmp_path, [structured_report(study, FINDINGS, MODEL)])
    groups = groups_by_laterality(pydicom.dcmread(path))
    fused = {}
    for item in items_named(groups["L"], "111047"):
        codes = _content_codes(item)
        if codes.get("370129005") == "FUSED":  # method
            fused[codes.get("121401")] = float(item.MeasuredValueSequence[0].NumericValue)  # derivation
    # derivation Mean / Standard Deviation / Minimum / Maximum (CID 7464)
    assert fused == pytest.approx({"373098007": 0.83, "386136009": 0.04, "255605001": 0.77, "56851009": 0.88})
    uncalibrated = [i for i in items_named(groups["L"], "111047") if _content_codes(i).get("370129005") == "FUSED_UNCAL"]
    assert float(uncalibrated[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(0.78)
    members = {g: sorted(i.ConceptCodeSequence[0].CodeMeaning for i in items_named(groups[g], "CONFORMAL_CLASS"))
               for g in ("L", "R")}
    assert members == {"L": ["Benign", "Malignant"], "R": ["Benign"]}
    [level] = items_named(groups["R"], "CONFORMAL_LEVEL")
    assert float(level.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.9)
    assert "calibrated mean over 5 fold models" in items_named(groups["L"], "121106")[0].TextValue


def test_a_conformal_set_with_an_unknown_class_is_refused(study):
    with pytest.raises(DicomResultsError, match=r"conformal set classes \['suspicious'\]"):
        structured_report(study, [BreastFinding("L", 0.5, "benign", conformal_set=("suspicious",))], MODEL)


def test_structured_report_names_the_model_and_keeps_the_patients_study(study):
    sr = structured_report(study, FINDINGS, MODEL)
    source = study[0]
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
        assert sr[keyword].value == source[keyword].value
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesDescription.startswith("AI RESULT")
    texts = {str(item.get("TextValue", "")) for item in walk(sr.ContentSequence)}
    assert {"virtual-biopsy-resnet18", "3", "alias=champion"} <= texts
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99VBIOPSY"
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {str(ds.SOPInstanceUID) for ds in study}


def test_same_inputs_give_the_same_bytes(study, tmp_path):
    source = cc_source(study)
    first = write_results(tmp_path / "a", [structured_report(study, FINDINGS, MODEL),
                                           saliency_map(source, smooth_saliency(source), model=MODEL,
                                                        classifier=CLASSIFIER)])
    second = write_results(tmp_path / "b", [structured_report(study, FINDINGS, MODEL),
                                            saliency_map(source, smooth_saliency(source), model=MODEL,
                                                         classifier=CLASSIFIER)])
    assert [p.name for p in first] == [p.name for p in second]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


@needs_dciodvfy
@pytest.mark.parametrize("laterality", ["L", "R"])
def test_saliency_map_passes_dciodvfy(study, tmp_path, laterality):
    source = cc_source(study, laterality)
    [path] = write_results(tmp_path, [saliency_map(source, smooth_saliency(source), model=MODEL,
                                                   classifier=CLASSIFIER)])
    assert dciodvfy_iod_errors(path, "Segmentation") == []


def test_saliency_map_reads_back_values_and_source_geometry(study, tmp_path):
    source = cc_source(study)
    saliency = smooth_saliency(source)
    [path] = write_results(tmp_path, [saliency_map(source, saliency, model=MODEL, classifier=CLASSIFIER)])
    seg = pydicom.dcmread(path)
    # FRACTIONAL stores 8 bits: the map comes back to half a step of 1/255
    np.testing.assert_allclose(saliency_values(seg), saliency, atol=0.5 / 255 + 1e-7)
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    assert [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == \
        [float(v) for v in source.PixelSpacing]
    assert list(seg.PatientOrientation) == list(source.PatientOrientation)
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert derivation.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert derivation.SpatialLocationsPreserved == "YES"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "130403"
    assert "CESM CC" in seg.ContentDescription and "resnet18" in seg.ContentDescription
    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID


def test_file_names_carry_no_patient_identifier(study, tmp_path):
    source = cc_source(study)
    paths = write_results(tmp_path, [structured_report(study, FINDINGS, MODEL),
                                     saliency_map(source, smooth_saliency(source), model=MODEL, classifier=CLASSIFIER)])
    identifiers = {str(source.PatientID), str(source.PatientName), str(source.AccessionNumber)} - {""}
    assert sorted(p.name.split("_")[0] for p in paths) == ["SEG", "SR"]
    for path in paths:
        assert not any(identifier in path.name for identifier in identifiers)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_finding_from_prediction_takes_predicts_fields():
    class Prediction:  # the attributes of serving.fused_model.BreastPrediction that matter here
        p, p_ffdm, p_cesm, label = 0.7, 0.4, 0.8, "malignant"
        synthetic = {"CC": True, "MLO": False}
        p_uncalibrated, p_folds, p_fold_sd, p_fold_min, p_fold_max = 0.66, (0.6, 0.8), 0.1, 0.6, 0.8
        conformal_set, conformal_level = ("malignant",), 0.9

    finding = finding_from_prediction("R", Prediction())
    assert finding == BreastFinding("R", 0.7, "malignant", ("CC",), 0.4, 0.8, p_uncalibrated=0.66, p_fold_sd=0.1,
                                    p_fold_min=0.6, p_fold_max=0.8, n_folds=2, conformal_set=("malignant",),
                                    conformal_level=0.9)


def test_saliency_of_the_wrong_shape_is_refused(study):
    source = cc_source(study)
    with pytest.raises(DicomResultsError, match="shape .* source geometry"):
        saliency_map(source, np.zeros((8, 8), np.float32), model=MODEL, classifier=CLASSIFIER)


def test_saliency_outside_zero_one_is_refused(study):
    source = cc_source(study)
    with pytest.raises(DicomResultsError, match=r"\[0, 1\]"):
        saliency_map(source, smooth_saliency(source) * 2, model=MODEL, classifier=CLASSIFIER)


@pytest.mark.parametrize("finding, message", [
    (BreastFinding("L", 1.2, "malignant"), "p_malignant = 1.2 is not a probability"),
    (BreastFinding("L", 0.5, "malignant", p_cesm=-0.1), "p_cesm = -0.1"),
    (BreastFinding("X", 0.5, "benign"), "laterality must be one of"),
    (BreastFinding("L", 0.5, "suspicious"), "class 'suspicious'"),
    (BreastFinding("L", 0.5, "benign", imputed_cesm_views=("ML",)), "imputed CESM views"),
])
def test_bad_findings_are_refused_naming_the_breast(study, finding, message):
    with pytest.raises(DicomResultsError, match=message):
        structured_report(study, [finding], MODEL)


def test_a_breast_without_source_images_is_refused(study):
    left_only = [ds for ds in study if ds.ImageLaterality == "L"]
    with pytest.raises(DicomResultsError, match="breast 'R': no source image"):
        structured_report(left_only, FINDINGS, MODEL)


def test_two_objects_with_one_uid_are_refused_before_writing(study, tmp_path):
    sr = structured_report(study, FINDINGS, MODEL)
    with pytest.raises(DicomResultsError, match="same SOP Instance UID"):
        write_results(tmp_path / "out", [sr, sr])
    assert not (tmp_path / "out").exists()


def _referenced_source(seg) -> str:
    """The SOP Instance UID of the one image a saliency map references."""
    [uid] = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
             for item in series.ReferencedInstanceSequence}
    return uid


def test_predict_writes_a_structured_report_and_a_map_per_classifier_for_the_pacs(gated_project, tiny_raw, tmp_path):
    """`vbiopsy predict --dicom-results DIR` on an LE-only study: the SR holds the p and class
    predict printed, says both CESM views were imputed, and every map lies over the image its
    classifier read; names carry no patient identifier; dciodvfy finds no error."""
    import json

    from test_report import _planted_study

    from virtual_biopsy.cli.main import main as vbiopsy

    study = _planted_study(tiny_raw, tmp_path / "study", ("LE",))
    out, result = tmp_path / "dicom", tmp_path / "result.json"
    assert vbiopsy(["predict", str(study["dir"]), "--root", str(gated_project), "--dicom-results", str(out),
                    "--json", str(result)]) == 0
    printed = json.loads(result.read_text())
    written = sorted(out.iterdir())
    assert [p.name for p in written] == sorted(Path(p).name for p in printed["dicom_results"])
    assert not any(secret in p.name for p in written for secret in study["secrets"])
    srs = [pydicom.dcmread(p) for p in written if p.name.startswith("SR_")]
    maps = [pydicom.dcmread(p) for p in written if p.name.startswith("SEG_")]
    assert len(srs) == 1 and len(maps) == 4 * len(printed["breasts"])
    groups = groups_by_laterality(srs[0])
    sources = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in study["dir"].iterdir()}
    for lat, breast in printed["breasts"].items():
        fused = next(i for i in items_named(groups[lat], "111047")
                     if i.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "FUSED")
        assert float(fused.MeasuredValueSequence[0].NumericValue) == pytest.approx(breast["p_calibrated"], abs=1e-6)
        members = sorted(i.ConceptCodeSequence[0].CodeMeaning.lower() for i in items_named(groups[lat], "CONFORMAL_CLASS"))
        assert members == sorted(breast["conformal_set"])
        assert all(items_named(groups[lat], f"CESM_{v}_IMPUTED")[0].ConceptCodeSequence[0].CodeMeaning == "Yes"
                   for v in ("CC", "MLO"))
    for seg in maps:
        source = sources[_referenced_source(seg)]
        assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)  # LE-only: every map lies over an LE image
    for path in written:
        iod = "EnhancedSR" if path.name.startswith("SR_") else "Segmentation"
        assert dciodvfy_iod_errors(path, iod) == []  # dciodvfy: a system dep of make test
