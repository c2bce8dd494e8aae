"""`vbiopsy predict STUDY_DIR`: the registered fused pipeline on one patient's DICOM study.

    vbiopsy predict STUDY_DIR [--model models:/virtual-biopsy-resnet18@champion] [--out DIR] [--json FILE|-]
                              [--report DIR]

Reads every ``*.dcm`` under STUDY_DIR, groups the images by breast (ImageLaterality), preprocesses
them with the preprocess stage's code at the pipeline's image size, runs Algorithm 1 per breast over
every serving fold (serving/fused_model.py) and prints, per breast, the calibrated p (the mean over
folds, what the class is decided on) with the spread between folds (sd, min-max), the uncalibrated
p, the conformal set at its level, the calibration setting (F+C, or F+Ĉ when a CESM view was
imputed), p_F, p_C, the class and which CESM views were imputed. ``--out`` writes each
imputed CESM view as a DICOM object marked synthetic in its FFDM source's geometry (rows, columns,
pixel spacing, orientation; ``vbiopsy impute --dicom-out``'s writer, serving/synthetic_cesm.py),
``--json`` the result as JSON. ``--report`` writes one self-contained HTML page per study
(serving/report.py): the four views with synthetic CESM marked, each classifier's Grad-CAM
(serving/saliency.py; with several folds the mean of the folds' maps, and the classifier's mean
share of p), the probabilities, the calibrated p with its fold spread and conformal set, the
class, the imputed inputs, the fusion weights per fold and the model's name, version, aliases
and card. The page and its file name (``<study key>.html``, a
hash of the StudyInstanceUID) carry no patient name or id, no original UID and no file name.
Errors name the file: a non-DICOM or non-mammography file, two patients in one study, a breast
without an FFDM image of a view, a ``--report`` target that is a file.

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

import numpy as np

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


def preprocess_study(fused, breasts: dict[str, BreastStudy]) -> dict[str, Any]:
    """Every breast's images preprocessed at the pipeline's size: {laterality: BreastImages}."""
    from virtual_biopsy.serving.fused_model import BreastImages, preprocess_dicom

    size = fused.image_size
    return {lat: BreastImages(
        ffdm={v: preprocess_dicom(ds, lat, size) for v, ds in breasts[lat].ffdm.items()},
        cesm={v: preprocess_dicom(breasts[lat].cesm[v], lat, size) if v in breasts[lat].cesm else None
              for v in ("CC", "MLO")}) for lat in sorted(breasts)}


def predict_images(fused, images: dict[str, Any]) -> dict[str, Any]:
    """Algorithm 1 on preprocessed breasts (:func:`preprocess_study`); {laterality: BreastPrediction}."""
    from virtual_biopsy.serving.fused_model import predict_breasts

    return dict(zip(images, predict_breasts(fused, list(images.values()))))


def predict_study(fused, breasts: dict[str, BreastStudy]) -> dict[str, Any]:
    """Algorithm 1 on every breast; returns {laterality: BreastPrediction}."""
    return predict_images(fused, preprocess_study(fused, breasts))


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
        lat: {"p": r.p, "p_calibrated": r.p_calibrated, "p_uncalibrated": r.p_uncalibrated,
              "p_fold_sd": r.p_fold_sd, "p_fold_min": r.p_fold_min, "p_fold_max": r.p_fold_max,
              "p_folds": dict(zip(map(str, r.folds), r.p_folds)), "conformal_set": list(r.conformal_set),
              "conformal_level": r.conformal_level, "setting": r.setting,
              "p_ffdm": r.p_ffdm, "p_cesm": r.p_cesm, "class": r.label,
              "imputed_cesm": [v for v, s in r.synthetic.items() if s], "per_classifier": r.per_input}
        for lat, r in results.items()}}


def report_text(report: dict[str, Any]) -> str:
    """The readable report: one block per breast."""
    lines = [f"patient {report['patient_id']}  (model {report['model']})"]
    names = {"L": "left", "R": "right"}
    for lat, r in report["breasts"].items():
        imputed = ", ".join(r["imputed_cesm"]) or "none (both CESM views acquired)"
        folds = len(r["p_folds"])
        lines += [f"  {names[lat]} breast: {r['class'].upper()}  p = {r['p_calibrated']:.3f} (calibrated, {r['setting']}; "
                  f"mean of {folds} fold{'s' if folds != 1 else ''}: sd {r['p_fold_sd']:.3f}, "
                  f"min-max {r['p_fold_min']:.3f}-{r['p_fold_max']:.3f})",
                  f"    conformal set ({100 * r['conformal_level']:.0f} %): {{{', '.join(r['conformal_set'])}}}"
                  f"   uncalibrated p = {r['p_uncalibrated']:.3f}",
                  f"    p_F (FFDM) = {r['p_ffdm']:.3f}   p_C (CESM) = {r['p_cesm']:.3f}  (uncalibrated, fold means)",
                  f"    imputed CESM views: {imputed}"]
    lines += [f"  note: {n}" for n in report["notes"]]
    lines.append("  (research use only; synthetic CESM is not an acquired image)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --report: saliency and the HTML page
# ---------------------------------------------------------------------------------------------
def study_saliency(fused, images: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """Grad-CAM of each classifier on the images it scored (CESM: acquired or imputed), per breast:
    {laterality: {(modality, view): ClassifierSaliency}} in the processed geometry.

    With several serving folds, a classifier's map is the mean of its folds' maps and its share of
    p the mean of its folds' shares: p is the mean of the folds' (calibrated) fused p, so that
    is how much of the ensemble's decision the classifier of that modality and view carries."""
    from dataclasses import replace

    from virtual_biopsy.serving.saliency import pipeline_saliency

    order = list(results)
    ffdm, cesm = [images[lat].ffdm for lat in order], [results[lat].cesm_images for lat in order]
    per_fold = [pipeline_saliency(fold, ffdm, cesm) for fold in fused.folds]
    combined = []
    for i in range(len(order)):
        maps = {}
        for key, first in per_fold[0][i].items():
            folds = [f[i][key] for f in per_fold]
            maps[key] = replace(first, processed=np.mean([m.processed for m in folds], axis=0).astype(np.float32),
                                fusion_share=float(np.mean([m.fusion_share for m in folds])))
        combined.append(maps)
    return dict(zip(order, combined))


