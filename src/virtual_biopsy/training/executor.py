"""Running a training stage's fold jobs: one after another, in local processes, or on a Ray cluster.

A stage builds one :class:`Job` per fold (a module-level function and picklable arguments: paths,
params, the fold's tables, a run handover; never image arrays, which each job re-opens memory-mapped
from their files), hands the list to :func:`run_jobs`, and gets the results back in job order. DVC
still runs the stage; the executor only decides where its jobs compute (``executor`` in params):

``local``, ``workers: 1``   in the stage's own process, one after another (also always under
                            torchrun, whose ranks must run the same folds in step, and for jobs
                            that call back into the stage, which cannot travel to another process)
``local``, ``workers: N``   N spawned processes on this machine
``ray``                     one Ray task per job with ``cpus_per_job`` CPUs and ``ray.gpus_per_job``
                            of a GPU (a fraction packs several small jobs on one device), on the
                            cluster at ``ray.address`` or ``$RAY_ADDRESS``, else a local one

Same results everywhere: each job computes on ``cpus_per_job`` torch threads wherever it runs and
draws all randomness from its own seeds, so on CPU every kind writes byte-identical files.

Faults. A job that raises fails the stage with its own exception type and message, prefixed with
the job's name ("train_classifier resnet18 CESM-CC fold 1: ..."), after the other jobs have run to
their end; it is never retried (the same input fails the same way). A Ray worker that dies (killed,
its node lost, Ray's out-of-memory killer) is a system fault: Ray re-runs the task up to
``ray.max_retries`` times, and the job resumes from the checkpoint its previous attempt left in
the model folder (training.checkpoint), so the outputs are the same as without the fault.

Progress: the executor prints a line when a job is submitted and when it ends, and each job one
line per epoch (:func:`report_epoch`), flushed, so ``dvc repro`` shows where a stage is.

No MLflow here: a job logs through the run handle it is given (mlops.runs.RunHandover).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from virtual_biopsy.core.config import ExecutorConfig

RAY_ADDRESS_ENV = "RAY_ADDRESS"
IN_PROCESS = ExecutorConfig(kind="local", workers=1)


@dataclass(frozen=True)
class Job:
    """One unit of training: ``function(*args, **kwargs)`` under the name that prefixes its output.

    ``function`` must be importable by name (a module-level function) and the arguments picklable
    when the job runs in another process.
    """

    name: str
    function: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def job(name: str, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Job:
    """``Job(name, function, args, kwargs)``, written as the call it stands for:
    ``job("pretrain_generator CC", pretrain_job, paths, params, view="CC")``."""
    return Job(name, function, args, kwargs)


class JobFailed(RuntimeError):
    """A job failed with an exception that cannot be rebuilt under its own type, or its worker died
    more often than ``ray.max_retries`` allows."""


@dataclass(frozen=True)
class _Failure:
    """A job's exception as it comes back from a worker: rebuilt in the driver (:func:`_job_error`)."""

    error: BaseException | None  # None when it does not pickle
    type_name: str
    message: str
    worker_traceback: str


# ---------------------------------------------------------------------------------------------
# Inside a job
# ---------------------------------------------------------------------------------------------
_current_job: dict[str, Any] = {}  # name and time of the last progress line of the job running here


def report_epoch(epoch: int, epochs: int, metrics: Mapping[str, float]) -> None:
    """One flushed progress line for epoch ``epoch`` (0-based) of ``epochs`` of the running job:
    ``train_generator CC fold 2 epoch 5/18: loss_g 1.230 val_l1 0.0800 (11.2 s)``. Outside a job: nothing."""
    if not _current_job:
        return
    now = time.perf_counter()
    shown = " ".join(f"{k.replace('/', '_')} {v:.4g}" for k, v in metrics.items())
    print(f"{_current_job['name']} epoch {epoch + 1}/{epochs}: {shown} ({now - _current_job['since']:.1f} s)",
          flush=True)
    _current_job["since"] = now


@contextlib.contextmanager
def _job_scope(name: str, threads: int) -> Iterator[None]:
    """The job's name for :func:`report_epoch` and its torch thread count, restored afterwards
    (in-process jobs share the stage's process)."""
    previous_threads, previous_job = torch.get_num_threads(), dict(_current_job)
    torch.set_num_threads(threads)
    _current_job.update(name=name, since=time.perf_counter())
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        _current_job.clear()
        _current_job.update(previous_job)


