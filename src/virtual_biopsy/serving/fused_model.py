"""The fused virtual-biopsy pipeline (paper Algorithm 1) as one object and as an MLflow pyfunc.

What one pipeline holds (:class:`FusedPipeline`)
    the two view generators G_CC, G_MLO (FFDM -> CESM), per cross-validation fold the four
    classifiers f_{m,v} (m in FFDM, CESM; v in CC, MLO) of one architecture with **that fold's**
    eq. 7 weights per modality and eq. 8 weights over modalities (:class:`FoldClassifiers`), the
    calibration of the fused output (:class:`Calibration`), and the image size its networks
    were trained at.

Which folds serve (``gate.serving``)
    ``ensemble`` (default): every fold's classifiers, each fold fused with its own weights, so
    weights and classifiers always belong together; the served p is the mean over folds and the
    spread between folds (sd, min, max) is reported with it. One fold chosen on about 12
    validation lesions can give a modality a weight of 0 (issue #16); the ensemble does not rest
    on that one choice. ``best_fold``: the single fold with the best validation MCC of p (F+C,
    real validation CESM; the behaviour before issue #16), kept as a documented option; its
    spread is 0 over one fold. The generators are each view's *serving* generator
    (``generator.serving_policy``, registered as ``cesm-generator-<view>``), one per view in
    both modes: for a new patient any generator is out of sample.

Algorithm 1 with calibration and a conformal set (:func:`predict_breasts`)
    per view: use the real CESM image when given, else impute G_v(FFDM_v) (flagged synthetic);
    per fold k: p_{m,v,k} = f_{m,v,k}(X_{m,v}); p_{m,k} = eq. 7 over views; p_k = eq. 8 over
    modalities; calibrated q_k = sigmoid(logit(p_k) / T_s) (temperature scaling, T of the
    breast's setting s; the calibrator was fitted on per-fold fused validation outputs);
    p = mean_k q_k (``p_calibrated``, what the class is decided on: malignant when p >= 0.5),
    ``p_uncalibrated`` = mean_k p_k, spread = population sd, min and max of q_k over folds;
    conformal set = {c : 1 - p(c) <= qhat_s} on the ensemble's calibrated p, never empty
    (evaluation/conformal.py). The setting s is F+C when both CESM views were acquired, F+Ĉ when
    both were imputed, and **F+Ĉ when one view was imputed** (its input is partly synthetic;
    the evaluation knows only all-acquired and all-imputed CESM, and F+Ĉ's larger
    uncertainty is the cautious choice); ``imputed_cc`` / ``imputed_mlo`` say which view.
    The arithmetic is that of the stages: ``generate`` and the classifiers' softmax (training),
    ``fuse`` (fusion), ``classify`` (metrics), evaluation.calibration and evaluation.conformal.

Inputs
    Images are preprocessed (paper 4.1, :func:`preprocess_dicom` = the preprocess stage's code):
    float32 (S, S) in [0, 1], S = ``image_size``. Over REST (the pyfunc), each image is a
    **base64 string of the raw little-endian float32 bytes** of the (S, S) array
    (:func:`encode_image`): 4 S^2 bytes, a third of the size of a JSON nested list and parsed
    without a float-by-float JSON decode. A request has exactly the four INPUT_COLUMNS: an
    unknown column (a typo such as ``cesm_MLO``) or a missing one is refused, never dropped or
    imputed silently; a null or empty value in ``cesm_cc`` / ``cesm_mlo`` means "not acquired:
    impute it". Served, every refusal is HTTP 400 whose ``message`` is the sentence naming the
    row, column and reason (:mod:`virtual_biopsy.mlops.scoring`), with no stack trace.

Bundle (what the pyfunc ships, :func:`save_bundle` / :func:`load_bundle`)
    one ``pipeline.pt`` of plain tensors and numbers (``torch.load(weights_only=True)``: no pickled
    code) plus ``pipeline.json`` describing it for humans. Format 2 (issue #16) holds every
    fold and the calibration; a format-1 bundle (one fold, no calibration) is refused with the
    advice to rerun the gate.
"""
from __future__ import annotations

