"""Lesion ground truth in the raw layout: mask PNGs and ``lesions.csv``, written and checked.

Who uses what:

* the simulator (data.synthetic) and the CDD-CESM importer write masks with :func:`write_mask_png`
  and rows of ``lesions.csv`` (data.layout.LESION_COLUMNS);
* ingest checks the table with :func:`lesion_truth` before it writes anything, and turns it into
  the pseudonymous interim table (data.layout.INTERIM_LESION_COLUMNS);
* preprocess reads each mask with :func:`read_mask_png` and carries it through the image's geometry.

The table is optional (:func:`read_lesion_table` returns None without it). Where it exists it
must be right: a row that names an image unknown to the raw folder, a mask that is missing,
unreadable, not single-channel 8-bit, not of its image's shape or empty, an unknown ``source``
or a latent value that is not a number is an error naming the table's row (the header is row 1),
the file, the value and the reason. One exception, so that a rejected image does not take the
whole run down: a row whose image ingest saw but did not keep (rejected, or listed in
metadata.csv with no file) goes with its image and is counted, the image's own rejection being
reported already (reports/ingest/rejected.csv, summary.json).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from virtual_biopsy.data.layout import (
    INTERIM_LESION_COLUMNS,
    LESION_COLUMNS,
    LESION_LATENT_COLUMNS,
    LESION_SOURCES,
    MASK_INSIDE,
    MASK_OUTSIDE,
)

MAX_PROBLEMS_SHOWN = 5  # an error message lists this many bad rows, then says how many more


class LesionMaskError(ValueError):
    """A mask file cannot be used; the message says why (the caller names the file or image)."""


class LesionTableError(ValueError):
    """lesions.csv cannot be used; the message names the table, the rows, the values and why."""


# --- mask files --------------------------------------------------------------------------------

def write_mask_png(path: Path, inside: np.ndarray) -> None:
    """Write a boolean mask as the layout's mask PNG: 8-bit grey, 255 inside, 0 outside."""
    pixels = np.where(np.asarray(inside, dtype=bool), MASK_INSIDE, MASK_OUTSIDE).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")  # a 2-D uint8 array is mode "L"


