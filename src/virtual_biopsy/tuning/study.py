"""`vbiopsy tune`: an Optuna search over one classifier's hyperparameters, tracked in MLflow.

    vbiopsy tune [--arch resnet18 --modality CESM --view CC] [--trials 20] [--metric mcc|auc]
                 [--storage sqlite:///optuna.db | postgresql+psycopg2://...] [--folds K] [--apply]

What is searched
    ``tune.space`` in params.yaml, keys of the ``classifier`` section: ``lr``, ``weight_decay``
    (``{low, high, log}`` floats), ``batch_size`` (a list: categorical) and ``augment_strength``
    (the AffineAugment scale, 0 = no augmentation). Everything else comes from params.yaml.

What is maximised
    The *validation* MCC or AUC (lesion level, as the train_classifier stage scores it) of the
    best-epoch model, averaged over the folds of data/splits/folds.csv. Only train and val
    patients are ever selected (:func:`tuning_folds`): the pixels of test patients are never
    read, so tuning cannot overfit the test set that the evaluate stage reports.

Pruning
    After every epoch the trial reports the fold's validation metric at step
    ``fold_position * epochs + epoch`` (steps line up across trials); Optuna's MedianPruner
    stops trials whose best value so far is below the median of completed trials at that step.
    A trial whose loss diverges (NaN) is pruned too, with the user attribute ``diverged``.

Tracking
    One MLflow run per study (stage ``tune``, under the pipeline's parent run) and one nested run
    ``trial-<n>`` per trial with its params, per-step validation metric and losses, and its
    final value; pruned trials carry the tag ``optuna_state=PRUNED``.

Sharing a study
    The study lives in ``--storage`` (default ``tune.storage``: SQLite). Any number of worker
    processes or machines given the same storage and study name work on one study: each runs
    ``--trials`` trials, trial numbers are assigned by the database, and every trial nests under
    the study's MLflow run (its id is kept in the study's user attributes). Give parallel
    workers distinct ``--worker`` indices so their samplers draw different start points.
    Watch a study live with ``optuna-dashboard sqlite:///optuna.db`` (or the PostgreSQL URL).

Result
    reports/tune/best_params.yaml (params.yaml shape) and the ``dvc exp run -S ...`` command that
    applies it; ``--apply`` runs that command.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from virtual_biopsy.core.atomic import write_text
from virtual_biopsy.core.config import (
    ARCHITECTURES,
    MODALITIES,
    VIEWS,
    ClassifierConfig,
    ConfigError,
    Params,
    load_params,
)
from virtual_biopsy.core.paths import ProjectPaths

STAGE = "tune"
SEARCHABLE = ("lr", "weight_decay", "batch_size", "augment_strength")
METRICS = ("mcc", "auc")
# The value a fold contributes when its metric is undefined (val lesions of one class only):
# chance level, so an uninformative fold neither helps nor sinks a trial.
CHANCE = {"mcc": 0.0, "auc": 0.5}
PARENT_RUN_ATTR = "mlflow_parent_run_id"
PARENT_WAIT_S = 120.0


class TuningError(ValueError):
    """The search space, metric or inputs cannot be tuned on."""


# ---------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------
def check_space(space: Mapping[str, Any]) -> None:
    """Every key is a searchable classifier param with a valid range or list of choices."""
    if not space:
        raise TuningError("tune.space is empty: nothing to search")
    for name, spec in space.items():
        if name not in SEARCHABLE:
            raise TuningError(f"tune.space.{name}: not searchable; choose from {SEARCHABLE}")
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise TuningError(f"tune.space.{name}: empty list of choices")
            continue
        if not isinstance(spec, Mapping) or not {"low", "high"} <= set(spec):
            raise TuningError(f"tune.space.{name}: expected {{low, high[, log]}} or a list of choices, got {spec!r}")
        low, high = float(spec["low"]), float(spec["high"])
        if not low <= high or (spec.get("log") and low <= 0):
            raise TuningError(f"tune.space.{name}: invalid range [{low}, {high}]" + (" on a log scale" if spec.get("log") else ""))
    if "batch_size" in space and not isinstance(space["batch_size"], (list, tuple)):
        raise TuningError("tune.space.batch_size: give a list of batch sizes")


def suggest(trial, space: Mapping[str, Any]) -> dict[str, Any]:
    """Draw one value per searched param from ``trial`` (Optuna's suggest API)."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, (list, tuple)):
            values[name] = trial.suggest_categorical(name, list(spec))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))
    return values