import base64
import binascii
import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from virtual_biopsy.core.atomic import write_json, write_torch
from virtual_biopsy.core.config import MODALITIES, VIEWS
from virtual_biopsy.evaluation.calibration import calibrated_probability
from virtual_biopsy.evaluation.conformal import conformal_set
from virtual_biopsy.evaluation.metrics import classify
from virtual_biopsy.models.classifiers import MALIGNANT_CLASS, build_classifier
from virtual_biopsy.models.cyclegan import ResnetGenerator
from virtual_biopsy.models.fusion import fuse
from virtual_biopsy.training.generator_trainer import generate

BUNDLE_FORMAT = 2
BUNDLE_FILE = "pipeline.pt"
BUNDLE_DESCRIPTION = "pipeline.json"
BUNDLE_ARTIFACT = "bundle"
INPUT_COLUMNS = ("ffdm_cc", "ffdm_mlo", "cesm_cc", "cesm_mlo")
# p is the calibrated ensemble probability (= p_calibrated, kept under its old name for callers of
# the first format); p_ffdm / p_cesm are the fold means of the per-modality fused p, uncalibrated.
OUTPUT_COLUMNS = ("p_ffdm", "p_cesm", "p", "class", "cesm_cc_synthetic", "cesm_mlo_synthetic",
                  "p_calibrated", "p_uncalibrated", "p_fold_sd", "p_fold_min", "p_fold_max", "n_folds",
                  "conformal_set", "conformal_level", "setting", "imputed_cc", "imputed_mlo")
CLASS_NAMES = {1: "malignant", 0: "benign"}
SERVING_MODES = ("ensemble", "best_fold")
SETTING_ACQUIRED = "F+C"  # both CESM views acquired
SETTING_IMPUTED = "F+Ĉ"  # at least one CESM view imputed (module docstring)
SERVED_SETTINGS = (SETTING_ACQUIRED, SETTING_IMPUTED)
CALIBRATION_METHODS = ("temperature",)
RANGE_TOLERANCE = 1e-3  # resizing rounding may put a preprocessed pixel a hair outside [0, 1]


class PipelineInputError(ValueError):
    """An input image cannot go through the pipeline; the message names the breast and image."""


class BundleError(ValueError):
    """A bundle or calibration file cannot be used; the message names the file, the key and why."""


def registered_name(arch: str) -> str:
    """Registered model name of the fused pipeline of one architecture: ``virtual-biopsy-<arch>``."""
    from virtual_biopsy.mlops.registry import pipeline_model_name

    return pipeline_model_name(arch)


# ---------------------------------------------------------------------------------------------
# The pipeline object
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Temperature scaling and split-conformal thresholds per setting (outputs/calibration/<arch>.json,
    written by the evaluate stage): ``settings[s]`` holds ``temperature`` (T > 0), ``qhat`` (in
    [0, 1]) and ``n_val`` (validation lesions it was fitted on) for each setting s."""

    method: str
    fitted_on: str
    conformal_level: float
    settings: Mapping[str, Mapping[str, float]]

    def entry(self, setting: str) -> Mapping[str, float]:
        return self.settings[setting]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "fitted_on": self.fitted_on, "conformal_level": self.conformal_level,
                "settings": {s: dict(e) for s, e in self.settings.items()}}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise BundleError(f"{where}: {value!r} is not a finite number")
    return float(value)


def calibration_from_json(data: Any, where: str) -> Calibration:
    """Check the calibration record ``data`` (``where`` names its file) and return it.

    Serving needs method "temperature", a conformal level in (0, 1) and, for F+C and F+Ĉ, a
    temperature > 0 and a qhat in [0, 1]; a missing or bad key raises BundleError naming it."""
    if not isinstance(data, Mapping):
        raise BundleError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for key in ("method", "conformal_level", "settings"):
        if key not in data:
            raise BundleError(f"{where}: no key {key!r} (keys: {sorted(data)}); rerun the evaluate stage")
    if data["method"] not in CALIBRATION_METHODS:
        raise BundleError(f"{where}: method {data['method']!r}; serving applies {list(CALIBRATION_METHODS)}")
    level = _number(data["conformal_level"], f"{where}: conformal_level")
    if not 0 < level < 1:
        raise BundleError(f"{where}: conformal_level {level} must lie strictly between 0 and 1")
    if not isinstance(data["settings"], Mapping):
        raise BundleError(f"{where}: settings must be an object of setting -> {{temperature, qhat, n_val}}")
    settings = {}
    for setting, entry in data["settings"].items():
        if not isinstance(entry, Mapping):
            raise BundleError(f"{where}: settings.{setting} must be an object, got {type(entry).__name__}")
        settings[setting] = {k: v for k, v in entry.items()}
    for setting in SERVED_SETTINGS:
        if setting not in settings:
            raise BundleError(f"{where}: settings.{setting} missing (keys: {sorted(settings)}); serving needs "
                              f"{list(SERVED_SETTINGS)}")
        entry = settings[setting]
        for key in ("temperature", "qhat"):
            if key not in entry:
                raise BundleError(f"{where}: settings.{setting}.{key} missing (keys: {sorted(entry)})")
            entry[key] = _number(entry[key], f"{where}: settings.{setting}.{key}")
        if entry["temperature"] <= 0:
            raise BundleError(f"{where}: settings.{setting}.temperature {entry['temperature']} must be > 0")
        if not 0 <= entry["qhat"] <= 1:
            raise BundleError(f"{where}: settings.{setting}.qhat {entry['qhat']} must lie in [0, 1]")
    return Calibration(str(data["method"]), str(data.get("fitted_on", "")), level, settings)


def read_calibration(path: str | Path) -> Calibration:
    """outputs/calibration/<arch>.json as a :class:`Calibration`; BundleError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: missing (run the evaluate stage first: it fits the calibration)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    return calibration_from_json(data, str(path))


