"""`vbiopsy server` configuration, MLproject and workflow files (fast; the live stack is in test_team_stack.py)."""
from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import yaml

from virtual_biopsy.mlops import server

REPO = Path(__file__).resolve().parents[1]
# Random per run: no literal that looks like a credential sits in a tracked file (test_secrets.py).
DB_PW, S3_KEY, ADMIN_PW, CSRF = (secrets.token_hex(8) for _ in range(4))
FULL_ENV = {
    "VBIOPSY_BACKEND_STORE_URI": "postgresql://mlflow@db:5432/mlflow",
    "VBIOPSY_ARTIFACTS_DESTINATION": "s3://bucket/mlartifacts",
    "AWS_ACCESS_KEY_ID": "id-from-env",
    "AWS_SECRET_ACCESS_KEY": S3_KEY,
    "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
}


@pytest.mark.parametrize("missing", ["VBIOPSY_BACKEND_STORE_URI", "VBIOPSY_ARTIFACTS_DESTINATION",
                                     "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_missing_variable_is_named(missing):
    env = {k: v for k, v in FULL_ENV.items() if k != missing}
    with pytest.raises(server.ServerConfigError, match=missing):
        server.plan_server(env)


@pytest.mark.parametrize("missing", ["MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"])
def test_auth_needs_admin_password_and_csrf_key(missing):
    env = {**FULL_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PW, "MLFLOW_FLASK_SERVER_SECRET_KEY": CSRF}
    del env[missing]
    with pytest.raises(server.ServerConfigError, match=missing):
        server.plan_server(env, auth=True)


def test_backend_must_be_postgres_and_destination_s3():
    with pytest.raises(server.ServerConfigError, match="PostgreSQL"):
        server.plan_server({**FULL_ENV, "VBIOPSY_BACKEND_STORE_URI": "sqlite:///x.db"})
    with pytest.raises(server.ServerConfigError, match="s3://"):
        server.plan_server({**FULL_ENV, "VBIOPSY_ARTIFACTS_DESTINATION": "/tmp/artifacts"})


def test_secrets_stay_off_the_command_line():
    uri = f"postgresql://mlflow:{DB_PW}@db:5432/mlflow"
    plan = server.plan_server({**FULL_ENV, "VBIOPSY_BACKEND_STORE_URI": uri})
    argv = " ".join(plan.argv)
    assert DB_PW not in argv and S3_KEY not in argv
    assert plan.env["MLFLOW_BACKEND_STORE_URI"] == uri.replace("postgresql://", "postgresql+psycopg2://")
    assert plan.argv[plan.argv.index("--artifacts-destination") + 1] == "s3://bucket/mlartifacts"
    assert "--serve-artifacts" in plan.argv
    assert DB_PW not in plan.redacted()


def test_auth_plan_uses_basic_auth_app_with_password_free_ini():
    env = {**FULL_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PW, "MLFLOW_FLASK_SERVER_SECRET_KEY": CSRF,
           "VBIOPSY_AUTH_DATABASE_URI": "postgresql://mlflow@db:5432/mlflow_auth"}
    plan = server.plan_server(env, auth=True)
    assert plan.argv[-2:] == ["--app-name", "basic-auth"]
    assert ADMIN_PW not in plan.auth_config
    assert "default_permission = READ" in plan.auth_config
    assert plan.env["VBIOPSY_AUTH_DATABASE_URI"] == "postgresql+psycopg2://mlflow@db:5432/mlflow_auth"


def test_cli_reports_missing_variable_without_traceback(capsys, monkeypatch):
    for name in FULL_ENV:
        monkeypatch.delenv(name, raising=False)
    assert server.main(["start", "--dry-run"]) == 1
    assert "VBIOPSY_BACKEND_STORE_URI is not set" in capsys.readouterr().err


def test_check_needs_a_tracking_uri(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert server.main(["check"]) == 1
    assert "MLFLOW_TRACKING_URI is not set" in capsys.readouterr().err


STAGES = ["ingest", "preprocess", "validate_data", "split", "train_generator", "impute", "train_classifier",
          "evaluate", "gate"]


def test_mlproject_has_an_entry_per_stage_pipeline_tune_and_predict():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    entries = project["entry_points"]
    for stage in STAGES:
        assert entries[stage]["command"].startswith(f"sh scripts/python.sh -m virtual_biopsy.stages.{stage} ")
        assert entries[stage]["parameters"]["root"]["type"] == "path"
    assert entries["main"]["command"].startswith("sh scripts/python.sh -m dvc repro")
    assert entries["tune"]["command"].startswith("sh scripts/python.sh -m virtual_biopsy.cli tune")
    assert entries["predict"]["command"].startswith("sh scripts/python.sh -m virtual_biopsy.cli predict")
    for name, entry in entries.items():
        for param, spec in (entry.get("parameters") or {}).items():
            kind = spec if isinstance(spec, str) else spec["type"]
            assert kind in ("string", "float", "path", "uri"), f"{name}.{param}: untyped"
            assert "{" + param + "}" in entry["command"], f"{name}.{param} unused"


def test_retrain_workflow_triggers_and_steps():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "retrain.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    for event in ("push", "pull_request"):
        assert set(triggers[event]["paths"]) == {"data.dvc", "params.yaml", "src/**"}
    steps = " ".join(str(s.get("run", "")) for s in workflow["jobs"]["retrain"]["steps"])
    assert "scripts/retrain.sh" in steps and "gh pr comment" in steps
    retrain = (REPO / "scripts" / "retrain.sh").read_text()
    for command in ('"$DVC" pull', '"$DVC" repro', '"$DVC" metrics diff', '"$DVC" params diff', '"$DVC" push',
                    "GITHUB_STEP_SUMMARY"):
        assert command in retrain
    ci = yaml.safe_load((REPO / ".github" / "workflows" / "ci.yml").read_text())
    assert any(".ci/run" in str(s.get("run", "")) for s in ci["jobs"]["test"]["steps"])
