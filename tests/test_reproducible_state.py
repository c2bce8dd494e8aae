"""Pipeline state is reproducible: same code, params and data, same dvc.lock, committed reports
and honest ``git_commit`` tags, whichever MLflow store the run logs to.

The fresh-clone check compares the session's two runs of the tiny pipeline (conftest's
``_tiny_pipeline_runs``): the tiny project on its embedded SQLite store, and a fresh clone of the
same commit (no outputs, no DVC cache) against another, fresh store, the team stack's tracking
server. Registry version numbers, which differ between stores, live in MLflow only, so nothing may
differ except RUN_SPECIFIC; the clone then commits its run as a user does and reruns a stage whose
output is a committed report, which must leave git status clean and the run's tag undirty.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from tiny_pipeline import BIN, REPO, run

from virtual_biopsy.mlops import tracking

# Outputs whose bytes differ from run to run, by design (README, "Results"): great-expectations'
# Data Docs pages carry the validation's run time, a random data-context id and random element ids.
RUN_SPECIFIC = {"reports/validation/data_docs"}
GIT = ["git", "-c", "user.email=t@example.org", "-c", "user.name=test"]


def _git(root, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=root, capture_output=True, text=True, check=True).stdout


def _out_hashes(lock: dict) -> dict[tuple[str, str], str]:
    return {(stage, out["path"]): out.get("md5") for stage, entry in lock["stages"].items()
            for out in entry.get("outs", [])}


def _without_run_specific(lock: dict) -> dict:
    """dvc.lock with the hashes of RUN_SPECIFIC outputs (as outs or as deps) blanked."""
    def blank(entry: dict) -> dict:
        return {**entry, "md5": None, "size": None, "nfiles": None} if entry["path"] in RUN_SPECIFIC else entry

    return {stage: {**entry, **{kind: [blank(e) for e in entry[kind]] for kind in ("deps", "outs") if kind in entry}}
            for stage, entry in lock["stages"].items()}


def test_git_commit_is_dirty_for_code_and_params_but_not_for_pipeline_outputs(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")  # the real pipeline: its outs are what is excluded
    files = {"params.yaml": "seed: 1\n", "src/code.py": "x = 1\n", "dvc.lock": "schema: '2.0'\n",
             "data.dvc": "outs: []\n", ".gitignore": "/models/\n", "reports/metrics.json": "{}\n",
             "reports/generator/CC.json": "{}\n", "reports/validation/metrics.json": "{}\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "state")
    head = _git(root, "rev-parse", "HEAD").strip()
    assert tracking.git_commit(root) == head

    # What dvc repro does to a clean checkout: deletes an output before its stage, rewrites
    # outputs, dvc.lock, *.dvc and .gitignore, and (core.autostage) stages some of them.
    (root / "reports/metrics.json").unlink()
    (root / "reports/generator/CC.json").write_text('{"mean": {}}\n')
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (root / "data.dvc").write_text("outs: [{md5: abc}]\n")
    (root / ".gitignore").write_text("/models/\n/manifest.csv\n")
    _git(root, "add", "dvc.lock", ".gitignore")
    assert tracking.git_commit(root) == head

    (root / "params.yaml").write_text("seed: 2\n")
    assert tracking.git_commit(root) == f"{head}+dirty"
    _git(root, "checkout", "-q", "--", "params.yaml")
    (root / "src/code.py").write_text("x = 2\n")
    _git(root, "add", "src/code.py")
    assert tracking.git_commit(root) == f"{head}+dirty"


def test_pipeline_output_pathspecs_cover_templated_stage_outputs():
    specs = tracking.pipeline_output_pathspecs(REPO)
    for path in ("reports/generator/*.json", "models/generator/*", "reports/evaluation", "reports/gate.json",
                 "outputs/predictions/*/*_*.csv", "reports/validation/data_docs"):
        assert f":(exclude,glob){path}" in specs, path
    assert not any("src/" in spec or "params.yaml" in spec for spec in specs)


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_pipeline")
@pytest.mark.timeout(1800)  # the first test of the group pays for the session's two pipeline runs
def test_a_fresh_clone_reproduces_the_committed_dvc_lock_and_reports(clone_run_on_team_stack, team_stack):
    first, clone = clone_run_on_team_stack.first, clone_run_on_team_stack.clone
    committed = clone_run_on_team_stack.committed
    assert "reports/generator/CC.json" in committed and "reports/metrics.json" in committed

    before, after = (yaml.safe_load((root / "dvc.lock").read_text()) for root in (first, clone))
    differing = sorted(key for key, md5 in _out_hashes(after).items() if _out_hashes(before).get(key) != md5)
    assert {path for _, path in differing} <= RUN_SPECIFIC, differing
    assert _without_run_specific(after) == _without_run_specific(before)
    # Every report a user commits after a run is rewritten byte for byte by the clone's run
    # (registry versions are not in them): committing the first run and cloning it would leave
    # git status clean but for dvc.lock's run-specific hashes.
    assert [rel for rel in committed[1:] if (clone / rel).read_bytes() != (first / rel).read_bytes()] == []

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=team_stack.tracking_uri)
    experiment = client.get_experiment_by_name(clone_run_on_team_stack.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    head = _git(clone, "rev-parse", "HEAD").strip()
    assert head == _git(first, "rev-parse", "HEAD").strip()
    assert runs and {r.data.tags.get("git_commit") for r in runs if "git_commit" in r.data.tags} == {head}
    assert run([str(BIN / "dvc"), "status", "--json"], clone).strip().splitlines()[-1] == "{}"

    # Commit the run as the project does, then rerun a stage whose output is a committed report:
    # DVC deletes and rewrites it while the stage runs, and the run is still not "dirty".
    _git(clone, "add", *committed)
    _git(clone, "commit", "-q", "-m", "pipeline run")
    env = {**team_stack.client_env(), tracking.EXPERIMENT_ENV: clone_run_on_team_stack.experiment}
    run([str(BIN / "dvc"), "repro", "--force", "--single-item", "split"], clone, env=env)
    committed_head = _git(clone, "rev-parse", "HEAD").strip()
    split_runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'split'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
    assert split_runs[0].data.tags["git_commit"] == committed_head
    assert _git(clone, "status", "--porcelain", "--untracked-files=no").strip() == ""
