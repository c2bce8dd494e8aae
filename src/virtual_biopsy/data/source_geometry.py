"""Preprocess's geometry undone: a processed ``S x S`` image back in its source's stored geometry.

Preprocess (data/preprocess.py, paper 4.1) takes every stored image through orient (mirror when
the chest wall is on the left) -> pad to square (columns on the left when taller than wide, rows
split top/bottom otherwise) -> contrast stretch -> resize to ``S x S``. A generator's synthetic
CESM is made in that processed geometry, so a radiologist cannot read it beside, or lay it over,
its low-energy (LE) source. :func:`to_source_geometry` undoes the three geometric steps in reverse
order (the stretch is an intensity step: the synthetic DICOM's display window stands for it,
dicom/synthetic.py):

1. **Resize** ``S x S`` -> ``side x side``, ``side = max(rows, columns)``, with preprocess's own
   resize (Pillow's bilinear filter, whose weights are convex: values stay in [0, 1]).
2. **Crop the padding** exactly where preprocess put it: the ``side - columns`` leftmost columns
   when the source is taller than wide, else ``(side - rows) // 2`` rows on top and the rest at
   the bottom.
3. **Mirror back** when the source's chest wall is on the left (preprocess's rule,
   :func:`virtual_biopsy.data.preprocess.chest_wall_on_left`).

The result has the source's rows and columns, pixel for pixel in the source's orientation; only
detail finer than one processed pixel (``side / S`` source pixels) is lost, by the resize.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from virtual_biopsy.data.preprocess import chest_wall_on_left, resize_square


class SourceGeometryError(ValueError):
    """A processed image cannot be put back into a source geometry; the message says which value and why."""


@dataclass(frozen=True)
class SourceGeometry:
    """What preprocess's geometry depends on: the stored ``rows`` x ``columns`` of the source image
    and whether its chest wall is at column 0 (``chest_wall_left``: preprocess mirrored it)."""

    rows: int
    columns: int
    chest_wall_left: bool

    def __post_init__(self) -> None:
        if self.rows < 1 or self.columns < 1:
            raise SourceGeometryError(f"a source image needs at least 1 row and 1 column, got "
                                      f"{self.rows} x {self.columns} (rows x columns)")

    @classmethod
    def of_dataset(cls, ds: Dataset, laterality: str) -> SourceGeometry:
        """The geometry of the stored image in ``ds``: the chest-wall side is decided by the very call
        preprocess makes on the same dataset (data.preprocess.preprocess_dataset), so the mirror
        undone here is the mirror applied there."""
        return cls(int(ds.Rows), int(ds.Columns), chest_wall_on_left(ds.get("PatientOrientation"), laterality))

    @property
    def side(self) -> int:
        """The side of the square preprocess padded the image to."""
        return max(self.rows, self.columns)


def crop_padding(square: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The ``rows x columns`` image inside a square that preprocess's ``pad_to_square`` padded:
    drop the left columns (taller than wide) or the top ``(side - rows) // 2`` and bottom rows."""
    side = max(rows, columns)
    if square.shape != (side, side):
        raise SourceGeometryError(f"a {rows} x {columns} image pads to a {side} x {side} square, got shape "
                                  f"{square.shape}")
    if rows > columns:
        return square[:, side - columns:]
    top = (side - rows) // 2
    return square[top: top + rows]


def to_source_geometry(processed: np.ndarray, geometry: SourceGeometry) -> np.ndarray:
    """A processed ``S x S`` image in [0, 1] as a ``float32 (rows, columns)`` image in the source's
    stored geometry (resize back, crop the padding, mirror back; see the module docstring)."""
    if processed.ndim != 2 or processed.shape[0] != processed.shape[1] or processed.shape[0] < 1:
        raise SourceGeometryError(f"a processed image is square (S x S), got shape {processed.shape}")
    if not np.isfinite(processed).all():
        raise SourceGeometryError("the processed image holds NaN or infinite values")
    square = resize_square(processed, geometry.side)
    image = crop_padding(square, geometry.rows, geometry.columns)
    if geometry.chest_wall_left:
        image = image[:, ::-1]
    return np.ascontiguousarray(image, dtype=np.float32)
