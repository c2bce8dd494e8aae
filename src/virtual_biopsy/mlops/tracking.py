"""Experiment tracking: every MLflow tracking call of the project lives here (the registry in registry.py).

Where runs go
    The embedded default is a SQLite store and an artifact folder inside the project
    (``mlruns/mlflow.db``, ``mlruns/artifacts``), so the model registry works with nothing
    started. ``MLFLOW_TRACKING_URI`` alone switches to a tracking server (PostgreSQL + S3 behind
    ``mlflow server``); no code changes.

How runs are shaped
    One *parent* run per pipeline run; each DVC stage opens a *child* run under it, and stages
    that train several models open grandchildren per view/arch/fold (``StageRun.child``). DVC runs
    each stage in its own process, so the parent cannot be held in memory: it is found again by
    its pipeline key (git commit + data version + params hash), or taken from
    ``VBIOPSY_PARENT_RUN_ID`` when a driver (``make demo``, CI) pins one. Every run carries the
    tags ``stage``, ``git_commit``, ``data_version``, ``params_hash`` (plus arch, modality, view,
    fold, setting where they apply), so the MLflow UI compares like with like.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from virtual_biopsy.core.config import Params, flatten, params_hash

EXPERIMENT_NAME = "virtual-biopsy"
PARENT_RUN_ENV = "VBIOPSY_PARENT_RUN_ID"
EXPERIMENT_ENV = "VBIOPSY_EXPERIMENT"
PIPELINE_KEY_TAG = "pipeline_key"
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def _mlflow():
    # Imported lazily: importing mlflow costs ~1 s, and layers below must not need it at all.
    import mlflow

    return mlflow


# ---------------------------------------------------------------------------------------------
# Where the store is
# ---------------------------------------------------------------------------------------------
def embedded_store(root: str | Path = ".") -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded SQLite store under ``root/mlruns``."""
    mlruns = Path(root).resolve() / "mlruns"
    return f"sqlite:///{mlruns / 'mlflow.db'}", (mlruns / "artifacts").as_uri()


def tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store of ``root``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_store(root)[0]


def _uses_embedded_store(root: str | Path) -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI")


def _artifact_location(root: str | Path) -> str | None:
    """Artifact folder of a new experiment: beside a SQLite store, the server's choice otherwise.

    Without this a bare ``sqlite:`` URI would put artifacts in ``./mlruns`` of whatever folder
    the process happens to run in.
    """
    if _uses_embedded_store(root):
        return embedded_store(root)[1]
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    return None  # a tracking server decides (e.g. --artifacts-destination s3://...)


def get_client(root: str | Path = "."):
    """An ``MlflowClient`` on the configured store (creates the embedded folder when needed)."""
    mlflow = _mlflow()
    if _uses_embedded_store(root):
        (Path(root) / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(root)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, root: str | Path = ".", name: str | None = None) -> str:
    """Id of the project's experiment, created on first use.

    The embedded store keeps artifacts under ``root/mlruns/artifacts``; with a server, the
    server's artifact root (for example an S3 bucket behind ``--artifacts-destination``) decides.
    """
    name = name or os.environ.get(EXPERIMENT_ENV, EXPERIMENT_NAME)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = _artifact_location(root)
    try:
        # The MLflow 3 UI opens GenAI (tracing) pages for an experiment of unknown kind; this is
        # model training, so say so and the UI opens on the runs table.
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except Exception:  # another process created it between our lookup and create
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


# ---------------------------------------------------------------------------------------------
# What a run is about: code, data and params versions
# ---------------------------------------------------------------------------------------------
def git_commit(root: str | Path = ".") -> str:
    """Current commit (``+dirty`` when the work tree differs), ``unknown`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # dvc.lock and *.dvc change as stages run; they are data/pipeline state, not code.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock", ":!*.dvc"],
            cwd=root, capture_output=True, text=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_version(root: str | Path = ".") -> str:
    """The md5 that ``data.dvc`` records for data/raw (``untracked`` when there is no data.dvc)."""
    dvc_file = Path(root) / "data.dvc"
    if not dvc_file.exists():
        return "untracked"
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "unknown"))


def run_context(root: str | Path = ".", params: Params | None = None) -> dict[str, str]:
    """Tags shared by every run of one pipeline run."""
    context = {
        "git_commit": git_commit(root),
        "data_version": data_version(root),
        "params_hash": params_hash(params) if params is not None else "none",
    }
    key = "|".join(context[k] for k in ("git_commit", "data_version", "params_hash"))
    context[PIPELINE_KEY_TAG] = hashlib.sha256(key.encode()).hexdigest()[:16]
    return context


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
# Params whose value is a secret of the site: logged as redacted so the run still shows they were set.
SECRET_PARAM_WORDS = ("salt", "password", "secret", "token")


def loggable_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Params safe to log: values of secret-looking keys (the pseudonym salt) are redacted."""
    return {k: ("<redacted>" if any(w in k.lower() for w in SECRET_PARAM_WORDS) else v) for k, v in flat.items()}


def _clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (tags or {}).items() if v is not None}


