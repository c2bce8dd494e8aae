"""docker/: what can be checked without a Docker engine (none runs here).

The compose file parses, has every service and variable the docs name, the MLflow service asks
for a login, every service has a health check, and the image installs exactly what `make test`
installs (same extras, same constraints lock).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENV_EXAMPLE = REPO / "docker" / ".env.example"
DOCS = [REPO / "docs" / "team-stack.md", REPO / "README.md"]
SERVICES = ("postgres", "minio", "minio-init", "mlflow", "trainer", "ray-head", "ray-worker", "trainer-ray")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in DOCS if p.exists())


def _compose_variables() -> set[str]:
    code = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    return set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", code))


def test_compose_has_the_team_services(compose):
    assert set(SERVICES) <= set(compose["services"])


def test_services_named_in_docs_exist(compose):
    named = set(re.findall(r"`([a-z][a-z0-9-]*)`", _docs_text()))
    candidates = {n for n in named if n in SERVICES or n.replace("-", "") in {"minioinit"}}
    assert candidates, "the docs should name the compose services"
    assert candidates <= set(compose["services"])


def test_every_compose_variable_is_in_env_example_and_back():
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if line and not line.startswith("#")}
    used = _compose_variables()
    assert used - example == set(), f"variables compose reads but .env.example lacks: {sorted(used - example)}"
    assert example - used == set(), f"variables in .env.example that compose never reads: {sorted(example - used)}"


def test_docker_env_names_in_docs_exist():
    docs = _docs_text()
    compose_text = COMPOSE.read_text()
    for name in set(re.findall(r"`((?:MLFLOW|POSTGRES|MINIO|DVC|BIND)_[A-Z0-9_]+)", docs)):
        if name.startswith(("MLFLOW_TRACKING_", "MLFLOW_S3_ENDPOINT", "MLFLOW_AUTH_", "MLFLOW_FLASK_")):
            continue  # client-side or `vbiopsy server` variables, checked by test_server.py
        if name.startswith("DVC_") and name in (REPO / ".github" / "workflows" / "retrain.yml").read_text():
            continue  # GitHub Actions secret names
        assert name in compose_text or name.rstrip("_") in compose_text, f"docs name {name}, compose does not use it"


def test_secrets_are_required_not_defaulted(compose):
    text = COMPOSE.read_text()
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_S3_SECRET_KEY",
                 "DVC_S3_SECRET_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRAINER_PASSWORD", "RAY_AUTH_TOKEN"):
        uses = re.findall(r"\$\{" + name + r"(:[?-][^}]*)?\}", text)
        assert uses, f"{name} unused"
        assert all(u.startswith(":?") for u in uses), f"{name} must be required (${{{name}:?...}}), not defaulted"
    assert (REPO / "docker" / ".gitignore").read_text().splitlines().count(".env") == 1


def test_mlflow_service_requires_login(compose):
    mlflow = compose["services"]["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["vbiopsy", "server"] and "--auth" in command
    env = mlflow["environment"]
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "VBIOPSY_BACKEND_STORE_URI",
                 "VBIOPSY_ARTIFACTS_DESTINATION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "MLFLOW_S3_ENDPOINT_URL", "PGPASSWORD"):
        assert name in env, name
    assert env["VBIOPSY_BACKEND_STORE_URI"].startswith("postgresql://") and ":${" not in env["VBIOPSY_BACKEND_STORE_URI"]
    assert env["VBIOPSY_ARTIFACTS_DESTINATION"].startswith("s3://")
    trainer = compose["services"]["trainer"]["environment"]
    assert trainer["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "MLFLOW_TRACKING_PASSWORD" in trainer


def test_trainer_runs_the_pipeline(compose):
    trainer = compose["services"]["trainer"]
    assert trainer["command"] == ["bash", "scripts/retrain.sh"]
    assert '"$DVC" repro' in (REPO / "scripts" / "retrain.sh").read_text()


def test_ray_head_and_workers_run_the_pipeline_image_on_the_trainers_checkout(compose):
    services = compose["services"]
    trainer = services["trainer"]
    head, worker, driver = services["ray-head"], services["ray-worker"], services["trainer-ray"]
    for name, service in (("ray-head", head), ("ray-worker", worker), ("trainer-ray", driver)):
        assert service["image"] == trainer["image"] and service["build"] == trainer["build"], name
        assert service["volumes"] == trainer["volumes"] and service["working_dir"] == trainer["working_dir"], name
        assert service["user"] == trainer["user"], name
        # the jobs log to the trainer's MLflow server, and every node presents the cluster's token
        env = service["environment"]
        assert {k: env[k] for k in trainer["environment"]} == trainer["environment"], name
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
        assert service["profiles"] == ["ray"], name
    assert head["command"][:3] == ["ray", "start", "--head"] and "--port=6379" in head["command"]
    assert "--block" in head["command"] and "--block" in worker["command"]
    assert worker["command"][:2] == ["ray", "start"] and "--address=ray-head:6379" in worker["command"]
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # The driver joins the cluster without CPUs (it runs no job), then runs the pipeline like the trainer.
    script = driver["command"][-1]
    assert "ray start --address=ray-head:6379 --num-cpus=0" in script and script.endswith("bash scripts/retrain.sh")
    assert driver["environment"]["RAY_ADDRESS"] == "auto"


def test_every_long_running_service_has_a_healthcheck(compose):
    for name, service in compose["services"].items():
        if name == "minio-init":  # one-shot job, waited on with service_completed_successfully
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "HEALTHCHECK" in DOCKERFILE.read_text()


def test_published_ports_bind_loopback_by_default(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port} on all interfaces"


def _makefile_install_line() -> str:
    makefile = (REPO / "Makefile").read_text()
    line = next(row for row in makefile.splitlines() if "pip install" in row and "$(CONSTRAINTS)" in row)
    return line.strip()


def test_image_installs_the_same_pinned_set_as_make_test():
    dockerfile = DOCKERFILE.read_text()
    make_line = _makefile_install_line()
    extras = re.search(r"-e '(\.\[[a-z,]+\])'", make_line).group(1)
    assert "CONSTRAINTS := requirements/constraints.txt" in (REPO / "Makefile").read_text()
    assert f"pip install -c requirements/constraints.txt -e '{extras}'" in dockerfile
    assert "COPY requirements/constraints.txt requirements/constraints.txt" in dockerfile
    assert "COPY pyproject.toml" in dockerfile
    # Anything installed besides the project is pinned exactly.
    for line in dockerfile.splitlines():
        for requirement in re.findall(r"'([A-Za-z0-9_.-]+[^']*)'", line if "pip install" in line else ""):
            if requirement.startswith("."):
                continue
            assert "==" in requirement, f"unpinned requirement in the Dockerfile: {requirement}"


def test_image_base_is_selectable_and_cpu_by_default():
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11", dockerfile, re.M)
    assert "FROM ${BASE_IMAGE}" in dockerfile
    assert "USER vbiopsy" in dockerfile


def test_dockerignore_keeps_local_state_and_secrets_out():
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for entry in (".venv/", ".git/", ".dvc/config.local", "docker/.env", "mlruns/"):
        assert entry in ignored
