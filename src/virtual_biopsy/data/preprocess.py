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

Lesion masks (data/interim/lesions.csv and the masks it names, see data.layout) go through exactly
their image's geometry (:func:`preprocess_mask`), in the same worker task as the image: orient with
the same chest-wall rule, pad to square with 0 on the same side, resize the 0/1 mask with the same
anti-aliased filter (each output pixel is then the share of it the lesion covers), and keep the
pixels at least half covered. A lesion too small to half-cover any pixel at the processed size
keeps its most covered pixel: a lesion must not disappear from the truth because the image was
shrunk (an evaluation inside the lesion would otherwise silently lose that image). They go into
``lesion_masks.npy``, ``uint8 (N, size, size)`` row-aligned with ``images.npy`` (1 inside the
lesion, 0 elsewhere and for images without a mask), and ``lesions.csv`` (PROCESSED_LESION_COLUMNS:
one row per array row with a mask, its pixel count and latent values), written in the same set as
the images and the index.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from virtual_biopsy.core.atomic import atomic_dir, staged_path, write_csv
from virtual_biopsy.core.config import PreprocessConfig
from virtual_biopsy.data.layout import INTERIM_LESION_COLUMNS, MANIFEST_COLUMNS, PROCESSED_LESION_COLUMNS
from virtual_biopsy.data.lesions import LesionMaskError, read_mask_png
from virtual_biopsy.dicom.read import DicomReadError, display_window, read_header, read_pixels
from virtual_biopsy.core.parallel import map_in_processes
from virtual_biopsy.core.paths import ProjectPaths

BACKGROUND_STRIP = 0.05  # share of the width, farthest from the chest wall, taken as background
INDEX_COLUMNS = (*MANIFEST_COLUMNS, "row")


class PreprocessError(ValueError):
    """An input of the preprocess stage cannot be used; the message names it and says why."""


# --- one image ---------------------------------------------------------------------------------

def _orientation_values(patient_orientation: object) -> list[str]:
    """PatientOrientation's values in every form it comes in: pydicom's MultiValue (the usual
    two-valued tag; not a ``list``), a list or tuple, a single str value, a raw backslash-joined
    string (``"A\\R"``) or bytes; none (None, empty) gives ``[]``."""
    if patient_orientation is None:
        return []
    if isinstance(patient_orientation, bytes):
        patient_orientation = patient_orientation.decode("ascii", errors="replace")
    if isinstance(patient_orientation, str):
        return patient_orientation.split("\\") if patient_orientation else []
    if isinstance(patient_orientation, Sequence):  # MultiValue, list, tuple
        return [str(value) for value in patient_orientation]
    return [str(patient_orientation)]


def chest_wall_on_left(patient_orientation: object, laterality: str) -> bool:
    """True when the chest wall is at column 0 (see the module docstring for the rule).

    ``patient_orientation`` is the tag's value as pydicom gives it (``ds.get("PatientOrientation")``:
    a MultiValue) or any form :func:`_orientation_values` accepts.
    """
    values = _orientation_values(patient_orientation)
    first = values[0].strip().upper() if values else ""
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


def pad_to_square(pixels: np.ndarray, value: float, out: np.ndarray | None = None) -> np.ndarray:
    """Pad with ``value`` to a square: columns on the left, or rows split top/bottom.

    Returns a new array of the same dtype (the image copied into place, the padding filled), or
    ``out`` (``side x side``, any dtype) filled so.
    """
    rows, cols = pixels.shape
    side = max(rows, cols)
    square = np.empty((side, side), dtype=pixels.dtype) if out is None else out
    if square.shape != (side, side):
        raise ValueError(f"pad_to_square: out has shape {square.shape}, not {(side, side)}")
    if rows > cols:
        square[:, : side - cols] = value
        square[:, side - cols:] = pixels
    else:
        top = (side - rows) // 2
        square[:top] = value
        square[top + rows:] = value
        square[top: top + rows] = pixels
    return square


