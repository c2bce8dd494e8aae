"""Model registry: every MLflow *registry* call of the project lives here (runs: tracking.py).

What is registered
    One registered model per generator view (``cesm-generator-cc``, ``cesm-generator-mlo``) and,
    later, one fused pipeline per classifier architecture. A version is created from an MLflow 3
    *logged model* (``models:/<model_id>``) that belongs to the run which trained it, so the
    registry links back to that run's params, metrics and artifacts.

Aliases, not stages
    ``challenger`` points at the last candidate a training stage produced, ``champion`` at the
    version that serves. Promotion and rollback move aliases only (the gate does it); the reasons
    of every decision are recorded as version tags.

No global state
    Every function takes the project ``root`` and talks to the store through an ``MlflowClient``
    on :func:`tracking.tracking_uri` (``MLFLOW_TRACKING_URI`` or the embedded SQLite store).
    ``mlflow.pytorch.log_model`` is the one API that insists on the *fluent* state (global tracking
    URI and active run), so :func:`_fluent_run` sets both for the duration of the call and restores
    them afterwards.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from virtual_biopsy.mlops import tracking

CHALLENGER = "challenger"
CHAMPION = "champion"


class RegistryError(ValueError):
    """A version the user named does not exist or is not a version number; the message names both."""


def generator_model_name(view: str) -> str:
    """Registered name of the CESM generator of one view: ``cesm-generator-cc`` / ``-mlo``."""
    return f"cesm-generator-{view.lower()}"


def pipeline_model_name(arch: str) -> str:
    """Registered name of the fused pipeline of one classifier architecture: ``virtual-biopsy-<arch>``."""
    return f"virtual-biopsy-{arch}"


def _mlflow():
    import mlflow  # lazy: importing mlflow costs ~1 s and lower layers never need it

    return mlflow


def _client(root: str | Path):
    return tracking.get_client(root)


@contextlib.contextmanager
def _fluent_store(root: str | Path) -> Iterator[None]:
    """Point MLflow's *global* tracking and registry URIs at the project's store, then restore.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` (and the registry its
    variable) into ``os.environ`` for subprocesses, and ``tracking.tracking_uri`` reads that
    variable, so restoring means putting back both the module state and the environment exactly
    as they were; otherwise one call would silently redirect every later client of the process.
    """
    mlflow = _mlflow()
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {key: os.environ.get(key) for key in env_keys}
    # The explicitly set URIs (None when unset); the public getters would return the defaults.
    saved_tracking = getattr(tracking_utils, "_tracking_uri", None)
    saved_registry = getattr(registry_utils, "_registry_uri", None)
    uri = tracking.tracking_uri(root)
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        mlflow.set_registry_uri(saved_registry)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _fluent_run(run: tracking.StageRun) -> Iterator[None]:
    """Make ``run`` the fluent active run on the project's store, then restore the caller's state.

    ``log_model`` creates the logged model in the active run's experiment and resolves the store
    from the global tracking URI; without this it would fall back to the Default experiment of
    a ``./mlflow.db`` in the working directory. Resuming an existing run with
    ``start_run(run_id=...)`` and leaving the block ends it (status FINISHED): callers therefore
    log a model from a run that is finished with it (the stage's ``serving`` child run).
    """
    mlflow = _mlflow()
    with _fluent_store(run.root):
        # nested=True lets a notebook user who has an active run of their own call this too.
        with mlflow.start_run(run_id=run.run_id, nested=mlflow.active_run() is not None):
            yield


def tensor_signature(example: np.ndarray):
    """MLflow signature of a model mapping a float32 tensor batch to one of the same shape.

    The batch dimension becomes -1 (any batch size); the other dimensions are fixed, which is
    what a generator or classifier trained at one image size accepts.
    """
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    shape = (-1, *example.shape[1:])
    spec = TensorSpec(np.dtype(np.float32), shape)
    return ModelSignature(inputs=Schema([spec]), outputs=Schema([TensorSpec(np.dtype(np.float32), shape)]))


def _pip_requirements() -> list[str]:
    # Given explicitly: otherwise MLflow infers them by re-loading the model in a subprocess,
    # which costs seconds per model and guesses from whatever happens to be imported.
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "numpy"]


def log_and_register_pytorch(
    run: tracking.StageRun,
    model: Any,
    name: str,
    registered_name: str,
    signature_example: np.ndarray,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> str:
    """Log ``model`` as a logged model of ``run`` and register it; return the new version number.

    ``signature_example`` is a float32 batch (at least 2 images, so the exported graph keeps a
    dynamic batch dimension) used as input example and to export the model with
    ``torch.export`` ("pt2": a traced graph, loadable without unpickling project code).
    ``tags`` go on the model version (view, fold, test metrics, data version ...).
    """
    mlflow = _mlflow()
    example = np.ascontiguousarray(signature_example, dtype=np.float32)
    if example.ndim < 2 or example.shape[0] < 2:
        raise ValueError(f"signature_example needs a batch of at least 2 items, got shape {example.shape}")
    model.eval()
    with _fluent_run(run):
        info = mlflow.pytorch.log_model(
            pytorch_model=model,
            name=name,
            signature=tensor_signature(example),
            input_example=example,
            serialization_format="pt2",
            pip_requirements=_pip_requirements(),
            tags={str(k): str(v) for k, v in (tags or {}).items()},
        )
        # Still inside the fluent block: the store resolves the ``models:/<model_id>`` source
        # through the global tracking URI.
        client = _client(run.root)
        _ensure_registered_model(client, registered_name)
        version = client.create_model_version(
            registered_name,
            source=f"models:/{info.model_id}",
            run_id=run.run_id,
            model_id=info.model_id,
            tags={str(k): str(v) for k, v in (tags or {}).items() if v is not None},
            description=description,
        )
    return str(version.version)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:  # created by a concurrent stage between our lookup and create
            client.get_registered_model(name)


def set_alias(name: str, alias: str, version: str | int, root: str | Path = ".") -> None:
    """Point ``alias`` of registered model ``name`` at ``version`` (moves it if already set)."""
    _client(root).set_registered_model_alias(name, alias, str(version))


def get_alias(name: str, alias: str, root: str | Path = ".") -> str | None:
    """Version number that ``alias`` points at, or None when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(root).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_version_tags(name: str, version: str | int, tags: Mapping[str, Any], root: str | Path = ".") -> None:
    """Set tags on one model version (None values are skipped)."""
    client = _client(root)
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, str(version), str(key), str(value))


def version_number(name: str, version: str | int) -> str:
    """``version`` as the registry spells it (``"3"``); RegistryError naming the model when malformed."""
    text = str(version).strip()
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise RegistryError(f"{name}: {str(version)!r} is not a model version (versions are numbered 1, 2, 3, ...)")
    return str(int(text))


def versions(name: str, root: str | Path = ".") -> list[str]:
    """Version numbers of a registered model, ascending ([] when the model does not exist)."""
    found = _client(root).search_model_versions(f"name = '{name}'")
    return sorted((str(v.version) for v in found), key=int)


def get_version_tags(name: str, version: str | int, root: str | Path = ".") -> dict[str, str]:
    """Tags of one model version; RegistryError naming the model and version when there is none."""
    from mlflow.exceptions import MlflowException

    number = version_number(name, version)
    try:
        return dict(_client(root).get_model_version(name, number).tags)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    existing = versions(name, root)
    known = (f"registered versions: {', '.join('v' + v for v in existing)}" if existing
             else "the model has no versions yet (run the gate stage)")
    raise RegistryError(f"{name} v{number}: no such version; {known}")


def model_uri(name: str, alias: str | None = None, version: str | int | None = None) -> str:
    """``models:/name@alias`` or ``models:/name/version``."""
    if (alias is None) == (version is None):
        raise ValueError("give exactly one of alias or version")
    return f"models:/{name}@{alias}" if alias is not None else f"models:/{name}/{version}"


def load_model(uri: str, root: str | Path = ".") -> Any:
    """Load a registered PyTorch model (``models:/name@alias``, ``models:/name/1``, ``runs:/...``).

    Returns a callable torch module mapping a float32 tensor batch to the output batch.
    """
    mlflow = _mlflow()
    # load_model resolves models:/ URIs against the global registry; point it at the project's.
    with _fluent_store(root):
        return mlflow.pytorch.load_model(uri, map_location="cpu")


# ---------------------------------------------------------------------------------------------
# Fused pipeline (pyfunc), promotion and rollback
# ---------------------------------------------------------------------------------------------
PREVIOUS_CHAMPION_TAG = "previous_champion"
DECISION_TAG = "gate.decision"
REASONS_TAG = "gate.reasons"


def log_and_register_pyfunc(run: tracking.StageRun, python_model: Any, name: str, registered_name: str, *,
                            artifacts: Mapping[str, str], signature: Any, input_example: Any,
                            code_paths: list[str], pip_requirements: list[str],
                            tags: Mapping[str, Any] | None = None, description: str | None = None) -> str:
    """Log a pyfunc model in ``run`` and register it as a new version of ``registered_name``.

    ``code_paths`` ships the package with the model, so a fresh process (``mlflow models serve``)
    imports the code the model was logged with, not whatever is installed. Returns the version.
    """
    mlflow = _mlflow()
    clean_tags = {str(k): str(v) for k, v in (tags or {}).items() if v is not None}
    with _fluent_run(run):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=python_model, artifacts=dict(artifacts), signature=signature,
            input_example=input_example, code_paths=code_paths, pip_requirements=pip_requirements,
            tags=clean_tags,
        )
        client = _client(run.root)
        _ensure_registered_model(client, registered_name)
        version = client.create_model_version(registered_name, source=f"models:/{info.model_id}",
                                              run_id=run.run_id, model_id=info.model_id, tags=clean_tags,
                                              description=description)
    return str(version.version)


def aliases(name: str, root: str | Path = ".") -> dict[str, str]:
    """alias -> version of a registered model ({} when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return {str(k): str(v) for k, v in _client(root).get_registered_model(name).aliases.items()}
    except MlflowException:
        return {}


def promote(name: str, version: str | int, root: str | Path = ".", tags: Mapping[str, Any] | None = None) -> str | None:
    """Move ``champion`` to ``version``; record the champion it replaces. Returns that previous one.

    The previous champion is written on the new version as ``previous_champion`` so that
    :func:`rollback` can walk back one decision at a time. Promoting the current champion again
    changes nothing but the tags.
    """
    previous = get_alias(name, CHAMPION, root)
    record = dict(tags or {})
    if previous is not None and previous != str(version):
        record[PREVIOUS_CHAMPION_TAG] = previous
    set_version_tags(name, version, record, root)
    set_alias(name, CHAMPION, version, root)
    return previous


def rollback(name: str, root: str | Path = ".", tags: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """Move ``champion`` back to the champion it replaced; returns (from version, to version).

    Raises ValueError when there is no champion or it has no recorded predecessor.
    """
    current = get_alias(name, CHAMPION, root)
    if current is None:
        raise ValueError(f"{name}: no champion to roll back")
    previous = get_version_tags(name, current, root).get(PREVIOUS_CHAMPION_TAG)
    if not previous:
        raise ValueError(f"{name}: champion v{current} has no previous champion recorded; nothing to roll back to")
    set_version_tags(name, current, {"rolled_back": "true", **(tags or {})}, root)
    set_alias(name, CHAMPION, previous, root)
    return current, previous


def champion_record(name: str, root: Path) -> dict[str, Any] | None:
    """The current champion's version, data version and AUCs (from its tags), or None."""
    from virtual_biopsy.evaluation.gate_checks import COMPARED_SETTINGS, slug

    version = get_alias(name, CHAMPION, root)
    if version is None:
        return None
    tags = get_version_tags(name, version, root)
    return {"version": version, "data_version": tags.get("data_version"),
            "auc": {s: tags.get(f"metric.{slug(s)}.auc") for s in COMPARED_SETTINGS}}


SIGNATURE_BATCH = 2  # an export example of 2 keeps the batch dimension of the graph dynamic


def register_generator(run: tracking.StageRun, view: str, generator: Any, image_size: int,
                       serving: Mapping[str, Any]) -> dict[str, Any]:
    """Register the serving generator as ``cesm-generator-<view>`` with alias challenger.

    ``serving`` says how it was chosen (policy, fold, test metrics); those go on the version's tags.
    The new version number is the store's count, not a result of the run: it is returned and set
    as the stage run's ``registered_model`` / ``registered_version`` tags, and belongs in no
    DVC-tracked file (a fresh store would number the same model 1, so dvc.lock would differ).
    """
    name = generator_model_name(view)
    example = np.random.default_rng(0).random((SIGNATURE_BATCH, 1, image_size, image_size), dtype=np.float32)
    tags = {
        "view": view, "policy": serving["policy"], "fold": serving["fold"], "image_size": image_size,
        "data_version": run.context.get("data_version"), "git_commit": run.context.get("git_commit"),
        "params_hash": run.context.get("params_hash"),
        **{f"test_{k}": f"{v:.6g}" for k, v in serving["test"].items()},
    }
    with run.child("serving", tags={"view": view, "policy": serving["policy"]}) as serving_run:
        version = log_and_register_pytorch(
            serving_run, generator, "generator", name, example, tags,
            description=f"CycleGAN FFDM->CESM generator, {view} view; serving policy {serving['policy']}",
        )
    set_alias(name, CHALLENGER, version, root=run.root)
    run.set_tags({"registered_model": name, "registered_version": version})
    return {"registered_model": name, "version": version, "alias": CHALLENGER}
