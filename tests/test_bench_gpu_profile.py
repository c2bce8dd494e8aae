"""bench/gpu_profile.py: a packed job that dies ends its measurement instead of hanging the others."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_profile import PackedJobDied, _collect  # noqa: E402


def _job(die: bool, barrier, results) -> None:
    if die:  # what the kernel's OOM killer does to a job that does not fit
        os.kill(os.getpid(), signal.SIGKILL)
    barrier.wait()
    results.put(1.0)


def _run(die_flags):
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(len(die_flags)), context.Queue()
    processes = [context.Process(target=_job, args=(die, barrier, results)) for die in die_flags]
    for process in processes:
        process.start()
    return processes, _collect(processes, results, len(processes), "classifier", "vgg16")


def test_every_job_alive_gives_every_wall():
    processes, walls = _run([False, False])
    assert walls == [1.0, 1.0]
    for process in processes:
        process.join()


def test_a_job_killed_before_the_barrier_ends_the_measurement_and_its_waiting_partners():
    with pytest.raises(PackedJobDied, match="2 concurrent classifier vgg16 jobs: one killed"):
        _run([False, True])
    assert not [p for p in mp.active_children() if p.name.startswith("Process")]
