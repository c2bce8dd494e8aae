"""torchrun data parallelism: ranks share every global batch, and two CPU processes (gloo) train a
classifier to the validation metrics of one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stack import free_port
from virtual_biopsy.training import distributed

VENV_BIN = Path(sys.executable).parent

# Trains the CESM-CC classifier of fold 0 (the train_classifier stage's own data selection) and
# writes, from rank 0 only, the epoch history and the validation probabilities and metrics.
WORKER = r'''
import json, sys
import torch
from virtual_biopsy.config import load_params
from virtual_biopsy.paths import ProjectPaths
from virtual_biopsy.models import build_classifier
from virtual_biopsy.stages import train_classifier as stage
from virtual_biopsy.training import distributed, predict_proba, train_classifier

torch.set_num_threads(1)
root, out = ProjectPaths(__import__("pathlib").Path(sys.argv[1])), sys.argv[2]
params = load_params(root.root / "params.yaml")
images, index, folds, _, _ = stage.read_inputs(root, "FFDM")
parts = stage.split_images(stage.biopsy_images(index, "CESM", "CC"), stage.patient_subsets(folds, 0), 0,
                           require=("train", "val"))
seed = stage.fold_seed(params.seed, "resnet18", "CESM", "CC", 0)
model = build_classifier("resnet18", seed=seed)
train_ds = stage.labelled_dataset(images, parts["train"], seed, params.classifier.augment)
val_ds = stage.labelled_dataset(images, parts["val"], seed, False)
ranks_seen = []
result = train_classifier(model, train_ds, val_ds, params.classifier, seed,
                          on_epoch_end=lambda e, m, s: ranks_seen.append(distributed.rank()))
p = predict_proba(model, images, parts["val"]["row"].to_numpy(), 8)
if distributed.is_main_process():
    json.dump({"history": result.history, "p": p.tolist(), "val": stage.score_metrics(parts["val"], p),
               "world_size": distributed.world_size(), "callback_ranks": ranks_seen}, open(out, "w"))
distributed.shutdown()
'''


def test_rank_shares_of_each_global_batch_add_up_to_the_single_process_batch():
    order = np.random.default_rng(0).permutation(27)
    shards = [distributed.shard_order(order, 8, rank, 2) for rank in (0, 1)]
    assert [len(s) for s in shards] == [4, 4]
    for step, start in enumerate(range(0, 27, 8)):
        assert sorted(shards[0][step] + shards[1][step]) == sorted(order[start : start + 8].tolist())
    assert [len(b) for b in shards[0]] == [4, 4, 4, 2] and [len(b) for b in shards[1]] == [4, 4, 4, 1]


def test_global_batch_must_split_evenly_over_the_ranks():
    with pytest.raises(ValueError, match="batch_size 7 .* not divisible by the 2 processes"):
        distributed.shard_order(np.arange(10), 7, 0, 2)


def test_single_process_helpers_are_no_ops():
    assert not distributed.is_distributed() and distributed.is_main_process() and distributed.world_size() == 1
    assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert distributed.init_from_env().world_size == 1 or "WORLD_SIZE" in os.environ


def test_torchrun_two_cpu_processes_match_one_process_with_the_same_global_batch(processed_project, tmp_path):
    """Tolerance: validation loss per epoch within 1e-4 relative, training loss within 1e-2
    relative, validation probabilities within 1e-4, lesion-level validation AUC and MCC within
    0.02 (measured: 5e-6, 3e-4, 5e-7, 0). Each step's gradients agree to float rounding (~1e-5
    relative: per-rank partial sums are added in another order) and Adam's normalised steps
    amplify that over many steps, so the check is tight but not bitwise."""
    import yaml

    params = yaml.safe_load((processed_project / "params.yaml").read_text())
    params["classifier"].update({"epochs": 2, "batch_size": 8, "lr": 0.0003, "augment": True})
    project = tmp_path / "project"
    (project).mkdir()
    os.symlink(processed_project / "data", project / "data")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    single = subprocess.run([sys.executable, str(worker), str(project), str(tmp_path / "single.json")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([str(VENV_BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                          f"--master_port={free_port()}", str(worker), str(project), str(tmp_path / "ddp.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("single", "ddp"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["callback_ranks"] == [0, 0]  # only rank 0 runs on_epoch_end (MLflow, pruning)
    assert len(one["history"]) == len(two["history"]) == 2
    for a, b in zip(one["history"], two["history"]):
        assert b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-4)
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-2)
    np.testing.assert_allclose(two["p"], one["p"], atol=1e-4)
    for metric in ("auc", "mcc"):
        assert two["val"][metric] == pytest.approx(one["val"][metric], abs=0.02)
