"""Shared fixtures. Tiny datasets come from the project's own generator (vbiopsy synth).

Tiny projects are made by ``make_project`` (raw data, params.yaml, the first stages) and copied by
``copy_project`` (a project's data and params.yaml with some sections changed); both are fixtures
that return the function, so module fixtures and helpers take them like any other fixture.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from stack import team_stack  # noqa: F401  (the session's PostgreSQL + S3 + mlflow server, for every module)

# Tests never talk to a tracking server by accident: each test that needs MLflow points it at a
# store inside its own temp folder.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# DVC would otherwise leave a temp file per command and spawn a daemon to post usage analytics.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# `make test` runs two pytest workers on 2 cores: a torch process with two threads beside another
# busy process spends its time in OpenMP barriers, so every process of the suite (the stages it
# starts inherit this) computes on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every mlflow server/ui a test starts skips MLflow 3's GenAI job runner (three huey consumer
# processes polling for the whole session), as `vbiopsy server` does (mlops/server.py).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread while a module's tests run (the previous count is restored after).

    Tiny networks on tiny batches: on a shared 2-core machine, synchronising threads costs more
    than they compute (a 2-fold classifier run is ~6x faster with one) and oversubscribed cores
    stall. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``;
    it is set up before the module's own fixtures, so those that train run on one thread too.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- tiny projects ----------------------------------------------------------------------------------
def _build_project(root: Path, params: Mapping[str, Any], *, synth=None, raw: Path | None = None, seed: int = 7,
                   stages: Sequence[str] = ("ingest", "preprocess", "split")):
    """The project at ``root``: data/raw (a copy of ``raw``, else ``synthesize(synth, seed)``),
    ``params`` as params.yaml, then ``stages`` run in that order in process, without MLflow.
    Returns its ProjectPaths."""
    import yaml

    from virtual_biopsy.core.config import load_params
    from virtual_biopsy.core.paths import ProjectPaths
    from virtual_biopsy.data.synthetic import synthesize
    from virtual_biopsy.stages.ingest import run_ingest
    from virtual_biopsy.stages.preprocess import run_preprocess
    from virtual_biopsy.stages.split import run_split

    runners = {"ingest": run_ingest, "preprocess": run_preprocess, "split": run_split}
    if (raw is None) == (synth is None):
        raise ValueError("give either raw (a folder to copy) or synth (a SynthConfig to generate)")
    if raw is not None:
        shutil.copytree(raw, root / "data" / "raw")
    else:
        synthesize(root / "data" / "raw", synth, seed=seed)
    (root / "params.yaml").write_text(yaml.safe_dump(dict(params)))
    paths, loaded = ProjectPaths(root), load_params(root / "params.yaml")
    for stage in stages:
        runners[stage](paths, loaded)
    return paths


def _copy_project(source: Path, dest: Path, sections: Mapping[str, Mapping[str, Any]] | None = None, *,
                  link_data: bool = False):
    """A project at ``dest`` with the data of ``source`` (a copy, or a symlink when ``link_data``:
    read only then) and its params.yaml, each section in ``sections`` updated key by key.
    Returns its ProjectPaths."""
    import yaml

    from virtual_biopsy.core.paths import ProjectPaths

    dest.mkdir(parents=True, exist_ok=True)
    if link_data:
        os.symlink(source / "data", dest / "data")
    else:
        shutil.copytree(source / "data", dest / "data")
    if not sections:
        shutil.copy(source / "params.yaml", dest / "params.yaml")
    else:
        params = yaml.safe_load((source / "params.yaml").read_text())
        for name, values in sections.items():
            params[name] = {**(params.get(name) or {}), **values}
        (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return ProjectPaths(dest)


@pytest.fixture(scope="session")
def make_project():
    """``make_project(root, params, synth=SynthConfig(...) | raw=folder, seed=7, stages=(...))``:
    a tiny project after its first stages (``_build_project``)."""
    return _build_project


@pytest.fixture(scope="session")
def copy_project():
    """``copy_project(source, dest, {section: {key: value}}, link_data=False)``: a fresh project
    with another project's data and (changed) params (``_copy_project``)."""
    return _copy_project


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    """A data/raw-like folder (DICOM studies + metadata.csv) of 16 simulated patients, 96 px high.

    Shared by the whole session, so read only: a test that damages files works on a copy."""
    from virtual_biopsy.core.config import SynthConfig
    from virtual_biopsy.data.synthetic import synthesize

    raw = tmp_path_factory.mktemp("tiny") / "raw"
    synthesize(raw, SynthConfig(patients=16, image_height=96), seed=7)
    return raw


