"""The fused virtual-biopsy pipeline (paper Algorithm 1) as one object and as an MLflow pyfunc.

What one pipeline holds (:class:`FusedPipeline`)
    the two view generators G_CC, G_MLO (FFDM -> CESM), the four classifiers f_{m,v}
    (m in FFDM, CESM; v in CC, MLO) of one architecture, the eq. 7 weights per modality and the
    eq. 8 weights over modalities, and the image size its networks were trained at.

Which fold serves
    Cross-validation trains every network once per fold. The pipeline that serves is the **fold
    with the best validation MCC of the fused output p** (F+C, real validation CESM), with that
    fold's four classifiers and that fold's fusion weights, so weights and classifiers always
    belong together. Choosing on validation (never test) keeps the reported test metrics an
    unbiased estimate for the served model. The generators are each view's *serving* generator
    (``generator.serving_policy``, registered as ``cesm-generator-<view>``): for a new patient any
    generator is out of sample, and the registry then holds one generator per view, not two.
    Averaging all folds would cost five times the latency for a gain the paper does not measure.

Algorithm 1 (:func:`predict_breasts`)
    per view: use the real CESM image when given, else impute G_v(FFDM_v) (flagged synthetic);
    p_{m,v} = f_{m,v}(X_{m,v}); p_m = eq. 7 over views; p = eq. 8 over modalities;
    class = malignant when p >= 0.5. The arithmetic is that of the stages: ``generate`` and
    ``predict_proba`` (training), ``fuse`` (fusion), ``classify`` (metrics).

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
    code) plus ``pipeline.json`` describing it for humans.
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
from virtual_biopsy.evaluation.metrics import classify
from virtual_biopsy.models.classifiers import build_classifier
from virtual_biopsy.models.cyclegan import ResnetGenerator
from virtual_biopsy.models.fusion import fuse
from virtual_biopsy.training.classifier_trainer import predict_proba
from virtual_biopsy.training.generator_trainer import generate

BUNDLE_FORMAT = 1
BUNDLE_FILE = "pipeline.pt"
BUNDLE_DESCRIPTION = "pipeline.json"
BUNDLE_ARTIFACT = "bundle"
INPUT_COLUMNS = ("ffdm_cc", "ffdm_mlo", "cesm_cc", "cesm_mlo")
OUTPUT_COLUMNS = ("p_ffdm", "p_cesm", "p", "class", "cesm_cc_synthetic", "cesm_mlo_synthetic")
CLASS_NAMES = {1: "malignant", 0: "benign"}
RANGE_TOLERANCE = 1e-3  # resizing rounding may put a preprocessed pixel a hair outside [0, 1]


class PipelineInputError(ValueError):
    """An input image cannot go through the pipeline; the message names the breast and image."""


def registered_name(arch: str) -> str:
    """Registered model name of the fused pipeline of one architecture: ``virtual-biopsy-<arch>``."""
    from virtual_biopsy.mlops.registry import pipeline_model_name

    return pipeline_model_name(arch)


# ---------------------------------------------------------------------------------------------
# The pipeline object
# ---------------------------------------------------------------------------------------------
@dataclass
class FusedPipeline:
    """Networks and weights of one fused pipeline (module docstring). Networks are in eval mode.

    ``view_weights[m][v]`` are eq. 7 weights, ``modality_weights[m]`` eq. 8 weights, as
    ``fusion.fusion_weights`` makes them (>= 0, fallback already applied). ``info`` records
    provenance (serving fold, validation MCCs, generator folds, data version ...).
    """

    arch: str
    image_size: int
    generators: dict[str, nn.Module]
    classifiers: dict[tuple[str, str], nn.Module]
    view_weights: dict[str, dict[str, float]]
    modality_weights: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [v for v in VIEWS if v not in self.generators]
        missing += [f"{m}_{v}" for m in MODALITIES for v in VIEWS if (m, v) not in self.classifiers]
        if missing:
            raise ValueError(f"a fused pipeline needs every generator and classifier; missing {missing}")
        for net in (*self.generators.values(), *self.classifiers.values()):
            net.eval()


@dataclass(frozen=True)
class BreastImages:
    """One breast's preprocessed images; a CESM view that is None is imputed."""

    ffdm: Mapping[str, np.ndarray]
    cesm: Mapping[str, np.ndarray | None]


