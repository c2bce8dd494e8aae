"""The synthetic CESM object over its LE source (dicom/synthetic.py, serving/synthetic_cesm.py): the
source's geometry for either aspect, its spacing attributes as they are, and bad inputs refused."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_checks import dciodvfy_errors

from virtual_biopsy.data.preprocess import preprocess_dataset
from virtual_biopsy.dicom.read import display_window, read_dataset, read_pixels
from virtual_biopsy.dicom.synthetic import SyntheticDicomError, synthetic_dicom
from virtual_biopsy.dicom.write import write_dataset
from virtual_biopsy.serving.synthetic_cesm import synthetic_cesm_dicom

PROCESSED_SIZE = 32
ROW = pd.Series({"laterality": "L", "view": "CC", "generator_view": "CC", "generator_fold": 0,
                 "image_id": "2.25.12345678901234567890"})


@pytest.fixture
def le_source(tiny_raw):
    """A left CC low-energy image of the tiny simulated dataset (96 x 81, chest wall on the left)."""
    return read_dataset(sorted(tiny_raw.rglob("*_LCC_LOW_ENERGY.dcm"))[0])


def _wider_than_tall(ds):
    """The same image transposed: the other aspect, which the embedded dataset never has."""
    pixels = ds.pixel_array.T.copy()
    ds.PixelData, (ds.Rows, ds.Columns) = pixels.tobytes(), pixels.shape
    return ds


@pytest.mark.parametrize("aspect", ["taller", "wider"])
def test_synthetic_cesm_of_either_aspect_has_the_sources_geometry_and_passes_dciodvfy(le_source, tmp_path, aspect):
    source = le_source if aspect == "taller" else _wider_than_tall(le_source)
    processed = preprocess_dataset(source, "L", PROCESSED_SIZE)  # stands in for the generator's output
    path = write_dataset(synthetic_cesm_dicom(source, processed, ROW), tmp_path / "synthetic.dcm")
    ds = pydicom.dcmread(path)
    assert ds.pixel_array.shape == (source.Rows, source.Columns)
    assert list(ds.PixelSpacing) == list(source.PixelSpacing)
    assert list(ds.PatientOrientation) == list(source.PatientOrientation)
    # The processed LE put back lies over the LE itself (shown in its window), closer than mirrored.
    center, width = display_window(source)
    le = np.clip((read_pixels(source) - (center - width / 2)) / width, 0, 1)
    error = np.abs(ds.pixel_array / 4095 - le).mean()
    assert error < 0.05 and 2 * error < np.abs(ds.pixel_array / 4095 - le[:, ::-1]).mean()
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(path) == []


def test_synthetic_dicom_refuses_pixels_not_in_the_sources_geometry(le_source):
    with pytest.raises(SyntheticDicomError, match=rf"synthetic image {ROW['image_id']}: pixels of shape \(32, 32\), "
                                                  r"but its LE source is 96 x 81"):
        synthetic_dicom(le_source, np.zeros((32, 32), np.float32), ROW)


def test_synthetic_dicom_refuses_pixels_that_are_not_finite(le_source):
    pixels = np.full((le_source.Rows, le_source.Columns), np.nan, np.float32)
    with pytest.raises(SyntheticDicomError, match="NaN or infinite"):
        synthetic_dicom(le_source, pixels, ROW)


def test_synthetic_dicom_takes_the_sources_spacing_as_it_is_and_drops_what_the_source_lacks(le_source):
    le_source.ImagerPixelSpacing = [0.1, 0.12]  # anisotropic, and not calibrated
    for keyword in ("PixelSpacing", "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription"):
        delattr(le_source, keyword)
    ds = synthetic_dicom(le_source, np.zeros((le_source.Rows, le_source.Columns), np.float32), ROW)
    assert [float(v) for v in ds.ImagerPixelSpacing] == [0.1, 0.12]
    assert "PixelSpacing" not in ds and "PixelSpacingCalibrationType" not in ds


def test_synthetic_dicom_refuses_a_source_without_any_pixel_spacing(le_source):
    del le_source.ImagerPixelSpacing, le_source.PixelSpacing
    with pytest.raises(SyntheticDicomError, match="neither ImagerPixelSpacing nor PixelSpacing"):
        synthetic_dicom(le_source, np.zeros((le_source.Rows, le_source.Columns), np.float32), ROW)
