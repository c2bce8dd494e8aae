"""Experiment tracking: the project's entry to MLflow runs (the registry is in registry.py).

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

Where each part lives
    store          the tracking URI, the client, the experiment (and the SQLite store's lock)
    run_context    the tags every run carries: git commit, data version, params hash, pipeline key
    run_lifecycle  signals as exceptions, run endings, runs of dead processes marked KILLED
    runs           StageRun / NullRun handles, logged datasets, ``open_run``
    parents        the pipeline's parent run: found, made, merged, reopened, closed
    ui_links       the ``mlflow ui`` command and the UI links the project prints
    tracking       this module: ``stage_run`` (the run of one DVC stage under the parent) and
                   ``log_to_parent``; it re-exports what callers of the other parts use, so code
                   outside mlops/ imports ``tracking`` only.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from virtual_biopsy.core.config import Params
from virtual_biopsy.mlops.parents import (
    DUPLICATE_TAG,
    PARENT_KIND_TAG,
    PARENT_RUN_ENV,
    close_parent,
    finish_pipeline_run,
    find_or_create_parent,
    merge_duplicate_parents,
    parent_run,
    pipeline_parent_run,
    pipeline_status,
    reopen_parent,
    start_pipeline_run,
)
from virtual_biopsy.mlops.run_context import (
    PIPELINE_KEY_TAG,
    STAGE_SECTIONS,
    data_version,
    git_commit,
    loggable_params,
    pipeline_output_pathspecs,
    run_context,
    section_params,
)
from virtual_biopsy.mlops.run_lifecycle import (
    KILLED_BY_TAG,
    PROCESS_TAG,
    Interrupted,
    best_effort,
    deferred_signals,
    reap_orphans,
    run_ending,
    signals_as_exceptions,
)
from virtual_biopsy.mlops.runs import (
    DATASET_COLUMNS,
    DATASET_CONTEXT_TAG,
    NullRun,
    OpenChildren,
    RunHandover,
    StageRun,
    clean_tags,
    dataset_table,
    open_run,
    table_counts,
)
from virtual_biopsy.mlops.store import (
    EXPERIMENT_ENV,
    EXPERIMENT_KIND_TAG,
    EXPERIMENT_NAME,
    MODEL_TRAINING,
    embedded_store,
    experiment_id,
    get_client,
    tracking_uri,
)

__all__ = [
    "DATASET_COLUMNS", "DATASET_CONTEXT_TAG", "DUPLICATE_TAG", "EXPERIMENT_ENV", "EXPERIMENT_KIND_TAG",
    "EXPERIMENT_NAME", "KILLED_BY_TAG", "MODEL_TRAINING", "PARENT_KIND_TAG", "PARENT_RUN_ENV", "PIPELINE_KEY_TAG",
    "PROCESS_TAG", "STAGE_SECTIONS", "Interrupted", "NullRun", "OpenChildren", "RunHandover", "StageRun", "data_version", "dataset_table",
    "deferred_signals", "embedded_store", "experiment_id", "finish_pipeline_run", "get_client", "git_commit",
    "log_to_parent", "loggable_params", "pipeline_output_pathspecs", "pipeline_parent_run", "pipeline_status",
    "run_context", "section_params", "signals_as_exceptions", "stage_run", "start_pipeline_run", "table_counts",
    "tracking_uri",
]


@contextlib.contextmanager
def stage_run(stage: str, *, root: str | Path = ".", params: Params | None = None,
              tags: Mapping[str, Any] | None = None, run_name: str | None = None,
              enabled: bool = True) -> Iterator[StageRun | NullRun]:
    """Open the child run of one DVC stage under the pipeline's parent run.

    The stage's own params section is logged as params; the run ends FINISHED, FAILED when the
    block raises, KILLED when the process gets SIGTERM/SIGINT/SIGHUP; the parent is reopened for
    the stage and ended after it (module doc). ``enabled=False`` yields a :class:`NullRun`, touches
    no MLflow store and leaves signals alone (torchrun ranks other than 0).
    """
    root = Path(root)
    if not enabled:
        yield NullRun(root)
        return
    with signals_as_exceptions():
        client = exp_id = parent_id = None
        outcome = "FINISHED"
        try:
            with deferred_signals():  # the parent is never made or reopened without the code that ends it armed
                client = get_client(root)
                exp_id = experiment_id(client, root)
                context = run_context(root, params)
                best_effort("marking runs of dead processes KILLED", reap_orphans, client, exp_id)
                pinned = os.environ.get(PARENT_RUN_ENV)
                parent_id, created = (pinned, False) if pinned else find_or_create_parent(client, exp_id, context)
                if not created:
                    best_effort("reopening the pipeline run", reopen_parent, client, parent_id)
            with open_run(client, exp_id, root, context, run_name or stage, parent_id,
                      {"stage": stage, **clean_tags(tags)}) as run:
                section = STAGE_SECTIONS.get(stage, stage)
                if params is not None and hasattr(params, section):
                    run.log_params(section_params(params, section))
                yield run
        except BaseException as exc:
            outcome = run_ending(exc)[0]
            raise
        finally:
            if parent_id is not None:
                with deferred_signals():
                    if not pinned:
                        parent_id = best_effort("merging duplicate pipeline runs", merge_duplicate_parents, client,
                                                 exp_id, context[PIPELINE_KEY_TAG], parent_id) or parent_id
                    best_effort("ending the pipeline run", close_parent, client, exp_id, parent_id, outcome)


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