def trial_config(base: ClassifierConfig, values: Mapping[str, Any]) -> ClassifierConfig:
    """``base`` with the trial's values (augment_strength 0 switches augmentation off)."""
    cfg = dataclasses.replace(base, **{k: v for k, v in values.items() if k != "augment_strength"})
    if "augment_strength" in values:
        strength = float(values["augment_strength"])
        cfg = dataclasses.replace(cfg, augment_strength=strength, augment=strength > 0)
    return cfg


# ---------------------------------------------------------------------------------------------
# Data: train and val patients only
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuningFold:
    fold: int
    train: pd.DataFrame  # stage IMAGE_COLUMNS + row
    val: pd.DataFrame


def tuning_folds(paths: ProjectPaths, modality: str, view: str, max_folds: int | None = None
                 ) -> tuple[np.ndarray, list[TuningFold]]:
    """The memory-mapped processed images and, per fold, the train and val images of f_{modality,view}.

    The selection is the train_classifier stage's own (same images, same patient split); the
    fold's test patients are dropped here, before any pixel is read, so nothing downstream can
    reach them.
    """
    from virtual_biopsy.data.cohorts import biopsy_images, patient_subsets, read_folds, read_processed_index, split_images
    from virtual_biopsy.training.datasets import open_images

    # Real images only (data/imputed is never opened): tuning scores no synthetic CESM.
    index, folds = read_processed_index(paths), read_folds(paths)
    images = open_images(paths.processed_images)
    real = biopsy_images(index, modality, view)
    if real.empty:
        raise TuningError(f"{paths.processed_index}: no early-phase biopsied {modality} {view} images")
    selected = []
    for fold in sorted(int(k) for k in folds["fold"].unique())[:max_folds]:
        parts = split_images(real, patient_subsets(folds, fold), fold, require=("train", "val"))
        selected.append(TuningFold(fold, parts["train"], parts["val"]))
    return images, selected


def validation_score(val: pd.DataFrame, p: np.ndarray, metric: str) -> float:
    """Lesion-level validation ``metric`` (the stage's scoring); chance level when undefined."""
    from virtual_biopsy.evaluation.scoring import score_metrics

    value = score_metrics(val, p)[metric]
    return CHANCE[metric] if value is None or math.isnan(value) else float(value)


