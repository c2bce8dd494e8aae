"""A tiny copy of the project on which the real `dvc repro` runs end to end (tests only).

The copy holds the repo's dvc.yaml, its plot templates (.dvc/plots) and src/ (the stages' code
dependencies), a params.yaml with tiny sizes layered over the real one, and a dataset made by the
project's own generator. It is a git + DVC repository of its own, so `dvc repro`, `dvc status`,
`dvc plots show` and the git/data version tags of the MLflow runs behave as in a user's clone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small enough for a test, large enough that every fold's val and test sets hold both classes.
TINY_PARAMS = {
    "synth": {"patients": 40, "image_height": 96},
    "preprocess": {"image_size": 32, "workers": 1},
    "ingest": {"workers": 1},
    "validate_data": {"min_patients": 10},
    "split": {"folds": 3},
    "generator": {"ngf": 4, "ndf": 4, "n_residual_blocks": 1, "epochs": 2, "warmup_epochs": 1, "patience": 1,
                  "batch_size": 8, "sample_every": 2},
    "pretrain": {"cohort": {"patients": 8, "image_height": 64}, "epochs": 1, "warmup_epochs": 0, "patience": 1},
    "classifier": {"epochs": 2, "warmup_epochs": 1, "patience": 1, "lr_patience": 1, "batch_size": 8},
    "evaluate": {"robustness_shares": [0, 50, 100], "robustness_draws": 2},
    "gate": {"generator_floors": {"ssim": 0.0, "psnr": 0.0},
             "floors": {"F+C": {"auc": 0.0}}},
}


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) and key != "floors" else value
    return merged


def tiny_params(**overrides: dict) -> dict:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return _merge(_merge(base, TINY_PARAMS), overrides)


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 900) -> str:
    """Run a command in ``cwd``; fail the test with its output when it fails."""
    full_env = {**os.environ, **(env or {})}
    # the copy has no .venv: scripts/python.sh falls back to python3 on PATH, this venv's
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    done = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def make_tiny_project(root: Path, **param_overrides: dict) -> Path:
    """A git + DVC project at ``root`` with the repo's pipeline, tiny params and tiny data."""
    from virtual_biopsy.core.config import params_from_dict
    from virtual_biopsy.data.synthetic import synthesize

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "python.sh", root / "scripts" / "python.sh")  # every stage's launcher
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = tiny_params(**param_overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    typed = params_from_dict(params)
    synthesize(root / "data" / "raw", typed.synth, seed=typed.seed)
    (root / ".gitignore").write_text("/data/raw/\n/mlruns/\n")
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.email=t@example.org", "-c", "user.name=test", "commit", "-q", "--allow-empty", "-m", "init"],
        root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], root)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # dvc.yaml's plot templates
    run([str(BIN / "dvc"), "add", "-q", "data/raw"], root)
    (root / "data" / "raw.dvc").rename(root / "data.dvc")
    text = (root / "data.dvc").read_text().replace("path: raw", "path: data/raw")
    (root / "data.dvc").write_text(text)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@example.org", "-c", "user.name=test", "commit", "-q", "-m", "tiny project"], root)
    return root


def repro(root: Path, env: dict[str, str] | None = None) -> str:
    """`dvc repro` of the whole pipeline in ``root``."""
    return run([str(BIN / "dvc"), "repro"], root, env=env)