def identity_calibration(level: float = 0.9, fitted_on: str = "nothing (T = 1, qhat = 1)") -> Calibration:
    """T = 1 (p unchanged) and qhat = 1 (every set holds both classes): for benchmarks of untrained networks."""
    return Calibration("temperature", fitted_on, level,
                       {s: {"temperature": 1.0, "qhat": 1.0, "n_val": 0} for s in SERVED_SETTINGS})


@dataclass
class FoldClassifiers:
    """One fold's four classifiers and the eq. 7 / eq. 8 weights fitted on that fold's validation
    lesions (``view_weights[m][v]``, ``modality_weights[m]``, >= 0 as ``fusion.fusion_weights``
    makes them). ``arch`` is here so that serving.saliency can take one fold as it takes a pipeline."""

    arch: str
    fold: int
    classifiers: dict[tuple[str, str], nn.Module]
    view_weights: dict[str, dict[str, float]]
    modality_weights: dict[str, float]

    def __post_init__(self) -> None:
        missing = [f"{m}_{v}" for m in MODALITIES for v in VIEWS if (m, v) not in self.classifiers]
        if missing:
            raise ValueError(f"fold {self.fold} needs every classifier; missing {missing}")
        for net in self.classifiers.values():
            net.eval()


@dataclass
class FusedPipeline:
    """Networks, weights and calibration of one fused pipeline (module docstring). Networks are in
    eval mode. ``folds``: one :class:`FoldClassifiers` per serving fold (all folds for
    ``ensemble``, one for ``best_fold``); ``info`` records provenance (serving mode, folds,
    validation MCCs, generator folds ...)."""

    arch: str
    image_size: int
    generators: dict[str, nn.Module]
    folds: list[FoldClassifiers]
    calibration: Calibration
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [v for v in VIEWS if v not in self.generators]
        if missing:
            raise ValueError(f"a fused pipeline needs a generator per view; missing {missing}")
        if not self.folds:
            raise ValueError("a fused pipeline needs at least one fold's classifiers")
        for net in self.generators.values():
            net.eval()

    @property
    def serving(self) -> str:
        return str(self.info.get("serving", "ensemble" if len(self.folds) > 1 else "best_fold"))

    @classmethod
    def single_fold(cls, arch: str, image_size: int, generators: dict[str, nn.Module],
                    classifiers: dict[tuple[str, str], nn.Module], view_weights: dict[str, dict[str, float]],
                    modality_weights: dict[str, float], calibration: Calibration | None = None,
                    info: dict[str, Any] | None = None, fold: int = 0) -> FusedPipeline:
        """A pipeline of one fold (``best_fold``; benchmarks), uncalibrated unless ``calibration`` is given."""
        return cls(arch, image_size, generators, [FoldClassifiers(arch, fold, classifiers, view_weights,
                                                                  modality_weights)],
                   calibration or identity_calibration(), dict(info or {}))


