"""Tracking: embedded store by default, one parent per pipeline run, tagged child runs."""
from __future__ import annotations

import mlflow
import pytest

from virtual_biopsy.core.config import Params
from virtual_biopsy.mlops import tracking


@pytest.fixture()
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    return tmp_path


def _runs(root):
    client = tracking.get_client(root)
    exp = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    return client.search_runs([exp.experiment_id])


def test_embedded_store_lives_inside_the_project(project):
    with tracking.stage_run("ingest", root=project, params=Params()) as run:
        run.log_metrics({"accepted": 3})
    assert (project / "mlruns" / "mlflow.db").exists()
    assert run.artifact_uri().startswith((project / "mlruns" / "artifacts").resolve().as_uri())


def test_stages_of_one_pipeline_run_share_one_parent(project):
    params = Params()
    with tracking.stage_run("ingest", root=project, params=params) as first:
        pass
    with tracking.stage_run("preprocess", root=project, params=params) as second:
        with second.child("fold-0", tags={"fold": 0, "view": "CC"}) as grandchild:
            grandchild.log_metrics({"loss": 0.5}, step=1)
    runs = {r.info.run_id: r for r in _runs(project)}
    parents = [r for r in runs.values() if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    parent_id = parents[0].info.run_id
    assert runs[first.run_id].data.tags["mlflow.parentRunId"] == parent_id
    assert runs[second.run_id].data.tags["mlflow.parentRunId"] == parent_id
    child = runs[grandchild.run_id]
    assert child.data.tags["mlflow.parentRunId"] == second.run_id
    assert child.data.tags["stage"] == "preprocess" and child.data.tags["fold"] == "0"
    for key in ("git_commit", "data_version", "params_hash"):
        assert child.data.tags[key] == runs[first.run_id].data.tags[key]
    assert runs[first.run_id].data.params["ingest.max_rejected_share"] == "0.05"


def test_changed_params_open_a_new_parent(project):
    with tracking.stage_run("ingest", root=project, params=Params()):
        pass
    with tracking.stage_run("ingest", root=project, params=Params(seed=1)):
        pass
    parents = [r for r in _runs(project) if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 2


def test_pinned_parent_run_is_used(project, monkeypatch):
    pinned = tracking.start_pipeline_run(project, Params())
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, pinned)
    with tracking.stage_run("ingest", root=project, params=Params(seed=7)) as run:
        pass
    assert tracking.get_client(project).get_run(run.run_id).data.tags["mlflow.parentRunId"] == pinned


def test_failing_stage_marks_its_run_failed(project):
    with pytest.raises(RuntimeError):
        with tracking.stage_run("ingest", root=project) as run:
            raise RuntimeError("boom")
    assert tracking.get_client(project).get_run(run.run_id).info.status == "FAILED"


def test_nan_metric_is_left_out_not_logged(project):
    with tracking.stage_run("evaluate", root=project) as run:
        run.log_metrics({"auc": float("nan"), "mcc": 0.25})
    metrics = tracking.get_client(project).get_run(run.run_id).data.metrics
    assert metrics == {"mcc": 0.25}


def test_tracking_uri_env_overrides_embedded_store(project, monkeypatch, tmp_path_factory):
    other = tmp_path_factory.mktemp("server-store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}/elsewhere.db")
    with tracking.stage_run("ingest", root=project):
        pass
    assert (other / "elsewhere.db").exists()
    assert not (project / "mlruns" / "mlflow.db").exists()
    assert mlflow.__version__.startswith("3.")


def test_sqlite_uri_keeps_artifacts_beside_the_database(project, monkeypatch, tmp_path_factory):
    other = tmp_path_factory.mktemp("sqlite-store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}/store.db")
    monkeypatch.chdir(project)
    with tracking.stage_run("ingest", root=project) as run:
        run.log_text("hello", "note.txt")
    assert (other / "artifacts").is_dir()
    assert not (project / "mlruns").exists()


def test_pseudonym_salt_is_never_logged(project):
    params = Params()
    tracking.start_pipeline_run(project, params)
    with tracking.stage_run("ingest", root=project, params=params) as run:
        pass
    client = tracking.get_client(project)
    for r in client.search_runs([run.experiment_id]):
        assert params.ingest.pseudonym_salt not in r.data.params.values()
    assert client.get_run(run.run_id).data.params["ingest.pseudonym_salt"] == "<redacted>"


def test_experiment_is_marked_as_model_training_for_the_ui(project):
    with tracking.stage_run("ingest", root=project):
        pass
    client = tracking.get_client(project)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING
