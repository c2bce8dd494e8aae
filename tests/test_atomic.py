"""Atomic torch writes: same object, same bytes; a failed write leaves the old file and no temp."""
from __future__ import annotations

import hashlib

import pytest
import torch

from virtual_biopsy.core.atomic import write_torch
from virtual_biopsy.models.cyclegan import ResnetGenerator


def _digest(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_same_weights_saved_twice_give_identical_bytes(tmp_path):
    torch.manual_seed(0)
    record = {"state_dict": ResnetGenerator(channels=1, ngf=4, n_residual_blocks=1).state_dict(), "fold": 0}
    write_torch(tmp_path / "a" / "fold0.pt", record)
    write_torch(tmp_path / "b" / "fold0.pt", record)
    assert _digest(tmp_path / "a" / "fold0.pt") == _digest(tmp_path / "b" / "fold0.pt")
    loaded = torch.load(tmp_path / "a" / "fold0.pt", weights_only=True)
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in record["state_dict"].items())


def test_failed_torch_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "weights.pt"
    write_torch(path, {"epoch": 1})
    before = _digest(path)
    with pytest.raises(Exception):
        write_torch(path, {"epoch": 2, "unpicklable": lambda: None})
    assert _digest(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pt"]