# ---------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------
@dataclass
class ClassifierObjective:
    """Mean validation ``metric`` over folds of one classifier trained with a trial's params."""

    params: Params
    arch: str
    modality: str
    view: str
    metric: str
    space: Mapping[str, Any]
    images: np.ndarray
    folds: list[TuningFold]
    parent: Any = None  # tracking.StageRun of the study, or None (no MLflow)
    device: str = "cpu"

    def __call__(self, trial) -> float:
        import optuna

        values = suggest(trial, self.space)
        tags = {"arch": self.arch, "modality": self.modality, "view": self.view, "trial": trial.number,
                "optuna_study": trial.study.study_name}
        pruned: optuna.TrialPruned | None = None
        child = self.parent.child(f"trial-{trial.number}", tags=tags) if self.parent is not None else _no_run()
        with child as run:
            if run is not None:
                run.log_params({**{f"classifier.{k}": v for k, v in values.items()}, "metric": self.metric,
                                "folds": len(self.folds)})
            try:
                value = self._evaluate(trial, values, run)
            except optuna.TrialPruned as exc:
                pruned = exc
                if run is not None:
                    run.set_tags({"optuna_state": "PRUNED", "diverged": trial.user_attrs.get("diverged", False)})
            else:
                if run is not None:
                    run.log_metrics({f"mean_val_{self.metric}": value})
                    run.set_tags({"optuna_state": "COMPLETE"})
        if pruned is not None:
            raise pruned
        return value

    def _evaluate(self, trial, values: Mapping[str, Any], run) -> float:
        import optuna

        from virtual_biopsy.models.classifiers import build_classifier
        from virtual_biopsy.training import (
            AffineAugment,
            LabelledImageDataset,
            predict_proba,
            train_classifier,
        )
        from virtual_biopsy.training.datasets import classifier_fold_seed

        cfg = trial_config(self.params.classifier, values)
        scores = []
        for position, part in enumerate(self.folds):
            seed = classifier_fold_seed(self.params.seed, self.arch, self.modality, self.view, part.fold)
            augment = AffineAugment(cfg.augment_strength) if cfg.augment and cfg.augment_strength > 0 else None
            train_ds = LabelledImageDataset(self.images, part.train["row"].to_numpy(), part.train["y"].to_numpy(),
                                            augment=augment, seed=seed)
            val_ds = LabelledImageDataset(self.images, part.val["row"].to_numpy(), part.val["y"].to_numpy(), seed=seed)
            val_rows = part.val["row"].to_numpy()

            def on_epoch_end(epoch: int, metrics: dict[str, float], state, part=part, position=position) -> None:
                p = predict_proba(state.models["classifier"], self.images, val_rows, cfg.batch_size, self.device)
                score = validation_score(part.val, p, self.metric)
                step = position * cfg.epochs + epoch
                if run is not None:
                    run.log_metrics({f"val_{self.metric}": score, "val_loss": metrics["val/loss"],
                                     "train_loss": metrics["train/loss"]}, step=step)
                trial.report(score, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"trial {trial.number}: val {self.metric} {score:.3f} at step {step} "
                                             "is below the median of earlier trials")

            model = build_classifier(self.arch, cfg.weights_file, seed=seed)
            try:
                train_classifier(model, train_ds, val_ds, cfg, seed, on_epoch_end=on_epoch_end, device=self.device)
            except FloatingPointError as exc:  # EarlyStopping refuses a NaN validation loss
                trial.set_user_attr("diverged", True)
                raise optuna.TrialPruned(f"trial {trial.number}: {exc}") from exc
            # The trainer leaves the best-epoch weights in the model: score those, as the stage does.
            scores.append(validation_score(part.val, predict_proba(model, self.images, val_rows, cfg.batch_size,
                                                                   self.device), self.metric))
            if run is not None:
                run.log_metrics({f"fold{part.fold}_val_{self.metric}": scores[-1]})
        return float(np.mean(scores))


class _no_run:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Study
# ---------------------------------------------------------------------------------------------
def default_study_name(arch: str, modality: str, view: str, metric: str) -> str:
    return f"classifier-{arch}-{modality}-{view}-{metric}"


def open_storage(url: str, root: Path):
    """An Optuna RDBStorage on ``url`` (relative SQLite paths are relative to the project root).

    Schema creation is retried: workers that start at the same moment race to create the tables.
    """
    import optuna
    import sqlalchemy.exc

    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{(root / url[len('sqlite:///'):]).resolve()}"
    last: Exception | None = None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {})
        except sqlalchemy.exc.SQLAlchemyError as exc:
            last = exc
            time.sleep(0.5 * (attempt + 1))
    raise TuningError(f"cannot open Optuna storage {url.split('@')[-1]}: {last}")


def open_study(storage, name: str, seed: int, n_startup_trials: int, n_warmup_steps: int):
    """(study, created): create the study, or join it when another worker already has.

    Creation is atomic in the database (unique study name), so exactly one worker is the creator.
    """
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    try:
        return optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                   pruner=pruner), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                   pruner=pruner, load_if_exists=True), False