@dataclass(frozen=True)
class BreastPrediction:
    """Algorithm 1's output for one breast, with what it was computed from."""

    p_ffdm: float
    p_cesm: float
    p: float
    label: str
    synthetic: dict[str, bool]
    per_input: dict[str, float]
    cesm_images: dict[str, np.ndarray]

    def as_row(self) -> dict[str, Any]:
        """The pyfunc's output row (OUTPUT_COLUMNS)."""
        return {"p_ffdm": self.p_ffdm, "p_cesm": self.p_cesm, "p": self.p, "class": self.label,
                **{f"cesm_{v.lower()}_synthetic": self.synthetic[v] for v in VIEWS}}


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
            synthetic = generate(pipeline.generators[view], np.stack([breasts[i].ffdm[view] for i in missing]))
            for i, image in zip(missing, synthetic):
                out[i][view] = (image, True)
    return out


def predict_breasts(pipeline: FusedPipeline, breasts: Sequence[BreastImages]) -> list[BreastPrediction]:
    """Algorithm 1 for a batch of breasts (each classifier runs once over the batch)."""
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
    probabilities: dict[tuple[str, str], np.ndarray] = {}
    for modality in MODALITIES:
        for view in VIEWS:
            images = np.stack([b.ffdm[view] for b in checked] if modality == "FFDM" else [c[view][0] for c in cesm])
            probabilities[modality, view] = predict_proba(pipeline.classifiers[modality, view], images,
                                                          np.arange(len(images)))
    p_mod = {m: fuse({v: probabilities[m, v] for v in VIEWS}, pipeline.view_weights[m]) for m in MODALITIES}
    p = fuse(p_mod, pipeline.modality_weights)
    classes = classify(p)
    return [
        BreastPrediction(
            p_ffdm=float(p_mod["FFDM"][i]), p_cesm=float(p_mod["CESM"][i]), p=float(p[i]),
            label=CLASS_NAMES[int(classes[i])], synthetic={v: cesm[i][v][1] for v in VIEWS},
            per_input={f"{m}_{v}": float(probabilities[m, v][i]) for m in MODALITIES for v in VIEWS},
            cesm_images={v: cesm[i][v][0] for v in VIEWS},
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
        "classifiers": {f"{m}_{v}": c.state_dict() for (m, v), c in pipeline.classifiers.items()},
        "view_weights": {m: {v: float(w) for v, w in ws.items()} for m, ws in pipeline.view_weights.items()},
        "modality_weights": {m: float(w) for m, w in pipeline.modality_weights.items()},
        "info_json": json.dumps(pipeline.info, sort_keys=True, default=str),
    }
    write_torch(folder / BUNDLE_FILE, record)
    write_json(folder / BUNDLE_DESCRIPTION, describe(pipeline))
    return folder


def load_bundle(folder: str | Path) -> FusedPipeline:
    """Rebuild the pipeline written by :func:`save_bundle` (CPU)."""
    path = Path(folder) / BUNDLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fused-pipeline bundle here")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if record.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: bundle format {record.get('format')!r}, this code reads {BUNDLE_FORMAT}")
    generators = {}
    for view, g in record["generators"].items():
        generators[view] = ResnetGenerator(channels=1, ngf=int(g["ngf"]), n_residual_blocks=int(g["n_residual_blocks"]))
        generators[view].load_state_dict(g["state_dict"])
    classifiers = {}
    for key, state in record["classifiers"].items():
        modality, view = key.split("_")
        classifiers[modality, view] = build_classifier(record["arch"])
        classifiers[modality, view].load_state_dict(state)
    return FusedPipeline(record["arch"], int(record["image_size"]), generators, classifiers,
                         record["view_weights"], record["modality_weights"], json.loads(record["info_json"]))


def describe(pipeline: FusedPipeline) -> dict[str, Any]:
    """What a human (or the registry's tags) should know about a pipeline: no tensors."""
    return {"arch": pipeline.arch, "image_size": pipeline.image_size, "view_weights": pipeline.view_weights,
            "modality_weights": pipeline.modality_weights, "info": pipeline.info,
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
    """MLflow pyfunc around :class:`FusedPipeline`: DataFrame of breasts in, OUTPUT_COLUMNS out.

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
    """Output: OUTPUT_COLUMNS. No input schema, on purpose: the pyfunc checks its own columns.

    With a column input schema MLflow's enforcement (mlflow.models.utils._enforce_schema) drops
    unknown columns with a log line only, so a mistyped ``cesm_MLO`` would reach the model as a
    missing CESM view and be imputed; and it answers a missing column with its own message that
    quotes the request. :func:`check_columns` refuses both naming the column; the logged input
    example documents the four columns.
    """
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    outputs = Schema([ColSpec("double", "p_ffdm"), ColSpec("double", "p_cesm"), ColSpec("double", "p"),
                      ColSpec("string", "class"), ColSpec("boolean", "cesm_cc_synthetic"),
                      ColSpec("boolean", "cesm_mlo_synthetic")])
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
