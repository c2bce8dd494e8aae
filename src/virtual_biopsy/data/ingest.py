"""Ingest: every file under the raw images folder becomes a manifest row or a rejected-file row.

Each file's header is read with pydicom (in a process pool; compressed pixel data are decoded to
check them, native ones need only their length) and checked in
the order a user would fix problems: readable DICOM, complete, a mammogram, laterality, view,
energy, decodable grey-scale pixels. Accepted images are then joined with ``metadata.csv`` (biopsy
result, ACR density, phase, age), de-duplicated by SOPInstanceUID and, when pairing is required,
matched LE with DES on the pair key. Every file that does not make it into the manifest is listed
in the rejected report with one plain reason; nothing is dropped silently.

Lesion ground truth (optional ``lesions.csv`` and its masks, data.layout and data.lesions) is
checked after that, before anything is written: a bad lesions table fails the stage with one
message naming its rows, files, values and reasons. The checked table becomes
``data/interim/lesions.csv`` (INTERIM_LESION_COLUMNS: keyed by image id, no path, no patient id),
header only when the raw folder has no lesions.csv; each mask's raw path goes to the private
sources table (``mask_path``).

Privacy: patient, study and image are keyed by :func:`pseudonymize` (the image by its
SOPInstanceUID, which DICOM PS3.15's confidentiality profile replaces); the original patient id,
name, birth date, accession number and institution never leave :func:`inspect_file`. The raw
layout names folders and files after the site's patient id, so no output names a raw file either:
the rejected report keys each file by a pseudonym of its path, and the only link from the keys
back to the files and their original UIDs is the private sources table (``data/interim/sources.csv``,
data.layout.SOURCES_COLUMNS), which is not a DVC output and never goes to MLflow.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from virtual_biopsy.core.atomic import write_csv, write_json
from virtual_biopsy.core.config import ACR_CATEGORIES, LABELS, PHASES, IngestConfig
from virtual_biopsy.dicom.cesm import UnknownEnergyError, energy_of, is_simulated, is_synthetic
from virtual_biopsy.dicom.read import DicomReadError, check_pixel_data, display_window, read_header
from virtual_biopsy.data.layout import (
    ENERGY_TO_MODALITY,
    LESIONS_FILE,
    MANIFEST_COLUMNS,
    METADATA_COLUMNS,
    SOURCES_COLUMNS,
    pair_key,
)
from virtual_biopsy.data.lesions import (
    LesionTableError,
    LesionTruth,
    ManifestImage,
    lesion_truth,
    no_lesion_truth,
    read_lesion_table,
)
from virtual_biopsy.core.parallel import map_in_processes
from virtual_biopsy.core.paths import ProjectPaths

REJECTED_COLUMNS = ("file_key", "reason")  # file_key: pseudonym of the path (sources.csv maps it back)
PRIVATE_COLUMNS = ("source_path", "sop_instance_uid")  # of a manifest row: to the sources table, not the manifest

# View Code Sequence codes (SNOMED CT, PS3.16 CID 4014) of the two views the method uses.
_VIEW_CODES = {"399162004": "CC", "399368009": "MLO"}


class IngestError(ValueError):
    """The raw folder as a whole cannot be ingested (missing table, too many rejections, ...)."""


class Rejection(Exception):
    """One file cannot be used; ``kind`` groups reasons in the summary, ``reason`` is for people."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class ImageRecord:
    """What ingest keeps of one readable mammogram: no identifying header value.

    ``source_path`` and ``source_uid`` name the raw file and its original SOPInstanceUID; they go
    to the private sources table only, never to the manifest.
    """

    source_path: str
    source_uid: str
    image_id: str           # pseudonymous SOPInstanceUID
    patient_id: str | None  # pseudonymous; None when the DICOM has no PatientID
    study_key: str | None   # pseudonymous StudyInstanceUID; None when absent
    laterality: str
    view: str
    modality: str
    rows: int
    columns: int
    window_center: float
    window_width: float
    dicom_age: int | None
    simulated: bool
    synthetic: bool


@dataclass(frozen=True)
class RejectedFile:
    file: str
    kind: str
    reason: str


@dataclass(frozen=True)
class IngestResult:
    """Manifest (MANIFEST_COLUMNS), rejected report (REJECTED_COLUMNS), summary counts, the
    private sources table (SOURCES_COLUMNS: keys -> raw files; written apart, see data.sources)
    and the interim lesion table (INTERIM_LESION_COLUMNS; header only without lesion truth)."""

    manifest: pd.DataFrame
    rejected: pd.DataFrame
    summary: dict
    sources: pd.DataFrame
    lesions: pd.DataFrame


