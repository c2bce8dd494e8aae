"""data.source_geometry undoes preprocess's geometry (orient, pad to square, resize) for both breasts
and both aspects, so a synthetic CESM lies over its LE source."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from virtual_biopsy.data.preprocess import chest_wall_on_left, pad_to_square, preprocess_pixels
from virtual_biopsy.data.source_geometry import (
    SourceGeometry,
    SourceGeometryError,
    crop_padding,
    to_source_geometry,
)

PROCESSED_SIZE = 64
TALLER, WIDER = (320, 269), (269, 320)  # the embedded dataset's aspect, and the other one
# An identity contrast stretch for an image already in [0, 1] with min 0 and max 1.
STRETCH_CENTER, STRETCH_WIDTH = 0.5, 1.0


def _smooth_image(rows: int, columns: int) -> np.ndarray:
    """Slowly varying values in [0, 1] (min 0, max 1): nothing finer than a processed pixel to lose."""
    r, c = np.mgrid[0:rows, 0:columns]
    image = np.sin(2 * np.pi * r / rows * 1.3) * np.cos(2 * np.pi * c / columns * 0.8) + 0.3 * np.sin(r / 23 + c / 31)
    return ((image - image.min()) / (image.max() - image.min())).astype(np.float32)


def _round_trip(image: np.ndarray, chest_wall_left: bool) -> np.ndarray:
    """preprocess's pixels (orient, pad, identity stretch, resize), then the inverse geometry."""
    processed = preprocess_pixels(image, STRETCH_CENTER, STRETCH_WIDTH, chest_wall_left, PROCESSED_SIZE)
    return to_source_geometry(processed, SourceGeometry(*image.shape, chest_wall_left))


@pytest.mark.parametrize("shape", [TALLER, WIDER], ids=["taller", "wider"])
@pytest.mark.parametrize("chest_wall_left", [True, False], ids=["chest-wall-left", "chest-wall-right"])
def test_inverse_returns_a_preprocessed_image_to_its_stored_geometry_within_resampling_error(shape, chest_wall_left):
    image = _smooth_image(*shape)
    back = _round_trip(image, chest_wall_left)
    assert back.shape == shape and back.dtype == np.float32
    error = np.abs(back - image)
    assert error.mean() < 0.005
    # Away from the edges (one processed pixel = side / S = 5 source pixels), where the resize
    # mixes in the padding, only interpolation error is left.
    margin = max(shape) // PROCESSED_SIZE + 1
    assert error[margin:-margin, margin:-margin].max() < 0.01


@pytest.mark.parametrize("shape", [TALLER, WIDER], ids=["taller", "wider"])
@pytest.mark.parametrize("chest_wall_left", [True, False], ids=["left-breast", "right-breast"])
def test_a_bright_spot_near_the_chest_wall_lands_where_it_was(shape, chest_wall_left):
    rows, columns = shape
    spot_row = int(rows * 0.4)
    spot_column = 12 if chest_wall_left else columns - 13  # 12 pixels from the chest-wall edge
    r, c = np.mgrid[0:rows, 0:columns]
    image = np.exp(-((r - spot_row) ** 2 + (c - spot_column) ** 2) / (2 * 6.0 ** 2)).astype(np.float32)
    back = _round_trip(image, chest_wall_left)
    found_row, found_column = np.unravel_index(np.argmax(back), back.shape)
    assert abs(found_row - spot_row) <= 2 and abs(found_column - spot_column) <= 2
    assert back.max() > 0.8  # the spot survived the round trip, it is not a stray pixel


@pytest.mark.parametrize("shape", [TALLER, WIDER, (270, 320), (100, 100)], ids=["taller", "wider", "even", "square"])
def test_crop_padding_removes_exactly_what_pad_to_square_added(shape):
    image = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(crop_padding(pad_to_square(image, -1.0), *shape), image)


@pytest.mark.parametrize("orientation", [None, ["A", "R"], ["P", "L"]], ids=["none", "A-R", "P-L"])
@pytest.mark.parametrize("laterality", ["L", "R"])
def test_chest_wall_side_is_the_one_preprocess_decides_for_the_same_dataset(orientation, laterality):
    # The mirror undone must be the mirror preprocess_dataset applied to this dataset, whatever its rule.
    ds = Dataset()
    ds.Rows, ds.Columns = TALLER
    if orientation:
        ds.PatientOrientation = orientation
    expected = chest_wall_on_left(ds.get("PatientOrientation"), laterality)
    assert SourceGeometry.of_dataset(ds, laterality) == SourceGeometry(*TALLER, chest_wall_left=expected)


@pytest.mark.parametrize("processed,message", [
    (np.zeros((64, 32), np.float32), r"square \(S x S\), got shape \(64, 32\)"),
    (np.zeros((2, 64, 64), np.float32), r"got shape \(2, 64, 64\)"),
    (np.full((8, 8), np.nan, np.float32), "NaN or infinite"),
])
def test_inverse_refuses_an_image_that_is_not_a_processed_one(processed, message):
    with pytest.raises(SourceGeometryError, match=message):
        to_source_geometry(processed, SourceGeometry(*TALLER, chest_wall_left=False))


def test_geometry_refuses_an_empty_source():
    with pytest.raises(SourceGeometryError, match="at least 1 row and 1 column, got 0 x 269"):
        SourceGeometry(0, 269, chest_wall_left=False)


def test_crop_refuses_a_square_of_the_wrong_side():
    with pytest.raises(SourceGeometryError, match="pads to a 320 x 320 square, got shape \\(64, 64\\)"):
        crop_padding(np.zeros((64, 64), np.float32), *TALLER)