@dataclass(frozen=True)
class BreastImages:
    """One breast's preprocessed images; a CESM view that is None is imputed."""

    ffdm: Mapping[str, np.ndarray]
    cesm: Mapping[str, np.ndarray | None]


@dataclass(frozen=True)
class BreastPrediction:
    """Algorithm 1's output for one breast (module docstring), with what it was computed from.

    ``p`` is the calibrated ensemble probability (``p_calibrated``), ``label`` its class;
    ``p_folds`` each fold's calibrated p (in ``folds`` order); ``p_ffdm``, ``p_cesm`` and
    ``per_input`` are fold means of uncalibrated probabilities."""

    p_ffdm: float
    p_cesm: float
    p: float
    label: str
    synthetic: dict[str, bool]
    per_input: dict[str, float]
    cesm_images: dict[str, np.ndarray]
    p_uncalibrated: float = float("nan")
    p_folds: tuple[float, ...] = ()
    folds: tuple[int, ...] = ()
    conformal_set: tuple[str, ...] = ()
    conformal_level: float = float("nan")
    setting: str = ""

    @property
    def p_calibrated(self) -> float:
        return self.p

    @property
    def p_fold_sd(self) -> float:
        """Population sd of the folds' calibrated p (the folds are the whole ensemble, not a sample)."""
        return float(np.std(self.p_folds)) if self.p_folds else float("nan")

    @property
    def p_fold_min(self) -> float:
        return float(min(self.p_folds)) if self.p_folds else float("nan")

    @property
    def p_fold_max(self) -> float:
        return float(max(self.p_folds)) if self.p_folds else float("nan")

    @property
    def conformal_text(self) -> str:
        """The set as the pyfunc returns it: "benign", "malignant" or "benign,malignant"."""
        return ",".join(self.conformal_set)

    def as_row(self) -> dict[str, Any]:
        """The pyfunc's output row (OUTPUT_COLUMNS)."""
        synthetic = {v: bool(self.synthetic[v]) for v in VIEWS}
        return {"p_ffdm": self.p_ffdm, "p_cesm": self.p_cesm, "p": self.p, "class": self.label,
                **{f"cesm_{v.lower()}_synthetic": synthetic[v] for v in VIEWS},
                "p_calibrated": self.p, "p_uncalibrated": self.p_uncalibrated, "p_fold_sd": self.p_fold_sd,
                "p_fold_min": self.p_fold_min, "p_fold_max": self.p_fold_max, "n_folds": len(self.p_folds),
                "conformal_set": self.conformal_text, "conformal_level": self.conformal_level,
                "setting": self.setting, **{f"imputed_{v.lower()}": synthetic[v] for v in VIEWS}}