def pseudonymize(original_id: str, salt: str) -> str:
    """Stable pseudonymous key: ``"anon-" + sha256(salt|id)[:12]``; the salt is set per site."""
    digest = hashlib.sha256(f"{salt}|{original_id}".encode()).hexdigest()
    return f"anon-{digest[:12]}"


# --- one file --------------------------------------------------------------------------------

def laterality_of(ds: Dataset) -> str:
    """``L`` or ``R`` from ImageLaterality, falling back to the series' Laterality."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value:
            if value not in ("L", "R"):
                raise Rejection("laterality", f"{keyword} is {value!r}, not L or R")
            return value
    raise Rejection("laterality", "no laterality: neither ImageLaterality nor Laterality is set")


def view_of(ds: Dataset) -> str:
    """``CC`` or ``MLO`` from ViewPosition, falling back to the View Code Sequence."""
    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    if position:
        if position not in ("CC", "MLO"):
            raise Rejection("view", f"ViewPosition is {position!r}, not CC or MLO")
        return position
    for item in ds.get("ViewCodeSequence") or []:
        code = str(item.get("CodeValue", ""))
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
        raise Rejection("view", f"ViewCodeSequence code {code!r} is not cranio-caudal or medio-lateral oblique")
    raise Rejection("view", "no view: neither ViewPosition nor ViewCodeSequence is set")


def age_from_dicom(ds: Dataset) -> int | None:
    """PatientAge (``045Y``) in years; None when absent or not in years."""
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] == "Y":
        return int(text[:3])
    return None


def _read_mammogram(path: Path) -> Dataset:
    try:
        ds = read_header(path)  # native pixel data stay in the file: check_pixel_data needs their length only
    except InvalidDicomError:
        raise Rejection("not_dicom", "not a DICOM file (no DICM prefix / File Meta Information)") from None
    except DicomReadError as exc:
        raise Rejection("truncated", str(exc)) from None
    except Exception as exc:  # pydicom raises many types on a mangled header; the message says why
        raise Rejection("unreadable", f"unreadable DICOM header: {exc}") from None
    modality = str(ds.get("Modality", "") or "").strip()
    if modality != "MG":
        raise Rejection("not_mammogram", f"not a mammogram: Modality is {modality or 'missing'!r}, not 'MG'")
    return ds


def inspect_file(path: Path, raw_dir: Path, salt: str) -> ImageRecord | RejectedFile:
    """Read one file (its header; pixel data only where compressed, to decode them) and return
    its record or why it is rejected."""
    relative = path.relative_to(raw_dir).as_posix()
    try:
        ds = _read_mammogram(path)
        laterality, view = laterality_of(ds), view_of(ds)
        try:
            energy = energy_of(ds)
        except UnknownEnergyError as exc:
            raise Rejection("energy", f"unknown energy: {exc}") from None
        try:
            check_pixel_data(ds)
            center, width = display_window(ds)
        except DicomReadError as exc:
            raise Rejection("pixel_data", str(exc)) from None
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if not uid:
            raise Rejection("no_uid", "no SOPInstanceUID")
    except Rejection as rejection:
        # Decoder plugins report over several lines; the report keeps one line per file. A reader
        # error may quote the file's path, which names the patient: the report must not.
        reason = " ".join(rejection.reason.replace(str(path), "the file").replace(relative, "the file").split())
        return RejectedFile(relative, rejection.kind, reason)
    patient = str(ds.get("PatientID", "") or "").strip()
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    return ImageRecord(
        source_path=relative,
        source_uid=uid,
        image_id=pseudonymize(uid, salt),
        patient_id=pseudonymize(patient, salt) if patient else None,
        study_key=pseudonymize(study, salt) if study else None,
        laterality=laterality,
        view=view,
        modality=ENERGY_TO_MODALITY[energy],
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        window_center=round(float(center), 3),
        window_width=round(float(width), 3),
        dicom_age=age_from_dicom(ds),
        simulated=is_simulated(ds),
        synthetic=is_synthetic(ds),
    )


def inspect_files(paths: list[Path], raw_dir: Path, salt: str, workers: int) -> Iterator[ImageRecord | RejectedFile]:
    """:func:`inspect_file` over ``paths`` in a process pool of ``workers`` (in-process when 1)."""
    task = functools.partial(inspect_file, raw_dir=raw_dir, salt=salt)
    yield from map_in_processes(task, paths, workers, desc="ingest", unit="file")


# --- the table -------------------------------------------------------------------------------

def read_metadata(path: Path) -> pd.DataFrame:
    """metadata.csv as strings indexed by ``file``; raises :class:`IngestError` naming the problem."""
    if not path.exists():
        raise IngestError(f"{path}: metadata table not found (the raw layout needs it, see data/layout.py)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in METADATA_COLUMNS if c not in table.columns]
    if missing:
        raise IngestError(f"{path}: missing column(s) {missing}")
    duplicated = table["file"][table["file"].duplicated()].tolist()
    if duplicated:
        raise IngestError(f"{path}: file(s) listed more than once: {duplicated[:5]}")
    return table.set_index("file")


def _age(value: str, fallback: int | None) -> int | None:
    try:
        return int(float(value))
    except ValueError:
        return fallback


def join_metadata(record: ImageRecord, row: Mapping[str, str] | None, salt: str) -> dict | RejectedFile:
    """A manifest row for ``record`` with the label, ACR, phase and age from its metadata row."""
    def reject(kind: str, reason: str) -> RejectedFile:
        return RejectedFile(record.source_path, kind, reason)

    if row is None:
        return reject("metadata", "not listed in metadata.csv (no biopsy label or phase)")
    phase, label, acr = row["phase"].strip(), row["biopsy"].strip(), row["acr"].strip().lower()
    if phase not in PHASES:
        return reject("metadata", f"metadata.csv phase {phase!r} is not one of {PHASES}")
    if label not in LABELS:
        return reject("metadata", f"metadata.csv biopsy {label!r} is not one of {LABELS}")
    if acr and acr not in ACR_CATEGORIES:
        return reject("metadata", f"metadata.csv acr {acr!r} is not one of {ACR_CATEGORIES} or empty")
    original_patient = row["patient_id"].strip()
    patient = record.patient_id or (pseudonymize(original_patient, salt) if original_patient else None)
    if patient is None:
        return reject("metadata", "no patient id in the DICOM (PatientID) or metadata.csv")
    # Without a StudyInstanceUID the site's study id names the study only within its patient.
    study = record.study_key or pseudonymize(f"{original_patient}|{row['study_id'].strip()}", salt)
    values = dict(vars(record))  # the record's fields (all scalars: no need for asdict's deep copy)
    values.update(
        sop_instance_uid=record.source_uid,
        patient_id=patient,
        study_id=study,
        phase=phase,
        label=label,
        acr=acr,
        age=_age(row["age"], record.dicom_age),
        pair_key=pair_key(patient, study, record.laterality, record.view, phase),
    )
    # The manifest's columns, then the two private ones (they go to the sources table only).
    return {column: values[column] for column in (*MANIFEST_COLUMNS, *PRIVATE_COLUMNS)}


def file_key(relative_path: str, salt: str) -> str:
    """Pseudonymous key of a raw file (its path names the patient): the rejected report's ``file_key``."""
    return pseudonymize(relative_path, salt)


