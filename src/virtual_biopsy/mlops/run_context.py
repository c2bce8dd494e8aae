"""What a run is about: the code, data and params versions every run of a pipeline run carries,
and which params are logged (secrets redacted).

``git_commit`` is ``+dirty`` only when tracked code or params differ from the commit, never for
what the pipeline itself rewrites, so a ``dvc repro`` of a clean checkout tags its runs with the
bare commit.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from virtual_biopsy.core.config import Params, flatten, params_hash

PIPELINE_KEY_TAG = "pipeline_key"


def pipeline_output_pathspecs(root: str | Path = ".") -> list[str]:
    """Git pathspecs excluding what ``dvc repro`` writes: every out, metric and plot of dvc.yaml's stages.

    Committed metrics files (reports/*.json) are such outputs: DVC deletes them before their stage
    runs and the stage rewrites them, so without this every stage of a ``dvc repro`` would see
    the tree "dirty". ``${...}`` of a foreach/matrix stage matches any one path component.
    """
    try:
        pipeline = yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    specs = []
    for stage in (pipeline.get("stages") or {}).values():
        body = (stage.get("do") or stage) if isinstance(stage, dict) else {}
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                pattern = re.sub(r"\$\{[^}]*\}", "*", str(path)).strip("/")
                specs += [f":(exclude,glob){pattern}", f":(exclude,glob){pattern}/**"]
    return specs


def git_commit(root: str | Path = ".") -> str:
    """Current commit, ``unknown`` outside git; ``+dirty`` when tracked code or params differ from it.

    What the pipeline itself rewrites does not count: dvc.lock, *.dvc, the .gitignore entries DVC
    adds, and every stage output (:func:`pipeline_output_pathspecs`). So a ``dvc repro`` of a
    clean checkout tags every run with the bare commit, also after a stage rewrote a committed
    metrics file; an edited source file or params.yaml (tracked, not an output) makes it dirty.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock",
             ":(exclude,glob)**/*.dvc", ":(exclude,glob)**/.gitignore", *pipeline_output_pathspecs(root)],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_version(root: str | Path = ".") -> str:
    """The md5 that ``data.dvc`` records for data/raw (``untracked`` when there is no data.dvc)."""
    dvc_file = Path(root) / "data.dvc"
    if not dvc_file.exists():
        return "untracked"
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "unknown"))


def run_context(root: str | Path = ".", params: Params | None = None) -> dict[str, str]:
    """Tags shared by every run of one pipeline run."""
    context = {
        "git_commit": git_commit(root),
        "data_version": data_version(root),
        "params_hash": params_hash(params) if params is not None else "none",
    }
    key = "|".join(context[k] for k in ("git_commit", "data_version", "params_hash"))
    context[PIPELINE_KEY_TAG] = hashlib.sha256(key.encode()).hexdigest()[:16]
    return context


# Params whose value is a secret of the site: logged as redacted so the run still shows they were set.
SECRET_PARAM_WORDS = ("salt", "password", "secret", "token")


def loggable_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Params safe to log: values of secret-looking keys (the pseudonym salt) are redacted."""
    return {k: ("<redacted>" if any(w in k.lower() for w in SECRET_PARAM_WORDS) else v) for k, v in flat.items()}


# Stages whose params.yaml section has another name than the stage.
STAGE_SECTIONS = {"train_generator": "generator", "train_classifier": "classifier"}


def section_params(params: Params, section: str) -> dict[str, Any]:
    """One params.yaml section as loggable params ``section.key`` (a fold run's hyperparameters)."""
    return loggable_params(flatten(getattr(params, section), f"{section}."))