GENERATOR_PARAMS = {
    "seed": 3,
    "preprocess": {"image_size": 32, "workers": 1},
    "split": {"folds": 2},
    "generator": {"views": ["CC"], "ngf": 4, "ndf": 4, "n_residual_blocks": 1, "epochs": 2, "warmup_epochs": 1,
                  "patience": 1, "batch_size": 8, "sample_every": 1},
}


@pytest.fixture(scope="session")
def generator_project(tmp_path_factory) -> Path:
    """A project root after synth (24 patients), ingest, preprocess (32 px), split (2 folds) and
    train_generator --view CC (tiny CycleGAN, 2 epochs, MLflow in the root's embedded store)."""
    from virtual_biopsy.core.config import SynthConfig
    from virtual_biopsy.stages import train_generator

    root = tmp_path_factory.mktemp("generator_project")
    _build_project(root, GENERATOR_PARAMS, synth=SynthConfig(patients=24, image_height=96), seed=7)
    assert train_generator.main(["--view", "CC", "--root", str(root)]) == 0
    return root


# --- fused pipeline projects (gate, pipeline, predict, serving tests) ------------------------------
FUSED_SIZE = 32  # tiny: untrained resnet18 and a 4-filter generator run in milliseconds at 32 px


def _write_fused_project(root: Path) -> Path:
    """A project folder holding what the gate stage reads, as the stages write it, with tiny
    untrained networks and passing reports (predictions carry signal so validation MCCs are > 0)."""
    import json

    import numpy as np
    import pandas as pd
    import yaml

    from virtual_biopsy.core.config import GeneratorConfig
    from virtual_biopsy.core.paths import ProjectPaths
    from virtual_biopsy.evaluation.predictions import PREDICTION_COLUMNS
    from virtual_biopsy.models import ResnetGenerator, build_classifier
    from virtual_biopsy.models.weights import (
        save_classifier_weights,
        save_generator_weights,
    )

    paths = ProjectPaths(root)
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["preprocess"]["image_size"] = FUSED_SIZE
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    tiny = GeneratorConfig(ngf=4, n_residual_blocks=1)
    for i, view in enumerate(("CC", "MLO")):
        generator = ResnetGenerator(channels=1, ngf=tiny.ngf, n_residual_blocks=tiny.n_residual_blocks)
        save_generator_weights(paths.serving_generator(view), generator.state_dict(), tiny, view=view, fold=0,
                               image_size=FUSED_SIZE, policy="best_fold")
        (paths.reports / "generator").mkdir(parents=True, exist_ok=True)
        (paths.reports / "generator" / f"{view}.json").write_text(json.dumps({"mean": {"ssim": 0.6, "psnr": 22.0}}))
    rng = np.random.default_rng(3)
    rows = []
    for fold in (0, 1):
        for m, modality in enumerate(("FFDM", "CESM")):
            for v, view in enumerate(("CC", "MLO")):
                model = build_classifier("resnet18", seed=fold * 10 + m * 2 + v)
                save_classifier_weights(paths.classifier_weights("resnet18", modality, view, fold), model.state_dict(),
                                        arch="resnet18", modality=modality, view=view, fold=fold)
                for subset in ("val", "test"):
                    for lesion in range(8):
                        label = int(lesion % 3 != 0)
                        for source in (("real", "synthetic") if modality == "CESM" else ("real",)):
                            p = float(np.clip(0.5 + (label - 0.5) * rng.uniform(0.1, 0.6) + rng.normal(0, 0.1), 0, 1))
                            rows.append({"arch": "resnet18", "modality": modality, "view": view, "fold": fold,
                                         "subset": subset, "lesion_id": f"P{fold}{subset}{lesion}|S|L",
                                         "patient_id": f"P{fold}{subset}{lesion}", "acr": "b", "label": label,
                                         "source": source, "image_id": f"{fold}.{subset}.{lesion}.{m}{v}.{source}",
                                         "p_malignant": p})
    frame = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    for (modality, view), group in frame.groupby(["modality", "view"]):
        out = paths.predictions_dir / "resnet18" / f"{modality}_{view}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        group.to_csv(out, index=False)
    # What preprocess writes that the gate reads: the index's simulated flag (for the model card).
    paths.processed_index.parent.mkdir(parents=True, exist_ok=True)
    frame[["image_id", "patient_id", "view", "modality"]].drop_duplicates("image_id").assign(
        simulated=True, synthetic=False).to_csv(paths.processed_index, index=False)
    # The evaluate stage's evidence tables the gate reports (computed by the real functions).
    from virtual_biopsy.evaluation.paired_tests import paired_comparisons
    from virtual_biopsy.evaluation.settings import lesion_probabilities, prepare_folds
    from virtual_biopsy.evaluation.weight_stability import weight_stability

    folds = prepare_folds(frame, ("FFDM", "CESM"), ("CC", "MLO"))
    paths.evaluation_dir.mkdir(parents=True, exist_ok=True)
    paired_comparisons(lesion_probabilities(folds), n_boot=200).to_csv(paths.evaluation_dir / "paired_tests.csv",
                                                                       index=False)
    weight_stability(folds, draws=200).to_csv(paths.evaluation_dir / "weights.csv", index=False)
    metrics = {"resnet18": {s: {"auc": auc, "gmean": 0.6, "mcc": 0.3} for s, auc in
                            (("F", 0.70), ("C", 0.8), ("Ĉ", 0.72), ("F+C", 0.8), ("F+Ĉ", 0.71))}}
    (paths.reports / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False))
    (paths.reports / "validation").mkdir(parents=True, exist_ok=True)
    (paths.reports / "validation" / "metrics.json").write_text(json.dumps({"evaluated": 10, "passed": 10,
                                                                            "critical_failed": 0, "warning_failed": 0}))
    (paths.reports / "split").mkdir(parents=True, exist_ok=True)
    (paths.reports / "split" / "summary.json").write_text(json.dumps({"leakage": 0, "folds": 2}))
    # What the evaluate stage fits for serving (outputs/calibration/<arch>.json); T != 1 so that the
    # served p differs from the raw fused p, qhat < 1 so that sets of one class occur.
    calibration = {"method": "temperature", "fitted_on": "the fixture's choice", "conformal_level": 0.9,
                   "settings": {s: {"temperature": t, "qhat": q, "n_val": 16} for s, t, q in
                                (("F", 1.2, 0.6), ("C", 0.9, 0.55), ("Ĉ", 1.3, 0.62), ("F+C", 0.8, 0.55),
                                 ("F+Ĉ", 1.5, 0.65))}}
    (root / "outputs" / "calibration").mkdir(parents=True, exist_ok=True)
    (root / "outputs" / "calibration" / "resnet18.json").write_text(json.dumps(calibration, ensure_ascii=False))
    return root


