"""`vbiopsy predict STUDY --report DIR`: one offline HTML page per study that a person opens, as
headless Chromium renders it, with nothing that identifies the patient in the page or its name."""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from browser import VisibleText, chromium, needs_chromium

from virtual_biopsy.cli.main import main as vbiopsy
from virtual_biopsy.serving.report import (
    NOT_AVAILABLE,
    BreastReport,
    ModelIdentity,
    ReportError,
    StudyReport,
    ViewPanel,
    check_report_dir,
    render_html,
    study_key,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Identifying values planted in the study's headers and file names (as tests/test_privacy.py does).
PLANTED = {"PatientName": "Doe^Jane-PRIVACY", "PatientID": "SECRET-ID-4711", "AccessionNumber": "ACC-PRIV-0815"}
FILE_ID = "PHI-123"


def _planted_study(tiny_raw: Path, folder: Path, energies: tuple[str, ...], patient_index: int = 0) -> dict:
    """One patient's early-phase images copied to ``folder`` with identifying headers, each file
    named ``PHI-123_<n>_<laterality><view>_<energy>.dcm``; returns the folder, the planted
    strings and the original UIDs (SOP instance, series, study)."""
    meta = pd.read_csv(tiny_raw / "metadata.csv", dtype=str, keep_default_na=False)
    patient = sorted(meta["patient_id"].unique())[patient_index]
    rows = meta[(meta["patient_id"] == patient) & (meta["phase"] == "early") & meta["energy"].isin(energies)]
    folder.mkdir(parents=True)
    uids = set()
    for i, rel in enumerate(rows["file"]):
        ds = pydicom.dcmread(tiny_raw / rel)
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        uids |= {str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)}
        ds.save_as(folder / f"{FILE_ID}_{i}_{Path(rel).stem.split('_', 2)[-1]}.dcm")
    return {"dir": folder, "secrets": [*PLANTED.values(), FILE_ID], "uids": uids}


def _predict(study: dict, root: Path, out: Path) -> dict:
    result = out / f"{study['dir'].name}.json"
    assert vbiopsy(["predict", str(study["dir"]), "--root", str(root), "--report", str(out / "pages"),
                    "--json", str(result)]) == 0
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def reports(gated_project, tiny_raw, tmp_path_factory) -> dict:
    """predict --report on two studies of the tiny gated project: one with LE only (both CESM views
    imputed), one with LE and DES (CESM acquired), all pages in one folder."""
    out = tmp_path_factory.mktemp("report")
    studies = {"imputed": _planted_study(tiny_raw, out / "study_le", ("LE",)),
               "acquired": _planted_study(tiny_raw, out / "study_le_des", ("LE", "DES"), patient_index=1)}
    return {"out": out, "studies": studies,
            "results": {kind: _predict(study, gated_project, out) for kind, study in studies.items()}}


def _open_in_chromium(page: Path, screenshot: Path) -> str:
    """The page's visible text as Chromium renders it from its file:// URL, and a screenshot."""
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="vbiopsy-profile-") as profile:
        dom = chromium(["--virtual-time-budget=5000", "--dump-dom", url], profile)
    with tempfile.TemporaryDirectory(prefix="vbiopsy-profile-") as profile:
        chromium([f"--screenshot={screenshot}", url], profile)
    parser = VisibleText(hidden=("script", "style", "noscript", "title"))
    parser.feed(dom.stdout)
    return " | ".join(parser.parts)


def _page(reports: dict, kind: str) -> Path:
    return Path(reports["results"][kind]["report"])


def test_predict_writes_one_page_per_study_named_by_a_study_key(reports):
    pages = sorted((reports["out"] / "pages").glob("*.html"))
    assert len(pages) == 2 and {p for p in pages} == {_page(reports, k) for k in ("imputed", "acquired")}
    assert all(re.fullmatch(r"study-[0-9a-f]{12}\.html", p.name) for p in pages)


