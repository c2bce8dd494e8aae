"""Experiment tracking: every MLflow tracking call of the project lives here (the registry in registry.py).

Where runs go
    The embedded default is a SQLite store and an artifact folder inside the project
    (``mlruns/mlflow.db``, ``mlruns/artifacts``), so the model registry works with nothing
    started. ``MLFLOW_TRACKING_URI`` alone switches to a tracking server (PostgreSQL + S3 behind
    ``mlflow server``); no code changes.

How runs are shaped
    One *parent* run per pipeline run; each DVC stage opens a *child* run under it, and stages
    that train several models open grandchildren per view/arch/fold (``StageRun.child``). DVC runs
    each stage in its own process, so the parent cannot be held in memory: it is found again by
    its pipeline key (git commit + data version + params hash), or taken from
    ``VBIOPSY_PARENT_RUN_ID`` when a driver (``make demo``, CI) pins one. Every run carries the
    tags ``stage``, ``git_commit``, ``data_version``, ``params_hash`` (plus arch, modality, view,
    fold, setting where they apply), so the MLflow UI compares like with like.

How runs end (no run stays RUNNING)
    A stage run and its nested runs end FINISHED when their block completes, FAILED when it
    raises, KILLED when the process is stopped: while a run is open, SIGTERM, SIGINT and SIGHUP
    raise :class:`Interrupted` (a KeyboardInterrupt) in the main thread, so every ``with`` block
    closes its run, and once they are closed the signal is handed to the handler that was there
    before (SIGTERM still kills the process, so DVC and torchrun see it die of the signal). Only
    the main thread of the process that opened the run reacts: torchrun ranks other than 0 open
    no run (NullRun) and keep their handlers; forked DataLoader workers get the previous handlers
    back at the fork. Runs of a process that could not react (SIGKILL, the OOM killer, a crash, a
    rank SIGKILLed by torchrun while blocked in a collective) carry the tag ``process`` (host, PID
    namespace, PID, start time); the next stage on that host marks them KILLED.

    The parent is RUNNING while one of its stages runs and ended otherwise: each stage reopens it
    when it starts and, when it ends, closes it if no stage run under it is still RUNNING (the last
    stage to end sees every other one ended, so the parent is never left RUNNING). Its status is
    then the pipeline's so far, judged by the latest attempt of each stage (run name): FAILED if
    one failed, else KILLED if one was killed, else FINISHED; its end time is the end of the latest
    stage, so its duration spans the whole pipeline run. This holds for an implicit parent (a bare
    ``dvc repro``) and for a pinned one; ``vbiopsy pipeline finish`` closes a pinned parent for
    good with the headline metrics.

One parent per pipeline key, also when stages run concurrently
    MLflow picks run ids itself and has no create-if-absent, so the parent cannot have a
    deterministic id. On a SQLite store (the embedded default) a lock file beside the database
    (``mlflow.db.lock``, flock: released by the OS if its holder dies) makes "search, else
    create" atomic, so a second parent is never made. A PostgreSQL store or a tracking server,
    shared by several machines, has no such lock: there a stage that made a parent waits
    :data:`PARENT_SETTLE_S`, searches again and, if an older implicit parent of the same key
    exists, deletes its own (tag ``duplicate_of``) and joins the oldest; every stage that ends
    also moves the children of any younger duplicate to the oldest and deletes the duplicate, so
    even two creations that crossed unseen end as one parent. The oldest is the one all
    processes agree on: a parent, once made, only ever meets younger rivals.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from virtual_biopsy.core.config import Params, flatten, params_hash

EXPERIMENT_NAME = "virtual-biopsy"
PARENT_RUN_ENV = "VBIOPSY_PARENT_RUN_ID"
EXPERIMENT_ENV = "VBIOPSY_EXPERIMENT"
PIPELINE_KEY_TAG = "pipeline_key"
# "pinned" (made by `vbiopsy pipeline start`) or "implicit" (made by the first stage of a bare dvc repro).
PARENT_KIND_TAG = "pipeline_parent"
DUPLICATE_TAG = "duplicate_of"  # on a deleted duplicate parent: the parent its children moved to
PROCESS_TAG = "process"  # host/pid-namespace:pid:start-ticks of the process that holds the run open
KILLED_BY_TAG = "killed_by"  # SIGTERM, SIGINT, ... or "process gone"
PARENT_SETTLE_S = 0.5  # how long a stage that made a parent on a shared store waits for rivals
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def _mlflow():
    # Imported lazily: importing mlflow costs ~1 s, and layers below must not need it at all.
    import mlflow

    return mlflow


# ---------------------------------------------------------------------------------------------
# Where the store is
# ---------------------------------------------------------------------------------------------
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
    mlflow = _mlflow()
    if _uses_embedded_store(root):
        (Path(root) / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(root)
    # The client opens the store at once; on a new SQLite file that creates the schema, which
    # processes starting together (parallel stages) would race to do.
    with _store_lock(uri):
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for an in-memory or non-SQLite store)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


_held_locks: dict[Path, int] = {}


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Exclusive among processes on one SQLite store (flock on ``<db>.lock``); a no-op otherwise.

    Re-entrant within a process (flock would deadlock on a second open of the same file).
    """
    store = _sqlite_file(uri)
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


