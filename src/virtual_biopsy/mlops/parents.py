"""The pipeline's parent run: one per pipeline run, found again by every stage.

DVC runs each stage in its own process, so the parent cannot be held in memory: it is found again
by its pipeline key (git commit + data version + params hash), or taken from
``VBIOPSY_PARENT_RUN_ID`` when a driver (``make demo``, CI) pins one. It is RUNNING while one of
its stages runs and ended otherwise (tracking.stage_run reopens and closes it).

One parent per pipeline key, also when stages run concurrently
    MLflow picks run ids itself and has no create-if-absent, so the parent cannot have a
    deterministic id. On a SQLite store (the embedded default) a lock file beside the database
    (``mlflow.db.lock``, flock: released by the OS if its holder dies) makes "search, else
    create" atomic, so a second parent is never made. A PostgreSQL store or a tracking server,
    shared by several machines, has no such lock: there a stage that made a parent waits
    :data:`PARENT_SETTLE_S`, searches again and, if an older implicit parent of the same key
    exists, deletes its own (tag ``duplicate_of``) and joins the oldest; every stage that ends
    also moves the children of any younger duplicate to the oldest and deletes the duplicate, so
    even two creations that crossed unseen end as one parent. The oldest is the one all
    processes agree on: a parent, once made, only ever meets younger rivals.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from virtual_biopsy.core.config import Params, flatten
from virtual_biopsy.mlops.run_context import PIPELINE_KEY_TAG, loggable_params, run_context
from virtual_biopsy.mlops.run_lifecycle import best_effort, reap_orphans
from virtual_biopsy.mlops.runs import StageRun
from virtual_biopsy.mlops.store import experiment_id, get_client, sqlite_file, store_lock

PARENT_RUN_ENV = "VBIOPSY_PARENT_RUN_ID"
# "pinned" (made by `vbiopsy pipeline start`) or "implicit" (made by the first stage of a bare dvc repro).
PARENT_KIND_TAG = "pipeline_parent"
DUPLICATE_TAG = "duplicate_of"  # on a deleted duplicate parent: the parent its children moved to
PARENT_SETTLE_S = 0.5  # how long a stage that made a parent on a shared store waits for rivals


def _by_age(run) -> tuple[int, str]:
    return (run.info.start_time or 0, run.info.run_id)


def _pipeline_parents(client, exp_id: str, key: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.{PIPELINE_KEY_TAG} = '{key}' and tags.stage = 'pipeline'",
                              max_results=1000)


def _implicit(runs: list) -> list:
    return sorted((r for r in runs if r.data.tags.get(PARENT_KIND_TAG) == "implicit"), key=_by_age)


def _canonical_parent(runs: list):
    """The parent stages of this key join: the newest pinned one (the latest ``vbiopsy pipeline
    start``), else the oldest implicit one (what concurrent creators agree on), else the newest
    parent made before parents carried their kind."""
    pinned = [r for r in runs if r.data.tags.get(PARENT_KIND_TAG) == "pinned"]
    if pinned:
        return max(pinned, key=_by_age)
    implicit = _implicit(runs)
    if implicit:
        return implicit[0]
    return max(runs, key=_by_age) if runs else None


def _discard_duplicate(client, run_id: str, kept: str) -> None:
    client.set_tag(run_id, DUPLICATE_TAG, kept)
    client.set_terminated(run_id, status="FINISHED")
    client.delete_run(run_id)


def find_or_create_parent(client, exp_id: str, context: dict[str, str]) -> tuple[str, bool]:
    """(run id, whether this call created it) of the parent of this pipeline key (module doc)."""
    key = context[PIPELINE_KEY_TAG]
    with store_lock(client.tracking_uri):
        found = _canonical_parent(_pipeline_parents(client, exp_id, key))
        if found is not None:
            return found.info.run_id, False
        name = f"pipeline-{key[:8]}"
        mine = client.create_run(exp_id, run_name=name, tags={
            **context, "stage": "pipeline", PARENT_KIND_TAG: "implicit", "mlflow.runName": name}).info.run_id
    if sqlite_file(client.tracking_uri) is None:  # no lock: a rival may have created one meanwhile
        time.sleep(PARENT_SETTLE_S)
        winner = _canonical_parent(_pipeline_parents(client, exp_id, key))
        if winner is not None and winner.info.run_id != mine:
            _discard_duplicate(client, mine, winner.info.run_id)
            return winner.info.run_id, False
    return mine, True


def merge_duplicate_parents(client, exp_id: str, key: str, parent_id: str) -> str:
    """Move the children of younger implicit parents of ``key`` to the oldest and delete the
    younger ones; returns ``parent_id``, or the oldest if ``parent_id`` was one of the younger."""
    implicit = _implicit(_pipeline_parents(client, exp_id, key))
    for duplicate in implicit[1:]:
        kept, gone = implicit[0].info.run_id, duplicate.info.run_id
        for child in _children(client, exp_id, gone):
            client.set_tag(child.info.run_id, "mlflow.parentRunId", kept)
        _discard_duplicate(client, gone, kept)
        if parent_id == gone:
            parent_id = kept
    return parent_id


def pipeline_status(children: list) -> str | None:
    """The pipeline's status from its stage runs: None while the latest attempt of a stage (run
    name) is RUNNING, else FAILED if one failed, KILLED if one was killed, FINISHED otherwise."""
    latest: dict[str, Any] = {}
    for run in sorted(children, key=_by_age):
        latest[run.info.run_name] = run
    statuses = {run.info.status for run in latest.values()}
    if statuses & {"RUNNING", "SCHEDULED"}:
        return None
    return next((s for s in ("FAILED", "KILLED") if s in statuses), "FINISHED")


def _children(client, exp_id: str, parent_id: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


def reopen_parent(client, parent_id: str) -> None:
    if client.get_run(parent_id).info.status != "RUNNING":
        client.update_run(parent_id, status="RUNNING")


def close_parent(client, exp_id: str, parent_id: str, fallback: str) -> None:
    """End the parent unless one of its stages is still running (that stage will end it).

    ``fallback``: the status when no stage run exists under it (the stage stopped before its run).
    """
    children = _children(client, exp_id, parent_id)
    status = pipeline_status(children) if children else fallback
    if status is not None:
        client.set_terminated(parent_id, status=status)


def pipeline_parent_run(client, exp_id: str, context: dict[str, str]) -> str:
    """Run id of this pipeline run's parent: pinned by env, else found (or made) by pipeline key."""
    pinned = os.environ.get(PARENT_RUN_ENV)
    if pinned:
        return pinned
    return find_or_create_parent(client, exp_id, context)[0]


def start_pipeline_run(root: str | Path = ".", params: Params | None = None) -> str:
    """Create a fresh parent run (drivers export its id as ``VBIOPSY_PARENT_RUN_ID``).

    It is RUNNING until a stage under it ends (module doc) or ``vbiopsy pipeline finish``.
    """
    client = get_client(root)
    exp_id = experiment_id(client, root)
    context = run_context(root, params)
    name = f"pipeline-{context[PIPELINE_KEY_TAG][:8]}"
    run = client.create_run(exp_id, run_name=name,
                            tags={**context, "stage": "pipeline", PARENT_KIND_TAG: "pinned", "mlflow.runName": name})
    if params is not None:
        StageRun(client, run.info.run_id, exp_id, Path(root), context).log_params(loggable_params(flatten(params)))
    return run.info.run_id


def finish_pipeline_run(root: str | Path, run_id: str, status: str | None = None, *, aborted: bool = False) -> str:
    """End a parent run for good; returns the status set.

    ``status`` None: the stages' verdict (:func:`pipeline_status`; FINISHED when no stage ran).
    ``aborted``: the driver stopped before the pipeline completed: the stages' verdict when it is
    FAILED or KILLED, else FAILED. Runs of dead processes on this host are marked KILLED first.
    """
    client = get_client(root)
    exp_id = client.get_run(run_id).info.experiment_id
    best_effort("marking runs of dead processes KILLED", reap_orphans, client, exp_id)
    if status is None:
        verdict = pipeline_status(_children(client, exp_id, run_id))
        if aborted:
            status = verdict if verdict in ("FAILED", "KILLED") else "FAILED"
        elif verdict is None:  # a stage is still running: it ends the parent when it ends
            return "RUNNING"
        else:
            status = verdict
    client.set_terminated(run_id, status=status)
    return status


def parent_run(root: str | Path = ".", params: Params | None = None) -> StageRun:
    """A handle on the pipeline's parent run (for results that describe the whole run)."""
    client = get_client(root)
    exp_id = experiment_id(client, root)
    context = run_context(root, params)
    parent_id = os.environ.get(PARENT_RUN_ENV)
    if not parent_id:
        parent_id, created = find_or_create_parent(client, exp_id, context)
        if created:  # made outside any stage: ended at once, like a parent between two stages
            client.set_terminated(parent_id, status="FINISHED")
    return StageRun(client, parent_id, exp_id, Path(root), context)