def generator_label(fused, view: str) -> str:
    """How the page names the generator that imputed ``view``: registered name, fold and policy."""
    from virtual_biopsy.mlops.registry import generator_model_name

    info = fused.info.get("generators", {}).get(view) or {}
    details = [f"fold {info['fold']}" if info.get("fold") is not None else None, info.get("policy")]
    details = [d for d in details if d]
    return generator_model_name(view) + (f" ({', '.join(str(d) for d in details)})" if details else "")


def model_identity(uri: str, root: Path):
    """Name, version, aliases, UI page and card text of the registered version ``uri`` resolves to.

    A ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI is looked up in the project's
    registry; the version's description is its model card (the gate writes it). Any other URI
    (``runs:/...``, a folder) has no registry entry: the page then says so."""
    import re

    from mlflow.exceptions import MlflowException

    from virtual_biopsy.mlops.store import get_client, tracking_uri
    from virtual_biopsy.mlops.ui_links import ui_base_url, ui_command, ui_link
    from virtual_biopsy.serving.report import ModelIdentity

    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/([0-9]+))", uri)
    if not match:
        return ModelIdentity(uri)
    name, alias, version = match.groups()
    client = get_client(root)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        return ModelIdentity(uri, name, version, (alias,) if alias else ())
    served = tracking_uri(root).startswith(("http://", "https://"))
    return ModelIdentity(
        uri, name, str(found.version), tuple(sorted(found.aliases or ([alias] if alias else []))),
        card_url=ui_link(ui_base_url(root), f"models/{name}/versions/{found.version}"),
        card_url_note=None if served else f"opens while the MLflow UI serves this project's store: {ui_command(root)}",
        card_text=found.description or None)


