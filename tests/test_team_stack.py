"""The team stack for real: PostgreSQL + S3 (moto server) + `vbiopsy server`, and DVC's S3 remote.

One session-scoped stack (tests/stack.py) serves every test here; the tests only need
``MLFLOW_TRACKING_URI``, as a user does. Clients hold no S3 or database credentials: artifacts go
through the server's proxy.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from virtual_biopsy.mlops import tracking

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture()
def client_of(team_stack, monkeypatch, tmp_path):  # noqa: F811
    """This test process as a plain client: the tracking URI and nothing else."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "MLFLOW_S3_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_stack.tracking_uri)
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, f"vb-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    return tmp_path


def _search_runs(base_url: str, experiment_id: str) -> list[dict]:
    response = requests.post(f"{base_url}/api/2.0/mlflow/runs/search",
                             json={"experiment_ids": [experiment_id], "max_results": 100}, timeout=30)
    response.raise_for_status()
    return response.json().get("runs", [])


def test_stage_run_logs_to_server_with_artifacts_in_s3(team_stack, client_of):  # noqa: F811
    report = client_of / "report.json"
    report.write_text('{"accepted": 3}\n')
    with tracking.stage_run("ingest", root=client_of, tags={"view": "CC"}) as run:
        run.log_params({"ingest.max_rejected_share": 0.05})
        run.log_metrics({"accepted": 3.0})
        run.log_artifact(report, "reports")
    assert run.artifact_uri().startswith("mlflow-artifacts:"), "artifacts must go through the server's proxy"

    keys = team_stack.s3.keys(team_stack.bucket, "mlartifacts/")
    assert any(key.endswith(f"{run.run_id}/artifacts/reports/report.json") for key in keys), keys
    body = team_stack.s3.client().get_object(
        Bucket=team_stack.bucket, Key=next(k for k in keys if k.endswith(f"{run.run_id}/artifacts/reports/report.json"))
    )["Body"].read()
    assert body == report.read_bytes()

    runs = {r["info"]["run_id"]: r for r in _search_runs(team_stack.tracking_uri, run.experiment_id)}
    assert run.run_id in runs
    logged = runs[run.run_id]["data"]
    assert {"key": "ingest.max_rejected_share", "value": "0.05"} in logged["params"]
    assert any(m["key"] == "accepted" and m["value"] == 3.0 for m in logged["metrics"])
    tags = {t["key"]: t["value"] for t in logged["tags"]}
    assert tags["stage"] == "ingest" and tags["view"] == "CC"
    parent_id = tags["mlflow.parentRunId"]
    assert runs[parent_id]["info"]["status"] in ("RUNNING", "FINISHED")


def test_registered_model_alias_is_served_by_rest_api(team_stack, client_of):  # noqa: F811
    name = f"vbiopsy-fused-{uuid.uuid4().hex[:6]}"
    with tracking.stage_run("gate", root=client_of) as run:
        run.log_text("placeholder model card\n", "model/README.md")
    client = tracking.get_client(client_of)
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.run_id}/model", run_id=run.run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    response = requests.get(f"{team_stack.tracking_uri}/api/2.0/mlflow/registered-models/alias",
                            params={"name": name, "alias": "champion"}, timeout=30)
    response.raise_for_status()
    served = response.json()["model_version"]
    assert served["name"] == name and served["version"] == str(version.version)
    assert served["run_id"] == run.run_id
    assert "champion" in served.get("aliases", [])


def test_mlflow_run_entry_point_against_the_server(team_stack, tmp_path):  # noqa: F811
    env = team_stack.client_env()
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env[tracking.EXPERIMENT_ENV] = experiment = f"vb-project-{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        [str(VENV_BIN / "mlflow"), "run", str(REPO), "-e", "check_stack", "--env-manager", "local",
         "--experiment-name", experiment, "-P", f"root={tmp_path}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stack OK" in result.stdout

    exp = requests.get(f"{team_stack.tracking_uri}/api/2.0/mlflow/experiments/get-by-name",
                       params={"experiment_name": experiment}, timeout=30).json()["experiment"]
    runs = _search_runs(team_stack.tracking_uri, exp["experiment_id"])
    stages = sorted(t["value"] for r in runs for t in r["data"].get("tags", []) if t["key"] == "stage")
    assert "check_stack" in stages
    launcher = [r for r in runs if any(t["key"] == "mlflow.project.entryPoint" for t in r["data"].get("tags", []))]
    assert launcher and launcher[0]["info"]["status"] == "FINISHED"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def _dvc(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_dvc_push_pull_round_trip_through_s3_remote(team_stack, tmp_path):  # noqa: F811
    repo = tmp_path / "repo"
    data = repo / "data" / "raw"
    (data / "images" / "P1").mkdir(parents=True)
    rng_bytes = os.urandom(64 * 1024)
    (data / "images" / "P1" / "P1_1_LCC_LOW_ENERGY.dcm").write_bytes(rng_bytes)
    (data / "metadata.csv").write_text("image,label\nP1_1_LCC_LOW_ENERGY.dcm,benign\n")
    originals = {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()}

    bucket = team_stack.s3.create_bucket(f"dvc-{uuid.uuid4().hex[:8]}")
    env = {**os.environ, **team_stack.s3.env(), "VBIOPSY_DVC_REMOTE_URL": f"s3://{bucket}/dvcstore",
           "VBIOPSY_DVC_S3_ENDPOINT": team_stack.s3.endpoint, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    _git(repo, "init", "-q")
    _dvc(repo, env, "init", "-q")
    # The project's script: remote URL in .dvc/config (committed), endpoint + keys in config.local.
    result = subprocess.run(["bash", str(REPO / "scripts" / "dvc_s3_remote.sh"), "--store-credentials"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    committed = (repo / ".dvc" / "config").read_text()
    assert f"s3://{bucket}/dvcstore" in committed
    assert team_stack.s3.secret_key not in committed and team_stack.s3.access_key not in committed
    assert team_stack.s3.secret_key in (repo / ".dvc" / "config.local").read_text()
    assert subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=repo).returncode == 0

    _dvc(repo, env, "add", "data/raw")
    _dvc(repo, env, "push")  # credentials from the environment
    # ... and from .dvc/config.local alone, as in a later shell that exports nothing
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    assert team_stack.s3.keys(bucket, "dvcstore/"), "dvc push wrote nothing to the bucket"

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc(repo, env, "pull")
    restored = {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert restored == originals


def test_login_is_required_when_auth_is_on(team_stack, tmp_path):  # noqa: F811
    from stack import MlflowServer

    password = uuid.uuid4().hex + "Aa1!"
    env = {**team_stack.server_env(team_stack.postgres.create_database("mlflow_auth_test")),
           "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
    server = MlflowServer(tmp_path / "auth-server", env, auth=True)
    try:
        server.start()
        url = f"{server.url}/api/2.0/mlflow/experiments/search"
        assert requests.get(url, params={"max_results": 1}, timeout=30).status_code == 401
        ok = requests.get(url, params={"max_results": 1}, auth=("admin", password), timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        server.stop()


TINY_DVC_YAML = """\
stages:
  train:
    cmd: python train.py
    deps: [train.py, data/raw]
    params: [train.lr]
    metrics: [{metrics.json: {cache: false}}]
  gate:
    cmd: python gate.py
    deps: [gate.py, metrics.json]
    outs: [gate.json]
"""
TINY_TRAIN = """\
import json, yaml
lr = yaml.safe_load(open("params.yaml"))["train"]["lr"]
n = len(open("data/raw/values.txt").read().split())
json.dump({"auc": round(0.5 + lr, 3), "n": n}, open("metrics.json", "w"))
"""
TINY_GATE = """\
import json
json.dump({"champion": json.load(open("metrics.json"))["auc"] >= 0.55}, open("gate.json", "w"))
"""


def test_retrain_script_pulls_reproduces_diffs_and_pushes(team_stack, tmp_path):  # noqa: F811
    repo = tmp_path / "project"
    (repo / "data" / "raw").mkdir(parents=True)
    (repo / "data" / "raw" / "values.txt").write_text("1 2 3 4\n")
    (repo / "params.yaml").write_text("train:\n  lr: 0.1\n")
    (repo / "dvc.yaml").write_text(TINY_DVC_YAML)
    (repo / "train.py").write_text(TINY_TRAIN)
    (repo / "gate.py").write_text(TINY_GATE)
    bucket = team_stack.s3.create_bucket(f"retrain-{uuid.uuid4().hex[:8]}")
    env = {**os.environ, **team_stack.s3.env(), "VBIOPSY_DVC_S3_ENDPOINT": team_stack.s3.endpoint,
           "DVC_NO_ANALYTICS": "1", "DVC": str(VENV_BIN / "dvc"),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    env.pop("GITHUB_STEP_SUMMARY", None)
    _git(repo, "init", "-q", "-b", "main")
    _dvc(repo, env, "init", "-q")
    remote_env = {**env, "VBIOPSY_DVC_REMOTE_URL": f"s3://{bucket}/store"}
    subprocess.run(["bash", str(REPO / "scripts" / "dvc_s3_remote.sh")], cwd=repo, env=remote_env, check=True,
                   capture_output=True)
    _dvc(repo, env, "add", "data/raw")
    _dvc(repo, env, "repro")
    _dvc(repo, env, "push", "data/raw.dvc")  # the remote holds the raw data, not the pipeline outputs
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "baseline")

    # A change on a branch, as in a pull request, on a fresh runner: no cache, no data.
    _git(repo, "checkout", "-q", "-b", "better-lr")
    (repo / "params.yaml").write_text("train:\n  lr: 0.2\n")
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "raw")
    retrain_env = {**remote_env, "RETRAIN_REQUIRE_REMOTE": "1"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "retrain.sh")], cwd=repo, env=retrain_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (repo / "data" / "raw" / "values.txt").read_text() == "1 2 3 4\n"
    assert json.loads((repo / "gate.json").read_text()) == {"champion": True}
    summary = (repo / "reports" / "retrain" / "summary.md").read_text()
    assert "against `main`" in summary
    assert "train.lr" in summary and "0.1" in summary and "0.2" in summary
    assert "auc" in summary and "0.6" in summary and "0.7" in summary
    assert "failed" not in summary, summary
    # the gate's output was pushed by the script: pull it into a fresh cache
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "gate.json").unlink()
    _dvc(repo, env, "pull", "gate")
    assert json.loads((repo / "gate.json").read_text()) == {"champion": True}


@pytest.mark.xdist_group("tiny_pipeline")
@pytest.mark.timeout(1800)  # the first test of the group pays for the session's two pipeline runs
def test_tiny_pipeline_runs_against_the_server_with_artifacts_in_s3(team_stack, clone_run_on_team_stack):  # noqa: F811
    """`dvc repro` of the real pipeline (conftest's fresh clone of the session's tiny run) with only
    MLFLOW_TRACKING_URI pointing at the team stack: stage runs, their artifacts (in the bucket) and
    the registry aliases are all on the server. The same tiny project ran on the embedded store
    too: with the same seed every metric must be identical (determinism, and independence of the
    tracking backend)."""
    root, tiny_pipeline_run = clone_run_on_team_stack.clone, clone_run_on_team_stack.first
    experiment = clone_run_on_team_stack.experiment
    assert not (root / "mlruns").exists(), "the embedded store was used instead of the server"

    exp = requests.get(f"{team_stack.tracking_uri}/api/2.0/mlflow/experiments/get-by-name",
                       params={"experiment_name": experiment}, timeout=30).json()["experiment"]
    runs = _search_runs(team_stack.tracking_uri, exp["experiment_id"])
    stages = {tag["value"] for r in runs for tag in r["data"].get("tags", []) if tag["key"] == "stage"}
    assert {"ingest", "preprocess", "validate_data", "split", "train_generator", "impute",
            "train_classifier", "evaluate", "gate"} <= stages
    run_ids = {r["info"]["run_id"] for r in runs}
    keys = team_stack.s3.keys(team_stack.bucket, "mlartifacts/")
    in_bucket = [k for k in keys if any(run_id in k for run_id in run_ids)]
    assert any(k.endswith("table_a1.md") for k in in_bucket)
    assert any(k.endswith("gate.json") for k in in_bucket)

    decision = json.loads((root / "reports" / "gate.json").read_text())["resnet18"]
    alias = requests.get(f"{team_stack.tracking_uri}/api/2.0/mlflow/registered-models/alias",
                         params={"name": "virtual-biopsy-resnet18", "alias": "challenger"}, timeout=30)
    assert alias.status_code == 200, alias.text
    assert "version" not in decision  # registry version numbers live in MLflow: the gate run's tags
    gate_tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    assert [t["resnet18.version"] for t in gate_tags if t.get("stage") == "gate" and "resnet18.version" in t] == [
        alias.json()["model_version"]["version"]]
    # Same seed, other store: the reports are identical (they hold no registry version numbers).
    for report in ("reports/metrics.json", "reports/generator/CC.json", "reports/generator/MLO.json",
                   "reports/gate.json"):
        here, there = (json.loads((r / report).read_text()) for r in (root, tiny_pipeline_run))
        assert here == there, f"{report} differs between two runs with the same seed"
