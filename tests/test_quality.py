"""Data-quality suites on a dataset made by `vbiopsy synth`: the clean data pass; each critical
defect injected into them fails naming its expectation."""
from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from virtual_biopsy.core.config import ValidateDataConfig
from virtual_biopsy.data.quality import (
    CRITICAL,
    QualityError,
    build_checks,
    image_stats,
    validate,
)
from virtual_biopsy.stages import validate_data

SIZE = 32
CFG = ValidateDataConfig(min_patients=10)


@pytest.fixture(scope="module")
def simulated(make_project, tmp_path_factory) -> tuple[pd.DataFrame, np.ndarray]:
    """Manifest and processed images of a 16-patient dataset from `vbiopsy synth` -> ingest -> preprocess."""
    from virtual_biopsy.core.config import SynthConfig

    paths = make_project(tmp_path_factory.mktemp("quality"), {"preprocess": {"image_size": SIZE, "workers": 1},
                                                               "ingest": {"workers": 1}},
                         synth=SynthConfig(patients=16, image_height=64), seed=11, stages=("ingest", "preprocess"))
    manifest = pd.read_csv(paths.manifest, dtype={"acr": str}, keep_default_na=False)
    manifest["acr"] = manifest["acr"].replace("", None)
    return manifest, np.load(paths.processed_images)


@pytest.fixture
def clean_manifest(simulated) -> Callable[..., pd.DataFrame]:
    """``clean_manifest(patients=None)``: the simulated manifest (a copy), optionally only its
    first ``patients`` patients."""
    def copy(patients: int | None = None) -> pd.DataFrame:
        manifest = simulated[0].copy()
        if patients is not None:
            keep = sorted(manifest["patient_id"].unique())[:patients]
            manifest = manifest[manifest["patient_id"].isin(keep)].reset_index(drop=True)
        return manifest

    return copy


@pytest.fixture
def clean_images(simulated) -> Callable[..., np.ndarray]:
    """``clean_images(n, size=SIZE)``: the simulated dataset's first ``n`` processed images (a
    copy), zero-padded to ``size``."""
    def copy(n: int, size: int = SIZE) -> np.ndarray:
        images = simulated[1][:n].copy()
        pad = size - images.shape[1]
        return np.pad(images, ((0, 0), (0, pad), (0, pad))) if pad > 0 else images

    return copy


def run(manifest: pd.DataFrame, images: np.ndarray, index: pd.DataFrame | None = None, cfg=CFG):
    return validate(manifest, image_stats(images), cfg, SIZE, processed_index=index)


def failed_names(report) -> set[str]:
    return {o.name for o in report.critical_failures}


def test_clean_dataset_passes_every_critical_expectation(clean_manifest, clean_images):
    manifest = clean_manifest()
    report = run(manifest, clean_images(len(manifest)))
    assert report.passed, report.failure_message()
    assert report.metrics()["evaluated"] == len(build_checks(CFG, SIZE, len(manifest)))


# Each defect: (expectation name, manifest edit, image edit). Edits work on copies.
def _set(column, value, row=0):
    def edit(m):
        m.loc[row, column] = value
    return edit


def _image(fn):
    def edit(images):
        images[3] = fn(images[3])
    return edit


def _drop_des_partner(m):
    des = m[(m["label"] == "malignant") & (m["modality"] == "CESM")].index[0]
    m.loc[des, "pair_key"] = "orphan|DES"  # the LE image's partner is no longer found


def _only_malignant(m):
    m.loc[m["label"] == "benign", "label"] = "malignant"