def page_notes(notes: list[str], study_dir: Path) -> list[str]:
    """read_study's notes without file names (a raw layout's names carry patient ids)."""
    names = sorted({p.name for p in Path(study_dir).rglob("*") if p.is_file()}, key=len, reverse=True)
    cleaned = []
    for note in notes:
        for name in names:
            note = note.replace(name, "a file of the study")
        cleaned.append(note)
    return cleaned


def _panel(fused, breast: BreastStudy, image, result, saliency, modality: str, view: str):
    """One view as the page shows it: image and map put back in the source image's geometry
    (a synthetic CESM lies over its FFDM source, so it takes the FFDM image's geometry)."""
    import numpy as np

    from virtual_biopsy.data.source_geometry import SourceGeometry, to_source_geometry
    from virtual_biopsy.serving.report import ViewPanel
    from virtual_biopsy.serving.saliency import in_source_geometry

    synthetic = modality == "CESM" and result.synthetic[view]
    source = _saliency_source(breast, result, modality, view)
    geometry = SourceGeometry.of_dataset(source, breast.laterality)
    cam = saliency[modality, view]
    shown = np.clip(to_source_geometry(np.asarray(image, dtype=np.float32), geometry), 0.0, 1.0)
    return ViewPanel(modality, view, shown,
                     p=result.per_input[f"{modality}_{view}"], fusion_share=cam.fusion_share,
                     saliency=in_source_geometry(cam.processed, geometry), grid=cam.grid,
                     synthetic_by=generator_label(fused, view) if synthetic else None)


def study_page(fused, breasts: dict[str, BreastStudy], images: dict[str, Any], results: dict[str, Any],
               saliency: dict[str, Any], model, notes: list[str]):
    """The StudyReport of one study (serving/report.py) from predict's values: ``images`` the
    preprocessed breasts (:func:`preprocess_study`), ``results`` their predictions, ``saliency``
    :func:`study_saliency`, ``model`` :func:`model_identity`; no identifier goes in."""
    from virtual_biopsy.serving.report import BreastReport, StudyReport, study_key

    sections = []
    for lat, result in results.items():
        breast = breasts[lat]
        panels = [_panel(fused, breast, shown, result, saliency[lat], modality, view)
                  for view in ("CC", "MLO")
                  for modality, shown in (("FFDM", images[lat].ffdm[view]), ("CESM", result.cesm_images[view]))]
        sections.append(BreastReport(lat, result.p, result.p_ffdm, result.p_cesm, result.label,
                                     [v for v, s in result.synthetic.items() if s], panels,
                                     fused.folds[0].view_weights, fused.folds[0].modality_weights,
                                     calibrated_p=result.p_calibrated, fold_spread=result.p_fold_sd,
                                     conformal_set=result.conformal_set, p_uncalibrated=result.p_uncalibrated,
                                     fold_range=(result.p_fold_min, result.p_fold_max),
                                     n_folds=len(result.p_folds), conformal_level=result.conformal_level,
                                     setting=result.setting,
                                     fold_weights=[(f.fold, f.view_weights, f.modality_weights) for f in fused.folds]))
    uids = [str(ds.get("StudyInstanceUID", "")) for b in breasts.values() for ds in (*b.ffdm.values(), *b.cesm.values())]
    return StudyReport(study_key(uids), model, sections, tuple(notes))


def _saliency_source(breast: BreastStudy, result, modality: str, view: str):
    """The image a classifier's map lies over: the FFDM for FFDM and for an imputed CESM view (the
    synthetic image has its FFDM source's geometry), else the acquired CESM."""
    synthetic = modality == "CESM" and result.synthetic[view]
    return breast.ffdm[view] if modality == "FFDM" or synthetic else breast.cesm[view]


