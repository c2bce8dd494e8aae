"""`vbiopsy profile NAME`: switch params.yaml to a documented profile as a DVC experiment.

A profile (profiles/NAME.yaml) lists only the keys that differ from params.yaml. It is applied
with `dvc exp run -S key=value ...`, so the default profile in params.yaml stays untouched and
`dvc exp show` / `dvc params diff` compare the two.

A profile may start from another one: ``extends: paper.yaml`` (a file in the same folder) takes
that profile's keys, then lays its own on top, section by section (a key it sets replaces the
base's value; the base's other keys in that section stay). That is how ``gpu`` is ``paper`` on
another machine without copying ``paper``'s numbers.

Keys come in two kinds. *Execution* keys (:data:`EXECUTION_KEYS`) say where and how fast the
pipeline runs: the device and the worker processes. Every other key is a *method* key: it changes
what is computed (the data, the networks, the objective, the schedule). Two profiles that agree on
every method key run the same method; :func:`method_differences` lists where they do not.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from virtual_biopsy.core.config import (
    ConfigError,
    Params,
    flatten,
    load_params,
    params_from_dict,
    read_yaml,
)
from virtual_biopsy.core.experiments import exp_run_command

# The profile key that names the profile this one starts from (resolved here, never seen by config.py).
EXTENDS_KEY = "extends"

# Dotted params.yaml keys that change where or how fast the pipeline runs, not what it computes.
# The one list of them: a profile that differs from another only here runs the same method.
# (bf16 autocast, channels_last and pinned memory follow from the device; no key sets them.)
EXECUTION_KEYS = frozenset({
    "ingest.workers",       # processes reading the DICOM files; the manifest is the same
    "preprocess.workers",   # processes preprocessing images; the arrays are the same
    "generator.device",     # auto | cpu | cuda | cuda:N
    "classifier.device",
    # where the fold jobs run (training.executor); the weights are the same bytes
    "executor.kind", "executor.workers", "executor.cpus_per_job",
    "executor.ray.address", "executor.ray.gpus_per_job", "executor.ray.max_retries",
})


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid on top: nested mappings merge, any other value replaces."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def _available(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _read_profile_file(profile_file: Path) -> dict[str, Any]:
    """The mapping in one profile file, as written (its ``extends`` not yet resolved)."""
    if not profile_file.exists():
        raise ConfigError(f"{profile_file}: no such profile (available: {_available(profile_file.parent)})")
    try:
        raw = read_yaml(profile_file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{profile_file}: not valid YAML ({exc})") from exc
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{profile_file}: a profile is a mapping of params.yaml sections, got {raw!r}")
    base = raw.get(EXTENDS_KEY)
    if EXTENDS_KEY in raw and not (isinstance(base, str) and base.endswith(".yaml") and "/" not in base):
        raise ConfigError(f"{profile_file}: {EXTENDS_KEY}: expected the file name of a profile in the same "
                          f"folder, e.g. paper.yaml, got {base!r}")
    return raw


def resolve_profile(profile_file: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The keys a profile sets, its ``extends`` chain resolved: base profile first, own keys on top.

    The result holds params.yaml sections only (no ``extends``). A chain that comes back to a
    profile already in it is refused, naming the chain.
    """
    profile_file = Path(profile_file)
    if profile_file.resolve() in _seen:
        chain = " -> ".join(p.name for p in (*_seen, profile_file.resolve()))
        raise ConfigError(f"{profile_file}: {EXTENDS_KEY} goes round in a circle ({chain})")
    own = _read_profile_file(profile_file)
    base_name = own.pop(EXTENDS_KEY, None)
    if base_name is None:
        return own
    base_file = profile_file.parent / base_name
    if not base_file.exists():
        raise ConfigError(f"{profile_file}: {EXTENDS_KEY}: {base_name}: no such profile "
                          f"(available: {_available(profile_file.parent)})")
    return _merge(resolve_profile(base_file, (*_seen, profile_file.resolve())), own)


def profile_params(profile_file: Path, params_file: Path) -> Params:
    """The parameters a stage sees once the profile is applied: params.yaml with the profile on top."""
    resolved = resolve_profile(profile_file)
    base = read_yaml(Path(params_file).read_text()) or {}
    try:
        return params_from_dict(_merge(base, resolved))
    except ConfigError as exc:
        raise ConfigError(f"{profile_file}: {exc}") from exc


def profile_overrides(profile_file: Path, params_file: Path) -> dict[str, Any]:
    """Dotted key -> value overrides of a profile (``extends`` resolved), validated against the params schema."""
    profile_params(profile_file, params_file)  # refuses an unknown key or a bad value, naming the profile
    return flatten(resolve_profile(profile_file))


def method_keys(params: Params) -> dict[str, Any]:
    """Every dotted key of ``params`` that is not an execution key, with its value."""
    return {key: value for key, value in flatten(params).items() if key not in EXECUTION_KEYS}


def method_differences(profile_file: Path, reference_file: Path, params_file: Path) -> dict[str, tuple[Any, Any]]:
    """Method keys on which two profiles (each applied to ``params_file``) disagree: key -> (profile, reference).

    Empty when the two run the same method and differ, if at all, only in :data:`EXECUTION_KEYS`.
    """
    ours = method_keys(profile_params(profile_file, params_file))
    theirs = method_keys(profile_params(reference_file, params_file))
    return {key: (ours.get(key), theirs.get(key)) for key in sorted(ours.keys() | theirs.keys())
            if ours.get(key) != theirs.get(key)}


def run_profile(args: argparse.Namespace) -> int:
    """Print (and with ``--run`` run) the ``dvc exp run -S ...`` command of a profile; a bad one: one line, exit 1."""
    root = Path(args.root)
    try:
        load_params(root / "params.yaml")  # the base must be valid before we layer a profile on it
        overrides = profile_overrides(root / "profiles" / f"{args.name}.yaml", root / "params.yaml")
    except ConfigError as exc:
        print(f"vbiopsy profile: {exc}", file=sys.stderr)
        return 1
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
