"""Run lifecycle: no MLflow run stays RUNNING. Killed stages end KILLED (real processes, real
signals), a bare sequence of stages leaves its implicit parent ended, concurrent stages of one
pipeline share one parent, and runs of a SIGKILLed process are closed by the next stage."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virtual_biopsy.core.config import Params
from virtual_biopsy.mlops import run_lifecycle, tracking

# A stage as the tests run it: `hold` opens a stage run with a nested run and a forked worker
# (as a DataLoader with workers would), says READY and sleeps until it is killed; `race` waits
# until every racer is ready, then opens a stage run (the parent does not exist yet).
SCRIPT = '''
import multiprocessing, signal, sys, time
from pathlib import Path
from virtual_biopsy.mlops import run_lifecycle, tracking

signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground job has it
root, mode = sys.argv[1], sys.argv[2]
if mode == "hold":
    def work(started):
        started.set()
        time.sleep(120)

    with tracking.stage_run("hold", root=root) as run:
        with run.child("nested", tags={"fold": 0}) as nested:
            fork = multiprocessing.get_context("fork")
            started = fork.Event()
            worker = fork.Process(target=work, args=(started,))
            worker.start()
            started.wait(60)  # the worker runs its own code (not still inside fork) when the signal comes
            print("READY", worker.pid, flush=True)
            time.sleep(120)
else:
    index, racers = int(sys.argv[3]), int(sys.argv[4])
    tracking.get_client(root)  # mlflow imported and the store open before the start line
    (Path(root) / f"ready-{index}").touch()
    while len(list(Path(root).glob("ready-*"))) < racers:
        time.sleep(0.01)
    with tracking.stage_run(f"stage-{index}", root=root):
        time.sleep(0.5)
'''


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite file with the schema made (the slow part of a first run), copied per test."""
    import mlflow

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture()
def project(tmp_path, empty_store, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(empty_store, tmp_path / "mlruns" / "mlflow.db")
    (tmp_path / "stage.py").write_text(SCRIPT)
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", tracking.PARENT_RUN_ENV)}
    return {**env, "OMP_NUM_THREADS": "1"}


def _runs(root: Path, deleted: bool = False) -> list:
    from mlflow.entities import ViewType

    client = tracking.get_client(root)
    exp = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY)


def _running(root: Path) -> list[str]:
    return [r.info.run_name for r in _runs(root, deleted=True) if r.info.status == "RUNNING"]


def _by_name(root: Path) -> dict:
    return {r.info.run_name: r for r in _runs(root)}


