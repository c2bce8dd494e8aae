"""Atomic writes: same object, same bytes; a failed write leaves the old file and no temp; a set
of files is swapped in as one folder (stale files go, an interrupted swap is recovered); modes
follow the umask."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest
import torch

from virtual_biopsy.core.atomic import (
    atomic_dir,
    backup_path,
    recover_dir,
    restore_interrupted_swap,
    staged_path,
    staging_prefix,
    write_csv,
    write_json,
    write_text,
    write_torch,
)
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


# --- sets of files: one swap, stale files gone, interrupted writes recovered --------------------

def _write_set(target, files: dict[str, str], fail_after: int | None = None) -> None:
    """Write ``files`` as the set ``target``; raise after ``fail_after`` files (a writer that dies)."""
    with atomic_dir(target) as staged:
        for i, (name, text) in enumerate(files.items()):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("writer failed midway")
            write_text(staged / name, text)


def _contents(folder) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_set_write_failing_midway_leaves_the_previous_complete_set_and_no_staging(tmp_path):
    target = tmp_path / "processed"
    _write_set(target, {"images.npy": "v1 images", "index.csv": "v1 index"})
    with pytest.raises(RuntimeError, match="midway"):
        _write_set(target, {"images.npy": "v2 images", "index.csv": "v2 index"}, fail_after=1)
    assert _contents(target) == {"images.npy": "v1 images", "index.csv": "v1 index"}
    assert [p.name for p in tmp_path.iterdir()] == ["processed"]


def test_set_write_replaces_the_whole_folder_so_stale_files_go(tmp_path):
    target = tmp_path / "CC"
    _write_set(target, {"fold0.pt": "a", "fold1.pt": "b"})
    (target / "fold7.pt").write_text("stale, of an older run")
    (target / "checkpoints").mkdir()
    _write_set(target, {"fold0.pt": "a2", "fold1.pt": "b2"})
    assert _contents(target) == {"fold0.pt": "a2", "fold1.pt": "b2"}
    assert [p.name for p in tmp_path.iterdir()] == ["CC"]


def test_swap_killed_between_its_renames_is_undone_by_a_reader_and_by_the_next_write(tmp_path):
    target = tmp_path / "imputed"
    _write_set(target, {"images.npy": "v1", "index.csv": "v1"})
    os.rename(target, backup_path(target))  # step 1 done, then killed: no target, a complete backup
    assert restore_interrupted_swap(target / "index.csv")  # a reader missing its input puts it back
    assert _contents(target) == {"images.npy": "v1", "index.csv": "v1"} and not backup_path(target).exists()

    os.rename(target, backup_path(target))
    _write_set(target, {"images.npy": "v2", "index.csv": "v2"})  # a rerun settles it, then swaps
    assert _contents(target) == {"images.npy": "v2", "index.csv": "v2"} and not backup_path(target).exists()


def test_swap_killed_while_removing_the_backup_keeps_the_new_set(tmp_path):
    target = tmp_path / "CC"
    _write_set(target, {"fold0.pt": "new"})
    backup = backup_path(target)
    backup.mkdir()
    (backup / "fold0.pt").write_text("old")  # step 3 had not finished
    assert not recover_dir(target)
    assert _contents(target) == {"fold0.pt": "new"} and not backup.exists()
    assert not restore_interrupted_swap(target / "fold0.pt")  # nothing missing: nothing to do


def test_staging_folder_of_a_dead_writer_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f"{staging_prefix(tmp_path / 'CC')}{dead.pid}-0000"
    abandoned.mkdir()
    (abandoned / "fold0.pt").write_text("half a run")
    mine = tmp_path / f"{staging_prefix(tmp_path / 'CC')}{os.getpid()}-ffff"  # a live writer's: kept
    mine.mkdir()
    _write_set(tmp_path / "CC", {"fold0.pt": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["CC", mine.name])


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=oct)
def test_created_files_and_folders_get_their_modes_from_the_umask(tmp_path, umask):
    import numpy as np
    import pandas as pd

    previous = os.umask(umask)
    try:
        write_json(tmp_path / "summary.json", {"a": 1})
        write_torch(tmp_path / "weights.pt", {"epoch": 1})
        with atomic_dir(tmp_path / "processed") as staged:
            np.save(staged_path(tmp_path / "processed" / "images.npy", tmp_path / "processed", staged), np.zeros(2))
            write_csv(staged / "index.csv", pd.DataFrame({"row": [0, 1]}))
            write_text(staged / "sub" / "note.txt", "x")
    finally:
        os.umask(previous)
    files = [tmp_path / "summary.json", tmp_path / "weights.pt", *(tmp_path / "processed").rglob("*.*")]
    assert len(files) == 5
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    for folder in (tmp_path / "processed", tmp_path / "processed" / "sub"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