_canvases = threading.local()


def _square_canvas(side: int) -> np.ndarray:
    """A float32 ``side x side`` scratch square, reused by the calling thread.

    At the paper's size the padded square is 32.5 MB: above glibc's largest mmap threshold (32
    MB), so a fresh array is a fresh mapping, page-faulted in and unmapped for every image, which
    cost as much as filling it. A worker preprocesses images of one size, so one square per thread
    serves them all (per thread: the serving layer may preprocess from several). Only
    :func:`preprocess_pixels` and :func:`preprocess_mask` use it, and neither returns it.
    """
    canvas = getattr(_canvases, "square", None)
    if canvas is None or canvas.shape != (side, side):
        canvas = _canvases.square = np.empty((side, side), dtype=np.float32)
    return canvas


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


def _float_image(pixels: np.ndarray) -> Image.Image:
    """A mode-F Pillow image over ``pixels``' memory (C-contiguous float32), without a copy.

    ``Image.fromarray`` copies a float array into a freshly allocated Pillow image (for a 2850 x
    2850 square, three times the cost of the resize itself): ``Image.frombuffer`` maps only the
    modes in its ``_MAPMODES`` list without copying, though the ``core.map_buffer`` it calls for
    them maps 4-byte F lines alike. The mapped image keeps a reference to the buffer and is marked
    read-only, as ``frombuffer`` marks its mapped images. Where the call is missing (another
    Pillow) it falls back to ``fromarray``; the resized values are the same either way (tested).
    """
    rows, cols = pixels.shape
    try:
        core = Image.core.map_buffer(pixels, (cols, rows), "raw", 0, ("F", 0, 1))
    except (AttributeError, TypeError, ValueError):
        return Image.fromarray(pixels)
    image = Image.new("F", (0, 0))._new(core)
    image.readonly = 1
    return image


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a square float image to ``size x size`` with anti-aliasing; values stay in range.

    Pillow's bilinear filter widens its triangle support by the reduction factor when shrinking,
    so every source pixel contributes (no aliasing) and the weights are convex (no overshoot,
    unlike Lanczos); it is several times faster than skimage's Gaussian-then-interpolate.
    """
    image = _float_image(np.ascontiguousarray(pixels, dtype=np.float32))
    resized = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def _image_region(square: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The view of ``square`` where :func:`pad_to_square` puts a ``rows x cols`` (oriented) image."""
    side = square.shape[0]
    return square[:, side - cols:] if rows > cols else square[(side - rows) // 2:(side - rows) // 2 + rows]


def _fill_padding(square: np.ndarray, rows: int, cols: int, value: float) -> None:
    """Fill what :func:`pad_to_square` pads around a ``rows x cols`` image with ``value``."""
    side = square.shape[0]
    if rows > cols:
        square[:, : side - cols] = value
    else:
        top = (side - rows) // 2
        square[:top] = value
        square[top + rows:] = value


def _stretch_and_resize(square: np.ndarray, center: float, width: float, size: int) -> np.ndarray:
    return resize_square(contrast_stretch(square, center, width, in_place=True), size)


def preprocess_pixels(pixels: np.ndarray, center: float, width: float, chest_wall_left: bool,
                      size: int) -> np.ndarray:
    """Paper 4.1 on one presentation-space image: orient, pad, stretch, normalise, resize."""
    oriented = orient(pixels, chest_wall_left)
    canvas = _square_canvas(max(pixels.shape))
    square = pad_to_square(oriented, background_value(oriented), out=canvas)  # scratch: stretch it in place
    return _stretch_and_resize(square, center, width, size)


def preprocess_dataset(ds, laterality: str, size: int) -> np.ndarray:
    """Preprocess one DICOM dataset already read (the stage and ``vbiopsy predict`` share this).

    :func:`preprocess_pixels` on ``read_pixels(ds)``, with the pixels read straight into their
    oriented place in the padded square (one pass over a full-size image fewer); the same values.
    """
    center, width = display_window(ds)
    chest_wall_left = chest_wall_on_left(ds.get("PatientOrientation"), laterality)
    rows, cols = int(ds.Rows), int(ds.Columns)
    square = _square_canvas(max(rows, cols))
    oriented = _image_region(square, rows, cols)
    read_pixels(ds, out=orient(oriented, chest_wall_left))  # the stored image, mirrored into place if need be
    _fill_padding(square, rows, cols, background_value(oriented))
    return _stretch_and_resize(square, center, width, size)


def mask_coverage(mask: np.ndarray, chest_wall_left: bool, size: int) -> np.ndarray:
    """``resize_square`` of the oriented mask padded with 0 (float32 0/1), computed on its lesion rows.

    Pillow resizes in two passes, rows then columns, each output value a sum of its inputs times
    weights that depend only on the sizes; a row of zeros stays exactly zero. So the row pass runs
    on the padded band of rows that hold the lesion only, its rows go into an otherwise zero
    ``side x size`` image, and the column pass runs on that: bit for bit the coverage of resizing
    the whole padded square (tested), at a fraction of the cost for a lesion much smaller than the
    breast (the full-size square of a 2850-row image is 8.1 M pixels).
    """
    rows, cols = mask.shape
    side = max(rows, cols)
    oriented = orient(mask, chest_wall_left)
    lesion_rows = np.flatnonzero(oriented.any(axis=1))
    by_rows = np.zeros((side, size), dtype=np.float32)  # the row pass of the whole square
    if lesion_rows.size:
        first, last = int(lesion_rows[0]), int(lesion_rows[-1]) + 1
        band = np.zeros((last - first, side), dtype=np.float32)
        top = 0 if rows > cols else (side - rows) // 2
        band[:, side - cols:] = oriented[first:last]
        resized = _float_image(band).resize((size, last - first), Image.Resampling.BILINEAR)
        by_rows[top + first: top + last] = np.asarray(resized, dtype=np.float32)
    columns = _float_image(by_rows).resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(columns, dtype=np.float32), 0.0, 1.0)


