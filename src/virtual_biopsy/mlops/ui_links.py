"""The MLflow UI: the command that serves this project's store and the links the project prints,
every one opening in model-training mode."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from virtual_biopsy.mlops.store import EXPERIMENT_ENV, EXPERIMENT_NAME, get_client, tracking_uri


UI_PORT = 5000
# MLflow 3.17's UI has one global mode that starts as GenAI (Overview, Traces, Sessions ...): it
# takes ``workflowType`` from the page's URL, else from the browser's localStorage, else "genai",
# and ignores the experiment's mlflow.experimentKind tag. So every link the project prints says
# ``workflowType=machine_learning``: a fresh browser then opens the runs table of model training.
UI_MODE = {"workflowType": "machine_learning"}
# The evaluate stage's settings runs (its robustness sweeps are runs tagged synthetic_share 0-100).
EVALUATE_SETTINGS_FILTER = "tags.stage = 'evaluate' and tags.fold = 'all' and tags.synthetic_share != '0-100'"


def _serves_ui(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ui_command(root: str | Path = ".", port: int = UI_PORT) -> str:
    """The shell command that opens the MLflow UI on this project's store (a server needs none)."""
    uri = tracking_uri(root)
    if _serves_ui(uri):
        return f"open {ui_base_url(root, port)} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --port {port}"


def ui_base_url(root: str | Path = ".", port: int = UI_PORT) -> str:
    """Where the UI answers: the tracking server, or ``mlflow ui`` (ui_command) on loopback."""
    uri = tracking_uri(root)
    return uri.rstrip("/") if _serves_ui(uri) else f"http://127.0.0.1:{port}"


def ui_link(base: str, route: str, **query: str) -> str:
    """``BASE/#/ROUTE?...&workflowType=machine_learning``: a page of the UI in model-training mode.

    The mode goes last: the comparison page reads its first parameter only when it is ``runs``.
    """
    from urllib.parse import quote, urlencode

    return f"{base.rstrip('/')}/#/{route.strip('/')}?{urlencode({**query, **UI_MODE}, quote_via=quote)}"


def runs_link(base: str, experiment_id: str, search_filter: str | None = None, order_by: str | None = None,
              ascending: bool = False) -> str:
    """The experiment's runs table, optionally filtered (MLflow search syntax) and ordered.

    Ordered by anything but the start time, the UI lists the matching runs flat; by start time
    (its default) it nests them under their parents, collapsed.
    """
    query = {"searchFilter": search_filter} if search_filter else {}
    if order_by:
        query.update(orderByKey=order_by, orderByAsc=str(ascending).lower())
    return ui_link(base, f"experiments/{experiment_id}/runs", **query)


def compare_runs_link(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's comparison page of ``run_ids`` (params, metrics, plots side by side)."""
    return ui_link(base, "compare-runs", runs=json.dumps(list(run_ids)), experiments=json.dumps([experiment_id]))


def ui_links(root: str | Path = ".", port: int = UI_PORT, client: Any = None) -> dict[str, str]:
    """The UI pages ``vbiopsy pipeline summary`` prints, by what they show (all open in model-training mode)."""
    base = ui_base_url(root, port)
    client = client or get_client(root)
    found = client.get_experiment_by_name(os.environ.get(EXPERIMENT_ENV, EXPERIMENT_NAME))
    if found is None:
        return {"experiments": ui_link(base, "experiments")}
    exp = found.experiment_id
    by_auc = "metrics.`test_auc`"
    return {
        "runs (pipeline > stage > fold, newest first)": runs_link(base, exp),
        "settings compared (evaluate, by test AUC)": runs_link(base, exp, EVALUATE_SETTINGS_FILTER, by_auc),
        "one setting (F+Ĉ, every architecture)": runs_link(base, exp, "tags.setting = 'F+Ĉ'", by_auc),
    }