def drop_duplicates(records: list[ImageRecord], salt: str) -> tuple[list[ImageRecord], list[RejectedFile]]:
    """Keep the first file (by path) of each SOPInstanceUID; reject the others, naming the kept one's key."""
    first_path: dict[str, str] = {}
    kept, rejected = [], []
    for record in sorted(records, key=lambda r: r.source_path):
        other = first_path.setdefault(record.source_uid, record.source_path)
        if other == record.source_path:
            kept.append(record)
        else:
            rejected.append(RejectedFile(record.source_path, "duplicate",
                                         f"duplicate SOPInstanceUID: same image as file {file_key(other, salt)}"))
    return kept, rejected


def pair_images(rows: list[dict]) -> tuple[list[dict], list[RejectedFile]]:
    """Keep pair keys with exactly one LE (FFDM) and one DES (CESM) image; reject the rest."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["pair_key"], []).append(row)
    kept, rejected = [], []
    for group in groups.values():
        counts = Counter(row["modality"] for row in group)
        le, des = counts["FFDM"], counts["CESM"]
        if le == 1 and des == 1:
            kept.extend(group)
            continue
        if des == 0:
            reason = "LE image without its DES partner (no recombined image of the same breast, view and phase)"
        elif le == 0:
            reason = "DES image without its LE partner (no low-energy image of the same breast, view and phase)"
        else:
            reason = f"ambiguous pair: {le} LE and {des} DES images share patient, study, laterality, view and phase"
        rejected.extend(RejectedFile(row["source_path"], "unpaired", reason) for row in group)
    return kept, rejected


def _files_under(folder: Path) -> Iterator[Path]:
    """Files under ``folder`` as ``rglob("*")`` + ``is_file()`` finds them (symlinked folders are
    not entered), from one ``scandir`` per folder instead of a ``stat`` per file."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from _files_under(Path(entry.path))
            elif entry.is_file():
                yield Path(entry.path)


