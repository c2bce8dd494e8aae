"""Configuration: frozen dataclasses read from params.yaml.

Every stage receives the section it needs, never the raw dict, so a typo in params.yaml is an
error that names the key instead of a silently ignored setting. Defaults here equal the default
profile in params.yaml; a section missing from params.yaml takes them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VIEWS = ("CC", "MLO")
MODALITIES = ("FFDM", "CESM")
LATERALITIES = ("L", "R")
PHASES = ("early", "late")
LABELS = ("malignant", "benign", "none")
ACR_CATEGORIES = ("a", "b", "c", "d")
ARCHITECTURES = ("resnet18", "resnet50", "vgg16")


class ConfigError(ValueError):
    """params.yaml (or a profile) holds a key or value the pipeline cannot use."""


@dataclass(frozen=True)
class SynthConfig:
    patients: int = 120
    image_height: int = 320
    aspect_ratio: float = 0.84
    lesion_share: float = 0.52
    malignant_share: float = 0.72
    late_phase_share: float = 0.43
    acr_mix: tuple[float, ...] = (0.07, 0.39, 0.40, 0.14)
    acr_missing_share: float = 0.20
    le_lesion_contrast: float = 0.06
    le_uptake_coupling: float = 3.0
    des_glandular_suppression: float = 0.85
    bpe_strength: float = 0.25
    malignant_enhancement: float = 0.55
    benign_enhancement: float = 0.30
    enhancement_spread: float = 0.20
    noise_sd: float = 0.015


@dataclass(frozen=True)
class IngestConfig:
    raw_dir: str = "data/raw"
    max_rejected_share: float = 0.05
    require_pairs: bool = True
    pseudonym_salt: str = "virtual-biopsy-demo"
    workers: int = 2


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 64
    workers: int = 2


@dataclass(frozen=True)
class ValidateDataConfig:
    image_mean_range: tuple[float, float] = (0.02, 0.80)
    image_std_range: tuple[float, float] = (0.02, 0.50)
    age_range: tuple[int, int] = (18, 110)
    malignant_share_range: tuple[float, float] = (0.50, 0.90)
    min_patients: int = 20
    max_patients: int = 100000


@dataclass(frozen=True)
class SplitConfig:
    folds: int = 5
    val_share: float = 0.10
    test_share: float = 0.10


@dataclass(frozen=True)
class GeneratorConfig:
    views: tuple[str, ...] = VIEWS
    ngf: int = 8
    ndf: int = 8
    n_residual_blocks: int = 2
    epochs: int = 18
    warmup_epochs: int = 10
    patience: int = 6
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-5
    beta1: float = 0.5
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.0  # paper: 5 (profiles/paper.yaml)
    lambda_paired: float = 10.0
    augment: bool = True
    sample_every: int = 4
    serving_policy: str = "best_fold"
    pretrained_weights: str | None = None
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N


@dataclass(frozen=True)
class ClassifierConfig:
    architectures: tuple[str, ...] = ("resnet18",)
    modalities: tuple[str, ...] = MODALITIES
    views: tuple[str, ...] = VIEWS
    epochs: int = 12
    warmup_epochs: int = 4
    patience: int = 4
    lr_patience: int = 2
    lr_factor: float = 0.1
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-5
    augment: bool = True
    augment_strength: float = 1.0  # scales the affine ranges (0 = none, 1 = paper's); tuned by vbiopsy tune
    weights_file: str | None = None
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N


@dataclass(frozen=True)
class EvaluateConfig:
    robustness_shares: tuple[int, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    robustness_draws: int = 10


@dataclass(frozen=True)
class GateConfig:
    floors: dict[str, dict[str, float]] = field(default_factory=dict)
    imputation_tolerance: float = 0.02
    champion_tolerance: float = 0.02
    generator_floors: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TuneConfig:
    trials: int = 20
    metric: str = "mcc"
    storage: str = "sqlite:///optuna.db"
    space: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Params:
    seed: int = 20251125
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    validate_data: ValidateDataConfig = ValidateDataConfig()
    split: SplitConfig = SplitConfig()
    generator: GeneratorConfig = GeneratorConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    tune: TuneConfig = TuneConfig()


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a YAML value into the annotated type (lists become tuples, sections dataclasses)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | globals())  # resolve postponed annotations
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    kwargs = {name: _coerce(raw[name], hints[name], f"{where}.{name}" if where else name) for name in raw}
    return cls(**kwargs)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Validate a params mapping (as read from YAML) into :class:`Params`."""
    params = _build(Params, raw, "")
    _check_values(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml into frozen dataclasses; errors name the file and the key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    try:
        return params_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _check_values(p: Params) -> None:
    def bad(key: str, why: str) -> None:
        raise ConfigError(f"{key}: {why}")

    if p.preprocess.image_size < 16:
        bad("preprocess.image_size", f"must be at least 16 pixels, got {p.preprocess.image_size}")
    if p.split.folds < 2:
        bad("split.folds", f"needs at least 2 folds, got {p.split.folds}")
    if not 0 < p.split.val_share < 1 or not 0 < p.split.test_share < 1:
        bad("split", "val_share and test_share must lie in (0, 1)")
    for arch in p.classifier.architectures:
        if arch not in ARCHITECTURES:
            bad("classifier.architectures", f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    for view in (*p.classifier.views, *p.generator.views):
        if view not in VIEWS:
            bad("views", f"unknown view {view!r}; choose from {VIEWS}")
    for modality in p.classifier.modalities:
        if modality not in MODALITIES:
            bad("classifier.modalities", f"unknown modality {modality!r}; choose from {MODALITIES}")
    if p.generator.serving_policy not in ("best_fold", "refit"):
        bad("generator.serving_policy", f"must be best_fold or refit, got {p.generator.serving_policy!r}")
    if len(p.synth.acr_mix) != 4 or abs(sum(p.synth.acr_mix) - 1) > 1e-6:
        bad("synth.acr_mix", f"needs four shares (a, b, c, d) summing to 1, got {p.synth.acr_mix}")
    if p.tune.metric not in ("mcc", "auc"):
        bad("tune.metric", f"must be mcc or auc, got {p.tune.metric!r}")
    for section in ("generator", "classifier"):
        device = getattr(p, section).device
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            bad(f"{section}.device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")


def params_hash(params: Params) -> str:
    """Stable short hash of the effective parameters (tags runs so like compares with like)."""
    blob = json.dumps(dataclasses.asdict(params), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (nested) dataclass into dotted keys, as MLflow params want them."""
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(params).items() if dataclasses.is_dataclass(params) else params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