def read_mask_png(path: Path) -> np.ndarray:
    """The mask at ``path`` as a boolean array (rows, columns), True inside the lesion.

    Raises :class:`LesionMaskError` unless it is a PNG, 8-bit single-channel (mode ``L``) and
    holds only the layout's two values: anything else (a colour image, an anti-aliased outline)
    would leave it open which pixels are the lesion.
    """
    try:
        with Image.open(path) as image:
            file_format, mode, bands = image.format, image.mode, len(image.getbands())
            image.load()
            values = np.asarray(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        reason = " ".join(str(exc).replace(str(path), "the file").split())
        raise LesionMaskError(f"not a readable PNG image ({reason})") from None
    if file_format != "PNG":
        raise LesionMaskError(f"not a PNG file (Pillow reads it as {file_format})")
    if mode != "L":
        raise LesionMaskError(f"PNG mode {mode!r} with {bands} channel(s); a mask must be 8-bit "
                              "single-channel greyscale (mode 'L')")
    inside = values == MASK_INSIDE
    stray = ~inside & (values != MASK_OUTSIDE)
    if stray.any():
        raise LesionMaskError(f"values must be {MASK_OUTSIDE} (outside) or {MASK_INSIDE} (inside); "
                              f"found {np.unique(values[stray])[:5].tolist()}")
    return inside


def mask_problem(raw_dir: Path, mask_relpath: str, rows: int, columns: int) -> str | None:
    """Why the mask ``mask_relpath`` (relative to ``raw_dir``) cannot be the mask of a ``rows`` x
    ``columns`` image, or None when it can."""
    if not mask_relpath:
        return "no mask path"
    relative = PurePosixPath(mask_relpath)
    if relative.is_absolute() or ".." in relative.parts:
        return f"mask path {mask_relpath!r} must be relative to the raw folder and stay inside it"
    path = raw_dir / relative
    if not path.is_file():
        return f"mask file {mask_relpath} not found"
    try:
        inside = read_mask_png(path)
    except LesionMaskError as exc:
        return f"mask {mask_relpath}: {exc}"
    if inside.shape != (rows, columns):
        return (f"mask {mask_relpath} is {inside.shape[0]} x {inside.shape[1]} pixels but its image is "
                f"{rows} x {columns} (rows x columns); a mask has its image's stored geometry")
    if not inside.any():
        return f"mask {mask_relpath} is empty (no pixel is {MASK_INSIDE}); an image without a lesion has no row"
    return None


# --- the table -----------------------------------------------------------------------------------

def read_lesion_table(path: Path) -> pd.DataFrame | None:
    """lesions.csv as strings, or None when the raw folder has none (no lesion truth)."""
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LesionTableError(f"{path}: not a readable CSV table ({' '.join(str(exc).split())})") from None
    missing = [c for c in LESION_COLUMNS if c not in table.columns]
    if missing:
        raise LesionTableError(f"{path}: missing column(s) {missing}; the columns are {list(LESION_COLUMNS)}")
    return table


def latent_value(text: str) -> float:
    """One latent value of the table: a finite float, or NaN for an empty cell (not known)."""
    if not text.strip():
        return math.nan
    value = float(text)  # ValueError names the text
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


@dataclass(frozen=True)
class ManifestImage:
    """What the lesion check needs of one manifest image."""

    image_id: str
    rows: int
    columns: int


@dataclass(frozen=True)
class LesionTruth:
    """The checked lesion table: the interim table, each image's mask path, and the rows left out.

    ``table``: INTERIM_LESION_COLUMNS, in the order of ``images``; ``mask_paths``: image raw path ->
    mask raw path (for the private sources table); ``rows_without_image``: rows whose image ingest
    saw but did not keep.
    """

    table: pd.DataFrame
    mask_paths: dict[str, str]
    rows_without_image: int


def no_lesion_truth() -> LesionTruth:
    """A raw folder without lesions.csv: the interim table has its header only."""
    return LesionTruth(pd.DataFrame(columns=list(INTERIM_LESION_COLUMNS)), {}, 0)


def _row_problems(row: Mapping[str, str], image: ManifestImage | None, raw_dir: Path) -> list[str]:
    """Why one row of the table cannot be used (empty when it can); ``image`` None: not kept."""
    problems = []
    if row["source"].strip() not in LESION_SOURCES:
        problems.append(f"source {row['source']!r} is not one of {list(LESION_SOURCES)}")
    for column in LESION_LATENT_COLUMNS:
        try:
            latent_value(row[column])
        except ValueError:
            problems.append(f"{column} {row[column]!r} is not a number (nor empty)")
    if image is not None:
        problem = mask_problem(raw_dir, row["mask"].strip(), image.rows, image.columns)
        if problem:
            problems.append(problem)
    return problems


def lesion_truth(table: pd.DataFrame, table_path: Path, images: Mapping[str, ManifestImage],
                 known_files: Iterable[str], raw_dir: Path) -> LesionTruth:
    """Check lesions.csv (``table``) against the manifest and build the interim lesion table.

    ``images``: raw path -> :class:`ManifestImage` of every manifest image, in manifest order;
    ``known_files``: every image path ingest saw (files under images/ and metadata.csv rows).
    Raises :class:`LesionTableError` listing the bad rows (see the module docstring).
    """
    known = set(known_files)
    problems: list[str] = []
    first_row_of: dict[str, int] = {}
    kept: dict[str, Mapping[str, str]] = {}
    left_out = 0
    for position, row in enumerate(table.to_dict("records")):
        number = position + 2  # the header is row 1
        file = row["file"].strip()
        where = f"row {number} ({file or 'no file'})"
        if file in first_row_of:
            problems.append(f"{where}: listed more than once (first in row {first_row_of[file]})")
            continue
        first_row_of[file] = number
        if file not in known:
            problems.append(f"{where}: not an image of this raw folder (neither under images/ nor in metadata.csv)")
            continue
        image = images.get(file)
        problems.extend(f"{where}: {problem}" for problem in _row_problems(row, image, raw_dir))
        if image is None:
            left_out += 1  # its image was rejected or is missing; the rejected report says why
        else:
            kept[file] = row
    if problems:
        more = len(problems) - MAX_PROBLEMS_SHOWN
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN]) + (f"; and {more} more" if more > 0 else "")
        raise LesionTableError(f"{table_path}: {len(problems)} problem(s): {shown}")
    return LesionTruth(_interim_table(kept, images), {f: r["mask"].strip() for f, r in kept.items()}, left_out)


def _interim_table(kept: Mapping[str, Mapping[str, str]], images: Mapping[str, ManifestImage]) -> pd.DataFrame:
    """The interim rows of the kept images, in manifest order, keyed by image id (no path)."""
    rows = [
        {"image_id": image.image_id, "source": kept[file]["source"].strip(),
         **{column: latent_value(kept[file][column]) for column in LESION_LATENT_COLUMNS}}
        for file, image in images.items() if file in kept
    ]
    return pd.DataFrame(rows, columns=list(INTERIM_LESION_COLUMNS))
