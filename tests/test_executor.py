"""Fold jobs run by the executor (training.executor): in the stage's process, in local processes or
as tasks of a real Ray cluster on loopback, a training stage writes the same bytes and the same
MLflow runs; a Ray worker killed mid-job is retried from its checkpoint; a job failing for a real
reason fails the stage with its own message."""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import psutil
import pytest

from virtual_biopsy.core.config import ExecutorConfig, load_params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.evaluation.predictions import predictions_path
from virtual_biopsy.stages import train_classifier as stage
from virtual_biopsy.training import executor

ARCH, MODALITY, VIEW = "resnet18", "FFDM", "CC"
LABEL = f"{ARCH} {MODALITY}-{VIEW}"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Tags every fold run carries, whatever ran it (the process tag and the executor tag of the stage
# run say where, and may differ).
COMPARED_TAGS = ("stage", "arch", "modality", "view", "fold", "git_commit", "data_version", "params_hash",
                 "mlflow.runName")
EXECUTORS = {
    "in process": {"kind": "local", "workers": 1},
    "local pool": {"kind": "local", "workers": 2},
    "ray": {"kind": "ray"},
}


@pytest.fixture(scope="module")
def ray_cluster():
    """A real Ray cluster of 2 CPUs on this machine (loopback only), shut down after the module."""
    import ray

    # Ray's driver SIGTERM handler (sys.exit(15)) outlives ray.shutdown: keep this worker's own, or
    # later tests in the process (test_run_lifecycle's forked children) inherit Ray's.
    with executor.kept_signal_handlers():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        yield ray
        ray.shutdown()


def train(copy_project, source: Path, dest: Path, executor_section: dict, **classifier) -> ProjectPaths:
    """The FFDM-CC classifier stage of ``source``'s data at ``dest`` with this executor, logged to MLflow."""
    paths = copy_project(source, dest, {"executor": executor_section, **({"classifier": classifier} if classifier
                                                                         else {})})
    stage.run_train_classifier(paths, load_params(paths.root / "params.yaml"), ARCH, MODALITY, VIEW, device="cpu")
    return paths


def output_digests(paths: ProjectPaths) -> dict[str, str]:
    """sha256 of every file the stage writes (fold weights, val_mcc.json, predictions)."""
    files = sorted(paths.classifier_dir(ARCH, MODALITY, VIEW).iterdir()) + [predictions_path(paths, ARCH, MODALITY, VIEW)]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def stage_runs(paths: ProjectPaths) -> list:
    from virtual_biopsy.mlops import tracking

    client = tracking.get_client(paths.root)
    return client.search_runs([tracking.experiment_id(client, paths.root)],
                              filter_string="tags.stage = 'train_classifier'")


def fold_runs(paths: ProjectPaths) -> dict[str, object]:
    """The stage's fold runs by name, checked to be its stage run's only children."""
    runs = stage_runs(paths)
    (parent,) = [r for r in runs if r.info.run_name == f"train_classifier {LABEL}"]
    children = [r for r in runs if r is not parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    return {r.info.run_name: r for r in children}


def metric_steps(paths: ProjectPaths, run_id: str, key: str) -> list[int]:
    from virtual_biopsy.mlops import tracking

    return [m.step for m in tracking.get_client(paths.root).get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def trained(processed_project, copy_project, tmp_path_factory, ray_cluster) -> dict[str, ProjectPaths]:
    """The same stage under each executor."""
    return {name: train(copy_project, processed_project, tmp_path_factory.mktemp(name.replace(" ", "-")), section)
            for name, section in EXECUTORS.items()}


def test_every_executor_writes_byte_identical_weights_predictions_and_reports(trained):
    digests = {name: output_digests(paths) for name, paths in trained.items()}
    assert set(digests["in process"]) == {"fold0.pt", "fold1.pt", "val_mcc.json", f"{MODALITY}_{VIEW}.csv"}
    assert digests["local pool"] == digests["in process"]
    assert digests["ray"] == digests["in process"]


def test_every_executor_nests_one_finished_run_per_fold_with_the_same_tags_and_metrics(trained):
    expected = fold_runs(trained["in process"])
    assert set(expected) == {f"{LABEL} fold 0", f"{LABEL} fold 1"}
    for name, paths in trained.items():
        found = fold_runs(paths)
        assert set(found) == set(expected), name
        for run_name, run in found.items():
            assert run.info.status == "FINISHED", (name, run_name)
            assert {k: run.data.tags.get(k) for k in COMPARED_TAGS} == \
                {k: expected[run_name].data.tags.get(k) for k in COMPARED_TAGS}, (name, run_name)
            assert run.data.params == expected[run_name].data.params, (name, run_name)
            assert run.data.metrics == expected[run_name].data.metrics, (name, run_name)
            # each epoch logged once, by the one job that trained it
            assert metric_steps(paths, run.info.run_id, "val_loss") == list(range(int(run.data.metrics["epochs_run"])))


def ray_worker_running(job_name: str) -> psutil.Process | None:
    """The Ray worker process (a descendant of this driver) running the task named ``job_name``."""
    for process in psutil.Process().children(recursive=True):
        try:
            if job_name in " ".join(process.cmdline()):
                return process
        except psutil.Error:
            continue
    return None


def test_a_ray_worker_killed_mid_job_is_retried_from_its_checkpoint_with_identical_outputs(
        processed_project, copy_project, tmp_path, ray_cluster):
    longer = {"epochs": 6, "patience": 6, "warmup_epochs": 1}
    straight = train(copy_project, processed_project, tmp_path / "straight", EXECUTORS["in process"], **longer)
    paths = copy_project(processed_project, tmp_path / "killed", {"executor": EXECUTORS["ray"], "classifier": longer})
    checkpoint = paths.classifier_checkpoint(ARCH, MODALITY, VIEW, 0) / "last.pt"
    killed: list[int] = []

    def kill_fold_0_after_its_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        worker = ray_worker_running(f"train_classifier {LABEL} fold 0")
        if worker is not None:
            killed.append(worker.pid)
            worker.kill()

    killer = threading.Thread(target=kill_fold_0_after_its_first_checkpoint)
    killer.start()
    stage.run_train_classifier(paths, load_params(paths.root / "params.yaml"), ARCH, MODALITY, VIEW, device="cpu")
    killer.join()
    assert killed, "no Ray worker was running fold 0 when its first checkpoint appeared"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert output_digests(paths) == output_digests(straight)
    run = fold_runs(paths)[f"{LABEL} fold 0"]
    assert run.info.status == "FINISHED"
    # Resumed, not started over: no epoch was trained (and logged) twice.
    steps = metric_steps(paths, run.info.run_id, "val_loss")
    assert len(steps) == len(set(steps)) and steps[-1] == int(run.data.metrics["epochs_run"]) - 1


def test_a_job_failing_for_a_real_reason_fails_the_stage_with_its_own_message(
        processed_project, copy_project, tmp_path, ray_cluster, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a weights file")
    paths = copy_project(processed_project, tmp_path / "bad-weights",
                         {"executor": EXECUTORS["ray"], "classifier": {"weights_file": str(bad)}})
    code = stage.main(["--arch", ARCH, "--modality", MODALITY, "--view", VIEW, "--root", str(paths.root),
                       "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"train_classifier: train_classifier {LABEL} fold 0: " in err and "bad.pt" in err
    assert "Ray" not in err and "Traceback" not in err
    statuses = {r.info.run_name: r.info.status for r in stage_runs(paths)}
    assert statuses == {f"train_classifier {LABEL}": "FAILED", f"{LABEL} fold 0": "FAILED",
                        f"{LABEL} fold 1": "FAILED"}


def test_a_single_job_runs_where_the_config_says_and_raises_its_own_error_type(ray_cluster):
    job = executor.Job("pretrain CC", divmod, (7, 2))
    assert executor.run_job(job, ExecutorConfig(kind="ray")) == (3, 1)
    assert executor.run_job(job, ExecutorConfig()) == (3, 1)
    for config in (ExecutorConfig(kind="ray"), ExecutorConfig()):
        with pytest.raises(ZeroDivisionError) as failed:
            executor.run_job(executor.Job("pretrain MLO", divmod, (7, 0)), config)
        assert str(failed.value) == "pretrain MLO: integer division or modulo by zero"


def test_executor_section_is_checked_naming_the_key(processed_project, copy_project, tmp_path):
    from virtual_biopsy.core.config import ConfigError

    paths = copy_project(processed_project, tmp_path / "bad", {"executor": {"kind": "slurm"}})
    with pytest.raises(ConfigError, match=r"executor\.kind.*local, ray.*'slurm'"):
        load_params(paths.root / "params.yaml")


def test_generator_stage_on_ray_writes_the_bytes_of_the_in_process_run(generator_project, copy_project, tmp_path,
                                                                        ray_cluster):
    from virtual_biopsy.stages import train_generator

    paths = copy_project(generator_project, tmp_path / "generator-ray", {"executor": EXECUTORS["ray"]})
    train_generator.run_train_generator(paths, load_params(paths.root / "params.yaml"), "CC", device="cpu")
    in_process = ProjectPaths(generator_project)

    def digests(p: ProjectPaths) -> dict[str, str]:
        files = [*sorted(p.generator_dir("CC").glob("*.pt")), p.generator_report("CC")]
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    assert set(digests(paths)) == {"fold0.pt", "fold1.pt", "serving.pt", "CC.json"}
    assert digests(paths) == digests(in_process)