def _start_holder(root: Path) -> tuple[subprocess.Popen, int]:
    """The `hold` stage in its own process group; returns it and its forked worker's pid once READY."""
    process = subprocess.Popen([sys.executable, str(root / "stage.py"), str(root), "hold"], env=_env(), cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("READY"):
            return process, int(line.split()[1])
    process.wait()
    pytest.fail(f"stage exited with {process.returncode} before it was ready:\n{''.join(lines)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its dead parent's reaper) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signalled_stage_ends_its_runs_killed_and_dies_of_the_signal(project, signum):
    process, worker = _start_holder(project)
    os.killpg(process.pid, signum)  # the whole group, as Ctrl-C or a supervisor does: the worker too
    output = process.communicate(timeout=60)[0]
    # SIGTERM: the process still dies of the signal once its runs are closed (DVC, torchrun see it);
    # SIGINT: Python's own KeyboardInterrupt exit, which also ends with the signal.
    assert process.returncode == -signum, output
    assert _running(project) == []
    runs = _by_name(project)
    assert {name: r.info.status for name, r in runs.items()} == {
        "hold": "KILLED", "nested": "KILLED", f"pipeline-{runs['hold'].data.tags['pipeline_key'][:8]}": "KILLED"}
    assert runs["nested"].data.tags[tracking.KILLED_BY_TAG] == signal.Signals(signum).name
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:  # the forked worker reacted as without us
        time.sleep(0.1)
    assert not _alive(worker)


def test_runs_of_a_sigkilled_stage_are_ended_killed_by_the_next_stage(project):
    process, worker = _start_holder(project)
    os.killpg(process.pid, signal.SIGKILL)  # nothing in the process can react
    process.communicate(timeout=60)
    assert sorted(_running(project)) == ["hold", "nested", f"pipeline-{tracking.run_context(project)['pipeline_key'][:8]}"]
    with tracking.stage_run("next", root=project):
        pass
    assert _running(project) == []
    runs = _by_name(project)
    assert runs["hold"].info.status == runs["nested"].info.status == "KILLED"
    assert runs["nested"].data.tags[tracking.KILLED_BY_TAG] == "process gone"
    assert runs["next"].info.status == "FINISHED"


def _race(project: Path, racers: int, env: dict[str, str]) -> None:
    """``racers`` processes open a stage run of one pipeline at the same moment."""
    processes = [subprocess.Popen([sys.executable, str(project / "stage.py"), str(project), "race", str(i), str(racers)],
                                  env=env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(racers)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0] * racers, outputs


def test_concurrent_stages_of_one_pipeline_make_one_parent(project):
    racers = 4
    _race(project, racers, _env())
    everything = _runs(project, deleted=True)  # deleted duplicates included: the lock made none
    parents = [r for r in everything if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    stages = [r for r in everything if r.data.tags.get("stage") != "pipeline"]
    assert sorted(r.info.run_name for r in stages) == [f"stage-{i}" for i in range(racers)]
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {parents[0].info.run_id}
    assert _running(project) == []
    assert parents[0].info.status == "FINISHED"


@pytest.mark.slow
def test_concurrent_stages_on_a_tracking_server_end_with_one_parent(project, monkeypatch):
    # No lock reaches a server: creators that crossed delete their own parent and join the oldest.
    import requests
    from stack import _wait_for, free_port, stop_process

    url, log = f"http://127.0.0.1:{free_port()}", project / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{project / 'mlruns' / 'mlflow.db'}",
               "--artifacts-destination", str(project / "artifacts"), "--host", "127.0.0.1",
               "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=project,
                                  start_new_session=True)
    try:
        _wait_for(lambda: requests.get(f"{url}/health", timeout=2).ok, "mlflow server", server, log)
        racers = 4
        _race(project, racers, {**_env(), "MLFLOW_TRACKING_URI": url})
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        everything = _runs(project, deleted=True)
    finally:
        stop_process(server, timeout=5.0)
    parents = [r for r in everything if r.data.tags.get("stage") == "pipeline" and r.info.lifecycle_stage == "active"]
    assert len(parents) == 1
    kept = parents[0].info.run_id
    stages = [r for r in everything if r.data.tags.get("stage") != "pipeline"]
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {kept}
    duplicates = [r for r in everything if r.data.tags.get("stage") == "pipeline" and r.info.run_id != kept]
    assert all(r.data.tags[tracking.DUPLICATE_TAG] == kept for r in duplicates)
    assert [r.info.run_name for r in everything if r.info.status == "RUNNING"] == []
    assert parents[0].info.status == "FINISHED"


def test_bare_stage_sequence_ends_its_implicit_parent(project):
    client = tracking.get_client(project)
    with tracking.stage_run("ingest", root=project, params=Params()) as first:
        pass
    with tracking.stage_run("preprocess", root=project, params=Params()) as second:
        parent_id = client.get_run(second.run_id).data.tags["mlflow.parentRunId"]
        assert client.get_run(parent_id).info.status == "RUNNING"  # reopened while a stage runs
        with second.child("fold-0") as grandchild:
            grandchild.log_metrics({"loss": 0.5})
    assert _running(project) == []
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time >= client.get_run(second.run_id).info.end_time  # spans both stages
    assert client.get_run(first.run_id).data.tags["mlflow.parentRunId"] == parent_id


def test_parent_status_follows_the_latest_attempt_of_each_stage(project):
    client = tracking.get_client(project)
    with pytest.raises(RuntimeError):
        with tracking.stage_run("ingest", root=project) as failed:
            raise RuntimeError("disk full")
    parent_id = client.get_run(failed.run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "FAILED"
    with tracking.stage_run("ingest", root=project):  # the retry succeeds
        pass
    assert client.get_run(parent_id).info.status == "FINISHED"
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run("preprocess", root=project):
            raise KeyboardInterrupt
    assert client.get_run(parent_id).info.status == "KILLED"
    assert _running(project) == []


def test_signal_raises_inside_a_run_and_reaches_the_previous_handler_afterwards(project):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with pytest.raises(tracking.Interrupted):
            with tracking.stage_run("ingest", root=project) as run:
                assert signal.getsignal(signal.SIGTERM) is not previous
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # not reached: the handler raises at the next bytecode
        assert received == [signal.SIGTERM]  # handed on once the runs were closed
        assert signal.getsignal(signal.SIGTERM) is not run_lifecycle._on_signal  # the test's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert tracking.get_client(project).get_run(run.run_id).info.status == "KILLED"
    assert _running(project) == []


def test_a_worker_forked_just_before_a_sigterm_still_dies_of_it():
    # CPython drops a signal that reaches a forked child before it resets its signal state; with
    # our Python handler installed SIGTERM would be such a signal (the kernel's default action
    # would have killed the child). Blocked across the fork, it kills the child once it is reset.
    import multiprocessing

    exit_codes = []
    with tracking.signals_as_exceptions():
        for _ in range(5):
            worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
            worker.start()
            os.kill(worker.pid, signal.SIGTERM)  # at once: the child may not have run a line yet
            worker.join(20)
            exit_codes.append(worker.exitcode)
            if worker.exitcode is None:
                worker.kill()
                worker.join()
    assert exit_codes == [-signal.SIGTERM] * 5


def test_pinned_parent_is_ended_by_its_stages_and_finish_decides_for_good(project, monkeypatch):
    from virtual_biopsy.mlops import pipeline_runs

    pinned = tracking.start_pipeline_run(project, Params())
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, pinned)
    client = tracking.get_client(project)
    with pytest.raises(RuntimeError):
        with tracking.stage_run("ingest", root=project):
            raise RuntimeError("bad input")
    assert client.get_run(pinned).info.status == "FAILED"  # a driver that dies now leaves no RUNNING run
    parser = __import__("argparse").ArgumentParser()
    pipeline_runs.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pipeline", "--root", str(project), "finish", "--aborted", pinned])
    assert args.func(args) == 0
    assert client.get_run(pinned).info.status == "FAILED"
    with tracking.stage_run("ingest", root=project):
        pass
    args = parser.parse_args(["pipeline", "--root", str(project), "finish", pinned])
    assert args.func(args) == 0
    assert client.get_run(pinned).info.status == "FINISHED"
    assert _running(project) == []


def test_duplicate_implicit_parents_are_merged_into_the_oldest(project):
    # Two parents of one key, as two creators on a shared server can leave them when their
    # creations cross unseen; the next stage to end moves the younger one's children and deletes it.
    client = tracking.get_client(project)
    exp_id = tracking.experiment_id(client, project)
    context = tracking.run_context(project, Params())
    tags = {**context, "stage": "pipeline", tracking.PARENT_KIND_TAG: "implicit"}
    older = client.create_run(exp_id, tags=tags, run_name="pipeline-a", start_time=1_000).info.run_id
    younger = client.create_run(exp_id, tags=tags, run_name="pipeline-b", start_time=2_000).info.run_id
    orphan = client.create_run(exp_id, tags={"mlflow.parentRunId": younger, "stage": "ingest"}, run_name="ingest")
    client.set_terminated(orphan.info.run_id)
    with tracking.stage_run("preprocess", root=project, params=Params()) as run:
        pass
    assert client.get_run(run.run_id).data.tags["mlflow.parentRunId"] == older
    assert client.get_run(orphan.info.run_id).data.tags["mlflow.parentRunId"] == older
    gone = client.get_run(younger)
    assert gone.info.lifecycle_stage == "deleted" and gone.data.tags[tracking.DUPLICATE_TAG] == older
    assert client.get_run(older).info.status == "FINISHED"
    assert _running(project) == []


@pytest.mark.parametrize("mlflow", [True, False], ids=["mlflow", "no-mlflow"])
def test_killed_tune_ends_its_runs_killed_and_its_trial_fail(processed_project, copy_project, project, mlflow):
    # Without MLflow (as for a worker joining a study) no stage run holds the signals: tune does.
    import optuna

    # A trial long enough to be killed in (100 epochs); the kill comes after its first epoch.
    copy_project(processed_project, project, {
        "classifier": {"epochs": 100, "warmup_epochs": 100, "patience": 100},
        "tune": {"trials": 1, "metric": "auc", "storage": "sqlite:///optuna.db",
                 "space": {"lr": {"low": 0.0003, "high": 0.003, "log": True}}}})
    process = subprocess.Popen([sys.executable, "-m", "virtual_biopsy.cli.main", "tune", "--root", str(project),
                                "--study", "killed", "--folds", "1", *([] if mlflow else ["--no-mlflow"])],
                               env=_env(), cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines = []
    for line in process.stdout:  # not a terminal: tune prints a line per epoch
        lines.append(line)
        if "trial 0 fold" in line and "epoch 1/" in line:
            break
    else:
        process.wait()
        pytest.fail(f"tune exited with {process.returncode} before its first epoch:\n{''.join(lines)}")
    os.killpg(process.pid, signal.SIGTERM)
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == -signal.SIGTERM, output

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{project / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
    if not mlflow:
        return
    assert _running(project) == []
    runs = _by_name(project)
    assert runs["tune killed"].info.status == runs["trial-0"].info.status == "KILLED"
    assert runs["trial-0"].data.tags[tracking.KILLED_BY_TAG] == "SIGTERM"
    parent = tracking.get_client(project).get_run(runs["tune killed"].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"


def test_run_trials_tells_fail_for_an_interrupted_trial_and_keeps_optunas_states():
    import optuna

    from virtual_biopsy.tuning.study import run_trials

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.25})
    seen = []

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 1:
            raise optuna.TrialPruned()
        if trial.number == 2:
            raise tracking.Interrupted(signal.SIGTERM)  # what a SIGTERM raises inside a trial
        return x

    with pytest.raises(tracking.Interrupted):
        run_trials(study, objective, 5, lambda study, trial: seen.append((trial.number, trial.state)))
    states = optuna.trial.TrialState
    assert [t.state for t in study.trials] == [states.COMPLETE, states.PRUNED, states.FAIL]
    assert study.trials[0].params == {"x": 0.25}  # the enqueued trial came first, as with optimize
    assert seen == [(0, states.COMPLETE), (1, states.PRUNED)]
