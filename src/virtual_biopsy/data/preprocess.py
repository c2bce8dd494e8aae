"""Preprocess (paper 4.1): every manifest image becomes one fixed-size float image in [0, 1].

Per image, in this order (:func:`preprocess_pixels`):

1. **Orient** -- mirror the image when its chest wall is on the left, so every image has the chest
   wall on the right. The chest-wall side comes from Patient Orientation (0020,0020): its first
   value is the direction of increasing column index, ``A`` (towards the nipple: chest wall on the
   left) or ``P`` (chest wall on the right); without it, the display convention of PS3.3 / IHE
   Mammography (left breasts with the chest wall on the left) is assumed. On conventionally stored
   images this is exactly the paper's "flip left breasts": right breasts keep their orientation.
   Mirroring first and padding on the left is the same as padding away from the chest wall and
   mirroring afterwards, and needs one rule instead of two.
2. **Pad to square with the mean background value** -- on the side away from the chest wall
   (left after step 1) when the image is taller than wide; split top/bottom when it is wider than
   tall. Background is estimated as the mean of the outermost columns farthest from the chest
   wall (:data:`BACKGROUND_STRIP` of the width): a mammogram is acquired with the breast against
   the chest-wall edge of the detector, so that strip is air in front of the nipple. Unlike a
   low-intensity threshold this also holds for recombined (DES) images, whose background is not
   the darkest value.
3. **Contrast stretch** -- clip to the image's own DICOM display window (WindowCenter +-
   WindowWidth/2, see dicom.read.display_window; full stored range when the file has none).
4. **Normalise** -- min-max of the clipped image to [0, 1] (a constant image becomes all zeros).
5. **Resize** to ``size x size`` with an anti-aliased (scaled-support triangle) filter.

All images go into one ``float32 (N, size, size)`` ``.npy`` (created with ``open_memmap``; each worker
writes its rows straight into the file, so images are not sent back to the main process and memory
stays at a few images whatever N is) plus an index table: the manifest columns and ``row``.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from virtual_biopsy.core.atomic import atomic_dir, staged_path, write_csv
from virtual_biopsy.core.config import PreprocessConfig
from virtual_biopsy.data.layout import MANIFEST_COLUMNS
from virtual_biopsy.dicom.read import DicomReadError, display_window, read_dataset, read_pixels
from virtual_biopsy.core.parallel import map_in_processes
from virtual_biopsy.core.paths import ProjectPaths

BACKGROUND_STRIP = 0.05  # share of the width, farthest from the chest wall, taken as background
INDEX_COLUMNS = (*MANIFEST_COLUMNS, "row")


class PreprocessError(ValueError):
    """An input of the preprocess stage cannot be used; the message names it and says why."""


# --- one image ---------------------------------------------------------------------------------

def chest_wall_on_left(patient_orientation: object, laterality: str) -> bool:
    """True when the chest wall is at column 0 (see the module docstring for the rule)."""
    values = list(patient_orientation) if isinstance(patient_orientation, (list, tuple)) else (
        str(patient_orientation or "").split("\\"))
    first = str(values[0]).strip().upper() if values else ""
    if first.startswith("A"):
        return True
    if first.startswith("P"):
        return False
    return laterality == "L"


def orient(pixels: np.ndarray, chest_wall_left: bool) -> np.ndarray:
    """Mirror left-right when needed so the chest wall is on the right of every image."""
    return pixels[:, ::-1] if chest_wall_left else pixels


def background_value(pixels: np.ndarray) -> float:
    """Mean of the leftmost columns (farthest from the chest wall once oriented)."""
    strip = max(1, round(pixels.shape[1] * BACKGROUND_STRIP))
    return float(pixels[:, :strip].mean(dtype=np.float64))


def pad_to_square(pixels: np.ndarray, value: float) -> np.ndarray:
    """Pad with ``value`` to a square: columns on the left, or rows split top/bottom.

    Returns a new array of the same dtype (the image copied into place, the padding filled).
    """
    rows, cols = pixels.shape
    side = max(rows, cols)
    square = np.empty((side, side), dtype=pixels.dtype)
    if rows > cols:
        square[:, : side - cols] = value
        square[:, side - cols:] = pixels
    else:
        top = (side - rows) // 2
        square[:top] = value
        square[top + rows:] = value
        square[top: top + rows] = pixels
    return square


def contrast_stretch(pixels: np.ndarray, center: float, width: float, *, in_place: bool = False) -> np.ndarray:
    """Clip to ``center +- width/2`` and min-max normalise to [0, 1] (all zeros when constant).

    ``in_place=True`` (float32 input) overwrites ``pixels`` instead of allocating a new image; the
    values are the same either way.
    """
    out = pixels if in_place and pixels.dtype == np.float32 else None
    clipped = np.clip(pixels, center - width / 2.0, center + width / 2.0, out=out)
    low, high = float(clipped.min()), float(clipped.max())
    if high <= low:
        if out is not None:
            out.fill(0.0)
            return out
        return np.zeros_like(clipped, dtype=np.float32)
    np.subtract(clipped, low, out=clipped)
    np.divide(clipped, high - low, out=clipped)
    return clipped.astype(np.float32, copy=False)


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a square float image to ``size x size`` with anti-aliasing; values stay in range.

    Pillow's bilinear filter widens its triangle support by the reduction factor when shrinking,
    so every source pixel contributes (no aliasing) and the weights are convex (no overshoot,
    unlike Lanczos); it is several times faster than skimage's Gaussian-then-interpolate.
    """
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))  # float32 -> mode "F"
    resized = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def preprocess_pixels(pixels: np.ndarray, center: float, width: float, chest_wall_left: bool,
                      size: int) -> np.ndarray:
    """Paper 4.1 on one presentation-space image: orient, pad, stretch, normalise, resize."""
    oriented = orient(pixels, chest_wall_left)
    square = pad_to_square(oriented, background_value(oriented))  # a fresh array: stretch it in place
    return resize_square(contrast_stretch(square, center, width, in_place=True), size)