# ---------------------------------------------------------------------------------------------
# What a run is about: code, data and params versions
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Termination signals: a stopped process closes its runs
# ---------------------------------------------------------------------------------------------
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
FORCE_AFTER_S = 3.0  # a repeat of the signal later than this no longer waits for the runs to close


class Interrupted(KeyboardInterrupt):
    """A termination signal raised as an exception (``signum`` says which), so ``with`` blocks,
    ``finally`` clauses and every ``except KeyboardInterrupt`` (Optuna's trial FAIL) run."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _SignalState:
    depth = 0  # nesting of signals_as_exceptions (main thread only)
    previous: dict[int, Any] = {}
    owner_pid: int | None = None
    defer = 0  # nesting of deferred_signals
    pending: int | None = None
    fired_at: float | None = None


_signals = _SignalState()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _hand_to_previous(signum: int, frame: Any = None) -> None:
    """Do with ``signum`` what the process would have done had we not been installed."""
    previous = _signals.previous.get(signum, signal.SIG_DFL)
    if previous == signal.SIG_IGN:
        return
    if callable(previous):
        previous(signum, frame)  # Python's SIGINT handler raises KeyboardInterrupt
        return
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)  # default action: the process ends, killed by this signal


def _on_signal(signum: int, frame: Any) -> None:
    state = _signals
    # A process forked while we were installed (a DataLoader worker) inherits this handler; it
    # owns no run, so it reacts as it would have without us.
    if os.getpid() != state.owner_pid or state.depth == 0:
        _hand_to_previous(signum, frame)
        return
    if state.fired_at is not None:
        if time.monotonic() - state.fired_at < FORCE_AFTER_S:
            return  # a repeat (the terminal and a supervisor both sent it): the runs are being closed
        _restore_handlers()
        _hand_to_previous(signum, frame)  # asked again while closing hangs: give up on the runs
        return
    if state.defer:
        state.pending = state.pending or signum
        return
    state.fired_at = time.monotonic()
    raise Interrupted(signum)


def _restore_handlers() -> None:
    for signum, previous in _signals.previous.items():
        if signal.getsignal(signum) is _on_signal:  # replaced by someone since: leave theirs
            signal.signal(signum, previous)


_fork_masks = threading.local()


def _block_before_fork() -> None:
    # A signal that reaches a forked child before CPython re-initialises its signal state there is
    # dropped (the child's pending flags are cleared), so a worker forked a moment before a
    # Ctrl-C or killpg would survive it. Blocked across the fork, the signal waits in the kernel
    # and reaches the child once its handlers are back to the previous ones (_restore_in_child).
    _fork_masks.mask = None
    if _signals.depth and _signals.previous and os.getpid() == _signals.owner_pid:
        _fork_masks.mask = signal.pthread_sigmask(signal.SIG_BLOCK, list(_signals.previous))


def _unblock_after_fork() -> None:
    mask, _fork_masks.mask = getattr(_fork_masks, "mask", None), None
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _restore_in_child() -> None:
    """A forked child (a DataLoader worker) owns no run: it gets the handlers it would have had.

    A signal that arrived since the fork is pending: one with the default disposition kills the
    child when it is unblocked, as it would have without us; one for a Python handler (SIGINT's
    KeyboardInterrupt) is dropped, as CPython drops every signal that reaches a child before its
    signal state is reset (raised here, inside the fork hook, it would be swallowed anyway).
    """
    if getattr(_fork_masks, "mask", None) is not None:
        for signum, previous in _signals.previous.items():
            signal.signal(signum, previous)
        if hasattr(signal, "sigtimedwait"):
            for signum in signal.sigpending() & {s for s, h in _signals.previous.items() if callable(h)}:
                signal.sigtimedwait([signum], 0)
    _signals.depth, _signals.owner_pid, _signals.pending, _signals.fired_at = 0, None, None, None
    _signals.defer = 0
    _unblock_after_fork()


_fork_hooks: list[bool] = []


def _register_fork_hooks() -> None:
    if not _fork_hooks and hasattr(os, "register_at_fork") and hasattr(signal, "pthread_sigmask"):
        os.register_at_fork(before=_block_before_fork, after_in_parent=_unblock_after_fork,
                            after_in_child=_restore_in_child)
        _fork_hooks.append(True)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Inside this block SIGTERM, SIGINT and SIGHUP raise :class:`Interrupted` in the main thread.

    Nested blocks share one installation. Leaving the outermost restores the previous handlers
    and, when it is left by an :class:`Interrupted`, hands the signal to the previous handler
    (default SIGTERM: the process dies of it now; Python's SIGINT: KeyboardInterrupt goes on up).
    A signal that was ignored (``nohup``, a background job) stays ignored; a handler set outside
    Python is left alone; in other threads this is a no-op. Processes forked inside the block
    start with the previous handlers.
    """
    state = _signals
    if not _main_thread():
        yield
        return
    if state.depth == 0:
        _register_fork_hooks()
        state.owner_pid, state.previous, state.pending, state.fired_at = os.getpid(), {}, None, None
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN or previous is None:
                continue
            state.previous[signum] = previous
            signal.signal(signum, _on_signal)
    state.depth += 1
    owner = state.owner_pid
    left = False
    try:
        yield
    except Interrupted as exc:
        left = True
        if os.getpid() == owner and state.owner_pid == owner:  # not a forked child unwinding our frames
            state.depth -= 1
            if state.depth == 0:
                _restore_handlers()
                state.pending = None
                _hand_to_previous(exc.signum)
        raise
    finally:
        if not left and os.getpid() == owner and state.owner_pid == owner:
            state.depth -= 1
            if state.depth == 0:
                _restore_handlers()
                pending, state.pending = state.pending, None
                if pending is not None:  # held by a deferral that outlived the block: never lose it
                    _hand_to_previous(pending)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold a signal that arrives in this block (short bookkeeping: create or close a run) and
    raise it as :class:`Interrupted` when the block is left."""
    state = _signals
    if not _main_thread():
        yield
        return
    state.defer += 1
    try:
        yield
    finally:
        state.defer = max(0, state.defer - 1)  # a forked child starts at 0 (_restore_in_child)
        if state.defer == 0 and state.pending is not None and state.depth > 0 and os.getpid() == state.owner_pid:
            signum, state.pending = state.pending, None
            state.fired_at = time.monotonic()
            raise Interrupted(signum)


def _ending(exc: BaseException) -> tuple[str, str | None]:
    """(MLflow status, what killed it) of a run whose block raised ``exc``."""
    if isinstance(exc, Interrupted):
        return "KILLED", signal.Signals(exc.signum).name
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", "KeyboardInterrupt"
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return "FINISHED", None
    return "FAILED", None


# ---------------------------------------------------------------------------------------------
# Which process holds a run open (to close the runs of processes that died without a word)
# ---------------------------------------------------------------------------------------------
def _host_scope() -> str | None:
    """This host and PID namespace (PIDs mean something only there); None off Linux."""
    try:
        return f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process_identity(pid: int | None = None) -> str | None:
    """``host/pidns:pid:start-ticks`` of a live process (a reused PID has another start time)."""
    scope = _host_scope()
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if scope is None:
        return None
    return f"{scope}:{pid}:{stat.rsplit(')', 1)[1].split()[19]}"


def _reap_orphans(client, exp_id: str) -> None:
    """Mark KILLED the RUNNING runs of processes of this host that are gone (SIGKILL, OOM, crash)."""
    scope = _host_scope()
    if scope is None:
        return
    found = client.search_runs([exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.{PROCESS_TAG} LIKE '{scope}:%'",
                               max_results=1000)
    for run in found:
        owner = run.data.tags.get(PROCESS_TAG, "")
        if not owner.startswith(f"{scope}:"):
            continue
        pid = owner[len(scope) + 1:].split(":", 1)[0]
        if pid.isdigit() and _process_identity(int(pid)) != owner:
            client.set_tag(run.info.run_id, KILLED_BY_TAG, "process gone")
            client.set_terminated(run.info.run_id, status="KILLED")


def _best_effort(what: str, call, *args: Any) -> Any:
    """Parent bookkeeping never fails a stage: say what went wrong and go on."""
    try:
        return call(*args)
    except Exception as exc:
        print(f"tracking: {what} failed: {exc}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
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


# Columns a logged dataset may describe (schema, digest): pseudonymous keys, labels, acquisition
# and subset fields, rows of the processed array. Everything else (SOP instance UIDs, file paths
# that carry the site's patient ids, pair keys) is dropped before MLflow sees the table.
DATASET_COLUMNS = (
    "patient_id", "study_id", "lesion_id", "laterality", "view", "modality", "phase", "label", "y", "acr", "age",
    "arch", "fold", "subset", "source", "synthetic", "simulated", "p_malignant", "row", "le_row", "des_row",
)
DATASET_CONTEXT_TAG = "mlflow.data.context"  # what the UI's Dataset column shows beside the name


def dataset_table(table: Any) -> Any:
    """The DATASET_COLUMNS of a pandas table, text columns as strings (MLflow infers the schema)."""
    kept = table[[c for c in table.columns if c in DATASET_COLUMNS]].reset_index(drop=True)
    for column in kept.columns:
        if kept[column].dtype == object or str(kept[column].dtype) == "string":
            kept[column] = kept[column].fillna("").astype(str)
    return kept


def table_counts(table: Any, targets: str | None) -> dict[str, int]:
    """Rows, patients and rows per target value of a dataset table (its source metadata)."""
    counts = {"rows": int(len(table))}
    if "patient_id" in table.columns:
        counts["patients"] = int(table["patient_id"].nunique())
    if targets and targets in table.columns:
        counts.update({f"{targets}={k}": int(v) for k, v in table[targets].value_counts().sort_index().items()})
    return counts


def _clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (tags or {}).items() if v is not None}


@dataclass
class StageRun:
    """A handle on one MLflow run; all logging goes through it (no global active run)."""

    client: Any
    run_id: str
    experiment_id: str
    root: Path
    context: dict[str, str]

    # -- logging -----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow = _mlflow()
        # MLflow keys allow word characters and ``-. :/`` only; settings like ``F+C`` (gate floors) carry a ``+``.
        items = [mlflow.entities.Param(re.sub(r"[^\w\-. :/]", "_", str(k)), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # the REST API takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow = _mlflow()
        import time

        now = int(time.time() * 1000)
        items = [
            mlflow.entities.Metric(str(k), float(v), now, int(step or 0))
            for k, v in metrics.items()
            if v is not None and v == v  # NaN means "undefined": leave it out rather than log NaN
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow = _mlflow()
        items = [mlflow.entities.RunTag(k, v) for k, v in _clean_tags(tags).items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_tables(self, tables: Mapping[str, Any], *, name: str, source: Mapping[str, Any],
                   targets: str | None = None, predictions: str | None = None) -> None:
        """Log what the run read as MLflow dataset inputs: one per table, keyed by its context.

        ``tables`` maps a context (``train``, ``val``, ``test`` ...) to a pandas table of the rows
        read; each becomes a pandas dataset ``"<name> <context>"`` of its DATASET_COLUMNS, of
        which MLflow keeps the schema, row count and a digest, never the values (so no image, and
        no identifier beyond the pseudonymous ids). Its source is metadata only: ``source`` (the
        file the rows come from, fold, ...) plus the data version (data.dvc) and the table's
        counts. Empty tables are skipped.
        """
        mlflow = _mlflow()
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for context, table in tables.items():
            if table is None or len(table) == 0:
                continue
            kept = dataset_table(table)
            meta = {**source, "context": context, "data_version": self.context.get("data_version", "unknown"),
                    **table_counts(kept, targets)}
            with warnings.catch_warnings():  # schema hints about integer columns, meant for model signatures
                warnings.simplefilter("ignore")
                dataset = mlflow.data.from_pandas(
                    kept, source=CodeDatasetSource(tags={k: str(v) for k, v in meta.items()}), name=f"{name} {context}",
                    targets=targets if targets in kept.columns else None,
                    predictions=predictions if predictions in kept.columns else None,
                )
                entity = dataset._to_mlflow_entity()
            inputs.append(DatasetInput(entity, tags=[InputTag(DATASET_CONTEXT_TAG, context)]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    # -- nesting -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, Any] | None = None) -> Iterator["StageRun"]:
        """A nested run under this one (per view, architecture, fold, setting ...)."""
        inherited = {k: v for k, v in self.client.get_run(self.run_id).data.tags.items() if k == "stage"}
        with _run(self.client, self.experiment_id, self.root, self.context, name, self.run_id,
                  {**inherited, **_clean_tags(tags)}) as run:
            yield run


class NullRun:
    """A run that logs nothing: what ``stage_run(..., enabled=False)`` yields (``--no-mlflow``,
    a non-zero torchrun rank, a test). It has StageRun's methods, so code that logs never asks
    whether there is a run."""

    def __init__(self, root: str | Path = ".") -> None:
        self.root = Path(root)
        self.context: dict[str, str] = {}
        self.run_id = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def log_tables(self, tables: Mapping[str, Any], *, name: str, source: Mapping[str, Any],
                   targets: str | None = None, predictions: str | None = None) -> None:
        pass

    def __bool__(self) -> bool:
        """False: ``if run`` reads as "is this run recorded anywhere"."""
        return False

    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, Any] | None = None) -> Iterator["NullRun"]:
        yield self


@contextlib.contextmanager
def _run(client, exp_id: str, root: Path, context: dict[str, str], name: str, parent_id: str | None,
         tags: Mapping[str, str]) -> Iterator[StageRun]:
    """Create a run, yield a handle, and end it FINISHED, FAILED or KILLED (see the module doc)."""
    all_tags = {**context, **tags, "mlflow.runName": name}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    owner = _process_identity()
    if owner:
        all_tags[PROCESS_TAG] = owner
    with signals_as_exceptions():
        run_id, status, killed_by = None, "FINISHED", None
        try:
            with deferred_signals():  # a signal now is raised once the run exists and will be closed
                run_id = client.create_run(exp_id, tags=all_tags, run_name=name).info.run_id
            yield StageRun(client, run_id, exp_id, root, context)
        except BaseException as exc:
            status, killed_by = _ending(exc)
            raise
        finally:
            if run_id is not None:
                with deferred_signals():
                    if status == "FINISHED":
                        client.set_terminated(run_id, status=status)
                    else:  # the block's own exception is what the caller must see
                        _best_effort(f"marking run {run_id} {status}", _terminate, client, run_id, status, killed_by)


def _terminate(client, run_id: str, status: str, killed_by: str | None) -> None:
    if killed_by:
        client.set_tag(run_id, KILLED_BY_TAG, killed_by)
    client.set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------------------------
# The pipeline's parent run
# ---------------------------------------------------------------------------------------------
def _by_age(run) -> tuple[int, str]:
    return (run.info.start_time or 0, run.info.run_id)


def _pipeline_parents(client, exp_id: str, key: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.{PIPELINE_KEY_TAG} = '{key}' and tags.stage = 'pipeline'",
                              max_results=1000)


def _implicit(runs: list) -> list:
    return sorted((r for r in runs if r.data.tags.get(PARENT_KIND_TAG) == "implicit"), key=_by_age)


def _canonical_parent(runs: list):
    """The parent stages of this key join: the newest pinned one (the latest ``vbiopsy pipeline
    start``), else the oldest implicit one (what concurrent creators agree on), else the newest
    parent made before parents carried their kind."""
    pinned = [r for r in runs if r.data.tags.get(PARENT_KIND_TAG) == "pinned"]
    if pinned:
        return max(pinned, key=_by_age)
    implicit = _implicit(runs)
    if implicit:
        return implicit[0]
    return max(runs, key=_by_age) if runs else None


def _discard_duplicate(client, run_id: str, kept: str) -> None:
    client.set_tag(run_id, DUPLICATE_TAG, kept)
    client.set_terminated(run_id, status="FINISHED")
    client.delete_run(run_id)


def _find_or_create_parent(client, exp_id: str, context: dict[str, str]) -> tuple[str, bool]:
    """(run id, whether this call created it) of the parent of this pipeline key (module doc)."""
    key = context[PIPELINE_KEY_TAG]
    with _store_lock(client.tracking_uri):
        found = _canonical_parent(_pipeline_parents(client, exp_id, key))
        if found is not None:
            return found.info.run_id, False
        name = f"pipeline-{key[:8]}"
        mine = client.create_run(exp_id, run_name=name, tags={
            **context, "stage": "pipeline", PARENT_KIND_TAG: "implicit", "mlflow.runName": name}).info.run_id
    if _sqlite_file(client.tracking_uri) is None:  # no lock: a rival may have created one meanwhile
        time.sleep(PARENT_SETTLE_S)
        winner = _canonical_parent(_pipeline_parents(client, exp_id, key))
        if winner is not None and winner.info.run_id != mine:
            _discard_duplicate(client, mine, winner.info.run_id)
            return winner.info.run_id, False
    return mine, True


def _merge_duplicate_parents(client, exp_id: str, key: str, parent_id: str) -> str:
    """Move the children of younger implicit parents of ``key`` to the oldest and delete the
    younger ones; returns ``parent_id``, or the oldest if ``parent_id`` was one of the younger."""
    implicit = _implicit(_pipeline_parents(client, exp_id, key))
    for duplicate in implicit[1:]:
        kept, gone = implicit[0].info.run_id, duplicate.info.run_id
        for child in _children(client, exp_id, gone):
            client.set_tag(child.info.run_id, "mlflow.parentRunId", kept)
        _discard_duplicate(client, gone, kept)
        if parent_id == gone:
            parent_id = kept
    return parent_id


def pipeline_status(children: list) -> str | None:
    """The pipeline's status from its stage runs: None while the latest attempt of a stage (run
    name) is RUNNING, else FAILED if one failed, KILLED if one was killed, FINISHED otherwise."""
    latest: dict[str, Any] = {}
    for run in sorted(children, key=_by_age):
        latest[run.info.run_name] = run
    statuses = {run.info.status for run in latest.values()}
    if statuses & {"RUNNING", "SCHEDULED"}:
        return None
    return next((s for s in ("FAILED", "KILLED") if s in statuses), "FINISHED")


def _children(client, exp_id: str, parent_id: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


def _reopen_parent(client, parent_id: str) -> None:
    if client.get_run(parent_id).info.status != "RUNNING":
        client.update_run(parent_id, status="RUNNING")


def _close_parent(client, exp_id: str, parent_id: str, fallback: str) -> None:
    """End the parent unless one of its stages is still running (that stage will end it).

    ``fallback``: the status when no stage run exists under it (the stage stopped before its run).
    """
    children = _children(client, exp_id, parent_id)
    status = pipeline_status(children) if children else fallback
    if status is not None:
        client.set_terminated(parent_id, status=status)


def pipeline_parent_run(client, exp_id: str, context: dict[str, str]) -> str:
    """Run id of this pipeline run's parent: pinned by env, else found (or made) by pipeline key."""
    pinned = os.environ.get(PARENT_RUN_ENV)
    if pinned:
        return pinned
    return _find_or_create_parent(client, exp_id, context)[0]