def _check_image(image: Any, size: int, where: str) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32)
    if array.shape != (size, size):
        raise PipelineInputError(f"{where}: expected a preprocessed ({size}, {size}) image, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise PipelineInputError(f"{where}: image holds nan or inf")
    if array.min() < -RANGE_TOLERANCE or array.max() > 1 + RANGE_TOLERANCE:
        raise PipelineInputError(f"{where}: pixel values must lie in [0, 1] (preprocessed), "
                                 f"found [{array.min():.3g}, {array.max():.3g}]")
    return np.clip(array, 0.0, 1.0)


def _impute(pipeline: FusedPipeline, breasts: Sequence[BreastImages]) -> list[dict[str, tuple[np.ndarray, bool]]]:
    """Algorithm 1 lines 1-9: per breast and view, (CESM image, synthetic?)."""
    out: list[dict[str, tuple[np.ndarray, bool]]] = [{} for _ in breasts]
    for view in VIEWS:
        missing = [i for i, b in enumerate(breasts) if b.cesm.get(view) is None]
        for i, breast in enumerate(breasts):
            if i not in missing:
                out[i][view] = (breast.cesm[view], False)
        if missing:
            # One batch per view: the generator runs once however many breasts lack this view.
            # inference_mode: no autograd bookkeeping; the arithmetic is generate()'s.
            with torch.inference_mode():
                synthetic = generate(pipeline.generators[view], np.stack([breasts[i].ffdm[view] for i in missing]))
            for i, image in zip(missing, synthetic):
                out[i][view] = (image, True)
    return out


def _malignant_probability(model: nn.Module, batch: torch.Tensor) -> np.ndarray:
    """softmax(f(X))[:, malignant] in float64, as training's predict_proba computes it (CPU, float32)."""
    with torch.inference_mode():
        return torch.softmax(model(batch).float(), dim=1)[:, MALIGNANT_CLASS].double().numpy()


def fold_probabilities(fold: FoldClassifiers, inputs: Mapping[tuple[str, str], torch.Tensor]) -> dict[str, Any]:
    """One fold's Algorithm 1 on stacked inputs ``inputs[m, v]`` (N, 1, S, S): per-classifier p,
    per-modality p (eq. 7) and the fused p (eq. 8), each an array over the N breasts."""
    per_input = {(m, v): _malignant_probability(fold.classifiers[m, v], inputs[m, v])
                 for m in MODALITIES for v in VIEWS}
    p_mod = {m: fuse({v: per_input[m, v] for v in VIEWS}, fold.view_weights[m]) for m in MODALITIES}
    return {"per_input": per_input, "modality": p_mod, "p": fuse(p_mod, fold.modality_weights)}


def breast_setting(synthetic: Mapping[str, bool]) -> str:
    """The calibration setting of a breast: F+C when no CESM view was imputed, else F+Ĉ (module docstring)."""
    return SETTING_IMPUTED if any(synthetic.values()) else SETTING_ACQUIRED


def predict_breasts(pipeline: FusedPipeline, breasts: Sequence[BreastImages]) -> list[BreastPrediction]:
    """Algorithm 1 over every serving fold for a batch of breasts, calibrated, with the spread between
    folds and the conformal set (module docstring). Each classifier runs once over the batch."""
    if not breasts:
        return []
    size = pipeline.image_size
    checked = [
        BreastImages(
            ffdm={v: _check_image(b.ffdm.get(v), size, f"breast {i} FFDM {v}") if b.ffdm.get(v) is not None
                  else _missing_ffdm(i, v) for v in VIEWS},
            cesm={v: None if b.cesm.get(v) is None else _check_image(b.cesm[v], size, f"breast {i} CESM {v}")
                  for v in VIEWS},
        )
        for i, b in enumerate(breasts)
    ]
    cesm = _impute(pipeline, checked)
    inputs = {(m, v): torch.from_numpy(np.stack([b.ffdm[v] for b in checked] if m == "FFDM"
                                                else [c[v][0] for c in cesm]).astype(np.float32))[:, None]
              for m in MODALITIES for v in VIEWS}
    per_fold = [fold_probabilities(fold, inputs) for fold in pipeline.folds]
    synthetic = [{v: cesm[i][v][1] for v in VIEWS} for i in range(len(checked))]
    settings = [breast_setting(s) for s in synthetic]
    raw = np.vstack([f["p"] for f in per_fold])  # (folds, breasts)
    calibrated = np.empty_like(raw)
    for i, setting in enumerate(settings):
        # The calibrator was fitted on per-fold fused outputs: calibrate each fold's p, then average.
        calibrated[:, i] = calibrated_probability(raw[:, i], pipeline.calibration.entry(setting))
    p = calibrated.mean(axis=0)
    classes = classify(p)
    fold_ids = tuple(int(f.fold) for f in pipeline.folds)
    level = float(pipeline.calibration.conformal_level)
    return [
        BreastPrediction(
            p_ffdm=float(np.mean([f["modality"]["FFDM"][i] for f in per_fold])),
            p_cesm=float(np.mean([f["modality"]["CESM"][i] for f in per_fold])),
            p=float(p[i]), label=CLASS_NAMES[int(classes[i])], synthetic=synthetic[i],
            per_input={f"{m}_{v}": float(np.mean([f["per_input"][m, v][i] for f in per_fold]))
                       for m in MODALITIES for v in VIEWS},
            cesm_images={v: cesm[i][v][0] for v in VIEWS},
            p_uncalibrated=float(raw[:, i].mean()), p_folds=tuple(float(q) for q in calibrated[:, i]),
            folds=fold_ids, conformal_set=tuple(conformal_set(p[i], pipeline.calibration.entry(settings[i]))),
            conformal_level=level, setting=settings[i],
        )
        for i in range(len(checked))
    ]


def _missing_ffdm(breast: int, view: str) -> np.ndarray:
    raise PipelineInputError(f"breast {breast}: no FFDM {view} image; the pipeline needs FFDM CC and MLO")


def predict_breast(pipeline: FusedPipeline, ffdm_cc: np.ndarray, ffdm_mlo: np.ndarray,
                   cesm_cc: np.ndarray | None = None, cesm_mlo: np.ndarray | None = None) -> BreastPrediction:
    """Algorithm 1 for one breast, without MLflow: impute missing CESM, classify, fuse, decide."""
    breast = BreastImages(ffdm={"CC": ffdm_cc, "MLO": ffdm_mlo}, cesm={"CC": cesm_cc, "MLO": cesm_mlo})
    return predict_breasts(pipeline, [breast])[0]


def preprocess_dicom(ds: Any, laterality: str, size: int) -> np.ndarray:
    """Paper 4.1 on one DICOM dataset with the preprocess stage's own code: (size, size) in [0, 1]."""
    from virtual_biopsy.data.preprocess import preprocess_dataset

    return preprocess_dataset(ds, laterality, size)


# ---------------------------------------------------------------------------------------------
# Bundle: save / load without MLflow
# ---------------------------------------------------------------------------------------------
def save_bundle(pipeline: FusedPipeline, folder: str | Path) -> Path:
    """Write ``pipeline.pt`` (tensors and numbers only) and ``pipeline.json`` into ``folder``."""
    folder = Path(folder)
    record = {
        "format": BUNDLE_FORMAT, "arch": pipeline.arch, "image_size": int(pipeline.image_size),
        "generators": {v: {"ngf": int(g.ngf), "n_residual_blocks": int(g.n_residual_blocks),
                           "state_dict": g.state_dict()} for v, g in pipeline.generators.items()},
        "folds": [{"fold": int(f.fold),
                   "classifiers": {f"{m}_{v}": c.state_dict() for (m, v), c in f.classifiers.items()},
                   "view_weights": {m: {v: float(w) for v, w in ws.items()} for m, ws in f.view_weights.items()},
                   "modality_weights": {m: float(w) for m, w in f.modality_weights.items()}}
                  for f in pipeline.folds],
        "calibration_json": json.dumps(pipeline.calibration.to_json(), sort_keys=True, ensure_ascii=False),
        "info_json": json.dumps(pipeline.info, sort_keys=True, default=str),
    }
    write_torch(folder / BUNDLE_FILE, record)
    write_json(folder / BUNDLE_DESCRIPTION, describe(pipeline))
    return folder


def _key(record: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise BundleError(f"{where}: no key {key!r} (keys: {sorted(record)})")
    return record[key]


def load_bundle(folder: str | Path) -> FusedPipeline:
    """Rebuild the pipeline written by :func:`save_bundle` (CPU); BundleError naming the file and key
    when the bundle is of another format or lacks a part."""
    path = Path(folder) / BUNDLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fused-pipeline bundle here")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, Mapping):
        raise BundleError(f"{path}: not a fused-pipeline bundle (a {type(record).__name__}, not a record)")
    if record.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: bundle format {record.get('format')!r}, this code reads {BUNDLE_FORMAT} "
                          "(format 1 held one fold and no calibration): rerun the gate stage")
    arch = _key(record, "arch", str(path))
    generators = {}
    for view, g in _key(record, "generators", str(path)).items():
        generators[view] = ResnetGenerator(channels=1, ngf=int(g["ngf"]), n_residual_blocks=int(g["n_residual_blocks"]))
        generators[view].load_state_dict(g["state_dict"])
    folds = []
    for n, entry in enumerate(_key(record, "folds", str(path))):
        where = f"{path}: folds[{n}]"
        classifiers = {}
        for key, state in _key(entry, "classifiers", where).items():
            modality, view = key.split("_")
            classifiers[modality, view] = build_classifier(arch)
            classifiers[modality, view].load_state_dict(state)
        folds.append(FoldClassifiers(arch, int(_key(entry, "fold", where)), classifiers,
                                     _key(entry, "view_weights", where), _key(entry, "modality_weights", where)))
    calibration = calibration_from_json(json.loads(_key(record, "calibration_json", str(path))),
                                        f"{path}: calibration_json")
    return FusedPipeline(arch, int(_key(record, "image_size", str(path))), generators, folds, calibration,
                         json.loads(record.get("info_json", "{}")))


def describe(pipeline: FusedPipeline) -> dict[str, Any]:
    """What a human (or the registry's tags) should know about a pipeline: no tensors."""
    return {"arch": pipeline.arch, "image_size": pipeline.image_size, "serving": pipeline.serving,
            "folds": [{"fold": f.fold, "view_weights": f.view_weights, "modality_weights": f.modality_weights}
                      for f in pipeline.folds],
            "calibration": pipeline.calibration.to_json(), "info": pipeline.info,
            "input_columns": list(INPUT_COLUMNS), "output_columns": list(OUTPUT_COLUMNS),
            "image_encoding": "base64 of little-endian float32 (S, S) bytes, S = image_size"}


# ---------------------------------------------------------------------------------------------
# REST encoding of images
# ---------------------------------------------------------------------------------------------
def encode_image(image: np.ndarray) -> str:
    """base64 of the little-endian float32 bytes of a square image (the REST input format)."""
    return base64.b64encode(np.ascontiguousarray(image, dtype="<f4").tobytes()).decode("ascii")


def decode_image(value: Any, size: int, where: str) -> np.ndarray | None:
    """A REST cell back to an (size, size) float32 image; None/NaN/'' mean missing.

    Nested lists (``[[...], ...]``) are accepted too, for callers that build JSON by hand.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return np.asarray(value, dtype=np.float32)
    if not isinstance(value, (str, bytes)):
        raise PipelineInputError(f"{where}: expected a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PipelineInputError(f"{where}: not valid base64 ({exc})") from exc
    if len(raw) != 4 * size * size:
        raise PipelineInputError(f"{where}: {len(raw)} bytes, expected {4 * size * size} "
                                 f"(float32 {size} x {size}, the pipeline's image size)")
    return np.frombuffer(raw, dtype="<f4").reshape(size, size).astype(np.float32)


def check_columns(columns: Sequence[Any]) -> None:
    """A request's columns are exactly INPUT_COLUMNS, in any order; PipelineInputError otherwise.

    A mistyped column would otherwise be ignored and its image replaced by an imputed one, and
    a missing CESM column would be imputed without a word; a null *value* is how a caller asks
    for imputation.
    """
    names = [str(c) for c in columns]
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise PipelineInputError(f"column(s) {twice} given more than once; expected each of {list(INPUT_COLUMNS)} once")
    unknown = [c for c in names if c not in INPUT_COLUMNS]
    if unknown:
        described = []
        for column in unknown:
            guess = difflib.get_close_matches(column.lower(), INPUT_COLUMNS, n=1, cutoff=0.6)
            described.append(f"{column!r}" + (f" (did you mean {guess[0]!r}?)" if guess else ""))
        raise PipelineInputError(f"unknown column(s) {', '.join(described)}; the pipeline takes exactly "
                                 f"{list(INPUT_COLUMNS)} (null in a CESM column: imputed)")
    missing = [c for c in INPUT_COLUMNS if c not in names]
    if missing:
        raise PipelineInputError(f"input lacks column(s) {missing}; send all of {list(INPUT_COLUMNS)}, "
                                 f"with null for a CESM view that was not acquired (it is then imputed)")


def breasts_from_frame(frame: Any, size: int) -> list[BreastImages]:
    """One :class:`BreastImages` per DataFrame row (columns exactly INPUT_COLUMNS, see :func:`check_columns`)."""
    check_columns(list(frame.columns))
    breasts = []
    for i, (_, row) in enumerate(frame.iterrows()):
        cells = {c: decode_image(row.get(c), size, f"row {i} {c}") for c in INPUT_COLUMNS}
        breasts.append(BreastImages(ffdm={"CC": cells["ffdm_cc"], "MLO": cells["ffdm_mlo"]},
                                    cesm={"CC": cells["cesm_cc"], "MLO": cells["cesm_mlo"]}))
    return breasts


# ---------------------------------------------------------------------------------------------
# MLflow pyfunc
# ---------------------------------------------------------------------------------------------
try:  # the pyfunc class needs mlflow; predict_breast and the bundle do not
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover - exercised only where mlflow is absent
    _PythonModel = object


# No type hints on predict, on purpose: they would switch on MLflow's own input coercion, and the
# pyfunc checks its columns itself (MLflow says so in a UserWarning when the class is defined).
class FusedPipelineModel(_PythonModel):
    """MLflow pyfunc around :class:`FusedPipeline`: DataFrame of breasts in, OUTPUT_COLUMNS out
    (the calibrated ensemble p, the spread between folds, the conformal set, the imputed flags).

    Holds no state when pickled; :meth:`load_context` rebuilds the networks from the bundle
    artifact, so the logged model contains tensors as data and this class by reference.

    Bad input (an unknown or missing column, an image that is not base64 float32 of the
    pipeline's size, pixels outside [0, 1]) raises :func:`virtual_biopsy.mlops.scoring.bad_request`:
    ``mlflow models serve`` answers it with HTTP 400 whose ``message`` is the sentence of the
    :class:`PipelineInputError`, and no stack trace.
    """

    def load_context(self, context) -> None:
        self.pipeline = load_bundle(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            predictions = predict_breasts(self.pipeline, breasts_from_frame(frame, self.pipeline.image_size))
        except PipelineInputError as exc:
            from virtual_biopsy.mlops.scoring import bad_request

            raise bad_request(str(exc)) from exc
        return pd.DataFrame([p.as_row() for p in predictions], columns=list(OUTPUT_COLUMNS))


def pyfunc_signature():
    """Output: OUTPUT_COLUMNS (p = p_calibrated, the fold spread, the conformal set as "benign",
    "malignant" or "benign,malignant", its level, the calibration setting and the imputed flags).
    No input schema, on purpose: the pyfunc checks its own columns.

    With a column input schema MLflow's enforcement (mlflow.models.utils._enforce_schema) drops
    unknown columns with a log line only, so a mistyped ``cesm_MLO`` would reach the model as a
    missing CESM view and be imputed; and it answers a missing column with its own message that
    quotes the request. :func:`check_columns` refuses both naming the column; the logged input
    example documents the four columns.
    """
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    types = {"class": "string", "conformal_set": "string", "setting": "string", "n_folds": "long",
             "cesm_cc_synthetic": "boolean", "cesm_mlo_synthetic": "boolean", "imputed_cc": "boolean",
             "imputed_mlo": "boolean"}
    outputs = Schema([ColSpec(types.get(name, "double"), name) for name in OUTPUT_COLUMNS])
    return ModelSignature(inputs=None, outputs=outputs)


def input_example(image_size: int, seed: int = 0):
    """Two breasts: one with both real CESM views, one with none (both imputed)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    images = [encode_image(rng.random((image_size, image_size), dtype=np.float32)) for _ in range(6)]
    return pd.DataFrame({"ffdm_cc": [images[0], images[4]], "ffdm_mlo": [images[1], images[5]],
                         "cesm_cc": [images[2], None], "cesm_mlo": [images[3], None]})


def package_dir() -> Path:
    """The ``virtual_biopsy`` package folder, shipped with the model (``code_paths``)."""
    return Path(__file__).resolve().parents[1]


def pip_requirements() -> list[str]:
    """Explicit requirements (inference would reload the model in a subprocess: slow and guessy)."""
    import importlib.metadata as md

    names = ("torch", "torchvision", "numpy", "pandas", "pydicom", "pillow", "scipy", "pyyaml", "tqdm")
    out = []
    for name in names:
        try:
            out.append(f"{name}=={md.version(name).split('+')[0]}")
        except md.PackageNotFoundError:
            out.append(name)
    return out