def preprocess_mask(mask: np.ndarray, chest_wall_left: bool, size: int) -> np.ndarray:
    """A boolean lesion mask in its image's stored geometry -> ``uint8 (size, size)``, 1 inside.

    Exactly the image's geometry (see the module docstring): orient, pad with 0 on the same side,
    the same resize (:func:`mask_coverage`), then pixels at least half covered; a non-empty mask
    keeps at least its most covered pixel.
    """
    coverage = mask_coverage(mask, chest_wall_left, size)  # share of each pixel inside the lesion
    processed = (coverage >= 0.5).astype(np.uint8)
    if mask.any() and not processed.any():
        processed[np.unravel_index(np.argmax(coverage), coverage.shape)] = 1
    return processed


def _read_listed_dataset(path: str | Path, expected_uid: str | None):
    """Read one DICOM; errors name the file. With ``expected_uid``, the file must still hold that
    image (SOPInstanceUID), the one ingest listed under this path."""
    try:
        ds = read_header(path)  # the pixels are read once, by read_pixels
    except (OSError, DicomReadError, ValueError) as exc:
        raise PreprocessError(f"{path}: {exc}") from exc
    if expected_uid is not None and str(ds.get("SOPInstanceUID", "") or "").strip() != expected_uid:
        raise PreprocessError(f"{path}: not the image ingest listed under this path (raw data changed); "
                              "rerun the ingest stage")
    return ds


def _preprocess_read(ds, path: str | Path, laterality: str, size: int) -> np.ndarray:
    """:func:`preprocess_dataset` on ``ds``, read from ``path``; errors name the file."""
    try:
        return preprocess_dataset(ds, laterality, size)
    except (OSError, DicomReadError, ValueError) as exc:
        raise PreprocessError(f"{path}: {exc}") from exc


