"""Configuration: frozen dataclasses read from params.yaml.

Every stage receives the section it needs, never the raw dict, so a typo in params.yaml is an
error that names the key instead of a silently ignored setting. Defaults here equal the default
profile in params.yaml; a section missing from params.yaml takes them.

Validation (:func:`params_from_dict`) refuses, with a :class:`ConfigError` naming the key, the
value and the rule, every value the pipeline cannot use: counts such as epochs, batch sizes,
folds and workers below 1, learning rates that are not > 0, negative weight decays, loss weights
or patience, shares outside their interval, image sizes the networks cannot take, ranges whose
low end exceeds the high end. Numbers may be written as YAML 1.2 reads them: ``1e-3`` is a float
(PyYAML, a YAML 1.1 reader, would otherwise hand the stage the string ``"1e-3"``).

``split.test_share`` is not a free knob: every patient is tested exactly once, in one of the
``split.folds`` folds, so the test share *is* 1 / folds. Left out or null it takes that value;
a value that disagrees with the fold count is refused rather than silently ignored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
EXECUTOR_KINDS = ("local", "ray")
PRETRAINED_VIEW_PLACEHOLDER = "{view}"  # generator.pretrained_weights: filled in per view


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
    # Realised test share: 1 / folds (each patient is tested once). None (the default) takes that
    # value; params validation refuses any other (module docstring).
    test_share: float | None = None

    def __post_init__(self) -> None:
        if self.test_share is None and isinstance(self.folds, int) and self.folds > 0:
            object.__setattr__(self, "test_share", 1 / self.folds)


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
    # Training steps per epoch at most (None: the whole training set). Only for smoke runs such as
    # `make paper-smoke`, which must exercise the paper's sizes in minutes, not learn anything.
    max_steps_per_epoch: int | None = None
    serving_policy: str = "best_fold"
    # Initial weights (paper 5.2.1: pre-trained, then fine-tuned): a local weights file, relative
    # to the project root; "{view}" is replaced by the view (CC, MLO). None: from scratch. The one
    # default that differs from params.yaml (models/pretrain/{view}.pt, the pretrain_generator
    # stage's output): a config built in code has no pipeline whose pre-training it could load.
    pretrained_weights: str | None = None
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N

    def for_view(self, view: str, root: str | Path | None = None) -> GeneratorConfig:
        """This section for one view: ``pretrained_weights`` with ``{view}`` filled in and, given
        ``root``, made absolute (a relative path is relative to the project root)."""
        if self.pretrained_weights is None:
            return self
        path = Path(self.pretrained_weights.replace(PRETRAINED_VIEW_PLACEHOLDER, view))
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        return dataclasses.replace(self, pretrained_weights=str(path))


@dataclass(frozen=True)
class PretrainCohortConfig:
    """The second simulated cohort, written in the CDD-CESM release's layout (data/cdd_cesm_cohort.py).

    Another cohort, not another simulator: anatomy and contrast physics are the frozen ``synth``
    defaults; what differs is the patients (own seed and size) and the scanner's look.
    """

    patients: int = 40
    seed: int = 20220301
    image_height: int = 160          # JPEG rows (the release's JPEGs: about 2000-3000); columns follow synth.aspect_ratio
    noise_sd: float = 0.03           # quantum noise, fraction of full scale (embedded dataset: 0.015)
    le_gamma: float = 0.7            # display gamma of the LE JPEGs (< 1 brightens the tissue)
    des_contrast: float = 1.4        # gain of the DES JPEGs around the unenhanced breast level
    jpeg_quality: int = 85           # the JPEG encoder's quality (1-95)


@dataclass(frozen=True)
class PretrainConfig:
    """Pre-training of one CycleGAN per view on a second dataset before fine-tuning (paper 5.2.1).

    Network sizes, loss weights and batch size are the generator section's (the weights must fit
    train_generator); the epoch budget and learning rate are this section's
    (training.pretraining.pretraining_config).
    """

    release_dir: str = "data/external/cdd-cesm"   # the CDD-CESM release folder import_pretrain reads
    cohort: PretrainCohortConfig = PretrainCohortConfig()
    epochs: int = 10
    warmup_epochs: int = 4
    patience: int = 3
    lr: float = 2e-3
    val_share: float = 0.2           # share of the pre-training patients held out for early stopping


@dataclass(frozen=True)
class RayExecutorConfig:
    """Where and with what share of a machine a fold job runs on a Ray cluster."""

    address: str | None = None     # None: RAY_ADDRESS, else a local cluster started by the stage
    gpus_per_job: float = 0.0      # Ray num_gpus of one job; a fraction packs several jobs on one GPU
    max_retries: int = 3           # re-runs of a job whose worker died (it resumes from its checkpoint)


@dataclass(frozen=True)
class ExecutorConfig:
    """How a training stage runs its fold jobs (training.executor). Execution only: the results are
    the same whatever is chosen, so no stage depends on this section (dvc.yaml, params_hash)."""

    kind: str = "local"            # local | ray
    # Jobs at once (local). 1 (one after another, in the stage's process) differs from params.yaml's 2:
    # a config built in code (a test, a notebook) trains where it is called.
    workers: int = 1
    cpus_per_job: int = 1          # torch threads of one job (and its Ray num_cpus)
    ray: RayExecutorConfig = RayExecutorConfig()


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
    max_steps_per_epoch: int | None = None  # as GeneratorConfig's: smoke runs only
    weights_file: str | None = None
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N


@dataclass(frozen=True)
class EvaluateConfig:
    robustness_shares: tuple[int, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    robustness_draws: int = 10
    bootstrap_resamples: int = 2000  # patient resamples of the paired AUC intervals and the weight MCC intervals
    min_weight_lesions: int = 10     # validation lesions per class below which a fusion weight is warned about
    conformal_level: float = 0.90    # nominal coverage of the served conformal prediction sets
    calibration_bins: int = 10       # equal-width bins of ECE and the reliability diagrams


@dataclass(frozen=True)
class GateConfig:
    floors: dict[str, dict[str, float]] = field(default_factory=dict)
    imputation_tolerance: float = 0.02
    champion_tolerance: float = 0.02
    generator_floors: dict[str, float] = field(default_factory=dict)
    # Which classifiers the registered pipeline serves (issue #16): every fold's, each fused with its
    # own weights and averaged (ensemble), or the one fold with the best validation MCC (best_fold).
    serving: str = "ensemble"


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
    pretrain: PretrainConfig = PretrainConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    tune: TuneConfig = TuneConfig()
    executor: ExecutorConfig = ExecutorConfig()


# YAML 1.2 reads 1e-3, 1E5 and 1.0e3 as floats; PyYAML (YAML 1.1) only when the mantissa has a dot
# and the exponent a sign, so users' `lr: 1e-3` would arrive as the string "1e-3".
_EXPONENT_FLOAT = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+")


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also resolves YAML 1.2 exponent floats (``1e-3``) to floats."""


_ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(rf"^{_EXPONENT_FLOAT.pattern}$"),
                                    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """Parse params-style YAML: :func:`yaml.safe_load` plus ``1e-3``-style floats."""
    return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass


def _number(value: Any, where: str) -> float:
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value.strip().replace("_", ""))  # "1e-3" from a YAML 1.1 reader (module docstring)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


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
        if not args or (len(args) == 2 and args[1] is Ellipsis):  # any length, one item type
            item_types = [args[0] if args else Any] * len(value)
        else:  # fixed length, e.g. a (low, high) range
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {list(value)!r}")
            item_types = list(args)
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, value_type = typing.get_args(annotation) or (Any, Any)
        return {str(k): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if annotation is float:
        return _number(value, where)
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
        raw = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    try:
        return params_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Value rules: each failure names the key, the rule and the value
# ---------------------------------------------------------------------------------------------
MIN_IMAGE_SIZE = 16          # preprocess.image_size: ResNet's stem and the CycleGAN's downsampling
MAX_IMAGE_SIZE = 4096
IMAGE_SIZE_MULTIPLE = 4      # the CycleGAN generator downsamples twice by 2 (models/cyclegan.py)
VGG_MIN_IMAGE_SIZE = 32      # VGG16's five max-pools leave nothing of a smaller image
MIN_RAW_HEIGHT = 48          # synth.image_height: the phantom's smallest detector (data/synthetic.py)
MAX_RAW_HEIGHT = 8192
TEST_SHARE_TOLERANCE = 0.005  # so that 0.33 is accepted for 3 folds
METRIC_RANGES = {"auc": (0.0, 1.0), "gmean": (0.0, 1.0), "mcc": (-1.0, 1.0), "ssim": (-1.0, 1.0),
                 "psnr": (0.0, math.inf)}


def _fail(key: str, why: str) -> None:
    raise ConfigError(f"{key}: {why}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        _fail(key, f"must be at least {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        _fail(key, f"must be greater than 0, got {value}")


def _within(key: str, value: float, low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> None:
    above = low < value if open_low else low <= value
    below = value < high if open_high else value <= high
    if not (above and below):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        _fail(key, f"must lie in {interval}, got {value}")


def _range(key: str, values: tuple[float, float], low: float = -math.inf, high: float = math.inf) -> None:
    first, last = values
    if first > last:
        _fail(key, f"low end {first} is above high end {last}")
    if first < low or last > high:
        _fail(key, f"must lie within [{low:g}, {high:g}], got {list(values)}")


def _choices(key: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    if not values:
        _fail(key, f"must list at least one of {allowed}")
    for value in values:
        if value not in allowed:
            _fail(key, f"unknown value {value!r}; choose from {allowed}")
        if values.count(value) > 1:
            _fail(key, f"lists {value!r} twice")


def _not_empty(key: str, value: str) -> None:
    if not value.strip():
        _fail(key, "must not be empty")


def _check_values(p: Params) -> None:
    _at_least("seed", p.seed, 0)

    s = p.synth
    _at_least("synth.patients", s.patients, 1)
    _within("synth.image_height", s.image_height, MIN_RAW_HEIGHT, MAX_RAW_HEIGHT)
    _within("synth.aspect_ratio", s.aspect_ratio, 0.3, 2.0)
    for name in ("lesion_share", "malignant_share", "late_phase_share", "acr_missing_share",
                 "des_glandular_suppression"):
        _within(f"synth.{name}", getattr(s, name), 0.0, 1.0)
    for name in ("le_lesion_contrast", "le_uptake_coupling", "bpe_strength", "malignant_enhancement",
                 "benign_enhancement", "enhancement_spread", "noise_sd"):
        _at_least(f"synth.{name}", getattr(s, name), 0)
    if len(s.acr_mix) != 4 or min(s.acr_mix) < 0 or abs(sum(s.acr_mix) - 1) > 1e-6:
        _fail("synth.acr_mix", f"needs four shares >= 0 (a, b, c, d) summing to 1, got {list(s.acr_mix)}")

    _not_empty("ingest.raw_dir", p.ingest.raw_dir)
    _within("ingest.max_rejected_share", p.ingest.max_rejected_share, 0.0, 1.0)
    _not_empty("ingest.pseudonym_salt", p.ingest.pseudonym_salt)
    _at_least("ingest.workers", p.ingest.workers, 1)

    size = p.preprocess.image_size
    _within("preprocess.image_size", size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    if size % IMAGE_SIZE_MULTIPLE:
        _fail("preprocess.image_size", f"must be a multiple of {IMAGE_SIZE_MULTIPLE} (the CycleGAN generator "
                                       f"halves it twice), got {size}")
    _at_least("preprocess.workers", p.preprocess.workers, 1)

    v = p.validate_data
    _range("validate_data.image_mean_range", v.image_mean_range, 0.0, 1.0)
    _range("validate_data.image_std_range", v.image_std_range, 0.0, 1.0)
    _range("validate_data.age_range", v.age_range, 0)
    _range("validate_data.malignant_share_range", v.malignant_share_range, 0.0, 1.0)
    _at_least("validate_data.min_patients", v.min_patients, 1)
    _at_least("validate_data.max_patients", v.max_patients, v.min_patients)

    sp = p.split
    _at_least("split.folds", sp.folds, 2)
    _within("split.val_share", sp.val_share, 0.0, 1.0, open_low=True, open_high=True)
    fold_share = 1 / sp.folds
    if sp.val_share + fold_share >= 1:
        _fail("split.val_share", f"{sp.val_share} plus the test share 1/{sp.folds} = {fold_share:.3g} leaves no "
                                 f"patient to train on; keep it below {1 - fold_share:.3g}")
    if sp.test_share is not None and abs(sp.test_share - fold_share) > TEST_SHARE_TOLERANCE:
        _fail("split.test_share", f"must equal 1/split.folds = {fold_share:.3g} (each patient is tested once, in "
                                  f"one of {sp.folds} folds), got {sp.test_share}; change split.folds instead, "
                                  f"or leave test_share out")

    g = p.generator
    _choices("generator.views", g.views, VIEWS)
    for name in ("ngf", "ndf", "n_residual_blocks", "epochs", "patience", "batch_size"):
        _at_least(f"generator.{name}", getattr(g, name), 1)
    _at_least("generator.warmup_epochs", g.warmup_epochs, 0)
    _positive("generator.lr", g.lr)
    _at_least("generator.weight_decay", g.weight_decay, 0)
    _within("generator.beta1", g.beta1, 0.0, 1.0, open_high=True)
    for name in ("lambda_cycle", "lambda_identity", "lambda_paired"):
        _at_least(f"generator.{name}", getattr(g, name), 0)
    _at_least("generator.sample_every", g.sample_every, 0)  # 0: no sample grids
    if g.serving_policy not in ("best_fold", "refit"):
        _fail("generator.serving_policy", f"must be best_fold or refit, got {g.serving_policy!r}")
    if g.pretrained_weights is not None:
        _not_empty("generator.pretrained_weights", g.pretrained_weights)
    if g.max_steps_per_epoch is not None:
        _at_least("generator.max_steps_per_epoch", g.max_steps_per_epoch, 1)

    pt = p.pretrain
    _not_empty("pretrain.release_dir", pt.release_dir)
    for name in ("epochs", "patience"):
        _at_least(f"pretrain.{name}", getattr(pt, name), 1)
    _at_least("pretrain.warmup_epochs", pt.warmup_epochs, 0)
    _positive("pretrain.lr", pt.lr)
    _within("pretrain.val_share", pt.val_share, 0.0, 1.0, open_low=True, open_high=True)
    pc = pt.cohort
    _at_least("pretrain.cohort.patients", pc.patients, 2)  # one to train on, one to early-stop on
    _at_least("pretrain.cohort.seed", pc.seed, 0)
    _within("pretrain.cohort.image_height", pc.image_height, MIN_RAW_HEIGHT, MAX_RAW_HEIGHT)
    _at_least("pretrain.cohort.noise_sd", pc.noise_sd, 0)
    _positive("pretrain.cohort.le_gamma", pc.le_gamma)
    _positive("pretrain.cohort.des_contrast", pc.des_contrast)
    _within("pretrain.cohort.jpeg_quality", pc.jpeg_quality, 1, 95)

    c = p.classifier
    _choices("classifier.architectures", c.architectures, ARCHITECTURES)
    if "vgg16" in c.architectures and size < VGG_MIN_IMAGE_SIZE:
        _fail("classifier.architectures", f"vgg16 needs preprocess.image_size of at least {VGG_MIN_IMAGE_SIZE}, "
                                          f"got {size}")
    _choices("classifier.modalities", c.modalities, MODALITIES)
    _choices("classifier.views", c.views, VIEWS)
    for name in ("epochs", "patience", "batch_size"):
        _at_least(f"classifier.{name}", getattr(c, name), 1)
    for name in ("warmup_epochs", "lr_patience"):
        _at_least(f"classifier.{name}", getattr(c, name), 0)
    _within("classifier.lr_factor", c.lr_factor, 0.0, 1.0, open_low=True, open_high=True)
    _positive("classifier.lr", c.lr)
    _at_least("classifier.weight_decay", c.weight_decay, 0)
    _within("classifier.augment_strength", c.augment_strength, 0.0, 1.0)
    if c.max_steps_per_epoch is not None:
        _at_least("classifier.max_steps_per_epoch", c.max_steps_per_epoch, 1)

    for section in ("generator", "classifier"):
        device = getattr(p, section).device
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            _fail(f"{section}.device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")

    if not p.evaluate.robustness_shares:
        _fail("evaluate.robustness_shares", "must list at least one share (percent of CESM imputed)")
    for i, share in enumerate(p.evaluate.robustness_shares):
        _within(f"evaluate.robustness_shares[{i}]", share, 0, 100)
    _at_least("evaluate.robustness_draws", p.evaluate.robustness_draws, 1)
    _at_least("evaluate.bootstrap_resamples", p.evaluate.bootstrap_resamples, 100)
    _at_least("evaluate.min_weight_lesions", p.evaluate.min_weight_lesions, 1)
    if not 0 < p.evaluate.conformal_level < 1:
        _fail("evaluate.conformal_level", f"must lie strictly between 0 and 1, got {p.evaluate.conformal_level}")
    _at_least("evaluate.calibration_bins", p.evaluate.calibration_bins, 2)

    gate = p.gate
    for setting, floors in gate.floors.items():
        for metric, floor in floors.items():
            low, high = METRIC_RANGES.get(metric, (-math.inf, math.inf))
            _within(f"gate.floors.{setting}.{metric}", floor, low, high)
    for metric, floor in gate.generator_floors.items():
        low, high = METRIC_RANGES.get(metric, (-math.inf, math.inf))
        _within(f"gate.generator_floors.{metric}", floor, low, high)
    _within("gate.imputation_tolerance", gate.imputation_tolerance, 0.0, 1.0)
    _within("gate.champion_tolerance", gate.champion_tolerance, 0.0, 1.0)
    if gate.serving not in ("ensemble", "best_fold"):
        _fail("gate.serving", f"must be ensemble or best_fold, got {gate.serving!r}")

    ex = p.executor
    if ex.kind not in EXECUTOR_KINDS:
        _fail("executor.kind", f"must be one of {', '.join(EXECUTOR_KINDS)}, got {ex.kind!r}")
    _at_least("executor.workers", ex.workers, 1)
    _at_least("executor.cpus_per_job", ex.cpus_per_job, 1)
    _at_least("executor.ray.gpus_per_job", ex.ray.gpus_per_job, 0)
    _at_least("executor.ray.max_retries", ex.ray.max_retries, 0)

    _at_least("tune.trials", p.tune.trials, 1)
    if p.tune.metric not in ("mcc", "auc"):
        _fail("tune.metric", f"must be mcc or auc, got {p.tune.metric!r}")
    _not_empty("tune.storage", p.tune.storage)
    # tune.space (ranges and choices of the searched classifier keys) is checked by
    # virtual_biopsy.tuning.study.check_space before a study starts.


def params_hash(params: Params) -> str:
    """Stable short hash of the effective parameters (tags runs so like compares with like)."""
    # Without the executor section: where the fold jobs ran does not change what they computed.
    blob = json.dumps({k: v for k, v in dataclasses.asdict(params).items() if k != "executor"},
                      sort_keys=True, default=str)
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
