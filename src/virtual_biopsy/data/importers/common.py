"""What every importer shares: the report of every source file, the atomic write of the raw
layout, and the parsers of spreadsheet cells.

An importer reads a public release and fills an :class:`ImportOutcome` while writing images
(and the lesion masks of a release with outlines) into a temporary folder; :func:`run_import`
turns that folder into ``data/raw`` in one rename, together with ``metadata.csv``,
``import_report.csv`` and, when masks were written, ``lesions.csv``. Nothing is dropped silently:
every source file gets a report row (imported, rejected, ignored), every spreadsheet row that
names no image gets one (unmatched), and so does every annotation row that cannot be used.

An importer that has to make DICOM from a release's JPEGs does so with :mod:`.jpeg`, which builds
them with the project's one writer (``virtual_biopsy.dicom.write``).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from virtual_biopsy.core.atomic import atomic_dir, write_csv
from virtual_biopsy.data.layout import LESION_COLUMNS, LESIONS_FILE, METADATA_COLUMNS

REPORT_COLUMNS = ("source", "status", "reason", "destination")
IMPORTED, REJECTED, UNMATCHED, IGNORED = "imported", "rejected", "unmatched", "ignored"
REPORT_NAME = "import_report.csv"
METADATA_NAME = "metadata.csv"


class ImporterError(ValueError):
    """The release cannot be imported at all (wrong paths, missing table, nothing usable)."""


@dataclass
class ImportOutcome:
    """Everything one importer run produced: metadata rows of written images, lesions.csv rows of
    written masks (data.layout.LESION_COLUMNS) and report rows."""

    metadata: list[dict] = field(default_factory=list)
    report: list[dict] = field(default_factory=list)
    lesions: list[dict] = field(default_factory=list)

    def lesion(self, row: dict) -> None:
        """Record the lesions.csv row of a mask the importer wrote."""
        self.lesions.append(row)

    def imported(self, source: str, destination: str, row: dict, note: str = "") -> None:
        self.metadata.append(row)
        self.report.append({"source": source, "status": IMPORTED, "reason": note, "destination": destination})

    def rejected(self, source: str, reason: str) -> None:
        self.report.append({"source": source, "status": REJECTED, "reason": reason, "destination": ""})

    def unmatched(self, source: str, reason: str) -> None:
        self.report.append({"source": source, "status": UNMATCHED, "reason": reason, "destination": ""})

    def ignored(self, source: str, reason: str) -> None:
        self.report.append({"source": source, "status": IGNORED, "reason": reason, "destination": ""})

    def counts(self) -> Counter:
        return Counter(row["status"] for row in self.report)


# An importer reads ``source`` (and an optional table path) and writes images under the folder it
# is given, relative paths as in data.layout.image_relpath.
Importer = Callable[[Path, Path, "Path | None"], ImportOutcome]


# --- destination and atomic write ------------------------------------------------------------

def check_destination(dest: Path, force: bool) -> None:
    """Refuse to replace a non-empty destination unless ``force``: data/raw may hold real data."""
    if dest.exists() and not dest.is_dir():
        raise ImporterError(f"{dest}: destination exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ImporterError(f"{dest}: destination is not empty; pass --force to replace it")


def check_source(source: Path) -> None:
    if not source.is_dir():
        raise ImporterError(f"{source}: source release folder does not exist or is not a folder")


def run_import(importer: Importer, source: Path, dest: Path, table: Path | None, force: bool) -> ImportOutcome:
    """Run ``importer`` into a temporary folder and rename it onto ``dest`` when anything was imported.

    When nothing could be imported the destination is left untouched and :class:`ImporterError`
    names the most common reasons, so the user sees why without opening a report.
    """
    source, dest = Path(source), Path(dest)
    check_source(source)
    check_destination(dest, force)
    with atomic_dir(dest) as tmp:
        outcome = importer(source, tmp, table)
        if not outcome.metadata:
            raise ImporterError(f"{source}: no image could be imported. {top_reasons(outcome)}")
        metadata = pd.DataFrame(outcome.metadata, columns=list(METADATA_COLUMNS)).sort_values("file")
        write_csv(tmp / METADATA_NAME, metadata)
        if outcome.lesions:  # optional in the layout: a release without outlines has none
            lesions = pd.DataFrame(outcome.lesions, columns=list(LESION_COLUMNS)).sort_values("file")
            write_csv(tmp / LESIONS_FILE, lesions)
        write_csv(tmp / REPORT_NAME, pd.DataFrame(outcome.report, columns=list(REPORT_COLUMNS)))
    return outcome


def top_reasons(outcome: ImportOutcome, limit: int = 3) -> str:
    """The most frequent rejection reasons, with the numbers in them folded so alike ones group."""
    reasons = Counter(
        re.sub(r"\d+", "N", row["reason"]) for row in outcome.report if row["status"] in (REJECTED, UNMATCHED)
    )
    if not reasons:
        return "The source folder holds no image file of this release."
    return "Most common reasons: " + "; ".join(f"{n} x {why}" for why, n in reasons.most_common(limit))


def summary(outcome: ImportOutcome, dest: Path) -> str:
    """Human summary printed by the CLI, ending with the next step."""
    counts = outcome.counts()
    masks = f" with {len(outcome.lesions)} lesion masks ({LESIONS_FILE})" if outcome.lesions else ""
    lines = [
        f"imported {counts[IMPORTED]} images into {dest}{masks}",
        f"rejected {counts[REJECTED]} files or annotations, {counts[UNMATCHED]} spreadsheet or annotation rows "
        f"named no image, ignored {counts[IGNORED]} companion files; every one is listed in {dest / REPORT_NAME}",
    ]
    if counts[REJECTED] or counts[UNMATCHED]:
        lines.append("warning: " + top_reasons(outcome))
    lines.append(f"next: dvc add {dest}  (then commit {dest}.dvc)")
    return "\n".join(lines)


# --- small shared parsers --------------------------------------------------------------------

def relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def is_missing(value: object) -> bool:
    """True for an empty spreadsheet cell (NaN, None, blank, or the release's '_' placeholder)."""
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return str(value).strip() in ("", "_", "-", "nan", "NaN")


def parse_age(value: object, where: str) -> str:
    """Age in whole years as text ('' when not reported); DICOM '056Y' style accepted."""
    if is_missing(value):
        return ""
    text = str(value).strip().upper().removesuffix("Y")
    try:
        age = float(text)
    except ValueError:
        raise ValueError(f"{where}: age {value!r} is not a number") from None
    if not 0 < age < 130:
        raise ValueError(f"{where}: age {value!r} is outside 0-130 years")
    return str(int(age))


def parse_acr(value: object, where: str) -> str:
    """ACR density category a-d ('' when not reported); accepts 'A', 'acr c', '3'."""
    if is_missing(value):
        return ""
    text = str(value).strip().upper().replace("ACR", "").strip().removesuffix(".0")
    letter = {"1": "A", "2": "B", "3": "C", "4": "D"}.get(text, text)
    if letter not in ("A", "B", "C", "D"):
        raise ValueError(f"{where}: breast density {value!r} is not an ACR category (A, B, C, D)")
    return letter.lower()
