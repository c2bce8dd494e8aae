"""Running a study: the trials of one worker, the study's MLflow run, and the best params it found.

Tracking
    One MLflow run per study (stage ``tune``, under the pipeline's parent run) and one nested run
    ``trial-<n>`` per trial with its params, per-step validation metric and losses, and its
    final value; pruned trials carry the tag ``optuna_state=PRUNED``.

A stopped worker
    SIGTERM, Ctrl-C or SIGHUP raise ``tracking.Interrupted`` in the trial (every worker, with or
    without MLflow): the trial's run and the study's run end KILLED, the Optuna trial is told
    FAIL (:func:`run_trials`), then the process dies of the signal as it would have.

Result
    reports/tune/best_params.yaml (params.yaml shape) and the ``dvc exp run -S ...`` command that
    applies it; ``--apply`` runs that command.
"""
from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from virtual_biopsy.core.atomic import write_text
from virtual_biopsy.core.config import ARCHITECTURES, MODALITIES, VIEWS, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.mlops import tracking
from virtual_biopsy.tuning.objective import (
    METRICS,
    ClassifierObjective,
    TuningError,
    check_space,
    tuning_folds,
)
from virtual_biopsy.tuning.storage import (
    check_study_identity,
    default_study_name,
    open_storage,
    open_study,
    without_password,
)

STAGE = "tune"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
PARENT_WAIT_S = 120.0


# ---------------------------------------------------------------------------------------------
# Study
# ---------------------------------------------------------------------------------------------
def study_run(study, root: Path, params: Params):
    """Handle on the study's MLflow run, made by the creating worker (waits for it on the others)."""
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
    """What one worker tunes: the classifier f_{modality,view} of ``arch``, ``trials`` trials of the study."""

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
    check_study_identity(study, {"arch": request.arch, "modality": request.modality, "view": request.view,
                                 "metric": request.metric, "folds": [f.fold for f in folds],
                                 "space": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in space.items()}},
                         created)
    # On a terminal tqdm draws a bar; otherwise (CI, a log file, nohup) one line per epoch and trial.
    log_line = None if sys.stderr.isatty() else (lambda line: print(f"tune {name}: {line}", file=sys.stderr, flush=True))
    tags = {"arch": request.arch, "modality": request.modality, "view": request.view, "optuna_study": name}
    # The creating worker owns the study's run; the others nest their trials under it, and without
    # MLflow every run is a NullRun.
    owner = request.use_mlflow and created
    # Signals raise in every worker (a joining worker and --no-mlflow open no stage run): a stopped
    # worker still tells its trial FAIL.
    with tracking.signals_as_exceptions(), tracking.stage_run(
            STAGE, root=paths.root, params=params, tags=tags, run_name=f"tune {name}", enabled=owner) as own_run:
        if owner:
            study.set_user_attr(PARENT_RUN_ATTR, own_run.run_id)
            study.set_user_attr("metric", request.metric)
        own_run.log_params({"storage": without_password(request.storage), "study": name,
                            "space": yaml.safe_dump(space, default_flow_style=True).strip()})
        parent = study_run(study, paths.root, params) if request.use_mlflow and not created else own_run
        objective = ClassifierObjective(params, request.arch, request.modality, request.view, request.metric, space,
                                        images, folds, parent, request.device, log_line)
        with tqdm(total=request.trials, desc=f"tune {name}", disable=None) as bar:
            finished = []  # this worker's trials (a disabled bar does not count)

            def progress(study, trial) -> None:
                finished.append(trial.number)
                bar.update(1)
                best = _best_or_none(study)
                bar.set_postfix(best=f"{best.value:.3f}" if best else "-", state=trial.state.name.lower())
                if log_line is not None:
                    value = f"{trial.value:.3f}" if trial.value is not None else "-"
                    log_line(f"trial {trial.number} {trial.state.name.lower()} (value {value}); "
                             f"best {f'{best.value:.3f} (trial {best.number})' if best else '-'}; "
                             f"{len(finished)}/{request.trials} done")

            run_trials(study, objective, request.trials, progress)
        best = _best_or_none(study)
        if best is None:
            raise TuningError(f"study {name}: no trial completed (all pruned or failed); widen tune.space")
        result = write_best_params(paths, study, best, request.metric)
        own_run.log_metrics({f"best_val_{request.metric}": best.value, "best_trial": best.number})
        own_run.log_artifact(best_params_path(paths), STAGE)
    return result


def run_trials(study, objective, n_trials: int, callback=None) -> None:
    """``study.optimize(objective, n_trials, callbacks=[callback])`` by Optuna's ask-and-tell.

    Optuna's optimize tells FAIL when the objective raises (KeyboardInterrupt included), but a
    signal that lands while it asks for or tells a trial, outside the objective, would leave that
    trial RUNNING for ever. Here asking and telling hold signals back (``tracking.deferred_signals``)
    and any exception, a kill (``tracking.Interrupted``) included, tells the trial FAIL before it
    goes on up.
    """
    import optuna
    from optuna.trial import TrialState

    for _ in range(n_trials):
        trial = None
        try:
            with tracking.deferred_signals():
                trial = study.ask()
            try:
                value, state = objective(trial), None
            except optuna.TrialPruned:
                value, state = None, TrialState.PRUNED
            with tracking.deferred_signals():
                frozen = study.tell(trial, value, state=state)
        except BaseException:
            if trial is not None:
                with tracking.deferred_signals():
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        if callback is not None:
            callback(study, frozen)


def _best_or_none(study):
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


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
    from virtual_biopsy.core.experiments import exp_run_command

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