def list_raw_files(images_dir: Path) -> list[Path]:
    """Every file under ``images_dir`` (recursively, sorted): each becomes a row of one table."""
    if not images_dir.is_dir():
        raise IngestError(f"{images_dir}: raw images folder not found")
    files = sorted(_files_under(images_dir))
    if not files:
        raise IngestError(f"{images_dir}: no files to ingest")
    return files


def _summary(files: int, manifest: pd.DataFrame, rejected: list[RejectedFile], unused_metadata: int) -> dict:
    return {
        "files": files,
        "accepted": len(manifest),
        "rejected": len(rejected),
        "rejected_share": round(len(rejected) / files, 6) if files else 0.0,
        "rejected_by_kind": dict(sorted(Counter(r.kind for r in rejected).items())),
        "patients": int(manifest["patient_id"].nunique()) if len(manifest) else 0,
        "pairs": int(manifest["pair_key"].nunique()) if len(manifest) else 0,
        "images_by_modality_view": {
            f"{m}_{v}": int(n) for (m, v), n in manifest.groupby(["modality", "view"]).size().items()
        } if len(manifest) else {},
        "metadata_rows_without_file": unused_metadata,
    }


def ingest_raw(raw_dir: Path, cfg: IngestConfig) -> IngestResult:
    """Read every file under ``raw_dir/images`` into a manifest, a rejected report and a summary,
    and the raw folder's lesion truth (lesions.csv, when there is one) into the interim lesion table.

    Files are read by ``cfg.workers`` processes. Pure apart from reading: writing the outputs and
    enforcing ``cfg.max_rejected_share`` are :func:`write_outputs` and :func:`check_rejected_share`.
    """
    raw_dir = Path(raw_dir)
    metadata = read_metadata(raw_dir / "metadata.csv")
    lesions = read_lesions(raw_dir)
    files = list_raw_files(raw_dir / "images")
    records: list[ImageRecord] = []
    rejected: list[RejectedFile] = []
    seen: set[str] = set()  # every file's path relative to raw_dir, as its record or rejection names it
    for outcome in inspect_files(files, raw_dir, cfg.pseudonym_salt, cfg.workers):
        if isinstance(outcome, RejectedFile):
            rejected.append(outcome)
            seen.add(outcome.file)
        else:
            records.append(outcome)
            seen.add(outcome.source_path)
    records, duplicates = drop_duplicates(records, cfg.pseudonym_salt)
    rejected += duplicates
    rows: list[dict] = []
    metadata_rows = metadata.to_dict("index")  # {file: {column: value}}; far cheaper than .loc per file
    for record in records:
        joined = join_metadata(record, metadata_rows.get(record.source_path), cfg.pseudonym_salt)
        (rejected if isinstance(joined, RejectedFile) else rows).append(joined)
    if cfg.require_pairs:
        rows, unpaired = pair_images(rows)
        rejected += unpaired
    table = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, *PRIVATE_COLUMNS]).sort_values("source_path",
                                                                                           ignore_index=True)
    collided = table["image_id"][table["image_id"].duplicated()]
    if len(collided):  # two different UIDs, one 48-bit pseudonym: never silently merge two images
        raise IngestError(f"{len(collided)} image pseudonym(s) shared by different SOPInstanceUIDs; "
                          "set another ingest.pseudonym_salt")
    manifest = table[list(MANIFEST_COLUMNS)].copy()
    manifest["age"] = manifest["age"].astype("Int64")
    rejected.sort(key=lambda r: r.file)
    salt = cfg.pseudonym_salt
    report = pd.DataFrame([(file_key(r.file, salt), r.reason) for r in rejected], columns=list(REJECTED_COLUMNS))
    truth = check_lesions(lesions, raw_dir, table, seen | set(metadata.index))
    unused = int((~metadata.index.isin(list(seen))).sum())
    summary = _summary(len(files), manifest, rejected, unused)
    summary.update(lesion_images=len(truth.table), lesion_rows_without_image=truth.rows_without_image)
    return IngestResult(manifest, report, summary, sources_table(sorted(seen), table, salt, truth.mask_paths),
                        truth.table)


