"""What every stage's command line shares: ``--root``, ``--params``, ``--no-mlflow``, and loading.

Each stage is ``python -m virtual_biopsy.stages.NAME`` (DVC and MLproject call it that way) and
adds its own options (``--view``, ``--arch``, ...) to the parser made here.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from virtual_biopsy.core.config import Params, load_params
from virtual_biopsy.core.paths import ProjectPaths


def stage_parser(stage: str, doc: str | None, *, mlflow_flag: bool = True) -> argparse.ArgumentParser:
    """Parser with the options every stage takes; ``doc``'s first line is the description."""
    parser = argparse.ArgumentParser(prog=f"python -m virtual_biopsy.stages.{stage}",
                                     description=(doc or "").strip().split("\n")[0])
    parser.add_argument("--root", default=".", help="project root (default: current directory)")
    parser.add_argument("--params", default=None, help="params file (default: ROOT/params.yaml)")
    if mlflow_flag:
        parser.add_argument("--no-mlflow", action="store_true", help="write the outputs but log nothing to MLflow")
    return parser


def add_device_option(parser: argparse.ArgumentParser, section: str) -> None:
    """``--device`` of the stages that run networks; its default is ``<section>.device`` in params."""
    parser.add_argument("--device", default=None,
                        help=f"torch device: auto, cpu, cuda, cuda:1 ... (default: {section}.device in params)")


def stage_inputs(args: argparse.Namespace) -> tuple[ProjectPaths, Params]:
    """The project's paths and its params (``--params`` or ROOT/params.yaml); raises ConfigError."""
    paths = ProjectPaths(Path(args.root))
    return paths, load_params(args.params or paths.root / "params.yaml")


def open_stage_run(stage: str, paths: ProjectPaths, params: Params, args: argparse.Namespace, **kwargs: Any):
    """The stage's MLflow run (a NullRun under ``--no-mlflow``), as a context manager.

    Open it before the stage's work, not after: the run's start and end times are then the
    stage's, so the UI's Duration column says how long the stage took.
    """
    from virtual_biopsy.mlops import tracking

    return tracking.stage_run(stage, root=paths.root, params=params, enabled=not args.no_mlflow, **kwargs)


def relative(path: Path, root: Path) -> str:
    """``path`` relative to the project root, POSIX style (how runs name the files they read)."""
    return Path(os.path.relpath(path, root)).as_posix()
