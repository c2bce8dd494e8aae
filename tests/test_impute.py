"""impute stage: out-of-fold synthetic CESM and its DICOM export (fixture ``generator_project``)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage
from dicom_checks import dciodvfy_errors

from virtual_biopsy.cli import main as cli
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.imputation import ImputeError, plan_imputation
from virtual_biopsy.data.source_geometry import SourceGeometry, to_source_geometry
from virtual_biopsy.dicom.cesm import energy_of, is_simulated, is_synthetic
from virtual_biopsy.dicom.read import display_window, read_pixels
from virtual_biopsy.dicom.synthetic import stored_values
from virtual_biopsy.models.weights import load_generator_weights
from virtual_biopsy.stages import impute
from virtual_biopsy.training.generator_trainer import generate


@pytest.fixture(scope="module")
def imputed(generator_project):
    assert impute.main(["--root", str(generator_project), "--no-mlflow"]) == 0
    paths = ProjectPaths(generator_project)
    return paths, pd.read_csv(paths.imputed_index), np.load(paths.imputed_images)


def test_every_le_image_is_imputed_once_marked_synthetic_cesm(imputed):
    paths, index, images = imputed
    processed = pd.read_csv(paths.processed_index)
    le_ids = set(processed.loc[(processed["modality"] == "FFDM") & (processed["view"] == "CC"), "image_id"])
    assert set(index["source_image_id"]) == le_ids and len(index) == len(le_ids)
    assert (index["modality"] == "CESM").all() and index["synthetic"].all()
    assert not set(index["image_id"]) & set(processed["image_id"])
    assert images.shape == (len(index), 32, 32) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1


def test_no_image_is_imputed_by_a_generator_that_trained_on_its_patient(imputed):
    paths, index, _ = imputed
    folds = pd.read_csv(paths.splits)
    subset = folds.set_index(["patient_id", "fold"])["subset"]
    for patient, fold in zip(index["patient_id"], index["generator_fold"]):
        assert subset[(patient, fold)] == "test"  # so neither train nor val (early stopping) of that fold


def test_imputed_pixels_are_the_fold_generators_output(imputed):
    paths, index, images = imputed
    processed = np.load(paths.processed_images)
    rows_by_id = pd.read_csv(paths.processed_index).set_index("image_id")["row"]
    for fold in (0, 1):
        pick = index[index["generator_fold"] == fold].iloc[:3]
        generator, _ = load_generator_weights(paths.generator_weights("CC", fold))
        expected = generate(generator, processed[rows_by_id[pick["source_image_id"]].to_numpy()])
        np.testing.assert_allclose(images[pick["row"].to_numpy()], expected, atol=1e-6)


def test_plan_refuses_a_patient_in_no_test_set():
    index = pd.DataFrame({"patient_id": ["p1", "p2"], "modality": ["FFDM"] * 2, "view": ["CC"] * 2, "row": [0, 1]})
    folds = pd.DataFrame({"patient_id": ["p1", "p2", "p2"], "fold": [0, 0, 1], "subset": ["test", "train", "val"]})
    with pytest.raises(ImputeError, match="p2"):
        plan_imputation(index, folds, ("CC",))


@pytest.fixture(scope="module")
def exported(imputed, tmp_path_factory):
    """``vbiopsy impute --dicom-out`` run once on the imputed project: (paths, index, images, out folder)."""
    paths, index, images = imputed
    out = tmp_path_factory.mktemp("dicom")
    assert cli.main(["impute", "--root", str(paths.root), "--dicom-out", str(out), "--no-mlflow"]) == 0
    return paths, index, images, out


def _source_path(paths: ProjectPaths, source_image_id: str) -> str:
    """The raw file (relative to data/raw) of an LE image, from the private sources table."""
    return pd.read_csv(paths.sources, dtype=str).set_index("image_id").at[source_image_id, "source_path"]


def _source_and_synthetic(exported, row):
    paths, _, _, out = exported
    relative = _source_path(paths, row["source_image_id"])
    return (pydicom.dcmread(paths.raw / relative),
            pydicom.dcmread(out / relative.replace(".dcm", "_SYNTHETIC_RECOMBINED.dcm")))


def _copy(paths: ProjectPaths, tmp_path: Path) -> ProjectPaths:
    return ProjectPaths(Path(shutil.copytree(paths.root, tmp_path / "project", ignore=shutil.ignore_patterns("mlruns"))))


def test_synthetic_dicom_round_trips_marked_synthetic_and_references_its_source(exported):
    paths, index, _, out = exported
    assert len(sorted(out.rglob("*.dcm"))) == len(index)
    row = index.iloc[0]
    source, ds = _source_and_synthetic(exported, row)
    assert is_synthetic(ds) and energy_of(ds) == "DES" and is_simulated(ds)
    assert ds.SeriesDescription.startswith("SYNTHETIC CESM")
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert ds.SOPInstanceUID == row["image_id"] != source.SOPInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    assert source.SOPInstanceUID in ds.DerivationDescription


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_synthetic_dicom_has_its_le_sources_geometry_and_lies_over_it(exported, laterality):
    _, index, images, _ = exported
    row = index[index["laterality"] == laterality].iloc[0]
    source, ds = _source_and_synthetic(exported, row)
    assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns) == (row["rows"], row["columns"])
    assert ds.pixel_array.shape == (source.Rows, source.Columns)
    assert list(ds.PixelSpacing) == list(source.PixelSpacing)
    assert list(ds.ImagerPixelSpacing) == list(source.ImagerPixelSpacing)
    assert ds.ImageLaterality == source.ImageLaterality == laterality
    assert list(ds.PatientOrientation) == list(source.PatientOrientation)
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    # Stored pixels: the imputed image put back into the source's geometry, on the 12-bit scale the
    # window shows in full.
    geometry = SourceGeometry.of_dataset(source, laterality)
    np.testing.assert_array_equal(ds.pixel_array, stored_values(to_source_geometry(images[int(row["row"])], geometry)))
    assert (float(ds.WindowCenter), float(ds.WindowWidth), ds.BitsStored) == (2048.0, 4096.0, 12)
    # Lies over the source: the generator leaves air at 0, so the synthetic breast is the LE breast
    # (LE above its window's low end), up to the blur of two resizes at the skin line.
    center, width = display_window(source)
    le_breast = read_pixels(source) > center - width / 2
    synthetic_breast = ds.pixel_array > 0
    assert (le_breast & synthetic_breast).sum() / (le_breast | synthetic_breast).sum() > 0.75  # mirrored: ~0.3
    processed_pixel = max(source.Rows, source.Columns) / images.shape[1]  # source pixels per processed pixel
    shift = np.subtract(ndimage.center_of_mass(le_breast), ndimage.center_of_mass(synthetic_breast))
    assert np.abs(shift).max() <= processed_pixel


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian dicom3tools) missing; scripts/install_system_deps.sh installs it")
@pytest.mark.parametrize("laterality", ["L", "R"])
def test_synthetic_dicom_passes_dciodvfy_without_errors(exported, laterality):
    paths, index, _, out = exported
    row = index[index["laterality"] == laterality].iloc[0]
    written = out / _source_path(paths, row["source_image_id"]).replace(".dcm", "_SYNTHETIC_RECOMBINED.dcm")
    assert dciodvfy_errors(written) == []


def test_rerun_replaces_imputed_as_one_set_with_the_same_bytes(imputed, tmp_path):
    paths, _, _ = imputed
    copy = _copy(paths, tmp_path)
    digests = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(paths.imputed_dir.iterdir())}
    (copy.imputed_dir / "stale.npy").write_bytes(b"of an older run")
    assert impute.main(["--root", str(copy.root), "--no-mlflow"]) == 0
    assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(copy.imputed_dir.iterdir())} == digests


def test_dicom_export_refuses_a_source_file_that_no_longer_holds_the_imputed_images_source(imputed, tmp_path, capsys):
    paths, index, _ = imputed
    copy = _copy(paths, tmp_path)
    source = _source_path(copy, index.iloc[0]["source_image_id"])
    ds = pydicom.dcmread(copy.raw / source)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()  # another image under the same path
    ds.save_as(copy.raw / source)
    assert cli.main(["impute", "--root", str(copy.root), "--dicom-out", str(tmp_path / "dicom"), "--no-mlflow"]) == 1
    err = capsys.readouterr().err
    assert "not the imputed image's LE source" in err and index.iloc[0]["source_image_id"] in err
    assert Path(source).parts[0] not in err  # the raw layout names folders after the patient


def test_dicom_export_names_the_image_not_the_path_when_a_source_is_missing(imputed, tmp_path, capsys):
    paths, index, _ = imputed
    copy = _copy(paths, tmp_path)
    source = _source_path(copy, index.iloc[0]["source_image_id"])
    (copy.raw / source).unlink()
    assert cli.main(["impute", "--root", str(copy.root), "--dicom-out", str(tmp_path / "dicom"), "--no-mlflow"]) == 1
    err = capsys.readouterr().err
    assert f"synthetic image {index.iloc[0]['image_id']}" in err and "missing from the raw data" in err
    assert Path(source).parts[0] not in err and Path(source).name not in err


def test_dicom_export_refuses_a_source_of_other_geometry_than_the_manifest(imputed, tmp_path, capsys):
    paths, index, _ = imputed
    copy = _copy(paths, tmp_path)
    row = index.iloc[0]
    source = _source_path(copy, row["source_image_id"])
    ds = pydicom.dcmread(copy.raw / source)
    cropped = ds.pixel_array[:-4]  # the same image, 4 rows shorter than ingest recorded
    ds.PixelData, ds.Rows = cropped.tobytes(), cropped.shape[0]
    ds.save_as(copy.raw / source)
    assert cli.main(["impute", "--root", str(copy.root), "--dicom-out", str(tmp_path / "dicom"), "--no-mlflow"]) == 1
    err = capsys.readouterr().err
    assert f"synthetic image {row['image_id']}" in err
    assert f"{row['rows'] - 4} x {row['columns']} pixels but the manifest says {row['rows']} x {row['columns']}" in err
    assert Path(source).parts[0] not in err