def study_run(study, root: Path, params: Params):
    """Handle on the study's MLflow run, made by the creating worker (waits for it on the others)."""
    from virtual_biopsy.mlops import tracking

    deadline = time.monotonic() + PARENT_WAIT_S
    while PARENT_RUN_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise TuningError(f"study {study.study_name}: no MLflow run recorded by its creating worker")
        time.sleep(0.5)
    client = tracking.get_client(root)
    return tracking.StageRun(client, study.user_attrs[PARENT_RUN_ATTR], tracking.experiment_id(client, root), root,
                             tracking.run_context(root, params))


@dataclass(frozen=True)
class TuneRequest:
    arch: str = "resnet18"
    modality: str = "CESM"
    view: str = "CC"
    trials: int = 20
    metric: str = "mcc"
    storage: str = "sqlite:///optuna.db"
    study_name: str | None = None
    max_folds: int | None = None
    device: str = "cpu"
    worker: int = 0
    use_mlflow: bool = True
    n_startup_trials: int = 5
    n_warmup_steps: int = 0


def run_tuning(paths: ProjectPaths, params: Params, request: TuneRequest) -> dict[str, Any]:
    """Run ``request.trials`` trials of the (possibly shared) study; write and return the best params."""
    import optuna
    from tqdm.auto import tqdm

    from virtual_biopsy.training.datasets import derive_seed

    for value, allowed, what in ((request.arch, ARCHITECTURES, "architecture"), (request.modality, MODALITIES, "modality"),
                                 (request.view, VIEWS, "view"), (request.metric, METRICS, "metric")):
        if value not in allowed:
            raise TuningError(f"unknown {what} {value!r}; choose from {allowed}")
    if request.trials < 1:
        raise TuningError(f"--trials must be at least 1, got {request.trials}")
    space = dict(params.tune.space)
    check_space(space)
    images, folds = tuning_folds(paths, request.modality, request.view, request.max_folds)
    name = request.study_name or default_study_name(request.arch, request.modality, request.view, request.metric)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(request.storage, paths.root)
    study, created = open_study(storage, name, derive_seed(params.seed, request.worker) % 2**32, request.n_startup_trials,
                                request.n_warmup_steps)
    tags = {"arch": request.arch, "modality": request.modality, "view": request.view, "optuna_study": name}
    from contextlib import nullcontext

    from virtual_biopsy.mlops import tracking

    if request.use_mlflow and created:
        context = tracking.stage_run(STAGE, root=paths.root, params=params, tags=tags, run_name=f"tune {name}")
    else:
        context = nullcontext(None)
    with context as own_run:
        if own_run is not None:
            study.set_user_attr(PARENT_RUN_ATTR, own_run.run_id)
            study.set_user_attr("metric", request.metric)
            own_run.log_params({"storage": _without_password(request.storage), "study": name,
                                "space": yaml.safe_dump(space, default_flow_style=True).strip()})
        parent = own_run if own_run is not None else (study_run(study, paths.root, params) if request.use_mlflow else None)
        objective = ClassifierObjective(params, request.arch, request.modality, request.view, request.metric, space,
                                        images, folds, parent, request.device)
        with tqdm(total=request.trials, desc=f"tune {name}", disable=None) as bar:
            def progress(study, trial) -> None:
                bar.update(1)
                best = _best_or_none(study)
                bar.set_postfix(best=f"{best.value:.3f}" if best else "-", state=trial.state.name.lower())

            study.optimize(objective, n_trials=request.trials, callbacks=[progress])
        best = _best_or_none(study)
        if best is None:
            raise TuningError(f"study {name}: no trial completed (all pruned or failed); widen tune.space")
        result = write_best_params(paths, study, best, request.metric)
        if own_run is not None:
            own_run.log_metrics({f"best_val_{request.metric}": best.value, "best_trial": best.number})
            own_run.log_artifact(best_params_path(paths), STAGE)
    return result


def _best_or_none(study):
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


