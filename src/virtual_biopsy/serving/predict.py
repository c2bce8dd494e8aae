"""`vbiopsy predict STUDY_DIR`: the registered fused pipeline on one patient's DICOM study.

    vbiopsy predict STUDY_DIR [--model models:/virtual-biopsy-resnet18@champion] [--out DIR] [--json FILE|-]

Reads every ``*.dcm`` under STUDY_DIR, groups the images by breast (ImageLaterality), preprocesses
them with the preprocess stage's code at the pipeline's image size, runs Algorithm 1 per breast and
prints, per breast, p_F, p_C, p, the class and which CESM views were imputed. ``--out`` writes each
imputed CESM view as a DICOM object marked synthetic in its FFDM source's geometry (rows, columns,
pixel spacing, orientation; ``vbiopsy impute --dicom-out``'s writer, serving/synthetic_cesm.py),
``--json`` the result as JSON. Errors name the file: a non-DICOM or non-mammography file, two
patients in one study, a breast without an FFDM image of a view.

Which image is used when a view holds several (e.g. early and late phase): the earliest acquired
(AcquisitionTime, then InstanceNumber), as the paper classifies early-phase images. Images a
generator made (marked SYNTHETIC) are never taken as real CESM.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ARCH = "resnet18"


class StudyError(ValueError):
    """The study folder cannot be predicted on; the message names the file or breast and why."""


@dataclass
class BreastStudy:
    """One breast's DICOM datasets: ``ffdm[view]``, ``cesm[view]`` (real CESM only)."""

    laterality: str
    ffdm: dict[str, Any] = field(default_factory=dict)
    cesm: dict[str, Any] = field(default_factory=dict)
    paths: dict[tuple[str, str], Path] = field(default_factory=dict)


def _acquisition_order(ds) -> tuple[str, int]:
    return str(ds.get("AcquisitionTime", "") or ""), int(ds.get("InstanceNumber", 0) or 0)


