"""Run handles: StageRun logs to one MLflow run (no global active run), NullRun logs nothing;
``open_run`` creates a run and ends it FINISHED, FAILED or KILLED (run_lifecycle)."""
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
        inherited = {k: v for k, v in self.client.get_run(self.run_id).data.tags.items() if k == "stage"}
        with open_run(self.client, self.experiment_id, self.root, self.context, name, self.run_id,
                  {**inherited, **clean_tags(tags)}) as run:
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

    def log_tables(self, tables: Mapping[str, Any], *, name: str, source: Mapping[str, Any],
                   targets: str | None = None, predictions: str | None = None) -> None:
        pass

    def __bool__(self) -> bool:
        """False: ``if run`` reads as "is this run recorded anywhere"."""
        return False

    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, Any] | None = None) -> Iterator["NullRun"]:
        yield self


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