def start_pipeline_run(root: str | Path = ".", params: Params | None = None) -> str:
    """Create a fresh parent run (drivers export its id as ``VBIOPSY_PARENT_RUN_ID``).

    It is RUNNING until a stage under it ends (module doc) or ``vbiopsy pipeline finish``.
    """
    client = get_client(root)
    exp_id = experiment_id(client, root)
    context = run_context(root, params)
    name = f"pipeline-{context[PIPELINE_KEY_TAG][:8]}"
    run = client.create_run(exp_id, run_name=name,
                            tags={**context, "stage": "pipeline", PARENT_KIND_TAG: "pinned", "mlflow.runName": name})
    if params is not None:
        StageRun(client, run.info.run_id, exp_id, Path(root), context).log_params(loggable_params(flatten(params)))
    return run.info.run_id


def finish_pipeline_run(root: str | Path, run_id: str, status: str | None = None, *, aborted: bool = False) -> str:
    """End a parent run for good; returns the status set.

    ``status`` None: the stages' verdict (:func:`pipeline_status`; FINISHED when no stage ran).
    ``aborted``: the driver stopped before the pipeline completed: the stages' verdict when it is
    FAILED or KILLED, else FAILED. Runs of dead processes on this host are marked KILLED first.
    """
    client = get_client(root)
    exp_id = client.get_run(run_id).info.experiment_id
    _best_effort("marking runs of dead processes KILLED", _reap_orphans, client, exp_id)
    if status is None:
        verdict = pipeline_status(_children(client, exp_id, run_id))
        if aborted:
            status = verdict if verdict in ("FAILED", "KILLED") else "FAILED"
        elif verdict is None:  # a stage is still running: it ends the parent when it ends
            return "RUNNING"
        else:
            status = verdict
    client.set_terminated(run_id, status=status)
    return status