@pytest.fixture(scope="session")
def _fused_template(tmp_path_factory) -> Path:
    return _write_fused_project(tmp_path_factory.mktemp("fused") / "template")


@pytest.fixture
def fused_project(_fused_template, tmp_path) -> Path:
    """A fresh project with everything the gate reads (no MLflow store yet); edit it freely.

    Weight files are hard links to a session template (tests never rewrite them; writing
    ~360 MB of untrained ResNet18 weights per test would dominate the run time), the rest copies.
    """
    def link_models(src: str, dst: str) -> None:
        (os.link if f"{os.sep}models{os.sep}" in src else shutil.copy2)(src, dst)

    return Path(shutil.copytree(_fused_template, tmp_path / "project", copy_function=link_models))


@pytest.fixture(scope="session")
def gated_project(tmp_path_factory) -> Path:
    """A project whose gate has run once: virtual-biopsy-resnet18 v1 is @champion. Read only."""
    from virtual_biopsy.stages.gate import main

    root = _write_fused_project(tmp_path_factory.mktemp("gated") / "project")
    assert main(["--root", str(root)]) == 0
    return root


# --- a processed, split project (classifier stage, tuning, distributed-training, architecture tests) ---
PROCESSED_PARAMS = {
    "seed": 11,
    "preprocess": {"image_size": 32, "workers": 1},
    "ingest": {"workers": 1},
    "split": {"folds": 2, "val_share": 0.25, "test_share": 0.5},
    "classifier": {"epochs": 2, "warmup_epochs": 1, "patience": 1, "lr_patience": 1, "batch_size": 8},
}


@pytest.fixture(scope="session")
def processed_project(tmp_path_factory) -> Path:
    """A project root after synth (16 patients, 64 px), ingest, preprocess (32 px) and split
    (2 folds) with tiny classifier params. Read only: ``copy_project`` what a test changes.

    Balanced classes (unlike the shared ``tiny_raw``): every fold's train, val and test subsets
    need a benign patient, and 16 patients at the paper's 72 % malignant hold too few.
    """
    from virtual_biopsy.core.config import SynthConfig

    root = tmp_path_factory.mktemp("processed-project")
    _build_project(root, PROCESSED_PARAMS, synth=SynthConfig(patients=16, image_height=64, malignant_share=0.5), seed=7)
    return root