def preprocess_file(path: str | Path, laterality: str, size: int, expected_uid: str | None = None) -> np.ndarray:
    """Read one DICOM and preprocess it; errors name the file. With ``expected_uid``, the file must
    still hold that image (SOPInstanceUID), the one ingest listed under this path."""
    return _preprocess_read(_read_listed_dataset(path, expected_uid), path, laterality, size)


def preprocess_lesion_mask(mask_path: str | Path, ds, laterality: str, size: int, image_id: str) -> np.ndarray:
    """Read the lesion mask of image ``image_id`` (DICOM ``ds``) and carry it through the image's
    geometry; the mask must have the image's stored shape. Errors name the image id (not the path,
    which names the patient)."""
    if not Path(mask_path).is_file():
        raise PreprocessError(f"image {image_id}: its lesion mask file is missing (raw data changed since "
                              "ingest); rerun the ingest stage")
    try:
        mask = read_mask_png(Path(mask_path))
    except LesionMaskError as exc:
        raise PreprocessError(f"image {image_id}: lesion mask unusable: {exc}") from None
    stored = (int(ds.Rows), int(ds.Columns))
    if mask.shape != stored:
        raise PreprocessError(f"image {image_id}: its lesion mask is {mask.shape[0]} x {mask.shape[1]} pixels but "
                              f"the image is {stored[0]} x {stored[1]} (rows x columns); a mask must have its "
                              "image's stored geometry")
    return preprocess_mask(mask, chest_wall_on_left(ds.get("PatientOrientation"), laterality), size)


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


@dataclass(frozen=True)
class Task:
    """One manifest row to preprocess: its array row, DICOM, laterality, original UID (checked
    against the file), image id and lesion mask (``""``: none)."""

    row: int
    path: str
    laterality: str
    uid: str | None
    image_id: str
    mask_path: str


@dataclass(frozen=True)
class OutputArrays:
    """Where the rows go: the images and masks files and the byte offset of their first rows."""

    images: str
    images_offset: int
    masks: str
    masks_offset: int


def _preprocess_into(task: Task, size: int, out: OutputArrays) -> int | None:
    """Preprocess ``task``'s image and lesion mask (zeros without one) into row ``task.row`` of the
    two arrays; return the processed mask's pixel count (None without a mask)."""
    ds = _read_listed_dataset(task.path, task.uid)
    image = _preprocess_read(ds, task.path, task.laterality, size).astype(np.float32, copy=False)
    if image.shape != (size, size):  # a wrong-sized row would overwrite its neighbours
        raise PreprocessError(f"{task.path}: preprocessed to shape {image.shape}, not {(size, size)}")
    write_row(out.images, out.images_offset + task.row * image.nbytes, image)
    if task.mask_path:
        mask = preprocess_lesion_mask(task.mask_path, ds, task.laterality, size, task.image_id)
    else:
        mask = np.zeros((size, size), dtype=np.uint8)
    write_row(out.masks, out.masks_offset + task.row * mask.nbytes, mask)
    return int(mask.sum()) if task.mask_path else None


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