@dataclass
class StageRun:
    """A handle on one MLflow run; all logging goes through it (no global active run)."""

    client: Any
    run_id: str
    experiment_id: str
    root: Path
    context: dict[str, str]

    # -- logging -----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow = _mlflow()
        # MLflow keys allow word characters and ``-. :/`` only; settings like ``F+C`` (gate floors) carry a ``+``.
        items = [mlflow.entities.Param(re.sub(r"[^\w\-. :/]", "_", str(k)), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow = _mlflow()
        import time

        now = int(time.time() * 1000)
        items = [
            mlflow.entities.Metric(str(k), float(v), now, int(step or 0))
            for k, v in metrics.items()
            if v is not None and v == v  # NaN means "undefined": leave it out rather than log NaN
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow = _mlflow()
        items = [mlflow.entities.RunTag(k, v) for k, v in _clean_tags(tags).items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    # -- nesting -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, Any] | None = None) -> Iterator["StageRun"]:
        """A nested run under this one (per view, architecture, fold, setting ...)."""
        inherited = {k: v for k, v in self.client.get_run(self.run_id).data.tags.items() if k == "stage"}
        with _run(self.client, self.experiment_id, self.root, self.context, name, self.run_id,
                  {**inherited, **_clean_tags(tags)}) as run:
            yield run


class NullRun:
    """A run that logs nothing: what ``stage_run(..., enabled=False)`` yields (``--no-mlflow``,
    a non-zero torchrun rank, a test). It has StageRun's methods, so code that logs never asks
    whether there is a run."""

    def __init__(self, root: str | Path = ".") -> None:
        self.root = Path(root)
        self.context: dict[str, str] = {}
        self.run_id = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def __bool__(self) -> bool:
        """False: ``if run`` reads as "is this run recorded anywhere"."""
        return False

    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, Any] | None = None) -> Iterator["NullRun"]:
        yield self


@contextlib.contextmanager
def _run(client, exp_id: str, root: Path, context: dict[str, str], name: str, parent_id: str | None,
         tags: Mapping[str, str]) -> Iterator[StageRun]:
    all_tags = {**context, **tags, "mlflow.runName": name}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    run = client.create_run(exp_id, tags=all_tags, run_name=name)
    handle = StageRun(client, run.info.run_id, exp_id, root, context)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


def pipeline_parent_run(client, exp_id: str, context: dict[str, str]) -> str:
    """Run id of this pipeline run's parent: pinned by env, else found (or made) by pipeline key."""
    pinned = os.environ.get(PARENT_RUN_ENV)
    if pinned:
        return pinned
    key = context[PIPELINE_KEY_TAG]
    found = client.search_runs(
        [exp_id], filter_string=f"tags.{PIPELINE_KEY_TAG} = '{key}' and tags.stage = 'pipeline'",
        max_results=1, order_by=["attributes.start_time DESC"],
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id, tags={**context, "stage": "pipeline", "mlflow.runName": f"pipeline-{key[:8]}"},
        run_name=f"pipeline-{key[:8]}",
    )
    return run.info.run_id


def start_pipeline_run(root: str | Path = ".", params: Params | None = None) -> str:
    """Create a fresh parent run (drivers export its id as ``VBIOPSY_PARENT_RUN_ID``)."""
    client = get_client(root)
    exp_id = experiment_id(client, root)
    context = run_context(root, params)
    run = client.create_run(
        exp_id, tags={**context, "stage": "pipeline", "mlflow.runName": f"pipeline-{context[PIPELINE_KEY_TAG][:8]}"},
        run_name=f"pipeline-{context[PIPELINE_KEY_TAG][:8]}",
    )
    if params is not None:
        StageRun(client, run.info.run_id, exp_id, Path(root), context).log_params(loggable_params(flatten(params)))
    return run.info.run_id


def parent_run(root: str | Path = ".", params: Params | None = None) -> StageRun:
    """A handle on the pipeline's parent run (for results that describe the whole run)."""
    client = get_client(root)
    exp_id = experiment_id(client, root)
    context = run_context(root, params)
    return StageRun(client, pipeline_parent_run(client, exp_id, context), exp_id, Path(root), context)


@contextlib.contextmanager
def stage_run(stage: str, *, root: str | Path = ".", params: Params | None = None,
              tags: Mapping[str, Any] | None = None, run_name: str | None = None,
              enabled: bool = True) -> Iterator[StageRun | NullRun]:
    """Open the child run of one DVC stage under the pipeline's parent run.

    The stage's own params section is logged as params; the run is FAILED when the block raises.
    ``enabled=False`` yields a :class:`NullRun` and touches no MLflow store.
    """
    root = Path(root)
    if not enabled:
        yield NullRun(root)
        return
    client = get_client(root)
    exp_id = experiment_id(client, root)
    context = run_context(root, params)
    parent_id = pipeline_parent_run(client, exp_id, context)
    with _run(client, exp_id, root, context, run_name or stage, parent_id, {"stage": stage, **_clean_tags(tags)}) as run:
        if params is not None and hasattr(params, stage):
            run.log_params(loggable_params(flatten(getattr(params, stage), f"{stage}.")))
        yield run


def log_to_parent(root: str | Path = ".", params: Params | None = None, *, metrics: Mapping[str, float] | None = None,
                  artifacts: Mapping[str, str | Path] | None = None, tags: Mapping[str, Any] | None = None) -> None:
    """Log pipeline-wide results (data-quality verdict, headline metrics) on the parent run.

    ``artifacts`` maps an artifact folder name to a local file or folder.
    """
    run = parent_run(root, params)
    if metrics:
        run.log_metrics(metrics)
    if tags:
        run.set_tags(tags)
    for artifact_path, local in (artifacts or {}).items():
        local = Path(local)
        (run.log_artifacts if local.is_dir() else run.log_artifact)(local, artifact_path)


def ui_command(root: str | Path = ".") -> str:
    """The shell command that opens the MLflow UI on this project's store."""
    if not _uses_embedded_store(root):
        return f"open {os.environ['MLFLOW_TRACKING_URI']} in a browser"
    return f"mlflow ui --backend-store-uri {embedded_store(root)[0]} --port 5000"
