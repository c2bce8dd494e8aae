"""DVC and MLflow commands work from a checkout without an activated venv (scripts/python.sh).

Every dvc.yaml stage and MLproject entry runs ``sh scripts/python.sh ...``, which picks
``$VIRTUAL_ENV/bin/python``, else the checkout's ``.venv/bin/python`` (for a DVC experiment in a
temp copy under .dvc/tmp/exps, the venv of the checkout holding it), else ``python3``, and puts
the checkout's src/ first on PYTHONPATH and a chosen venv's bin/ first on PATH (DVC starts its
queue worker as a bare `dvc`). The launcher is checked with stand-in interpreters (milliseconds),
then for real on a tiny project whose PATH holds no venv and where nothing is activated:
`dvc repro`, `dvc exp run -S`, `dvc exp run --queue` + `sh scripts/python.sh -m dvc queue start`
(the worker runs the experiment in a temp copy under .dvc/tmp/exps) and
`mlflow run . -e ingest --env-manager local`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "scripts" / "python.sh"
PREFIX = "sh scripts/python.sh "
SH = shutil.which("sh") or "/bin/sh"
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
BARE_PATH = os.pathsep.join(p for p in SYSTEM_DIRS if Path(p).is_dir())


def _bare_env(**extra: str) -> dict[str, str]:
    """The environment of a shell where nothing is activated: system PATH only, no venv variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX")}
    return {**env, "PATH": BARE_PATH, "DVC_NO_ANALYTICS": "1", "GIT_PYTHON_REFRESH": "quiet", **extra}