@dataclass(frozen=True)
class CloneRun:
    """The session's two whole pipeline runs (see :func:`_tiny_pipeline_runs`)."""

    first: Path       # the session's tiny pipeline run (embedded store)
    clone: Path       # a fresh clone of the same commit, after `dvc repro` against the team stack
    committed: tuple[str, ...]  # what a user commits after a run: dvc.lock and the reports git tracks
    experiment: str   # the MLflow experiment the clone's runs went to, on the server


@pytest.fixture(scope="session")
def _tiny_pipeline_runs(tmp_path_factory, team_stack) -> CloneRun:  # noqa: F811
    """Two runs of the real pipeline (`dvc repro`, every stage) of one tiny project, at once.

    The first runs in the tiny project (tests/tiny_pipeline.py) on its embedded SQLite store; the
    second in a fresh clone of the same commit (no outputs, no DVC cache, data/raw as `dvc pull`
    brings it) with only MLFLOW_TRACKING_URI pointing at the team stack (server, PostgreSQL,
    artifacts in S3). They run concurrently, one torch thread each (OMP_NUM_THREADS, above): a
    tiny run is mostly process start-up, imports and MLflow calls, so two share 2 cores well, and a
    whole tiny pipeline costs minutes. Under `make test`'s two workers every test that uses them
    is in the xdist group ``tiny_pipeline``, so one worker runs the pair once. The pair serves
    every end-to-end claim: test_pipeline_e2e, test_dvc_plots (the first run),
    test_reproducible_state (the second reproduces the first byte for byte, whichever store) and
    test_team_stack (the second's runs, artifacts and aliases are on the server).
    """
    import subprocess
    import uuid

    from tiny_pipeline import BIN, REPO, make_tiny_project, run

    from virtual_biopsy.mlops import tracking

    first = make_tiny_project(tmp_path_factory.mktemp("e2e") / "project")
    clone = tmp_path_factory.mktemp("clone") / "project"
    run(["git", "clone", "-q", str(first), str(clone)], clone.parent)
    shutil.copytree(first / "data" / "raw", clone / "data" / "raw")  # what `dvc pull data.dvc` brings
    experiment = f"vb-clone-{uuid.uuid4().hex[:8]}"
    envs = {first: dict(os.environ), clone: {**team_stack.client_env(), tracking.EXPERIMENT_ENV: experiment}}
    for env in envs.values():  # the copies have no .venv: scripts/python.sh finds this venv's python3 on PATH
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    logs = {root: open(root.parent / "repro.log", "w") for root in envs}
    procs = {root: subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=root, env=env, stdout=logs[root],
                                    stderr=subprocess.STDOUT) for root, env in envs.items()}
    try:
        for root, proc in procs.items():
            if proc.wait(timeout=1500) != 0:
                raise AssertionError(f"dvc repro in {root} failed ({proc.returncode}):\n"
                                     + (root.parent / "repro.log").read_text()[-6000:])
    finally:
        for root, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
            logs[root].close()
    tracked = subprocess.run(["git", "ls-files", "reports"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    committed = ("dvc.lock", *(p for p in tracked if (first / p).is_file()))
    return CloneRun(first, clone, committed, experiment)


@pytest.fixture(scope="session")
def tiny_pipeline_run(_tiny_pipeline_runs) -> Path:
    """A tiny project (tests/tiny_pipeline.py) after a real `dvc repro` on the embedded MLflow store."""
    return _tiny_pipeline_runs.first


@pytest.fixture(scope="session")
def clone_run_on_team_stack(_tiny_pipeline_runs) -> CloneRun:
    """A fresh clone of the tiny project's commit, reproduced on the team stack (_tiny_pipeline_runs)."""
    return _tiny_pipeline_runs


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make `--dist loadgroup` group again under pytest 9 (make test relies on it).

    pytest-xdist 3.8 marks a test of an ``xdist_group`` by renaming ``item._nodeid`` to
    ``<id>@<group>`` on each worker; pytest 9.2 reads ``nodeid`` from ``item._id`` instead, so
    the rename was lost, the groups scattered over both workers, and the session's two tiny
    pipelines ran once per worker (about 600 s of setup twice). Copy the rename to ``_id``.
    Private API of the pinned pytest: drop this once xdist sets the id pytest reads.
    """
    from _pytest.nodeid import coerce_node_id

    for item in items:
        renamed = getattr(item, "_nodeid", None)
        if renamed and renamed != item.nodeid:
            item._id = coerce_node_id(renamed)
