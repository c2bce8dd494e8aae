"""vbiopsy tune: shared PostgreSQL study across worker processes, nested MLflow trial runs,
pruning of a hopeless search space, and no access to test patients."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from stack import PostgresCluster, pg_bin

from virtual_biopsy import tuning
from virtual_biopsy.core.config import load_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TUNE = {"trials": 2, "metric": "auc", "storage": "sqlite:///optuna.db",
        "space": {"lr": {"low": 0.0003, "high": 0.003, "log": True}, "batch_size": [4, 8],
                  "augment_strength": {"low": 0.0, "high": 1.0}}}


@pytest.fixture(scope="module")
def postgres():
    if pg_bin() is None:
        pytest.fail("PostgreSQL server binaries missing: run `make system-deps`")
    base = Path(tempfile.mkdtemp(prefix="vbiopsy-tune-pg-", dir="/tmp"))
    base.chmod(0o711)
    cluster = PostgresCluster(base / "postgres")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_share_one_postgres_study_and_nest_every_trial_in_mlflow(processed_project, copy_project, postgres,
                                                                            tmp_path):
    import mlflow
    import optuna

    paths = copy_project(processed_project, tmp_path / "project", {"tune": TUNE})
    storage = postgres.create_database("optuna").replace("postgresql://", "postgresql+psycopg2://")
    tracking_uri = postgres.create_database("mlflow").replace("postgresql://", "postgresql+psycopg2://")
    # The tracking schema and experiment exist before the workers start (as on a team server);
    # artifacts go to the project folder, not the test runner's working directory.
    client = mlflow.MlflowClient(tracking_uri)
    client.create_experiment("virtual-biopsy", artifact_location=(tmp_path / "artifacts").as_uri())
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen([sys.executable, "-m", "virtual_biopsy.cli.main", "tune", "--root", str(paths.root),
                          "--storage", storage, "--study", "shared", "--trials", "2", "--folds", "1",
                          "--worker", str(worker)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for worker in (0, 1)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3]  # four trials in total, each number once
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)

    parent_id = study.user_attrs[tuning.PARENT_RUN_ATTR]
    parent = client.get_run(parent_id)
    assert parent.data.tags["stage"] == "tune"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == [f"trial-{n}" for n in range(4)]
    for run in children:
        trial = study.trials[int(run.data.tags["trial"])]
        assert float(run.data.params["classifier.lr"]) == pytest.approx(trial.params["lr"])
        history = client.get_metric_history(run.info.run_id, "val_auc")
        assert [m.step for m in history] == sorted(trial.intermediate_values)  # per-epoch value as steps
    best = yaml.safe_load((paths.reports / "tune" / "best_params.yaml").read_text())
    assert set(best["classifier"]) == {"lr", "batch_size", "augment_strength", "augment"}
    assert any("dvc exp run" in out and "-S classifier.lr=" in out for out in outputs)


def test_median_pruner_stops_trials_of_a_hopeless_search_space(processed_project, copy_project, tmp_path):
    import optuna

    # lr 10..100: Adam steps of that size wreck the network; the first (completed) trial sets the
    # median and later trials fall below it after an epoch or diverge outright.
    bad = {**TUNE, "space": {"lr": {"low": 10.0, "high": 100.0, "log": True}}}
    paths = copy_project(processed_project, tmp_path, {"classifier": {"epochs": 3}, "tune": bad})
    params = load_params(paths.root / "params.yaml")
    request = tuning.TuneRequest(trials=6, metric="auc", storage="sqlite:///optuna.db", study_name="hopeless",
                                 max_folds=1, use_mlflow=False, n_startup_trials=1)
    baseline = {"lr": 0.001}
    study = optuna.create_study(study_name="hopeless", storage=f"sqlite:///{paths.root / 'optuna.db'}",
                                direction="maximize")
    study.enqueue_trial(baseline, skip_if_exists=True)  # one sane trial first: the yardstick
    try:
        tuning.run_tuning(paths, params, request)
    except tuning.TuningError:
        pass  # no completed trial is an acceptable outcome of a hopeless space
    states = [t.state for t in optuna.load_study(study_name="hopeless", storage=study._storage).trials]
    assert optuna.trial.TrialState.PRUNED in states
    assert states.count(optuna.trial.TrialState.PRUNED) >= 3


def test_tuning_never_reads_the_pixels_of_test_patients(processed_project, copy_project, tmp_path):
    import pandas as pd

    clean = copy_project(processed_project, tmp_path / "clean", {"tune": TUNE})
    poisoned = copy_project(processed_project, tmp_path / "poisoned", {"tune": TUNE})
    # Every image of fold 0's test patients becomes NaN: reading any of them makes a loss NaN.
    # (Each patient is a test patient of some fold, so the check tunes on fold 0 alone.)
    index = pd.read_csv(poisoned.processed_index, dtype={"patient_id": str}, keep_default_na=False)
    folds = pd.read_csv(poisoned.splits, dtype={"patient_id": str})
    test_patients = set(folds.loc[(folds["fold"] == 0) & (folds["subset"] == "test"), "patient_id"])
    images = np.load(poisoned.processed_images)
    images[index["patient_id"].isin(test_patients).to_numpy()] = np.nan
    np.save(poisoned.processed_images, images)

    _, selected = tuning.tuning_folds(poisoned, "CESM", "CC")
    assert len(selected) == 2
    for part in selected:
        fold_test = set(folds.loc[(folds["fold"] == part.fold) & (folds["subset"] == "test"), "patient_id"])
        assert not (set(part.train["patient_id"]) | set(part.val["patient_id"])) & fold_test

    request = tuning.TuneRequest(trials=1, metric="auc", storage="sqlite:///optuna.db", max_folds=1, use_mlflow=False)
    values = [tuning.run_tuning(p, load_params(p.root / "params.yaml"), request)["value"] for p in (clean, poisoned)]
    assert math.isfinite(values[0]) and values[0] == values[1]


def test_search_space_names_an_unsearchable_key():
    with pytest.raises(tuning.TuningError, match="tune.space.epochs: not searchable"):
        tuning.check_space({"epochs": [1, 2]})


def test_best_params_apply_command_sets_dotted_classifier_keys():
    overrides = tuning.best_overrides({"lr": 0.00123456789, "batch_size": 16, "augment_strength": 0.0})
    assert overrides == {"classifier.augment_strength": 0.0, "classifier.batch_size": 16,
                         "classifier.lr": 0.00123457, "classifier.augment": False}
    command = tuning.apply_command(overrides, "s")
    assert command[:5] == ["dvc", "exp", "run", "-n", "tune-s"] and "classifier.lr=0.00123457" in command


def test_joining_a_study_made_with_another_fold_count_is_refused(processed_project, copy_project, tmp_path):
    paths = copy_project(processed_project, tmp_path / "project", {"tune": TUNE})
    params = load_params(paths.root / "params.yaml")
    one_fold = tuning.TuneRequest(trials=1, metric="auc", storage="sqlite:///optuna.db", study_name="s",
                                  max_folds=1, use_mlflow=False)
    tuning.run_tuning(paths, params, one_fold)
    two_folds = tuning.TuneRequest(**{**one_fold.__dict__, "max_folds": None})
    with pytest.raises(tuning.TuningError, match=r"study s was created with folds \[0\] \(this run: \[0, 1\]\)"):
        tuning.run_tuning(paths, params, two_folds)
    wider = copy_project(processed_project, tmp_path / "wider",
                         {"tune": {**TUNE, "space": {**TUNE["space"], "batch_size": [4, 8, 16]}}})
    shutil.copy(paths.root / "optuna.db", wider.root / "optuna.db")
    with pytest.raises(tuning.TuningError, match="study s was created with space"):
        tuning.run_tuning(wider, load_params(wider.root / "params.yaml"), one_fold)


def test_tune_prints_a_line_per_epoch_and_trial_when_not_on_a_terminal(processed_project, copy_project, tmp_path):
    paths = copy_project(processed_project, tmp_path / "project", {"tune": TUNE})
    done = subprocess.run([sys.executable, "-m", "virtual_biopsy.cli.main", "tune", "--root", str(paths.root),
                           "--trials", "1", "--folds", "1", "--no-mlflow"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    epochs = load_params(paths.root / "params.yaml").classifier.epochs
    lines = done.stderr.splitlines()
    for epoch in range(1, epochs + 1):
        assert any(f"trial 0 fold 0 epoch {epoch}/{epochs}: val auc" in line for line in lines), done.stderr
    assert any("trial 0 complete (value" in line and "1/1 done" in line for line in lines), done.stderr