def _dvc_commands() -> list[tuple[str, str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = []
    for name, body in stages.items():
        cmd = (body["do"] if "foreach" in body else body)["cmd"]
        out += [(name, c) for c in (cmd if isinstance(cmd, list) else [cmd])]
    return out


def test_every_dvc_stage_and_mlproject_entry_runs_through_the_launcher():
    commands = _dvc_commands()
    project = yaml.safe_load((REPO / "MLproject").read_text())
    commands += [(f"MLproject {name}", entry["command"]) for name, entry in project["entry_points"].items()]
    assert len(commands) >= 9 + 9
    assert [f"{name}: {cmd}" for name, cmd in commands if not cmd.startswith(PREFIX)] == []


# --- the launcher's choice, with stand-in interpreters ------------------------------------------------
def _fake_python(path: Path, label: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "{label} PYTHONPATH=$PYTHONPATH $*"\necho "$PATH" >&2\n')
    path.chmod(0o755)


def _checkout(root: Path) -> Path:
    (root / "scripts").mkdir(parents=True)
    shutil.copy(LAUNCHER, root / "scripts" / "python.sh")
    (root / "src" / "virtual_biopsy").mkdir(parents=True)
    return root


def _launch(root: Path, env: dict[str, str]) -> str:
    return _launch_with_path(root, env)[0]


def _launch_with_path(root: Path, env: dict[str, str]) -> tuple[str, list[str]]:
    """(what the chosen interpreter printed, the PATH it was started with)."""
    done = subprocess.run([SH, "scripts/python.sh", "-m", "x"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr.strip().split(os.pathsep)


def test_launcher_prefers_the_active_venv_then_the_checkouts_then_python3(tmp_path):
    root = _checkout(tmp_path / "project")
    system = tmp_path / "system-bin"
    _fake_python(system / "python3", "system")
    env = {"PATH": f"{system}{os.pathsep}{BARE_PATH}", "PYTHONPATH": "/elsewhere"}
    out, path = _launch_with_path(root, env)
    assert out == f"system PYTHONPATH={root}/src:/elsewhere -m x"
    assert path[0] == str(system)  # PATH left alone: no venv chosen

    _fake_python(root / ".venv" / "bin" / "python", "checkout-venv")
    out, path = _launch_with_path(root, env)
    assert out.startswith(f"checkout-venv PYTHONPATH={root}/src:")
    assert path[0] == str(root / ".venv" / "bin")  # so `dvc` started by name is this venv's

    _fake_python(tmp_path / "active" / "bin" / "python", "active-venv")
    assert _launch(root, {**env, "VIRTUAL_ENV": str(tmp_path / "active")}).startswith("active-venv ")


def test_launcher_in_a_dvc_experiment_copy_uses_the_venv_of_the_checkout_holding_it(tmp_path):
    outer = tmp_path / "project"
    _fake_python(outer / ".venv" / "bin" / "python", "checkout-venv")
    copy = _checkout(outer / ".dvc" / "tmp" / "exps" / "tmpabc123")
    # the copy's own src/ goes first: the code that runs is the experiment's, as DVC hashed it
    assert _launch(copy, {"PATH": BARE_PATH}) == f"checkout-venv PYTHONPATH={copy}/src -m x"
    shutil.rmtree(outer / ".venv")
    with pytest.raises(AssertionError, match="no Python found"):  # BARE_PATH may hold a python3: hide it
        _launch(copy, {"PATH": str(tmp_path / "empty")})


# --- for real, on a tiny project where nothing is activated ----------------------------------------
def _run(cmd: list[str], root: Path, env: dict[str, str], timeout: int = 600) -> str:
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"{' '.join(cmd)} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def bare_project(tmp_path_factory) -> Path:
    """A tiny git + DVC project (tests/tiny_pipeline.py) with `make install`'s .venv, nothing activated."""
    from tiny_pipeline import make_tiny_project

    root = make_tiny_project(tmp_path_factory.mktemp("bare") / "project",
                             synth={"patients": 16, "image_height": 64, "malignant_share": 0.5},
                             split={"folds": 2, "val_share": 0.25})
    shutil.copy(REPO / "MLproject", root / "MLproject")
    os.symlink(sys.prefix, root / ".venv")  # what `make install` leaves in a checkout
    (root / ".git" / "info" / "exclude").write_text("/.venv\n")
    return root


@pytest.mark.slow
def test_the_launcher_picks_the_checkouts_venv_when_nothing_is_activated(bare_project):
    env = _bare_env()
    show = "import sys, virtual_biopsy; print(sys.prefix, virtual_biopsy.__file__)"
    out = _run(["sh", "scripts/python.sh", "-c", show], bare_project, env)
    prefix, package = out.split()
    assert Path(prefix).resolve() == Path(sys.prefix).resolve()
    assert Path(package).resolve() == (bare_project / "src" / "virtual_biopsy" / "__init__.py").resolve()


@pytest.mark.slow
def test_dvc_repro_and_exp_run_work_without_an_activated_venv(bare_project):
    dvc, env = str(Path(sys.prefix) / "bin" / "dvc"), _bare_env()
    _run([dvc, "repro", "split"], bare_project, env)
    assert (bare_project / "data" / "splits" / "folds.csv").exists()
    assert _run([dvc, "status", "split"], bare_project, env).strip().endswith("Data and pipelines are up to date.")

    _run([dvc, "exp", "run", "-S", "split.val_share=0.3", "split"], bare_project, env)
    summary = json.loads((bare_project / "reports" / "split" / "summary.json").read_text())
    assert summary["configured_val_share"] == 0.3



@pytest.mark.slow
def test_a_queued_experiment_runs_without_an_activated_venv(bare_project):
    dvc, env = str(Path(sys.prefix) / "bin" / "dvc"), _bare_env()
    _run([dvc, "exp", "run", "--queue", "-n", "queued-val-share", "-S", "split.val_share=0.2", "split"],
         bare_project, env)
    # DVC starts the worker as `dvc` from PATH: the launcher puts the venv's bin/ there
    _run(["sh", "scripts/python.sh", "-m", "dvc", "queue", "start"], bare_project, env)
    deadline = time.monotonic() + 300
    while True:
        status = _run([dvc, "queue", "status"], bare_project, env)
        line = next(row for row in status.splitlines() if "queued-val-share" in row)
        if "Success" in line or "Failed" in line or time.monotonic() > deadline:
            break
        time.sleep(2)
    logs = subprocess.run([dvc, "queue", "logs", "queued-val-share"], cwd=bare_project, env=env,
                          capture_output=True, text=True).stdout
    assert "Success" in line, f"{status}\n{logs[-3000:]}"
    assert "queued-val-share" in _run([dvc, "exp", "show", "--json"], bare_project, env)


@pytest.mark.slow
def test_mlflow_run_of_a_stage_works_without_an_activated_venv(bare_project):
    env = _bare_env(MLFLOW_TRACKING_URI=f"sqlite:///{bare_project}/mlruns/mlflow.db")
    (bare_project / "mlruns").mkdir(exist_ok=True)
    out = _run([str(Path(sys.prefix) / "bin" / "mlflow"), "run", ".", "-e", "ingest", "--env-manager", "local"],
               bare_project, env)
    assert "succeeded" in out, out[-2000:]
