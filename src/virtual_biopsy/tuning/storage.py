"""Where a study lives: an Optuna RDB storage that several workers share.

Sharing a study
    The study lives in ``--storage`` (default ``tune.storage``: SQLite). Any number of worker
    processes or machines given the same storage and study name work on one study: each runs
    ``--trials`` trials, trial numbers are assigned by the database, and every trial nests under
    the study's MLflow run (its id is kept in the study's user attributes). Give parallel
    workers distinct ``--worker`` indices so their samplers draw different start points.
    Watch a study live with ``optuna-dashboard sqlite:///optuna.db`` (or the PostgreSQL URL).
"""
from __future__ import annotations

import time
from pathlib import Path

from virtual_biopsy.tuning.objective import TuningError


def default_study_name(arch: str, modality: str, view: str, metric: str) -> str:
    return f"classifier-{arch}-{modality}-{view}-{metric}"


def open_storage(url: str, root: Path):
    """An Optuna RDBStorage on ``url`` (relative SQLite paths are relative to the project root).

    Schema creation is retried: workers that start at the same moment race to create the tables.
    """
    import optuna
    import sqlalchemy.exc

    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{(root / url[len('sqlite:///'):]).resolve()}"
    last: Exception | None = None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {})
        except sqlalchemy.exc.SQLAlchemyError as exc:
            last = exc
            time.sleep(0.5 * (attempt + 1))
    raise TuningError(f"cannot open Optuna storage {url.split('@')[-1]}: {last}")


def open_study(storage, name: str, seed: int, n_startup_trials: int, n_warmup_steps: int):
    """(study, created): create the study, or join it when another worker already has.

    Creation is atomic in the database (unique study name), so exactly one worker is the creator.
    """
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    try:
        return optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                   pruner=pruner), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                   pruner=pruner, load_if_exists=True), False


def without_password(url: str) -> str:
    """``url`` with the password masked (``user:***@host``), safe to log."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


IDENTITY_ATTR = "identity"


def check_study_identity(study, identity: dict, created: bool) -> None:
    """Record what a new study optimises, or refuse to join one that optimises something else.

    ``identity``: the classifier (arch, modality, view), the metric, the folds averaged over and
    the search space. A worker joining with another fold count or space would mix objectives
    that are not comparable in one TPE model and one "best trial".
    """
    recorded = study.user_attrs.get(IDENTITY_ATTR)
    if recorded is None:
        # A new study, or one made outside `vbiopsy tune` (e.g. to enqueue a first trial): it is
        # ours to describe while none of its trials has run.
        if not created and any(trial.state.is_finished() for trial in study.get_trials(deepcopy=False)):
            raise TuningError(f"study {study.study_name}: has finished trials but no record of what they "
                              "optimised (made by another tool or an older version); use another --study name")
        study.set_user_attr(IDENTITY_ATTR, identity)
        return
    differs = [key for key in sorted(set(identity) | set(recorded)) if identity.get(key) != recorded.get(key)]
    if differs:
        what = "; ".join(f"{key} {recorded.get(key)!r} (this run: {identity.get(key)!r})" for key in differs)
        raise TuningError(f"study {study.study_name} was created with {what}: its trials are not comparable "
                          "with this run's; use another --study name or the study's settings")