def dicom_results(fused, breasts: dict[str, BreastStudy], results: dict[str, Any], saliency: dict[str, Any],
                  model) -> list:
    """The study's DICOM results (serving/dicom_results.py): one TID 1500 Structured Report with
    the calibrated p, its fold spread, the conformal set, the class and imputed views per breast,
    and one Grad-CAM map per breast and classifier, each
    lying over the image its classifier read (FRACTIONAL Segmentation, see that module)."""
    from virtual_biopsy.data.source_geometry import SourceGeometry
    from virtual_biopsy.serving import dicom_results as dr
    from virtual_biopsy.serving.saliency import in_source_geometry

    info = dr.ModelInfo(model.name or model.uri, model.version or "", ",".join(model.aliases))
    sources = [ds for b in breasts.values() for ds in (*b.ffdm.values(), *b.cesm.values())]
    objects = [dr.structured_report(sources, {lat: dr.finding_from_prediction(lat, r) for lat, r in results.items()},
                                    info)]
    number = 1
    for lat, result in results.items():
        for (modality, view), cam in saliency[lat].items():
            source = _saliency_source(breasts[lat], result, modality, view)
            values = in_source_geometry(cam.processed, SourceGeometry.of_dataset(source, lat))
            number += 1
            objects.append(dr.saliency_map(source, values, model=info, instance_number=number,
                                           classifier=dr.ClassifierInfo(view, modality, fused.arch)))
    return objects


def write_dicom_results(fused, breasts, results, saliency, model, out: Path) -> list[Path]:
    """:func:`dicom_results` written into ``out`` (names derived from UIDs: no patient identifier)."""
    from virtual_biopsy.serving.dicom_results import write_results

    return write_results(out, dicom_results(fused, breasts, results, saliency, model))


def run(args: argparse.Namespace) -> int:
    from virtual_biopsy.dicom.synthetic import SyntheticDicomError
    from virtual_biopsy.serving import fused_model
    from virtual_biopsy.serving.report import ReportError, check_report_dir, write_report
    from virtual_biopsy.serving.dicom_results import DicomResultsError
    from virtual_biopsy.serving.saliency import SaliencyError

    uri = args.model or f"models:/{fused_model.registered_name(DEFAULT_ARCH)}@champion"
    try:
        if args.report:
            check_report_dir(args.report)  # before the model loads: a wrong target fails at once
        patient, breasts, notes = read_study(Path(args.study_dir))
        fused = load_pipeline(uri, Path(args.root))
        images = preprocess_study(fused, breasts)
        results = predict_images(fused, images)
        report = report_json(patient, uri, results, notes)
        if args.out:
            report["written"] = [str(p) for p in write_imputed(fused, breasts, results, Path(args.out))]
        saliency = study_saliency(fused, images, results) if args.report or args.dicom_results else None
        # one registry lookup serves both outputs
        model = model_identity(uri, Path(args.root)) if args.report or args.dicom_results else None
        if args.dicom_results:
            report["dicom_results"] = [str(p) for p in write_dicom_results(
                fused, breasts, results, saliency, model, Path(args.dicom_results))]
        if args.report:
            page = study_page(fused, breasts, images, results, saliency, model,
                              page_notes(notes, Path(args.study_dir)))
            report["report"] = str(write_report(page, Path(args.report)))
    except (StudyError, fused_model.PipelineInputError, SyntheticDicomError, ReportError, SaliencyError,
            DicomResultsError) as exc:
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
        if report.get("report"):
            print(f"  report: {report['report']}")
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
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write one offline HTML page per study into this folder (created if missing): "
                             "the four views, synthetic CESM marked SYNTHETIC, Grad-CAM per classifier, p, p_F, "
                             "p_C, the class, imputed inputs, fusion weights, model name/version/alias and "
                             "model card; named <study key>.html (a hash of the StudyInstanceUID, no patient "
                             "identifiers); research use only")
    parser.add_argument("--dicom-results", default=None, metavar="DIR", dest="dicom_results",
                        help="write the study's results as standard DICOM for a PACS into this folder: a TID 1500 "
                             "Structured Report (p, class and imputed views per breast, referencing the source "
                             "images) and each classifier's Grad-CAM as a FRACTIONAL Segmentation over the image "
                             "it read; file names derived from UIDs (no patient identifiers); research use only")
    parser.add_argument("--root", default=".", help="project root whose MLflow store holds the model")
    parser.set_defaults(func=run)