def _run_in_worker(job: Job, threads: int) -> Any:
    """A job in a pool process or Ray task: its result, or its exception as a :class:`_Failure`
    (returned, not raised, so Ray never mistakes it for a fault worth retrying and no Ray
    traceback wraps it)."""
    try:
        with _job_scope(job.name, threads):
            return job.function(*job.args, **job.kwargs)
    except Exception as exc:  # noqa: BLE001 - every application error goes back to the driver as data
        return _failure(exc)


def _failure(exc: BaseException) -> _Failure:
    import pickle

    try:
        error = pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception holding an unpicklable object travels as text
        error = None
    return _Failure(error, type(exc).__name__, str(exc), "".join(traceback.format_exception(exc)))


def _job_error(job: Job, failure: _Failure) -> BaseException:
    """The job's own exception type with its message prefixed by the job's name (JobFailed when
    that type cannot be built from a message); the worker's traceback as a note."""
    message = f"{job.name}: {failure.message}"
    error: BaseException
    try:
        error = type(failure.error)(message) if failure.error is not None else JobFailed(
            f"{job.name}: {failure.type_name}: {failure.message}")
        if str(error) != message and failure.error is not None:
            raise TypeError("the exception type formats its arguments")
    except Exception:  # noqa: BLE001
        error = JobFailed(f"{job.name}: {failure.type_name}: {failure.message}")
    error.add_note(f"in the job's worker:\n{failure.worker_traceback}")
    return error


# ---------------------------------------------------------------------------------------------
# In the stage (the driver)
# ---------------------------------------------------------------------------------------------
DoneCallback = Callable[[int, BaseException | None], None]
"""``(job index, error or None)`` in the driver as soon as a job ends (e.g. to end its MLflow run)."""


def run_jobs(jobs: Sequence[Job], config: ExecutorConfig, on_done: DoneCallback | None = None) -> list[Any]:
    """Run ``jobs`` as ``config`` says and return their results in job order.

    Every job runs to its end; then the first failed one (in job order) raises its own error
    (module doc). ``on_done`` is called once per job as it ends.
    """
    on_done = on_done or (lambda index, error: None)
    if not jobs:
        return []
    if config.kind == "ray":
        outcomes = _run_on_ray(jobs, config, on_done)
    elif config.workers > 1 and len(jobs) > 1:
        outcomes = _run_in_pool(jobs, config, on_done)
    else:
        outcomes = _run_in_process(jobs, config, on_done)
    for job, outcome in zip(jobs, outcomes):
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


def run_job(job: Job, config: ExecutorConfig) -> Any:
    """One job (a stage with a single model, e.g. pre-training one view) where ``config`` says."""
    return run_jobs([job], replace(config, workers=1) if config.kind == "local" else config)[0]


def effective_config(config: ExecutorConfig, *, in_process: bool) -> ExecutorConfig:
    """``config``, or the in-process one when the jobs must stay in the stage's process (torchrun,
    callbacks into the stage)."""
    return IN_PROCESS if in_process else config


def _print(line: str) -> None:
    print(line, flush=True)


def _ended(job: Job, index: int, outcome: Any, started: float, on_done: DoneCallback) -> Any:
    """Turn a failure into the job's error, print the ending line, call ``on_done``."""
    if isinstance(outcome, _Failure):
        outcome = _job_error(job, outcome)
    error = outcome if isinstance(outcome, BaseException) else None
    took = time.perf_counter() - started
    _print(f"{job.name}: {'failed' if error else 'finished'} after {took:.1f} s")
    on_done(index, error)
    return outcome


def _run_in_process(jobs: Sequence[Job], config: ExecutorConfig, on_done: DoneCallback) -> list[Any]:
    """One job after another in this process; a failing job stops the stage at once, as the fold
    loop always did, with its own traceback chained to the prefixed error."""
    outcomes = []
    for index, job in enumerate(jobs):
        started = time.perf_counter()
        _print(f"{job.name}: started (in the stage's process)")
        try:
            with _job_scope(job.name, config.cpus_per_job):
                outcome: Any = job.function(*job.args, **job.kwargs)
        except Exception as exc:  # noqa: BLE001 - every application error, named after its job
            error = _ended(job, index, _failure(exc), started, on_done)
            raise error from exc
        outcomes.append(_ended(job, index, outcome, started, on_done))
    return outcomes