def _without_password(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------
def best_params_path(paths: ProjectPaths) -> Path:
    return paths.reports / "tune" / "best_params.yaml"


def best_overrides(best_params: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted params.yaml keys of a trial's params (``classifier.lr`` ...), with augmentation on/off."""
    overrides = {f"classifier.{k}": _plain(v) for k, v in sorted(best_params.items())}
    if "augment_strength" in best_params:
        overrides["classifier.augment"] = float(best_params["augment_strength"]) > 0
    return overrides


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value.item() if hasattr(value, "item") else value


def apply_command(overrides: Mapping[str, Any], study_name: str) -> list[str]:
    from virtual_biopsy.cli.profile import exp_run_command

    return exp_run_command(dict(overrides), f"tune-{study_name}")


def write_best_params(paths: ProjectPaths, study, best, metric: str) -> dict[str, Any]:
    """reports/tune/best_params.yaml in params.yaml shape; returns its content plus the command."""
    overrides = best_overrides(best.params)
    section: dict[str, Any] = {}
    for key, value in overrides.items():
        section[key.split(".", 1)[1]] = value
    command = apply_command(overrides, study.study_name)
    header = (f"# Best trial {best.number} of Optuna study {study.study_name}: validation {metric} "
              f"{best.value:.4f} (mean over folds).\n# Apply: {' '.join(shlex.quote(c) for c in command)}\n")
    write_text(best_params_path(paths), header + yaml.safe_dump({"classifier": section}, sort_keys=True))
    return {"classifier": section, "value": best.value, "trial": best.number, "study": study.study_name,
            "command": command}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _count(text: str) -> int:
    """An integer count; MLflow passes numeric parameters as e.g. ``20.0``."""
    value = float(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text}")
    return int(value)


def run_tune_command(args: argparse.Namespace) -> int:
    paths = ProjectPaths(Path(args.root))
    try:
        params = load_params(args.params or paths.root / "params.yaml")
        request = TuneRequest(
            arch=args.arch, modality=args.modality, view=args.view,
            trials=args.trials if args.trials is not None else params.tune.trials,
            metric=args.metric or params.tune.metric, storage=args.storage or params.tune.storage,
            study_name=args.study, max_folds=args.folds, device=args.device, worker=args.worker,
            use_mlflow=not args.no_mlflow,
        )
        result = run_tuning(paths, params, request)
    except (ConfigError, TuningError, FileNotFoundError, ValueError) as exc:
        print(f"tune: {exc}", file=sys.stderr)
        return 1
    command = " ".join(shlex.quote(c) for c in result["command"])
    print(f"tune: best validation {request.metric} {result['value']:.4f} (trial {result['trial']} of study "
          f"{result['study']}) -> {best_params_path(paths)}")
    print(command)
    if args.apply:
        return subprocess.call(result["command"], cwd=paths.root)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune", help="Optuna search over a classifier's hyperparameters (validation MCC/AUC), tracked in MLflow",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default="resnet18", choices=ARCHITECTURES)
    parser.add_argument("--modality", default="CESM", choices=MODALITIES)
    parser.add_argument("--view", default="CC", choices=VIEWS)
    parser.add_argument("--trials", type=_count, default=None, help="trials this worker runs (default tune.trials)")
    parser.add_argument("--metric", choices=METRICS, default=None, help="validation metric (default tune.metric)")
    parser.add_argument("--storage", default=None, help="SQLAlchemy URL of the study (default tune.storage)")
    parser.add_argument("--study", default=None, help="study name (default classifier-ARCH-MOD-VIEW-METRIC)")
    parser.add_argument("--folds", type=_count, default=None, help="tune on the first K folds only (default all)")
    parser.add_argument("--worker", type=int, default=0, help="index of this worker (seeds its sampler)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda ...)")
    parser.add_argument("--root", default=".", help="project root")
    parser.add_argument("--params", default=None, help="params file (default ROOT/params.yaml)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--apply", action="store_true", help="run the printed dvc exp run command")
    parser.set_defaults(func=run_tune_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vbiopsy")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tune", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
