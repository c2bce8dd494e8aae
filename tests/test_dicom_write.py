"""The mammography DICOM writer: conformant objects, LE/DES marks, determinism, bad inputs."""
from __future__ import annotations

import hashlib
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from virtual_biopsy.dicom.cesm import (
    DIGITAL_MG_FOR_PRESENTATION,
    energy_of,
    is_simulated,
    is_synthetic,
)
from virtual_biopsy.dicom.write import (
    DicomBuildError,
    Patient,
    Series,
    Study,
    Window,
    build_mammogram_dataset,
    deterministic_uid,
    write_dataset,
)

PATIENT = Patient("P0001", "SIMULATED^P0001", "19650314", 56)
STUDY = Study(deterministic_uid("test", "study"), "S01", "SIM000001", "20220103", "101500")


def _pixels(rows: int = 64, cols: int = 54) -> np.ndarray:
    return (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) % 4000).astype(np.uint16)


def _dataset(energy: str = "LE", *, pixels: np.ndarray | None = None, laterality: str = "R", view: str = "MLO",
             synthetic: bool = False, bits_stored: int = 12):
    return build_mammogram_dataset(
        _pixels() if pixels is None else pixels,
        patient=PATIENT, study=STUDY,
        series=Series(deterministic_uid("test", "series", energy), 1, f"SIMULATED CESM {energy}"),
        laterality=laterality, view=view, energy=energy,
        window=Window(2000, 3000 if energy == "LE" else 900),
        sop_instance_uid=deterministic_uid("test", "image", energy, synthetic),
        frame_of_reference_uid=deterministic_uid("test", "frame"),
        synthetic=synthetic, bits_stored=bits_stored, image_comments="SIMULATED test image",
    )


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian dicom3tools) missing; scripts/install_system_deps.sh installs it")
@pytest.mark.parametrize("energy,synthetic", [("LE", False), ("DES", False), ("DES", True)])
@pytest.mark.parametrize("laterality,view", [("R", "MLO"), ("L", "CC")])
def test_written_mammogram_passes_dciodvfy_without_errors(tmp_path, energy, synthetic, laterality, view):
    dataset = _dataset(energy, laterality=laterality, view=view, synthetic=synthetic)
    path = write_dataset(dataset, tmp_path / "image.dcm")
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (report.stdout + report.stderr).splitlines()
    assert lines[0].strip() == "MammographyImageForPresentation"
    assert [line for line in lines if line.startswith("Error")] == []


def test_le_and_des_are_told_apart_by_their_own_tags(tmp_path):
    le = pydicom.dcmread(write_dataset(_dataset("LE"), tmp_path / "le.dcm"))
    des = pydicom.dcmread(write_dataset(_dataset("DES"), tmp_path / "des.dcm"))
    assert (energy_of(le), energy_of(des)) == ("LE", "DES")
    assert le.FilterMaterial != des.FilterMaterial
    assert is_simulated(le) and is_simulated(des)
    assert not is_synthetic(le) and not is_synthetic(des)


def test_imputed_des_is_marked_synthetic(tmp_path):
    ds = pydicom.dcmread(write_dataset(_dataset("DES", synthetic=True), tmp_path / "fake.dcm"))
    assert is_synthetic(ds) and energy_of(ds) == "DES"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "", "RECOMBINED", "SYNTHETIC"]


def test_written_file_round_trips_pixels_and_presentation_tags(tmp_path):
    pixels = _pixels()
    ds = pydicom.dcmread(write_dataset(_dataset("LE", pixels=pixels), tmp_path / "x.dcm"))
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    assert ds.SOPClassUID == DIGITAL_MG_FOR_PRESENTATION
    assert ds.file_meta.MediaStorageSOPClassUID == DIGITAL_MG_FOR_PRESENTATION
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored) == ("MONOCHROME2", 16, 12)
    assert (ds.ImageLaterality, ds.ViewPosition) == ("R", "MLO")
    assert ds.ViewCodeSequence[0].CodeMeaning == "medio-lateral oblique"
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (2000.0, 3000.0)


def test_same_inputs_give_identical_bytes(tmp_path):
    first = write_dataset(_dataset("DES"), tmp_path / "a.dcm").read_bytes()
    second = write_dataset(_dataset("DES"), tmp_path / "b.dcm").read_bytes()
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()


def test_deterministic_uid_is_a_valid_stable_2_25_uid():
    uid = deterministic_uid("seed", 7, "P0001")
    assert uid == deterministic_uid("seed", 7, "P0001") != deterministic_uid("seed", 8, "P0001")
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid


def test_build_rejects_pixels_that_are_not_uint16():
    with pytest.raises(DicomBuildError, match="uint16, got float32"):
        _dataset(pixels=np.zeros((8, 8), np.float32))


def test_build_rejects_values_beyond_bits_stored():
    with pytest.raises(DicomBuildError, match="5000 does not fit in 12 stored bits"):
        _dataset(pixels=np.full((8, 8), 5000, np.uint16))


def test_build_rejects_unknown_laterality_and_view():
    with pytest.raises(DicomBuildError, match="laterality .* 'B'"):
        _dataset(laterality="B")
    with pytest.raises(DicomBuildError, match="view .* 'ML'"):
        _dataset(view="ML")


def test_only_des_images_can_be_synthetic():
    with pytest.raises(DicomBuildError, match="only DES"):
        _dataset("LE", synthetic=True)


def test_window_rejects_zero_width():
    with pytest.raises(DicomBuildError, match="width must be at least 1, got 0"):
        Window(100, 0)
