"""Where runs go: the tracking store, its client, the project's experiment.

The embedded default is a SQLite store and an artifact folder inside the project
(``mlruns/mlflow.db``, ``mlruns/artifacts``), so the model registry works with nothing started.
``MLFLOW_TRACKING_URI`` alone switches to a tracking server (PostgreSQL + S3 behind ``mlflow
server``); no code changes.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

EXPERIMENT_NAME = "virtual-biopsy"
EXPERIMENT_ENV = "VBIOPSY_EXPERIMENT"
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def mlflow_module():
    # Imported lazily: importing mlflow costs ~1 s, and layers below must not need it at all.
    import mlflow

    return mlflow


def embedded_store(root: str | Path = ".") -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded SQLite store under ``root/mlruns``."""
    mlruns = Path(root).resolve() / "mlruns"
    return f"sqlite:///{mlruns / 'mlflow.db'}", (mlruns / "artifacts").as_uri()


def tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite store of ``root``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_store(root)[0]


def _uses_embedded_store(root: str | Path) -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI")


def _artifact_location(root: str | Path) -> str | None:
    """Artifact folder of a new experiment: beside a SQLite store, the server's choice otherwise.

    Without this a bare ``sqlite:`` URI would put artifacts in ``./mlruns`` of whatever folder
    the process happens to run in.
    """
    if _uses_embedded_store(root):
        return embedded_store(root)[1]
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    return None  # a tracking server decides (e.g. --artifacts-destination s3://...)


def get_client(root: str | Path = "."):
    """An ``MlflowClient`` on the configured store (creates the embedded folder when needed)."""
    mlflow = mlflow_module()
    if _uses_embedded_store(root):
        (Path(root) / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(root)
    # The client opens the store at once; on a new SQLite file that creates the schema, which
    # processes starting together (parallel stages) would race to do.
    with store_lock(uri):
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for an in-memory or non-SQLite store)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


_held_locks: dict[Path, int] = {}


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive among processes on one SQLite store (flock on ``<db>.lock``); a no-op otherwise.

    Re-entrant within a process (flock would deadlock on a second open of the same file).
    """
    store = sqlite_file(uri)
    try:
        import fcntl
    except ImportError:  # not POSIX: the create-then-dedupe rule alone keeps one parent
        fcntl = None
    if store is None or fcntl is None:
        yield
        return
    lock = store.with_name(store.name + ".lock").resolve()
    if _held_locks.get(lock):
        _held_locks[lock] += 1
        try:
            yield
        finally:
            _held_locks[lock] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _held_locks[lock] = 1
        try:
            yield
        finally:
            _held_locks[lock] = 0
            fcntl.flock(handle, fcntl.LOCK_UN)


def experiment_id(client, root: str | Path = ".", name: str | None = None) -> str:
    """Id of the project's experiment, created on first use.

    The embedded store keeps artifacts under ``root/mlruns/artifacts``; with a server, the
    server's artifact root (for example an S3 bucket behind ``--artifacts-destination``) decides.
    """
    name = name or os.environ.get(EXPERIMENT_ENV, EXPERIMENT_NAME)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = _artifact_location(root)
    try:
        # The MLflow 3 UI opens GenAI (tracing) pages for an experiment of unknown kind; this is
        # model training, so say so and the UI opens on the runs table.
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except Exception:  # another process created it between our lookup and create
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
