"""impute stage: out-of-fold synthetic CESM and its DICOM export (fixture ``generator_project``)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from virtual_biopsy.cli import main as cli
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.imputation import ImputeError, plan_imputation
from virtual_biopsy.dicom.cesm import energy_of, is_simulated, is_synthetic
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


def test_synthetic_dicom_round_trips_marked_synthetic_and_references_its_source(imputed, tmp_path):
    paths, index, images = imputed
    out = tmp_path / "dicom"
    assert cli.main(["impute", "--root", str(paths.root), "--dicom-out", str(out), "--no-mlflow"]) == 0
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == len(index)
    row = index.iloc[0]
    # data/imputed names no raw file; the private sources table links the LE source to its file.
    source_path = pd.read_csv(paths.sources, dtype=str).set_index("image_id").at[row["source_image_id"], "source_path"]
    source = pydicom.dcmread(paths.raw / source_path)
    ds = pydicom.dcmread(out / source_path.replace(".dcm", "_SYNTHETIC_RECOMBINED.dcm"))
    assert is_synthetic(ds) and energy_of(ds) == "DES" and is_simulated(ds)
    assert ds.SeriesDescription.startswith("SYNTHETIC CESM")
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert ds.SOPInstanceUID == row["image_id"] != source.SOPInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    assert source.SOPInstanceUID in ds.DerivationDescription
    assert ds.pixel_array.shape == (32, 32)
    # Stored pixels are the imputed image on the 12-bit scale, in the source's orientation.
    restored = ds.pixel_array / 4095.0
    oriented = np.fliplr(restored) if source.PatientOrientation[0] == "A" else restored
    np.testing.assert_allclose(oriented, images[int(row["row"])], atol=1 / 4095)


def test_rerun_replaces_imputed_as_one_set_with_the_same_bytes(imputed, tmp_path):
    paths, _, _ = imputed
    copy = ProjectPaths(Path(shutil.copytree(paths.root, tmp_path / "project", ignore=shutil.ignore_patterns("mlruns"))))
    digests = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(paths.imputed_dir.iterdir())}
    (copy.imputed_dir / "stale.npy").write_bytes(b"of an older run")
    assert impute.main(["--root", str(copy.root), "--no-mlflow"]) == 0
    assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(copy.imputed_dir.iterdir())} == digests


def test_dicom_export_refuses_a_source_file_that_no_longer_holds_the_imputed_images_source(imputed, tmp_path, capsys):
    paths, index, _ = imputed
    copy = ProjectPaths(Path(shutil.copytree(paths.root, tmp_path / "project", ignore=shutil.ignore_patterns("mlruns"))))
    source = pd.read_csv(copy.sources, dtype=str).set_index("image_id").at[index.iloc[0]["source_image_id"], "source_path"]
    ds = pydicom.dcmread(copy.raw / source)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()  # another image under the same path
    ds.save_as(copy.raw / source)
    assert cli.main(["impute", "--root", str(copy.root), "--dicom-out", str(tmp_path / "dicom"), "--no-mlflow"]) == 1
    assert "not the imputed image's LE source" in capsys.readouterr().err
