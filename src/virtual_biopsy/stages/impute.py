"""DVC stage impute: synthetic CESM for every FFDM (LE) image, out of fold (paper Algorithm 1, step 1).

    python -m virtual_biopsy.stages.impute [--root .] [--params params.yaml]
    vbiopsy impute [--root .] --dicom-out DIR      (runs the stage when needed, then writes DICOM)

Which model imputes which image
    Each patient is in exactly one fold's *test* set (data/splits). That fold's generator was
    trained on that fold's train patients only, so it never saw the patient: every LE image is
    imputed by the generator of the fold that tests its patient. The classifiers' Ĉ setting
    therefore sees synthetic CESM of the same quality as a new patient would get.

Outputs (atomic)
    data/imputed/images.npy   float32 (N, S, S) in [0, 1]
    data/imputed/index.csv    the LE row's manifest columns with modality CESM and synthetic True,
                              a new image_id, source_image_id, generator_view, generator_fold, row

DICOM for the clinician (``--dicom-out``)
    Each synthetic image becomes a Digital Mammography object (dicom/write.py) in the source
    image's patient and study, with the synthetic ImageType of dicom/cesm.py
    (``IMAGE_TYPE_SYNTHETIC_DES``) and a SeriesDescription starting "SYNTHETIC CESM", referencing its LE source in SourceImageSequence
    and saying how it was made in DerivationDescription. Patient identity comes from the raw DICOM
    (never from MLflow); these files are never logged to MLflow.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from virtual_biopsy.atomic import atomic_path, write_csv
from virtual_biopsy.config import ConfigError, Params
from virtual_biopsy.data.layout import MANIFEST_COLUMNS
from virtual_biopsy.dicom.cesm import SIMULATED_MARK, SYNTHETIC_MARK
from virtual_biopsy.dicom.read import read_dataset
from virtual_biopsy.dicom.write import (
    Patient,
    Series,
    Study,
    Window,
    build_mammogram_dataset,
    deterministic_uid,
    write_dataset,
)
from virtual_biopsy.paths import ProjectPaths
from virtual_biopsy.stages.common import stage_inputs, stage_parser

STAGE = "impute"
IMPUTED_COLUMNS = (*MANIFEST_COLUMNS, "source_image_id", "generator_view", "generator_fold", "row")
SYNTHETIC_SERIES_OFFSET = 1000  # series number of a synthetic series = its source's + this
BITS_STORED = 12
# CID 7202 "Source Image Purposes of Reference": the LE image is the input of the generator.
PURPOSE_SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")


class ImputeError(ValueError):
    """Imputation cannot run (a patient without a test fold, a missing generator, bad inputs)."""


def imputed_images_path(paths: ProjectPaths) -> Path:
    return paths.imputed_dir / "images.npy"


def imputed_index_path(paths: ProjectPaths) -> Path:
    return paths.imputed_dir / "index.csv"


# ---------------------------------------------------------------------------------------------
# Which fold imputes which patient
# ---------------------------------------------------------------------------------------------
def test_fold_of_patients(folds: pd.DataFrame) -> pd.Series:
    """patient_id -> the one fold whose test set holds the patient (raises if not exactly one)."""
    tests = folds[folds["subset"] == "test"]
    counts = tests.groupby("patient_id")["fold"].nunique()
    repeated = counts[counts > 1]
    if len(repeated):
        raise ImputeError(f"patient(s) {repeated.index[:3].tolist()} are in the test set of several folds")
    return tests.drop_duplicates("patient_id").set_index("patient_id")["fold"].astype(int)


def plan_imputation(index: pd.DataFrame, folds: pd.DataFrame, views: tuple[str, ...]) -> pd.DataFrame:
    """LE rows of ``views`` with the (view, fold) of the generator that never saw their patient."""
    le = index[(index["modality"] == "FFDM") & index["view"].isin(views)].copy()
    fold_of = test_fold_of_patients(folds)
    le["generator_fold"] = le["patient_id"].map(fold_of)
    untested = le[le["generator_fold"].isna()]
    if len(untested):
        raise ImputeError(
            f"patient(s) {sorted(set(untested['patient_id']))[:3]} are in no fold's test set; "
            "no generator is guaranteed not to have seen them (rerun split)"
        )
    le["generator_fold"] = le["generator_fold"].astype(int)
    le["generator_view"] = le["view"]
    return le.sort_values("row", kind="stable").reset_index(drop=True)


def synthetic_image_id(source_image_id: str, view: str, fold: int) -> str:
    """New, deterministic SOPInstanceUID of the synthetic image made from ``source_image_id``."""
    return deterministic_uid("virtual-biopsy", "synthetic-cesm", source_image_id, view, fold)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def run_impute(paths: ProjectPaths, params: Params, device: str = "cpu") -> pd.DataFrame:
    """Impute every LE image out of fold; write data/imputed atomically; return the index."""
    # Imported here, not at the top: `vbiopsy --help` imports this module, and torch takes seconds.
    from virtual_biopsy.stages.train_generator import fold_weights_path, load_generator_weights
    from virtual_biopsy.training.datasets import open_images
    from virtual_biopsy.training.generator_trainer import generate

    for path, stage in ((paths.processed_images, "preprocess"), (paths.processed_index, "preprocess"),
                        (paths.splits, "split")):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (run the {stage} stage first)")
    images = open_images(paths.processed_images)
    plan = plan_imputation(pd.read_csv(paths.processed_index), pd.read_csv(paths.splits), params.generator.views)
    synthetic = np.empty((len(plan), *images.shape[1:]), dtype=np.float32)
    for (view, fold), group in plan.groupby(["generator_view", "generator_fold"]):
        generator, info = load_generator_weights(fold_weights_path(paths, view, fold))
        if info.get("view") != view or int(info.get("fold", -1)) != fold:
            raise ImputeError(f"{fold_weights_path(paths, view, fold)}: holds view {info.get('view')} "
                              f"fold {info.get('fold')}, expected {view} fold {fold}")
        synthetic[group.index.to_numpy()] = generate(
            generator, np.asarray(images[group["row"].to_numpy()]), params.generator.batch_size, device
        )
    index = imputed_index(plan)
    with atomic_path(imputed_images_path(paths), suffix=".npy") as tmp:
        np.save(tmp, synthetic)
    write_csv(imputed_index_path(paths), index)
    return index


def imputed_index(plan: pd.DataFrame) -> pd.DataFrame:
    """The LE rows restated as synthetic CESM rows (row = position in data/imputed/images.npy)."""
    index = plan.copy()
    index["source_image_id"] = index["image_id"]
    index["image_id"] = [synthetic_image_id(s, v, f) for s, v, f in
                         zip(index["source_image_id"], index["generator_view"], index["generator_fold"])]
    index["modality"] = "CESM"
    index["synthetic"] = True
    index["row"] = np.arange(len(index))
    return index[[c for c in IMPUTED_COLUMNS if c in index.columns]]


# ---------------------------------------------------------------------------------------------
# DICOM for the clinician
# ---------------------------------------------------------------------------------------------
def _age_years(ds: Dataset) -> int:
    age = str(ds.get("PatientAge", "") or "")
    return int(age[:3]) if age[:3].isdigit() and age.endswith("Y") else 0


def _chest_wall_left(ds: Dataset, laterality: str) -> bool:
    """Preprocess mirrored the image iff its chest wall was on the left (first orientation value A)."""
    orientation = [str(v) for v in (ds.get("PatientOrientation") or [])]
    return orientation[0] == "A" if orientation else laterality == "L"


def synthetic_dicom(source: Dataset, pixels01: np.ndarray, row: pd.Series) -> Dataset:
    """A synthetic CESM DICOM dataset for ``row`` (imputed index) made from its LE ``source``.

    Pixels stay in the processed geometry (square, S x S) but are mirrored back to the source's
    orientation; the pixel spacing grows by the resize factor so measurements stay true.
    """
    laterality, view = str(row["laterality"]), str(row["view"])
    pixels = np.fliplr(pixels01) if _chest_wall_left(source, laterality) else pixels01
    stored = np.round(np.clip(pixels, 0, 1) * ((1 << BITS_STORED) - 1)).astype(np.uint16)
    source_side = max(int(source.Rows), int(source.Columns))
    spacing = float((source.get("PixelSpacing") or source.get("ImagerPixelSpacing") or [0.1])[0])
    generator = f"cesm-generator-{str(row['generator_view']).lower()} fold {int(row['generator_fold'])}"
    comments = f"{SYNTHETIC_MARK} CESM imputed by {generator}; not an acquired image"
    if SIMULATED_MARK in str(source.get("ImageComments", "")).upper():
        comments += f"; source is {SIMULATED_MARK}"
    ds = build_mammogram_dataset(
        np.ascontiguousarray(stored),
        patient=Patient(patient_id=str(source.PatientID), name=str(source.get("PatientName", "")),
                        birth_date=str(source.get("PatientBirthDate", "")), age_years=_age_years(source),
                        sex=str(source.get("PatientSex", "F") or "F")),
        study=Study(instance_uid=str(source.StudyInstanceUID), study_id=str(source.get("StudyID", "")),
                    accession_number=str(source.get("AccessionNumber", "")), date=str(source.get("StudyDate", "")),
                    time=str(source.get("StudyTime", "")), description=str(source.get("StudyDescription", "")),
                    institution=str(source.get("InstitutionName", "")),
                    referring_physician=str(source.get("ReferringPhysicianName", ""))),
        series=Series(instance_uid=deterministic_uid("virtual-biopsy", "synthetic-series", source.SeriesInstanceUID,
                                                     generator),
                      number=int(source.get("SeriesNumber", 0) or 0) + SYNTHETIC_SERIES_OFFSET,
                      description=f"SYNTHETIC CESM {laterality}{view} ({generator})"),
        laterality=laterality, view=view, energy="DES", synthetic=True,
        window=Window(center=(1 << BITS_STORED) / 2, width=1 << BITS_STORED, explanation="FULL RANGE"),
        sop_instance_uid=str(row["image_id"]),
        frame_of_reference_uid=str(source.get("FrameOfReferenceUID") or deterministic_uid("for", row["image_id"])),
        pixel_spacing_mm=spacing * source_side / stored.shape[0],
        bits_stored=BITS_STORED, image_comments=comments,
    )
    if source.get("PatientOrientation"):
        ds.PatientOrientation = list(source.PatientOrientation)
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = PURPOSE_SOURCE_FOR_PROCESSING
    reference.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    ds.SourceImageSequence = DicomSequence([reference])
    ds.DerivationDescription = (
        f"Synthetic recombined (CESM) image imputed from the low-energy image "
        f"{source.SOPInstanceUID} by CycleGAN {generator} (virtual-biopsy), out of fold"
    )[:1024]
    return ds



def write_synthetic_dicoms(paths: ProjectPaths, params: Params, out_dir: Path) -> list[Path]:
    """Write every imputed image as DICOM under ``out_dir``, mirroring the raw layout."""
    index = pd.read_csv(imputed_index_path(paths))
    images = np.load(imputed_images_path(paths), mmap_mode="r")
    raw = paths.root / params.ingest.raw_dir
    written = []
    for _, row in index.iterrows():
        source_path = raw / str(row["source_path"])
        source = read_dataset(source_path)
        if str(source.SOPInstanceUID) != str(row["source_image_id"]):
            raise ImputeError(f"{source_path}: SOPInstanceUID {source.SOPInstanceUID} is not the imputed "
                              f"image's source {row['source_image_id']} (raw data changed; rerun the pipeline)")
        ds = synthetic_dicom(source, np.asarray(images[int(row["row"])]), row)
        relative = Path(str(row["source_path"]))
        target = out_dir / relative.parent / f"{relative.stem}_SYNTHETIC_RECOMBINED.dcm"
        written.append(write_dataset(ds, target))
    return written


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def log_to_mlflow(paths: ProjectPaths, params: Params, index: pd.DataFrame) -> None:
    from virtual_biopsy import tracking

    with tracking.stage_run(STAGE, root=paths.root, params=params) as run:
        counts = index.groupby(["generator_view", "generator_fold"]).size()
        run.log_metrics({"images": len(index), **{f"images_{v}_fold{f}": n for (v, f), n in counts.items()}})


def _outputs_stale(paths: ProjectPaths, params: Params) -> bool:
    """True when data/imputed is missing or older than a generator or the processed data."""
    index = imputed_index_path(paths)
    if not index.exists() or not imputed_images_path(paths).exists():
        return True
    inputs = [paths.processed_images, paths.splits,
              *(p for v in params.generator.views for p in (paths.models_dir / "generator" / v).glob("fold*.pt"))]
    return any(p.exists() and p.stat().st_mtime > index.stat().st_mtime for p in inputs)


def _run(args: argparse.Namespace, force: bool) -> int:
    from virtual_biopsy.training.loop import resolve_device

    try:
        paths, params = stage_inputs(args)
        if force or _outputs_stale(paths, params):
            index = run_impute(paths, params, str(resolve_device(args.device or params.generator.device)))
            if not args.no_mlflow:
                log_to_mlflow(paths, params, index)
            print(f"{STAGE}: {len(index)} synthetic CESM images -> {imputed_images_path(paths)}")
        if getattr(args, "dicom_out", None):
            written = write_synthetic_dicoms(paths, params, Path(args.dicom_out))
            print(f"{STAGE}: {len(written)} synthetic CESM DICOM files under {args.dicom_out}")
    except (ConfigError, ImputeError, FileNotFoundError, ValueError, RuntimeError, pd.errors.ParserError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    """`vbiopsy impute`: run the stage if its outputs are missing or stale, optionally write DICOM."""
    parser = subparsers.add_parser(
        "impute", help="synthetic CESM for every FFDM image (out of fold); --dicom-out writes DICOM")
    parser.add_argument("--root", default=".", help="project root (default: current directory)")
    parser.add_argument("--params", default=None, help="params file (default: ROOT/params.yaml)")
    parser.add_argument("--device", default=None,
                        help="torch device: auto, cpu, cuda ... (default: generator.device in params)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the outputs but log nothing to MLflow")
    parser.add_argument("--dicom-out", default=None, metavar="DIR",
                        help="write each synthetic image as a DICOM file referencing its LE source")
    parser.add_argument("--force", action="store_true", help="re-impute even if data/imputed is up to date")
    parser.set_defaults(func=lambda args: _run(args, force=args.force))


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--device", default=None,
                        help="torch device: auto, cpu, cuda ... (default: generator.device in params)")
    return _run(parser.parse_args(argv), force=True)


if __name__ == "__main__":
    sys.exit(main())