@needs_chromium
@pytest.mark.parametrize("kind", ["imputed", "acquired"])
def test_the_page_opened_in_chromium_shows_each_breasts_probability_class_and_synthetic_marks(reports, kind,
                                                                                               tmp_path):
    result = reports["results"][kind]
    screenshot = tmp_path / "page.png"
    text = _open_in_chromium(_page(reports, kind), screenshot)
    for laterality, breast in result["breasts"].items():
        name = {"L": "Left breast", "R": "Right breast"}[laterality]
        assert name in text
        assert f"{breast['class'].upper()}: p = {breast['p']:.3f}" in text, text[:800]
        assert f"{breast['p_ffdm']:.3f}" in text and f"{breast['p_cesm']:.3f}" in text
    assert ("SYNTHETIC -- imputed from FFDM by cesm-generator-cc" in text) == (kind == "imputed")
    assert ("SYNTHETIC -- imputed from FFDM by cesm-generator-mlo" in text) == (kind == "imputed")
    assert ("acquired CESM" in text) == (kind == "acquired")
    # The page names the setting its p comes from: F+Ĉ when both CESM views were imputed.
    assert ("p (fused, F+Ĉ)" in text) == (kind == "imputed") and ("p (fused, F+C)" in text) == (kind == "acquired")
    # the served fold ensemble gives the calibrated p, its spread over folds and the conformal set
    assert NOT_AVAILABLE not in text
    for breast in result["breasts"].values():
        assert f"{breast['p_calibrated']:.3f}" in text and f"sd {breast['p_fold_sd']:.3f}" in text
        assert f"min-max {breast['p_fold_min']:.3f}-{breast['p_fold_max']:.3f} over 2 folds" in text
        assert "{" + ", ".join(breast["conformal_set"]) + "}" in text and "conformal set (90 %)" in text
        assert f"calibrated p ({breast['setting']} calibration)" in text
        assert breast["setting"] == ("F+Ĉ" if kind == "imputed" else "F+C")
    assert "fold 0: over views" in text and "fold 1: over views" in text  # every fold's weights
    assert "Research use only" in text and "virtual-biopsy-resnet18" in text and "champion" in text
    assert "Grad-CAM" in text and "model card" in text.lower()
    from PIL import Image

    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 1000 and pixels.std() > 20, pixels.std()  # not a blank page


def test_the_page_needs_no_network_and_embeds_the_model_card(reports, gated_project):
    page = _page(reports, "imputed").read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources if s.startswith(("data", "file")))
    assert not [s for s in sources if not s.startswith("data:") and "/#/models/virtual-biopsy-resnet18/versions/" not in s]
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "## Intended use" in page  # the registered version's model card, embedded
    assert "/#/models/virtual-biopsy-resnet18/versions/1?workflowType=machine_learning" in page


def test_no_patient_name_id_or_original_uid_reaches_a_page_or_its_name(reports):
    for kind, study in reports["studies"].items():
        page = _page(reports, kind)
        text = page.read_text(encoding="utf-8")
        for needle in (*study["secrets"], *study["uids"]):
            assert needle not in text, f"{needle!r} in {page.name}"
            assert needle not in page.name


