"""`vbiopsy predict STUDY_DIR`: a readable per-breast report, imputed CESM written as synthetic DICOM,
and clear errors for studies it cannot read."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pydicom
import pytest
from dicom_checks import dciodvfy_errors

from virtual_biopsy.cli.main import main as vbiopsy
from virtual_biopsy.dicom.cesm import is_synthetic


def _study(tiny_raw, tmp_path, patient_index=0, energies=("LE", "DES")):
    meta = pd.read_csv(tiny_raw / "metadata.csv", dtype=str, keep_default_na=False)
    patient = sorted(meta["patient_id"].unique())[patient_index]
    rows = meta[(meta["patient_id"] == patient) & (meta["phase"] == "early") & meta["energy"].isin(energies)]
    study = tmp_path / f"study_{patient}"
    study.mkdir(exist_ok=True)
    for rel in rows["file"]:
        shutil.copy(tiny_raw / rel, study)
    return study


def test_predict_reports_each_breast_and_writes_imputed_cesm_as_synthetic_dicom(gated_project, tiny_raw, tmp_path, capsys):
    study = _study(tiny_raw, tmp_path, energies=("LE",))
    out = tmp_path / "out"
    assert vbiopsy(["predict", str(study), "--root", str(gated_project), "--out", str(out),
                    "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "breast:" in captured.out and "imputed CESM views: CC, MLO" in captured.out
    assert "loading models:/virtual-biopsy-resnet18@champion" in captured.err
    report = json.loads((tmp_path / "r.json").read_text())
    written = sorted(out.glob("*.dcm"))
    assert len(written) == 2 * len(report["breasts"])
    assert all(is_synthetic(pydicom.dcmread(p)) for p in written)


def test_predict_writes_each_imputed_cesm_in_its_ffdm_sources_geometry(gated_project, tiny_raw, tmp_path):
    study = _study(tiny_raw, tmp_path, energies=("LE",))
    out = tmp_path / "out"
    assert vbiopsy(["predict", str(study), "--root", str(gated_project), "--out", str(out), "--json", "-"]) == 0
    for source_path in sorted(study.glob("*.dcm")):
        source = pydicom.dcmread(source_path)
        written = out / f"{source_path.stem}_SYNTHETIC_RECOMBINED.dcm"
        ds = pydicom.dcmread(written)
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
        assert list(ds.PixelSpacing) == list(source.PixelSpacing)
        assert list(ds.ImagerPixelSpacing) == list(source.ImagerPixelSpacing)
        assert (ds.ImageLaterality, ds.ViewPosition) == (source.ImageLaterality, source.ViewPosition)
        assert list(ds.PatientOrientation) == list(source.PatientOrientation)
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(written) == []


def test_predict_imputes_nothing_when_the_study_has_cesm(gated_project, tiny_raw, tmp_path, capsys):
    study = _study(tiny_raw, tmp_path)
    assert vbiopsy(["predict", str(study), "--root", str(gated_project), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(b["imputed_cesm"] == [] for b in report["breasts"].values())
    assert all(b["setting"] == "F+C" for b in report["breasts"].values())


def test_predict_prints_the_calibrated_p_with_its_fold_spread_and_conformal_set(gated_project, tiny_raw, tmp_path,
                                                                                 capsys):
    study = _study(tiny_raw, tmp_path, energies=("LE",))
    assert vbiopsy(["predict", str(study), "--root", str(gated_project), "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    for breast in report["breasts"].values():
        assert breast["p"] == breast["p_calibrated"] and len(breast["p_folds"]) == 2  # the fixture's two folds
        assert breast["p_fold_min"] <= breast["p"] <= breast["p_fold_max"]
        assert breast["class"] == ("malignant" if breast["p_calibrated"] >= 0.5 else "benign")
        assert breast["setting"] == "F+Ĉ" and breast["conformal_level"] == 0.9
        assert set(breast["conformal_set"]) <= {"benign", "malignant"} and breast["conformal_set"]
        assert (f"p = {breast['p_calibrated']:.3f} (calibrated, F+Ĉ; mean of 2 folds: sd {breast['p_fold_sd']:.3f}, "
                f"min-max {breast['p_fold_min']:.3f}-{breast['p_fold_max']:.3f})") in text
        assert f"conformal set (90 %): {{{', '.join(breast['conformal_set'])}}}" in text
        assert f"uncalibrated p = {breast['p_uncalibrated']:.3f}" in text


def test_predict_refuses_a_study_mixing_two_patients(gated_project, tiny_raw, tmp_path, capsys):
    study = _study(tiny_raw, tmp_path)
    for f in _study(tiny_raw, tmp_path, patient_index=1).glob("*.dcm"):
        shutil.copy(f, study)
    assert vbiopsy(["predict", str(study), "--root", str(gated_project)]) == 1
    assert "two patients" in capsys.readouterr().err


def test_predict_refuses_a_breast_without_ffdm_of_a_view(gated_project, tiny_raw, tmp_path, capsys):
    study = _study(tiny_raw, tmp_path)
    next(study.glob("*MLO_LOW_ENERGY.dcm")).unlink()
    assert vbiopsy(["predict", str(study), "--root", str(gated_project)]) == 1
    assert "has no FFDM (low-energy) MLO" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["text", "ct"])
def test_predict_refuses_a_non_mammography_file(gated_project, tiny_raw, tmp_path, capsys, kind):
    study = _study(tiny_raw, tmp_path)
    bad = study / "extra.dcm"
    if kind == "text":
        bad.write_text("not a dicom file")
    else:
        ds = pydicom.dcmread(next(study.glob("*.dcm")))
        ds.Modality = "CT"
        ds.save_as(bad)
    assert vbiopsy(["predict", str(study), "--root", str(gated_project)]) == 1
    err = capsys.readouterr().err
    assert "extra.dcm" in err and ("not a readable DICOM" if kind == "text" else "not a mammogram") in err