DEFECTS: dict[str, tuple[str, Callable | None, Callable | None]] = {
    "null patient id": ("patient_id_not_null", _set("patient_id", None), None),
    "null label": ("label_not_null", _set("label", None, row=5), None),
    "bad view": ("view_in_domain", _set("view", "ML"), None),
    "bad laterality": ("laterality_in_domain", _set("laterality", "B"), None),
    "bad modality": ("modality_in_domain", _set("modality", "MRI"), None),
    "bad phase": ("phase_in_domain", _set("phase", "delayed"), None),
    "bad label": ("label_in_domain", _set("label", "suspicious"), None),
    "bad acr": ("acr_in_domain", _set("acr", "e"), None),
    "duplicate image id": ("image_id_unique", lambda m: m.__setitem__("image_id", m["image_id"].where(m.index != 0, m.loc[1, "image_id"])), None),
    "missing DES partner": ("lesion_le_has_des_partner", _drop_des_partner, None),
    "age out of range": ("age_in_range", _set("age", 7), None),
    "class balance out of bounds": ("malignant_share_in_range", _only_malignant, None),
    "blank image": ("image_std_plausible", None, _image(np.zeros_like)),
    "saturated image": ("image_mean_plausible", None, _image(np.ones_like)),
    "inverted image": ("image_background_dark", None, _image(lambda im: 1.0 - im)),
    "NaN pixel": ("pixels_finite", None, _image(lambda im: np.where(np.eye(SIZE, dtype=bool), np.nan, im))),
    "pixel above 1": ("pixel_max_in_unit_range", None, _image(lambda im: im * 1.5 + 0.2)),
    "negative pixel": ("pixel_min_in_unit_range", None, _image(lambda im: im - 0.3)),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_injected_defect_fails_its_critical_expectation(defect, clean_manifest, clean_images):
    expectation, edit_manifest, edit_images = DEFECTS[defect]
    manifest = clean_manifest()
    images = clean_images(len(manifest))
    if edit_manifest:
        edit_manifest(manifest)
        manifest = manifest.reset_index(drop=True)
    if edit_images:
        edit_images(images)
    report = run(manifest, images[: len(manifest)])
    assert expectation in failed_names(report), report.failure_message()
    assert expectation in report.failure_message()


def test_too_few_patients_fails_patient_count(clean_manifest, clean_images):
    manifest = clean_manifest(patients=6)
    report = run(manifest, clean_images(len(manifest)))
    assert "patient_count_in_range" in failed_names(report)


def test_wrong_processed_size_fails_shape_expectations(clean_manifest, clean_images):
    manifest = clean_manifest()
    report = run(manifest, clean_images(len(manifest), size=SIZE + 8))
    assert {"processed_height_is_configured_size", "processed_width_is_configured_size"} <= failed_names(report)


def test_index_not_matching_array_fails_row_count_and_membership(clean_manifest, clean_images):
    manifest = clean_manifest()
    index = manifest.assign(row=np.arange(len(manifest)))
    index.loc[0, "image_id"] = "not-in-manifest"
    report = run(manifest, clean_images(len(manifest) - 1), index=index)
    assert {"index_rows_match_array", "processed_images_in_manifest"} <= failed_names(report)


def test_missing_manifest_column_fails_schema_and_skips_its_checks(clean_manifest, clean_images):
    manifest = clean_manifest().drop(columns=["view"])
    report = run(manifest, clean_images(len(manifest)))
    assert "manifest_has_required_columns" in failed_names(report)
    assert "view_in_domain" not in {o.name for o in report.outcomes}


def test_warnings_are_recorded_but_do_not_fail(clean_manifest, clean_images):
    manifest = clean_manifest()
    manifest.loc[:, "acr"] = None
    manifest.loc[3, "age"] = None
    report = run(manifest, clean_images(len(manifest)))
    assert report.passed
    assert {o.name for o in report.warning_failures} == {"acr_mostly_reported", "age_reported"}


def test_failure_examples_name_the_offending_image(clean_manifest, clean_images):
    manifest = clean_manifest()
    manifest.loc[4, "age"] = 150
    report = run(manifest, clean_images(len(manifest)))
    (age,) = [o for o in report.critical_failures if o.name == "age_in_range"]
    assert age.unexpected_count == 1
    assert manifest.loc[4, "image_id"] in json.dumps(age.examples)


def test_every_expectation_has_a_known_severity_and_unique_name():
    checks = build_checks(CFG, SIZE, 10)
    assert len({c.name for c in checks}) == len(checks)
    assert {c.severity for c in checks} == {CRITICAL, "warning"}


def test_image_stats_rejects_array_of_wrong_rank():
    with pytest.raises(QualityError, match=r"\(N, H, W\).*\(4, 32\)"):
        image_stats(np.zeros((4, 32), dtype=np.float32))


def test_image_stats_reads_memmap_in_chunks(tmp_path, clean_images):
    images = clean_images(7)
    np.save(tmp_path / "images.npy", images)
    stats = image_stats(np.load(tmp_path / "images.npy", mmap_mode="r"), chunk=3)
    assert list(stats["row"]) == list(range(7))
    np.testing.assert_allclose(stats["mean"], images.mean(axis=(1, 2)), rtol=1e-5)


# ---- the stage ---------------------------------------------------------------------------------
def write_project(root, manifest: pd.DataFrame, images: np.ndarray) -> None:
    """Stage inputs as ingest/preprocess write them (contract in paths.py)."""
    (root / "data" / "interim").mkdir(parents=True)
    (root / "data" / "processed").mkdir(parents=True)
    manifest.to_csv(root / "data" / "interim" / "manifest.csv", index=False)
    manifest.assign(row=np.arange(len(manifest))).to_csv(root / "data" / "processed" / "index.csv", index=False)
    np.save(root / "data" / "processed" / "images.npy", images)
    (root / "params.yaml").write_text(f"preprocess:\n  image_size: {SIZE}\nvalidate_data:\n  min_patients: {CFG.min_patients}\n")


def test_stage_writes_results_metrics_and_static_data_docs(tmp_path, clean_manifest, clean_images):
    manifest = clean_manifest()
    write_project(tmp_path, manifest, clean_images(len(manifest)))
    assert validate_data.main(["--root", str(tmp_path)]) == 0
    out = tmp_path / "reports" / "validation"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["critical_failed"] == 0 and metrics["passed"] == metrics["evaluated"]
    results = json.loads((out / "results.json").read_text())
    assert {e["severity"] for e in results["expectations"]} == {"critical", "warning"}
    index_html = (out / "data_docs" / "index.html").read_text()
    assert "manifest" in index_html and "image_stats" in index_html
    assert not list(out.glob(".gx-*")), "the temporary GX project is removed"


def test_stage_exits_nonzero_naming_failed_expectation_and_rows(tmp_path, capsys, clean_manifest, clean_images):
    manifest = clean_manifest()
    manifest.loc[2, "view"] = "XCC"
    write_project(tmp_path, manifest, clean_images(len(manifest)))
    assert validate_data.main(["--root", str(tmp_path), "--no-mlflow"]) == 1
    err = capsys.readouterr().err
    assert "view_in_domain" in err and manifest.loc[2, "image_id"] in err
    assert json.loads((tmp_path / "reports" / "validation" / "metrics.json").read_text())["critical_failed"] == 1


def test_stage_reports_missing_inputs_by_file(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    assert validate_data.main(["--root", str(tmp_path), "--no-mlflow"]) == 1
    assert "manifest.csv: missing" in capsys.readouterr().err