def test_a_report_target_that_is_a_file_gives_one_line_naming_it(gated_project, tiny_raw, tmp_path, capsys):
    study = _planted_study(tiny_raw, tmp_path / "study", ("LE",))
    target = tmp_path / "report.html"
    target.write_text("not a folder")
    assert vbiopsy(["predict", str(study["dir"]), "--root", str(gated_project), "--report", str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"predict: --report {target}: is a file, not a folder; give a folder for the HTML reports"
    assert target.read_text() == "not a folder"


def test_notes_on_the_page_name_no_file_of_the_study(tmp_path):
    from virtual_biopsy.serving.predict import page_notes

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f"{FILE_ID}_0_LCC_RECOMBINED_SYNTHETIC_RECOMBINED.dcm").write_bytes(b"")
    notes = [f"{FILE_ID}_0_LCC_RECOMBINED_SYNTHETIC_RECOMBINED.dcm: a synthetic (imputed) image, not used as real CESM",
             "LCC LE: several images, the earliest acquired is used"]
    assert page_notes(notes, tmp_path) == ["a file of the study: a synthetic (imputed) image, not used as real CESM",
                                           notes[1]]


def test_predict_help_explains_the_report_option(capsys):
    with pytest.raises(SystemExit):
        vbiopsy(["predict", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--report DIR" in out and "HTML page per study" in out and "no patient identifiers" in out


# --- the page from plain values (no model) ---------------------------------------------------------
def _panel(modality: str, view: str, share: float, synthetic_by: str | None = None) -> ViewPanel:
    image = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    return ViewPanel(modality, view, image, p=0.6, fusion_share=share, saliency=image[::-1].copy(), grid=(1, 1),
                     synthetic_by=synthetic_by)


def _breast(**extra) -> BreastReport:
    panels = [_panel("FFDM", "CC", 0.0), _panel("CESM", "CC", 0.5, "cesm-generator-CC (fold 0)"),
              _panel("FFDM", "MLO", 0.0), _panel("CESM", "MLO", 0.5)]
    return BreastReport("L", 0.7, 0.4, 0.7, "malignant", ["CC"], panels,
                        {"FFDM": {"CC": 0.3, "MLO": 0.2}, "CESM": {"CC": 0.5, "MLO": 0.5}}, {"FFDM": 0.0, "CESM": 1.0},
                        **extra)


def test_a_classifier_with_weight_zero_is_said_to_have_contributed_nothing():
    page = render_html(StudyReport("study-000000000000", ModelIdentity("runs:/abc/model"), [_breast()]))
    assert page.count("weight 0: this classifier contributed nothing to p") == 2
    assert "one cell, the map cannot localise at this image size" in page
    assert "no registry page known for this URI" in page and "No model card text" in page


def test_calibration_spread_and_conformal_set_are_shown_when_the_model_gives_them():
    page = render_html(StudyReport("study-000000000000", ModelIdentity("runs:/abc/model"),
                                   [_breast(calibrated_p=0.612, fold_spread=0.045, conformal_set=["malignant"])]))
    assert NOT_AVAILABLE not in page
    assert "0.612" in page and "0.045" in page and "{malignant}" in page


def test_a_model_without_calibration_says_not_available_rather_than_a_value():
    page = render_html(StudyReport("study-000000000000", ModelIdentity("runs:/abc/model"), [_breast()]))
    assert page.count(NOT_AVAILABLE) == 3 and "uncalibrated p" not in page


def test_the_fold_spread_row_gives_sd_range_and_number_of_folds():
    page = render_html(StudyReport("study-000000000000", ModelIdentity("runs:/abc/model"), [_breast(
        calibrated_p=0.612, fold_spread=0.045, fold_range=(0.55, 0.68), n_folds=5, conformal_set=("benign", "malignant"),
        conformal_level=0.9, p_uncalibrated=0.6, setting="F+Ĉ")]))
    assert "sd 0.045, min-max 0.550-0.680 over 5 folds" in page
    assert "{benign, malignant}" in page and "conformal set (90 %)" in page and "calibrated p (F+Ĉ calibration)" in page
    assert "uncalibrated p (mean over folds)" in page and "0.600" in page


def test_text_from_the_model_card_is_escaped_not_run():
    model = ModelIdentity("models:/m@champion", "m", "2", ("champion",), card_text="<script>alert(1)</script> & co")
    page = render_html(StudyReport("study-000000000000", model, [_breast()]))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page


def test_the_study_key_is_stable_hides_the_uid_and_needs_one():
    uid = "1.2.826.0.1.3680043.8.498.12345"
    assert study_key([uid, uid]) == study_key([uid]) and uid not in study_key([uid])
    assert study_key(["1.2.3", "1.2.4"]) == study_key(["1.2.4", "1.2.3"]) != study_key(["1.2.3"])
    with pytest.raises(ReportError, match="no StudyInstanceUID"):
        study_key(["", " "])


def test_a_missing_report_folder_is_created_and_a_file_refused(tmp_path):
    assert check_report_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ReportError, match="is a file, not a folder"):
        check_report_dir(tmp_path / "f")