def read_interim_lesions(path: Path) -> pd.DataFrame:
    """The interim lesion table (ingest writes it, header only without lesion truth), as strings."""
    if not path.exists():
        raise PreprocessError(f"{path}: lesion table not found; run the ingest stage (it writes the table, "
                              "header only when the raw data have no lesions.csv)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in INTERIM_LESION_COLUMNS if c not in table.columns]
    if missing:
        raise PreprocessError(f"{path}: missing lesion table column(s) {missing}; rerun the ingest stage")
    return table


def check_lesions_match(manifest: pd.DataFrame, sources: pd.DataFrame, lesions: pd.DataFrame) -> None:
    """The interim lesion table and the sources' mask paths must name the same manifest images."""
    with_mask = set(manifest["image_id"][(sources["mask_path"] != "").to_numpy()])
    in_table = set(lesions["image_id"])
    if with_mask != in_table:
        strays = sorted(with_mask ^ in_table)
        raise PreprocessError(f"the lesion table and the sources table disagree on {len(strays)} image(s), e.g. "
                              f"{strays[:3]} (raw data or ingest outputs changed); rerun the ingest stage")


def processed_lesions(index: pd.DataFrame, lesions: pd.DataFrame, mask_pixels: list[int | None]) -> pd.DataFrame:
    """PROCESSED_LESION_COLUMNS: one row per array row with a mask (its latent values as ingest wrote them)."""
    table = index[["row", "image_id"]].assign(mask_pixels=mask_pixels).dropna(subset=["mask_pixels"])
    table = table.merge(lesions, on="image_id", how="inner", validate="one_to_one")
    return table.astype({"mask_pixels": int})[list(PROCESSED_LESION_COLUMNS)]


def preprocess_into(tasks: list[Task], size: int, workers: int, out: OutputArrays) -> list[int | None]:
    """Preprocess ``tasks`` into their rows of the images and masks arrays in ``out``, by ``workers``
    processes (in-process when 1); return each task's mask pixel count (None without a mask)."""
    work = functools.partial(_preprocess_into, size=size, out=out)
    return list(map_in_processes(work, tasks, workers, desc="preprocess", unit="image"))


def _new_array(path: Path, dtype, shape: tuple[int, ...]) -> int:
    """Create the ``.npy`` at ``path`` at its full size (the workers write its rows); return the
    byte offset of its data."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    offset = array.offset
    del array
    return offset


def write_processed(manifest: pd.DataFrame, sources: pd.DataFrame, cfg: PreprocessConfig, paths: ProjectPaths,
                    lesions: pd.DataFrame) -> dict:
    """Write ``images.npy``, ``index.csv``, ``lesion_masks.npy`` and ``lesions.csv`` for every
    manifest row; return counts and timing.

    ``sources``: the raw file (``source_path``), original ``sop_instance_uid`` and lesion mask
    (``mask_path``, empty when none) of each manifest row, in manifest order
    (data.sources.source_files); the outputs carry none of them. ``lesions``: the interim lesion
    table (:func:`read_interim_lesions`).
    """
    started = time.perf_counter()
    size = cfg.image_size
    check_lesions_match(manifest, sources, lesions)
    columns = zip(sources["source_path"], manifest["laterality"], sources["sop_instance_uid"], manifest["image_id"],
                  sources["mask_path"])
    tasks = [Task(row, *fields) for row, fields in enumerate(columns)]
    index = manifest[list(MANIFEST_COLUMNS)].assign(row=range(len(manifest)))
    shape = (len(tasks), size, size)
    # The arrays and their tables are one set: built in a staging folder, swapped in together.
    with atomic_dir(paths.processed_dir) as staged:
        images = staged_path(paths.processed_images, paths.processed_dir, staged)
        masks = staged_path(paths.processed_lesion_masks, paths.processed_dir, staged)
        out = OutputArrays(os.fspath(images), _new_array(images, np.float32, shape),
                           os.fspath(masks), _new_array(masks, np.uint8, shape))
        mask_pixels = preprocess_into(tasks, size, cfg.workers, out)
        write_csv(staged_path(paths.processed_index, paths.processed_dir, staged), index)
        write_csv(staged_path(paths.processed_lesions, paths.processed_dir, staged),
                  processed_lesions(index, lesions, mask_pixels))
    seconds = time.perf_counter() - started
    return {"images": len(tasks), "image_size": size, "lesion_masks": sum(n is not None for n in mask_pixels),
            "seconds": round(seconds, 3), "images_per_second": round(len(tasks) / seconds, 2) if seconds > 0 else 0.0}
