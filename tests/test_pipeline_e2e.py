"""The whole pipeline, for real: `dvc repro` on a tiny project made by the project's generator.

Determinism (same seed, identical metrics) is checked by the team-stack test, which runs the same
tiny project a second time against the tracking server and compares with this run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_pipeline import BIN, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_pipeline"),  # one worker runs the pair
              pytest.mark.timeout(1800)]  # the first test of the group pays for both runs

# Every stage that logs a run (pretrain_cohort only writes the simulated release's files).
STAGES = ("import_pretrain", "pretrain_generator", "ingest", "preprocess", "validate_data", "split",
          "observer_ceiling", "train_generator", "impute", "train_classifier", "saliency_eval", "evaluate", "gate")


@pytest.fixture(scope="module")
def first_run(tiny_pipeline_run) -> Path:
    return tiny_pipeline_run


def test_dvc_repro_runs_every_stage_and_leaves_a_clean_status(first_run):
    status = run([str(BIN / "dvc"), "status", "--json"], first_run)
    assert status.strip().splitlines()[-1] in ("{}",), status
    for path in ("data/interim/manifest.csv", "data/processed/images.npy", "reports/validation/metrics.json",
                 "data/splits/folds.csv", "reports/generator/CC.json", "reports/generator/MLO.json",
                 "data/imputed/images.npy", "outputs/predictions/resnet18/CESM_CC.csv",
                 "reports/evaluation/table_a1.md", "reports/metrics.json", "reports/gate.json"):
        assert (first_run / path).exists(), path


def test_every_stage_logged_a_run_under_one_parent(first_run):
    from virtual_biopsy.mlops import tracking

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
    from virtual_biopsy.mlops import registry

    decision = json.loads((first_run / "reports" / "gate.json").read_text())["resnet18"]
    assert decision["decision"] in ("promoted", "rejected") and decision["checks"], decision
    assert all({"name", "value", "threshold", "verdict"} <= set(check) for check in decision["checks"])
    from virtual_biopsy.mlops import tracking

    version = registry.get_alias("virtual-biopsy-resnet18", registry.CHALLENGER, root=first_run)
    # The version number is the gate run's tag; the DVC-tracked report holds none.
    assert "version" not in decision
    client = tracking.get_client(first_run)
    gate_runs = client.search_runs([tracking.experiment_id(client, first_run)], filter_string="tags.stage = 'gate'")
    assert version is not None
    assert [r.data.tags["resnet18.version"] for r in gate_runs if "resnet18.version" in r.data.tags] == [str(version)]