def parent_run(root: str | Path = ".", params: Params | None = None) -> StageRun:
    """A handle on the pipeline's parent run (for results that describe the whole run)."""
    client = get_client(root)
    exp_id = experiment_id(client, root)
    context = run_context(root, params)
    parent_id = os.environ.get(PARENT_RUN_ENV)
    if not parent_id:
        parent_id, created = _find_or_create_parent(client, exp_id, context)
        if created:  # made outside any stage: ended at once, like a parent between two stages
            client.set_terminated(parent_id, status="FINISHED")
    return StageRun(client, parent_id, exp_id, Path(root), context)


@contextlib.contextmanager
def stage_run(stage: str, *, root: str | Path = ".", params: Params | None = None,
              tags: Mapping[str, Any] | None = None, run_name: str | None = None,
              enabled: bool = True) -> Iterator[StageRun | NullRun]:
    """Open the child run of one DVC stage under the pipeline's parent run.

    The stage's own params section is logged as params; the run ends FINISHED, FAILED when the
    block raises, KILLED when the process gets SIGTERM/SIGINT/SIGHUP; the parent is reopened for
    the stage and ended after it (module doc). ``enabled=False`` yields a :class:`NullRun`, touches
    no MLflow store and leaves signals alone (torchrun ranks other than 0).
    """
    root = Path(root)
    if not enabled:
        yield NullRun(root)
        return
    with signals_as_exceptions():
        client = exp_id = parent_id = None
        outcome = "FINISHED"
        try:
            with deferred_signals():  # the parent is never made or reopened without the code that ends it armed
                client = get_client(root)
                exp_id = experiment_id(client, root)
                context = run_context(root, params)
                _best_effort("marking runs of dead processes KILLED", _reap_orphans, client, exp_id)
                pinned = os.environ.get(PARENT_RUN_ENV)
                parent_id, created = (pinned, False) if pinned else _find_or_create_parent(client, exp_id, context)
                if not created:
                    _best_effort("reopening the pipeline run", _reopen_parent, client, parent_id)
            with _run(client, exp_id, root, context, run_name or stage, parent_id,
                      {"stage": stage, **_clean_tags(tags)}) as run:
                section = STAGE_SECTIONS.get(stage, stage)
                if params is not None and hasattr(params, section):
                    run.log_params(section_params(params, section))
                yield run
        except BaseException as exc:
            outcome = _ending(exc)[0]
            raise
        finally:
            if parent_id is not None:
                with deferred_signals():
                    if not pinned:
                        parent_id = _best_effort("merging duplicate pipeline runs", _merge_duplicate_parents, client,
                                                 exp_id, context[PIPELINE_KEY_TAG], parent_id) or parent_id
                    _best_effort("ending the pipeline run", _close_parent, client, exp_id, parent_id, outcome)


