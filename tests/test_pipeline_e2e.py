"""The whole pipeline, for real: `dvc repro` on a tiny project made by the project's generator."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tiny_pipeline import BIN, make_tiny_project, repro, run

pytestmark = pytest.mark.slow

STAGES = ("ingest", "preprocess", "validate_data", "split", "train_generator", "impute", "train_classifier",
          "evaluate", "gate")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    root = make_tiny_project(tmp_path_factory.mktemp("e2e") / "project")
    repro(root)
    return root


def test_dvc_repro_runs_every_stage_and_leaves_a_clean_status(first_run):
    status = run([str(BIN / "dvc"), "status", "--json"], first_run)
    assert status.strip().splitlines()[-1] in ("{}",), status
    for path in ("data/interim/manifest.csv", "data/processed/images.npy", "reports/validation/metrics.json",
                 "data/splits/folds.csv", "reports/generator/CC.json", "reports/generator/MLO.json",
                 "data/imputed/images.npy", "outputs/predictions/resnet18/CESM_CC.csv",
                 "reports/evaluation/table_a1.md", "reports/metrics.json", "reports/gate.json"):
        assert (first_run / path).exists(), path


def test_every_stage_logged_a_run_under_one_parent(first_run):
    from virtual_biopsy import tracking

    client = tracking.get_client(first_run)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.data.tags["stage"] for r in stage_runs} == set(STAGES)
    for r in runs:
        assert r.data.tags["data_version"] == parents[0].data.tags["data_version"] != "untracked"


def test_gate_registered_the_fused_pipeline_and_recorded_its_decision(first_run):
    from virtual_biopsy import registry

    decision = json.loads((first_run / "reports" / "gate.json").read_text())["resnet18"]
    assert decision["decision"] in ("promoted", "rejected") and decision["checks"], decision
    assert all({"name", "value", "threshold", "verdict"} <= set(check) for check in decision["checks"])
    version = registry.get_alias("virtual-biopsy-resnet18", registry.CHALLENGER, root=first_run)
    assert version is not None and str(version) == str(decision["version"])


def test_same_seed_gives_identical_metrics_on_a_second_run(first_run, tmp_path):
    """Determinism: a second project from the same inputs reproduces every headline metric."""
    second = tmp_path / "second"
    shutil.copytree(first_run, second, ignore=shutil.ignore_patterns(
        "mlruns", "data.processed", "models", "outputs", "reports", "interim", "processed", "splits", "imputed",
        "dvc.lock"))
    repro(second)
    for report in ("reports/metrics.json", "reports/generator/CC.json", "reports/generator/MLO.json"):
        first_values = json.loads((first_run / report).read_text())
        second_values = json.loads((second / report).read_text())
        first_values.get("serving", {}).pop("version", None)
        second_values.get("serving", {}).pop("version", None)
        assert second_values == first_values, report
