"""Run handles: StageRun logs to one MLflow run (no global active run), NullRun logs nothing;
``open_run`` creates a run and ends it FINISHED, FAILED or KILLED (run_lifecycle).

Fold jobs in other processes (training.executor) log to a child run the driver started
(``OpenChildren.start``): the driver hands it over (``handover``, picklable), the job
``attach``-es to it and logs, and the driver ends it with the job's outcome."""
from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtual_biopsy.mlops.run_lifecycle import (
    KILLED_BY_TAG,
    PROCESS_TAG,
    best_effort,
    deferred_signals,
    process_identity,
    run_ending,
    signals_as_exceptions,
)
from virtual_biopsy.mlops.store import mlflow_module


# Columns a logged dataset may describe (schema, digest): pseudonymous keys, labels, acquisition
# and subset fields, rows of the processed array. Everything else (SOP instance UIDs, file paths
# that carry the site's patient ids, pair keys) is dropped before MLflow sees the table.
DATASET_COLUMNS = (
    "patient_id", "study_id", "lesion_id", "laterality", "view", "modality", "phase", "label", "y", "acr", "age",
    "arch", "fold", "subset", "source", "synthetic", "simulated", "p_malignant", "row", "le_row", "des_row",
)
DATASET_CONTEXT_TAG = "mlflow.data.context"  # what the UI's Dataset column shows beside the name


def dataset_table(table: Any) -> Any:
    """The DATASET_COLUMNS of a pandas table, text columns as strings (MLflow infers the schema)."""
    kept = table[[c for c in table.columns if c in DATASET_COLUMNS]].reset_index(drop=True)
    for column in kept.columns:
        if kept[column].dtype == object or str(kept[column].dtype) == "string":
            kept[column] = kept[column].fillna("").astype(str)
    return kept


def table_counts(table: Any, targets: str | None) -> dict[str, int]:
    """Rows, patients and rows per target value of a dataset table (its source metadata)."""
    counts = {"rows": int(len(table))}
    if "patient_id" in table.columns:
        counts["patients"] = int(table["patient_id"].nunique())
    if targets and targets in table.columns:
        counts.update({f"{targets}={k}": int(v) for k, v in table[targets].value_counts().sort_index().items()})
    return counts


def clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
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
        mlflow = mlflow_module()
        # MLflow keys allow word characters and ``-. :/`` only; settings like ``F+C`` (gate floors) carry a ``+``.
        items = [mlflow.entities.Param(re.sub(r"[^\w\-. :/]", "_", str(k)), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow = mlflow_module()
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
        mlflow = mlflow_module()
        items = [mlflow.entities.RunTag(k, v) for k, v in clean_tags(tags).items()]
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

    def log_tables(self, tables: Mapping[str, Any], *, name: str, source: Mapping[str, Any],
                   targets: str | None = None, predictions: str | None = None) -> None:
        """Log what the run read as MLflow dataset inputs: one per table, keyed by its context.

        ``tables`` maps a context (``train``, ``val``, ``test`` ...) to a pandas table of the rows
        read; each becomes a pandas dataset ``"<name> <context>"`` of its DATASET_COLUMNS, of
        which MLflow keeps the schema, row count and a digest, never the values (so no image, and
        no identifier beyond the pseudonymous ids). Its source is metadata only: ``source`` (the
        file the rows come from, fold, ...) plus the data version (data.dvc) and the table's
        counts. Empty tables are skipped.
        """
        mlflow = mlflow_module()
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for context, table in tables.items():
            if table is None or len(table) == 0:
                continue
            kept = dataset_table(table)
            meta = {**source, "context": context, "data_version": self.context.get("data_version", "unknown"),
                    **table_counts(kept, targets)}
            with warnings.catch_warnings():  # schema hints about integer columns, meant for model signatures
                warnings.simplefilter("ignore")
                dataset = mlflow.data.from_pandas(
                    kept, source=CodeDatasetSource(tags={k: str(v) for k, v in meta.items()}), name=f"{name} {context}",
                    targets=targets if targets in kept.columns else None,
                    predictions=predictions if predictions in kept.columns else None,
                )
                entity = dataset._to_mlflow_entity()
            inputs.append(DatasetInput(entity, tags=[InputTag(DATASET_CONTEXT_TAG, context)]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    # -- nesting -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, Any] | None = None) -> Iterator["StageRun"]:
        """A nested run under this one (per view, architecture, fold, setting ...)."""
        with open_run(self.client, self.experiment_id, self.root, self.context, name, self.run_id,
                  self.child_tags(tags)) as run:
            yield run

    def child_tags(self, tags: Mapping[str, Any] | None) -> dict[str, str]:
        """A child's own tags plus the ``stage`` tag it inherits from this run."""
        inherited = {k: v for k, v in self.client.get_run(self.run_id).data.tags.items() if k == "stage"}
        return {**inherited, **clean_tags(tags)}

    def start_child(self, name: str, tags: Mapping[str, Any] | None = None) -> "StageRun":
        """A nested run, created now and left RUNNING: the caller ends it (:meth:`end`), e.g. when
        the fold job it was handed to finishes. :meth:`open_children` ends the ones left open."""
        all_tags = {**self.context, **self.child_tags(tags), "mlflow.runName": name, "mlflow.parentRunId": self.run_id}
        owner = process_identity()
        if owner:  # a run of a driver that dies is marked KILLED by the next stage (reap_orphans)
            all_tags[PROCESS_TAG] = owner
        run_id = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id
        return StageRun(self.client, run_id, self.experiment_id, self.root, self.context)

    def end(self, status: str = "FINISHED", killed_by: str | None = None) -> None:
        """End this run FINISHED, FAILED or KILLED."""
        terminate(self.client, self.run_id, status, killed_by)

    @contextlib.contextmanager
    def open_children(self) -> Iterator["OpenChildren"]:
        """Child runs started now and ended one by one (:class:`OpenChildren`)."""
        with OpenChildren.around(self) as children:
            yield children

    # -- handing the run to another process ---------------------------------------------------
    def handover(self) -> "RunHandover":
        """What a job in another process (a pool worker, a Ray task) needs to log to this run:
        picklable, without the client. The job logs; whoever opened the run ends it."""
        return RunHandover(self.client.tracking_uri, self.run_id, self.experiment_id, str(self.root),
                           dict(self.context))


@dataclass(frozen=True)
class RunHandover:
    """A run opened elsewhere, as it travels to a fold job: :meth:`attach` gives a StageRun on it
    that neither creates nor ends a run (no duplicate, no orphan)."""

    tracking_uri: str
    run_id: str
    experiment_id: str
    root: str
    context: dict[str, str]

    def attach(self) -> StageRun:
        mlflow = mlflow_module()
        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return StageRun(client, self.run_id, self.experiment_id, Path(self.root), dict(self.context))


class OpenChildren:
    """Child runs of one parent that end when their jobs do, not when a ``with`` block does.

    ``start(name, tags)`` creates one RUNNING; ``end(run, error)`` ends it FINISHED, or FAILED /
    KILLED after ``error``. Leaving the block ends those still open with the block's outcome
    (FAILED on an exception, KILLED on a signal, else FINISHED), so none is left RUNNING.
    """

    def __init__(self, parent: "StageRun | NullRun") -> None:
        self.parent = parent
        self.running: dict[int, StageRun] = {}

    @classmethod
    @contextlib.contextmanager
    def around(cls, parent: "StageRun | NullRun") -> Iterator["OpenChildren"]:
        children = cls(parent)
        status, killed_by = "FINISHED", None
        try:
            yield children
        except BaseException as exc:
            status, killed_by = run_ending(exc)
            raise
        finally:
            with deferred_signals():
                for run in list(children.running.values()):
                    best_effort(f"marking run {run.run_id} {status}", run.end, status, killed_by)
                children.running.clear()

    def start(self, name: str, tags: Mapping[str, Any] | None = None) -> "StageRun | NullRun":
        with deferred_signals():  # a signal now is raised once the run is known and will be ended
            run = self.parent.start_child(name, tags)
            if run:
                self.running[id(run)] = run
        return run

    def end(self, run: "StageRun | NullRun", error: BaseException | None = None) -> None:
        if not run or id(run) not in self.running:
            return
        status, killed_by = ("FINISHED", None) if error is None else run_ending(error)
        with deferred_signals():
            self.running.pop(id(run)).end(status, killed_by)


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

    def log_tables(self, tables: Mapping[str, Any], *, name: str, source: Mapping[str, Any],
                   targets: str | None = None, predictions: str | None = None) -> None:
        pass

    def __bool__(self) -> bool:
        """False: ``if run`` reads as "is this run recorded anywhere"."""
        return False

    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, Any] | None = None) -> Iterator["NullRun"]:
        yield self

    def start_child(self, name: str, tags: Mapping[str, Any] | None = None) -> "NullRun":
        return self

    def end(self, status: str = "FINISHED", killed_by: str | None = None) -> None:
        pass

    @contextlib.contextmanager
    def open_children(self) -> Iterator[OpenChildren]:
        with OpenChildren.around(self) as children:
            yield children

    def handover(self) -> "NullRun":
        return self

    def attach(self) -> "NullRun":
        """A NullRun travels to a job as itself (see :meth:`StageRun.handover`)."""
        return self


@contextlib.contextmanager
def open_run(client, exp_id: str, root: Path, context: dict[str, str], name: str, parent_id: str | None,
         tags: Mapping[str, str]) -> Iterator[StageRun]:
    """Create a run, yield a handle, and end it FINISHED, FAILED or KILLED (see the module doc)."""
    all_tags = {**context, **tags, "mlflow.runName": name}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    owner = process_identity()
    if owner:
        all_tags[PROCESS_TAG] = owner
    with signals_as_exceptions():
        run_id, status, killed_by = None, "FINISHED", None
        try:
            with deferred_signals():  # a signal now is raised once the run exists and will be closed
                run_id = client.create_run(exp_id, tags=all_tags, run_name=name).info.run_id
            yield StageRun(client, run_id, exp_id, root, context)
        except BaseException as exc:
            status, killed_by = run_ending(exc)
            raise
        finally:
            if run_id is not None:
                with deferred_signals():
                    if status == "FINISHED":
                        client.set_terminated(run_id, status=status)
                    else:  # the block's own exception is what the caller must see
                        best_effort(f"marking run {run_id} {status}", terminate, client, run_id, status, killed_by)


def terminate(client, run_id: str, status: str, killed_by: str | None) -> None:
    if killed_by:
        client.set_tag(run_id, KILLED_BY_TAG, killed_by)
    client.set_terminated(run_id, status=status)