def preprocess_dataset(ds, laterality: str, size: int) -> np.ndarray:
    """Preprocess one DICOM dataset already read (the stage and ``vbiopsy predict`` share this)."""
    pixels = read_pixels(ds)
    center, width = display_window(ds)
    return preprocess_pixels(pixels, center, width, chest_wall_on_left(ds.get("PatientOrientation"), laterality), size)


def preprocess_file(path: str | Path, laterality: str, size: int, expected_uid: str | None = None) -> np.ndarray:
    """Read one DICOM and preprocess it; errors name the file. With ``expected_uid``, the file must
    still hold that image (SOPInstanceUID), the one ingest listed under this path."""
    try:
        ds = read_dataset(path)
    except (OSError, DicomReadError, ValueError) as exc:
        raise PreprocessError(f"{path}: {exc}") from exc
    if expected_uid is not None and str(ds.get("SOPInstanceUID", "") or "").strip() != expected_uid:
        raise PreprocessError(f"{path}: not the image ingest listed under this path (raw data changed); "
                              "rerun the ingest stage")
    try:
        return preprocess_dataset(ds, laterality, size)
    except (OSError, DicomReadError, ValueError) as exc:
        raise PreprocessError(f"{path}: {exc}") from exc


def write_row(path: str, offset: int, image: np.ndarray) -> None:
    """Write ``image``'s bytes into the file at ``path`` at byte ``offset`` (the file exists)."""
    data = memoryview(np.ascontiguousarray(image)).cast("B")
    fd = os.open(path, os.O_WRONLY)
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
    finally:
        os.close(fd)


def _preprocess_into(task: tuple[int, str, str, str | None], size: int, out: str, offset: int) -> None:
    """Preprocess task ``(row, path, laterality, uid)`` and write it as row ``row`` of the array in ``out``."""
    row, path, laterality, uid = task
    image = preprocess_file(path, laterality, size, uid).astype(np.float32, copy=False)
    if image.shape != (size, size):  # a wrong-sized row would overwrite its neighbours
        raise PreprocessError(f"{path}: preprocessed to shape {image.shape}, not {(size, size)}")
    write_row(out, offset + row * image.nbytes, image)


# --- the whole manifest ------------------------------------------------------------------------

def read_manifest(path: Path) -> pd.DataFrame:
    """The manifest as strings (so the index table round-trips it exactly)."""
    if not path.exists():
        raise PreprocessError(f"{path}: manifest not found; run the ingest stage first")
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise PreprocessError(f"{path}: missing manifest column(s) {missing}")
    if manifest.empty:
        raise PreprocessError(f"{path}: manifest has no images")
    return manifest


def preprocess_into(tasks: list[tuple[str, str, str | None]], size: int, workers: int, out: Path, offset: int) -> None:
    """Preprocess ``(path, laterality, uid)`` tasks into rows ``0..N-1`` of the float32 ``(N, size, size)``
    array stored in ``out`` from byte ``offset`` on, by ``workers`` processes (in-process when 1)."""
    work = functools.partial(_preprocess_into, size=size, out=os.fspath(out), offset=offset)
    for _ in map_in_processes(work, [(row, *task) for row, task in enumerate(tasks)], workers,
                              desc="preprocess", unit="image"):
        pass


def write_processed(manifest: pd.DataFrame, sources: pd.DataFrame, cfg: PreprocessConfig, paths: ProjectPaths) -> dict:
    """Write ``images.npy`` and ``index.csv`` for every manifest row; return counts and timing.

    ``sources``: the raw file (``source_path``) and original ``sop_instance_uid`` of each manifest
    row, in manifest order (data.sources.source_files); the index carries neither.
    """
    started = time.perf_counter()
    size = cfg.image_size
    tasks = list(zip(sources["source_path"], manifest["laterality"], sources["sop_instance_uid"]))
    index = manifest[list(MANIFEST_COLUMNS)].assign(row=range(len(manifest)))
    # The array and its index are one set: built in a staging folder, swapped in together.
    with atomic_dir(paths.processed_dir) as staged:
        images = staged_path(paths.processed_images, paths.processed_dir, staged)
        # The header and the file at its full size; the workers write the rows into it.
        array = np.lib.format.open_memmap(images, mode="w+", dtype=np.float32, shape=(len(tasks), size, size))
        offset = array.offset
        del array
        preprocess_into(tasks, size, cfg.workers, images, offset)
        write_csv(staged_path(paths.processed_index, paths.processed_dir, staged), index)
    seconds = time.perf_counter() - started
    return {"images": len(tasks), "image_size": size, "seconds": round(seconds, 3),
            "images_per_second": round(len(tasks) / seconds, 2) if seconds > 0 else 0.0}