def _run_in_pool(jobs: Sequence[Job], config: ExecutorConfig, on_done: DoneCallback) -> list[Any]:
    # spawn, not fork: a forked child would inherit the driver's torch thread pools, open MLflow
    # client and signal handlers.
    context = multiprocessing.get_context("spawn")
    outcomes: list[Any] = [None] * len(jobs)
    with concurrent.futures.ProcessPoolExecutor(min(config.workers, len(jobs)), mp_context=context) as pool:
        started = {}
        futures = {}
        for index, job in enumerate(jobs):
            futures[pool.submit(_run_in_worker, job, config.cpus_per_job)] = index
            started[index] = time.perf_counter()
            _print(f"{job.name}: submitted (local process pool, {config.workers} workers)")
        for future in concurrent.futures.as_completed(futures):
            index = futures[future]
            try:
                outcome = future.result()
            except concurrent.futures.process.BrokenProcessPool as exc:
                outcome = JobFailed(f"{jobs[index].name}: its worker process died ({exc}); run the stage again "
                                    f"to resume from the fold checkpoints")
            outcomes[index] = _ended(jobs[index], index, outcome, started[index], on_done)
    return outcomes


# -- Ray --------------------------------------------------------------------------------------
def ray_address(config: ExecutorConfig) -> str | None:
    """``executor.ray.address``, else ``$RAY_ADDRESS``; None starts a local cluster."""
    return config.ray.address or os.environ.get(RAY_ADDRESS_ENV) or None


TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """Restore this process's SIGTERM/SIGINT/SIGHUP handlers on the way out.

    ``ray.init`` replaces the driver's SIGTERM handler with one that calls ``sys.exit(15)`` and
    ``ray.shutdown`` leaves it there: the stage's own handling (its MLflow run ended KILLED, the
    default death of a forked child) would be gone for the rest of the process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


@contextlib.contextmanager
def ray_connection(config: ExecutorConfig) -> Iterator[Any]:
    """The ``ray`` module, connected: to the cluster the caller already joined (left connected), or
    to :func:`ray_address` (disconnected afterwards, the process's signal handlers as they were)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    address = ray_address(config)
    with kept_signal_handlers():
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 configure_logging=False, **({} if address else {"namespace": "virtual-biopsy"}))
        try:
            yield ray
        finally:
            ray.shutdown()


def _run_on_ray(jobs: Sequence[Job], config: ExecutorConfig, on_done: DoneCallback) -> list[Any]:
    with ray_connection(config) as ray:
        task = ray.remote(_run_in_worker)
        # retry_exceptions=False: a job's own error comes back as data anyway (_run_in_worker);
        # max_retries re-runs only tasks whose worker died.
        resources = {"num_cpus": config.cpus_per_job, "num_gpus": config.ray.gpus_per_job,
                     "max_retries": config.ray.max_retries, "retry_exceptions": False}
        refs, started = {}, {}
        for index, job in enumerate(jobs):
            refs[task.options(name=job.name, **resources).remote(job, config.cpus_per_job)] = index
            started[index] = time.perf_counter()
            _print(f"{job.name}: submitted (Ray, {config.cpus_per_job} CPU, {config.ray.gpus_per_job:g} GPU, "
                   f"up to {config.ray.max_retries} retries)")
        outcomes: list[Any] = [None] * len(jobs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            index = refs[ready[0]]
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the worker died more often than max_retries
                outcome = JobFailed(f"{jobs[index].name}: {type(exc).__name__}: {_first_line(exc)} "
                                    f"(after {config.ray.max_retries} retries)")
            outcomes[index] = _ended(jobs[index], index, outcome, started[index], on_done)
    return outcomes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["IN_PROCESS", "RAY_ADDRESS_ENV", "Job", "JobFailed", "effective_config", "job", "ray_address",
           "ray_connection", "report_epoch", "run_job", "run_jobs"]