def read_lesions(raw_dir: Path) -> pd.DataFrame | None:
    """The raw folder's lesions.csv (None without one), read before the images so that a table
    without its columns fails at once; :class:`IngestError` when it cannot be read."""
    try:
        return read_lesion_table(raw_dir / LESIONS_FILE)
    except LesionTableError as exc:
        raise IngestError(str(exc)) from None


def check_lesions(lesions: pd.DataFrame | None, raw_dir: Path, accepted: pd.DataFrame,
                  known_files: set[str]) -> LesionTruth:
    """lesions.csv (``lesions``, None: no lesion truth) checked against the accepted images
    (``accepted``: manifest rows with ``source_path``, in manifest order) and ``known_files`` (every
    image path ingest saw); :class:`IngestError` naming the bad rows when it cannot be used."""
    if lesions is None:
        return no_lesion_truth()
    images = {row.source_path: ManifestImage(row.image_id, int(row.rows), int(row.columns))
              for row in accepted.itertuples(index=False)}
    try:
        return lesion_truth(lesions, raw_dir / LESIONS_FILE, images, known_files, raw_dir)
    except LesionTableError as exc:
        raise IngestError(str(exc)) from None


def sources_table(files: list[str], accepted: pd.DataFrame, salt: str,
                  mask_paths: dict[str, str] | None = None) -> pd.DataFrame:
    """The private sources table: every raw file (``files``, relative paths) with its key, the
    manifest id and original SOPInstanceUID of those in the manifest (``accepted``), and the
    lesion mask of those that have one (``mask_paths``: raw path -> mask path)."""
    ids = accepted.set_index("source_path")[["image_id", "sop_instance_uid"]]
    table = pd.DataFrame({"file_key": [file_key(f, salt) for f in files], "source_path": files})
    table = table.join(ids, on="source_path").fillna({"image_id": "", "sop_instance_uid": ""})
    table["mask_path"] = [(mask_paths or {}).get(f, "") for f in files]
    return table[list(SOURCES_COLUMNS)]


def check_rejected_share(result: IngestResult, cfg: IngestConfig, report_path: Path | str) -> None:
    """Raise :class:`IngestError` when more than ``cfg.max_rejected_share`` of the files was rejected."""
    share = result.summary["rejected_share"]
    if share > cfg.max_rejected_share:
        kinds = ", ".join(f"{k}: {n}" for k, n in result.summary["rejected_by_kind"].items())
        raise IngestError(
            f"{result.summary['rejected']} of {result.summary['files']} files rejected ({share:.1%}), more than "
            f"ingest.max_rejected_share {cfg.max_rejected_share:.1%} ({kinds}); reasons in {report_path}"
        )


def rejected_reasons(result: IngestResult) -> dict[str, str]:
    """``{raw file path: reason}`` of the rejected report, through the private sources table
    (convenient for tests and messages at the site; the report itself names keys only)."""
    path_of = dict(zip(result.sources["file_key"], result.sources["source_path"]))
    return {path_of[key]: reason for key, reason in zip(result.rejected["file_key"], result.rejected["reason"])}


def write_outputs(result: IngestResult, paths: ProjectPaths, cfg: IngestConfig) -> None:
    """Write the private sources table, the rejected report and summary, check the rejected share,
    then write the interim lesion table and the manifest.

    The reports are written first so that a run failing on too many rejections still says why
    (with the sources table that maps their file keys back to files); the manifest and the lesion
    table keyed by its image ids are only replaced when the share is acceptable. Every write is atomic.
    """
    write_csv(paths.sources, result.sources)
    write_csv(paths.rejected, result.rejected)
    write_json(summary_path(paths), result.summary)
    check_rejected_share(result, cfg, paths.rejected)
    write_csv(paths.interim_lesions, result.lesions)
    write_csv(paths.manifest, result.manifest)


def summary_path(paths: ProjectPaths) -> Path:
    """reports/ingest/summary.json: the counts (a DVC metrics file)."""
    return paths.rejected.parent / "summary.json"