def log_to_parent(root: str | Path = ".", params: Params | None = None, *, metrics: Mapping[str, float] | None = None,
                  artifacts: Mapping[str, str | Path] | None = None, tags: Mapping[str, Any] | None = None) -> None:
    """Log pipeline-wide results (data-quality verdict, headline metrics) on the parent run.

    ``artifacts`` maps an artifact folder name to a local file or folder.
    """
    run = parent_run(root, params)
    if metrics:
        run.log_metrics(metrics)
    if tags:
        run.set_tags(tags)
    for artifact_path, local in (artifacts or {}).items():
        local = Path(local)
        (run.log_artifacts if local.is_dir() else run.log_artifact)(local, artifact_path)


# ---------------------------------------------------------------------------------------------
# The MLflow UI: the command that serves the store and the links the project prints
# ---------------------------------------------------------------------------------------------
UI_PORT = 5000
# MLflow 3.17's UI has one global mode that starts as GenAI (Overview, Traces, Sessions ...): it
# takes ``workflowType`` from the page's URL, else from the browser's localStorage, else "genai",
# and ignores the experiment's mlflow.experimentKind tag. So every link the project prints says
# ``workflowType=machine_learning``: a fresh browser then opens the runs table of model training.
UI_MODE = {"workflowType": "machine_learning"}
# The evaluate stage's settings runs (its robustness sweeps are runs tagged synthetic_share 0-100).
EVALUATE_SETTINGS_FILTER = "tags.stage = 'evaluate' and tags.fold = 'all' and tags.synthetic_share != '0-100'"