def read_study(study_dir: Path) -> tuple[str, dict[str, BreastStudy], list[str]]:
    """(patient id, breasts by laterality, notes) of the DICOM files under ``study_dir``."""
    from pydicom.errors import InvalidDicomError

    from virtual_biopsy.dicom.cesm import UnknownEnergyError, energy_of, is_synthetic
    from virtual_biopsy.dicom.read import read_dataset

    files = sorted(p for p in Path(study_dir).rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise StudyError(f"{study_dir}: no files")
    patients: dict[str, Path] = {}
    chosen: dict[tuple[str, str, str], tuple[Any, Path]] = {}
    notes = []
    for path in files:
        try:
            ds = read_dataset(path)
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise StudyError(f"{path}: not a readable DICOM file ({exc})") from exc
        if str(ds.get("Modality", "")).upper() != "MG":
            raise StudyError(f"{path}: modality {ds.get('Modality', 'missing')!r} is not a mammogram (MG)")
        if is_synthetic(ds):
            notes.append(f"{path.name}: a synthetic (imputed) image, not used as real CESM")
            continue
        patients.setdefault(str(ds.get("PatientID", "")), path)
        if len(patients) > 1:
            (a, pa), (b, pb) = list(patients.items())[:2]
            raise StudyError(f"{study_dir}: images of two patients ({a!r} in {pa.name}, {b!r} in {pb.name}); "
                             "predict reads one patient's study")
        laterality = str(ds.get("ImageLaterality") or ds.get("Laterality") or "").upper()
        view = str(ds.get("ViewPosition", "")).upper()
        if laterality not in ("L", "R") or view not in ("CC", "MLO"):
            raise StudyError(f"{path}: laterality {laterality!r} / view {view!r} is not L|R and CC|MLO")
        try:
            energy = energy_of(ds)
        except UnknownEnergyError as exc:
            raise StudyError(f"{path}: {exc}") from exc
        key = (laterality, view, energy)
        if key in chosen:
            notes.append(f"{laterality}{view} {energy}: several images, the earliest acquired is used")
            if _acquisition_order(ds) >= _acquisition_order(chosen[key][0]):
                continue
        chosen[key] = (ds, path)
    breasts: dict[str, BreastStudy] = {}
    for (laterality, view, energy), (ds, path) in sorted(chosen.items()):
        breast = breasts.setdefault(laterality, BreastStudy(laterality))
        (breast.ffdm if energy == "LE" else breast.cesm)[view] = ds
        breast.paths[view, energy] = path
    for breast in breasts.values():
        missing = [v for v in ("CC", "MLO") if v not in breast.ffdm]
        if missing:
            raise StudyError(f"{study_dir}: breast {breast.laterality} has no FFDM (low-energy) {'/'.join(missing)} "
                             "image; the pipeline needs FFDM CC and MLO")
    if not breasts:
        raise StudyError(f"{study_dir}: no usable mammogram")
    return next(iter(patients)), breasts, notes


def load_pipeline(uri: str, root: Path):
    """The FusedPipeline inside the pyfunc at ``uri`` (a progress line goes to stderr)."""
    import mlflow

    from virtual_biopsy.mlops import registry

    print(f"loading {uri} ...", file=sys.stderr, flush=True)
    with registry._fluent_store(root):
        model = mlflow.pyfunc.load_model(uri)
    return model.unwrap_python_model().pipeline


def predict_study(fused, breasts: dict[str, BreastStudy]) -> dict[str, Any]:
    """Algorithm 1 on every breast; returns {laterality: BreastPrediction}."""
    from virtual_biopsy.serving.fused_model import (
        BreastImages,
        predict_breasts,
        preprocess_dicom,
    )

    size = fused.image_size
    order = sorted(breasts)
    images = [BreastImages(
        ffdm={v: preprocess_dicom(ds, lat, size) for v, ds in breasts[lat].ffdm.items()},
        cesm={v: preprocess_dicom(breasts[lat].cesm[v], lat, size) if v in breasts[lat].cesm else None
              for v in ("CC", "MLO")}) for lat in order]
    return dict(zip(order, predict_breasts(fused, images)))


def write_imputed(fused, breasts: dict[str, BreastStudy], results: dict[str, Any], out: Path) -> list[Path]:
    """Each imputed CESM view as a synthetic DICOM in its FFDM source's geometry, named after the
    source file (``vbiopsy impute --dicom-out``'s writer)."""
    import pandas as pd

    from virtual_biopsy.data.imputation import synthetic_image_id
    from virtual_biopsy.dicom.write import write_dataset
    from virtual_biopsy.serving.synthetic_cesm import SYNTHETIC_SUFFIX, synthetic_cesm_dicom

    written = []
    for lat, result in results.items():
        for view, synthetic in result.synthetic.items():
            if not synthetic:
                continue
            source = breasts[lat].ffdm[view]
            fold = (fused.info.get("generators", {}).get(view) or {}).get("fold", 0)
            fold = int(fold) if str(fold).isdigit() else -1  # -1: a refit generator, trained on every fold
            row = pd.Series({"laterality": lat, "view": view, "generator_view": view, "generator_fold": fold,
                             "image_id": synthetic_image_id(str(source.SOPInstanceUID), view, fold)})
            stem = breasts[lat].paths[view, "LE"].stem
            written.append(write_dataset(synthetic_cesm_dicom(source, result.cesm_images[view], row),
                                         out / f"{stem}{SYNTHETIC_SUFFIX}.dcm"))
    return written


def report_json(patient: str, uri: str, results: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    return {"patient_id": patient, "model": uri, "notes": notes, "breasts": {
        lat: {"p_ffdm": r.p_ffdm, "p_cesm": r.p_cesm, "p": r.p, "class": r.label,
              "imputed_cesm": [v for v, s in r.synthetic.items() if s], "per_classifier": r.per_input}
        for lat, r in results.items()}}


def report_text(report: dict[str, Any]) -> str:
    """The readable report: one block per breast."""
    lines = [f"patient {report['patient_id']}  (model {report['model']})"]
    names = {"L": "left", "R": "right"}
    for lat, r in report["breasts"].items():
        imputed = ", ".join(r["imputed_cesm"]) or "none (both CESM views acquired)"
        lines += [f"  {names[lat]} breast: {r['class'].upper()}  p = {r['p']:.3f}",
                  f"    p_F (FFDM) = {r['p_ffdm']:.3f}   p_C (CESM) = {r['p_cesm']:.3f}",
                  f"    imputed CESM views: {imputed}"]
    lines += [f"  note: {n}" for n in report["notes"]]
    lines.append("  (research use only; synthetic CESM is not an acquired image)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from virtual_biopsy.dicom.synthetic import SyntheticDicomError
    from virtual_biopsy.serving import fused_model

    uri = args.model or f"models:/{fused_model.registered_name(DEFAULT_ARCH)}@champion"
    try:
        patient, breasts, notes = read_study(Path(args.study_dir))
        fused = load_pipeline(uri, Path(args.root))
        results = predict_study(fused, breasts)
        report = report_json(patient, uri, results, notes)
        if args.out:
            report["written"] = [str(p) for p in write_imputed(fused, breasts, results, Path(args.out))]
    except (StudyError, fused_model.PipelineInputError, SyntheticDicomError) as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a model that cannot be loaded: say which, not a traceback
        if type(exc).__name__ != "MlflowException":
            raise
        print(f"predict: cannot load {uri}: {exc}", file=sys.stderr)
        return 1
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(report_text(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def register(subparsers) -> None:
    """Add `vbiopsy predict`."""
    parser = subparsers.add_parser("predict", help="virtual biopsy of one patient's DICOM study (fused pipeline)")
    parser.add_argument("study_dir", help="folder with one patient's DICOM files (searched recursively)")
    parser.add_argument("--model", default=None,
                        help=f"model URI (default: models:/virtual-biopsy-{DEFAULT_ARCH}@champion)")
    parser.add_argument("--out", default=None, help="write imputed CESM views as synthetic DICOM into this folder")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON ('-': stdout only)")
    parser.add_argument("--root", default=".", help="project root whose MLflow store holds the model")
    parser.set_defaults(func=run)
