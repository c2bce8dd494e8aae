"""`vbiopsy profile NAME`: switch params.yaml to a documented profile as a DVC experiment.

A profile (profiles/NAME.yaml) lists only the keys that differ from params.yaml. It is applied
with `dvc exp run -S key=value ...`, so the default profile in params.yaml stays untouched and
`dvc exp show` / `dvc params diff` compare the two.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
from pathlib import Path
from typing import Any

from virtual_biopsy.core.config import (
    ConfigError,
    flatten,
    load_params,
    params_from_dict,
    read_yaml,
)
from virtual_biopsy.core.experiments import exp_run_command


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def profile_overrides(profile_file: Path, params_file: Path) -> dict[str, Any]:
    """Dotted key -> value overrides of a profile, validated against the params schema."""
    if not profile_file.exists():
        available = sorted(p.stem for p in profile_file.parent.glob("*.yaml"))
        raise ConfigError(f"{profile_file}: no such profile (available: {available})")
    override = read_yaml(profile_file.read_text()) or {}
    base = read_yaml(params_file.read_text()) or {}
    try:
        params_from_dict(_merge(base, override))
    except ConfigError as exc:
        raise ConfigError(f"{profile_file}: {exc}") from exc
    return flatten(override)




def run_profile(args: argparse.Namespace) -> int:
    root = Path(args.root)
    load_params(root / "params.yaml")  # the base must be valid before we layer a profile on it
    overrides = profile_overrides(root / "profiles" / f"{args.name}.yaml", root / "params.yaml")
    command = exp_run_command(overrides, args.exp_name or f"profile-{args.name}")
    print(" ".join(shlex.quote(c) for c in command))
    if args.run:
        return subprocess.call(command, cwd=root)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="run the pipeline with a documented profile (e.g. the paper's settings) as a DVC experiment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help="profile name: a file profiles/NAME.yaml (e.g. paper)")
    parser.add_argument("--run", action="store_true", help="run the experiment instead of printing the command")
    parser.add_argument("--exp-name", help="DVC experiment name (default profile-NAME)")
    parser.add_argument("--root", default=".", help="project root")
    parser.set_defaults(func=run_profile)