def _serves_ui(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ui_command(root: str | Path = ".", port: int = UI_PORT) -> str:
    """The shell command that opens the MLflow UI on this project's store (a server needs none)."""
    uri = tracking_uri(root)
    if _serves_ui(uri):
        return f"open {ui_base_url(root, port)} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --port {port}"


def ui_base_url(root: str | Path = ".", port: int = UI_PORT) -> str:
    """Where the UI answers: the tracking server, or ``mlflow ui`` (ui_command) on loopback."""
    uri = tracking_uri(root)
    return uri.rstrip("/") if _serves_ui(uri) else f"http://127.0.0.1:{port}"


def ui_link(base: str, route: str, **query: str) -> str:
    """``BASE/#/ROUTE?...&workflowType=machine_learning``: a page of the UI in model-training mode.

    The mode goes last: the comparison page reads its first parameter only when it is ``runs``.
    """
    from urllib.parse import quote, urlencode

    return f"{base.rstrip('/')}/#/{route.strip('/')}?{urlencode({**query, **UI_MODE}, quote_via=quote)}"


def runs_link(base: str, experiment_id: str, search_filter: str | None = None, order_by: str | None = None,
              ascending: bool = False) -> str:
    """The experiment's runs table, optionally filtered (MLflow search syntax) and ordered.

    Ordered by anything but the start time, the UI lists the matching runs flat; by start time
    (its default) it nests them under their parents, collapsed.
    """
    query = {"searchFilter": search_filter} if search_filter else {}
    if order_by:
        query.update(orderByKey=order_by, orderByAsc=str(ascending).lower())
    return ui_link(base, f"experiments/{experiment_id}/runs", **query)


def compare_runs_link(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's comparison page of ``run_ids`` (params, metrics, plots side by side)."""
    return ui_link(base, "compare-runs", runs=json.dumps(list(run_ids)), experiments=json.dumps([experiment_id]))


def ui_links(root: str | Path = ".", port: int = UI_PORT, client: Any = None) -> dict[str, str]:
    """The UI pages ``vbiopsy pipeline summary`` prints, by what they show (all open in model-training mode)."""
    base = ui_base_url(root, port)
    client = client or get_client(root)
    found = client.get_experiment_by_name(os.environ.get(EXPERIMENT_ENV, EXPERIMENT_NAME))
    if found is None:
        return {"experiments": ui_link(base, "experiments")}
    exp = found.experiment_id
    by_auc = "metrics.`test_auc`"
    return {
        "runs (pipeline > stage > fold, newest first)": runs_link(base, exp),
        "settings compared (evaluate, by test AUC)": runs_link(base, exp, EVALUATE_SETTINGS_FILTER, by_auc),
        "one setting (F+Ĉ, every architecture)": runs_link(base, exp, "tags.setting = 'F+Ĉ'", by_auc),
    }
