"""Atomic file and folder writes: a stage never leaves a half-written output.

Files
    :func:`atomic_path` (and ``write_*`` on top of it) writes under a temporary name in the
    destination's folder and renames it into place only when complete, so an interrupted write
    leaves either the old file or the new one.

Sets of files (a DVC ``outs`` folder: data/processed, data/imputed, a model folder, ...)
    :func:`atomic_dir` yields a fresh staging folder beside the target
    (``.<name>.staging-<pid>-<random>``); the writer puts the *whole* set there, and only when
    the block succeeds is it swapped in. POSIX cannot exchange two non-empty folders in one
    rename, so the swap is three steps::

        1. rename <name>          -> .<name>.previous     (the old set, kept as the backup)
        2. rename .<name>.staging -> <name>               (the new set)
        3. remove .<name>.previous

    A reader therefore never finds a mix of two sets under ``<name>``, and files of the old set
    that the new one lacks (a stale ``fold7.pt``) are gone after the swap. A process killed
    between steps 1 and 2 leaves no ``<name>`` but a complete ``.<name>.previous``; one killed
    during step 3 leaves both. :func:`recover_dir` settles either state: with no ``<name>``
    the backup is renamed back (the previous complete set returns), with a ``<name>`` the backup
    is the replaced set and is removed. Every set write calls it first, and readers that check
    their inputs (:func:`restore_interrupted_swap`, used by ``data.cohorts.require_inputs`` and
    the weight loaders) call it when an input is missing. Staging folders of writers that died
    are removed by the next write of the same set (their pid is no longer running).
    One writer per set at a time: ``dvc repro`` holds the repository lock, so no two stages
    write, or read while another writes, the same folder.

Modes
    Files and folders are created with the modes ``open``/``mkdir`` give under the process
    umask (0644 and 0755 with the usual 022), not ``mkstemp``/``mkdtemp``'s private 0600/0700:
    the outputs are shared project data, and DVC, MLflow and other users read them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STAGING_MARK = ".staging-"
BACKUP_SUFFIX = ".previous"


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create an empty file with a random name in ``folder``, mode 0o666 less the umask."""
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(errno.EEXIST, f"no free temporary name {prefix}*{suffix} in {folder}")


def _new_dir(folder: Path, prefix: str) -> Path:
    """Create an empty folder with a random name in ``folder``, mode 0o777 less the umask."""
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(candidate, 0o777)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, f"no free temporary folder name {prefix}* in {folder}")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    ``suffix`` keeps the extension for writers that look at it (``np.save`` adds ``.npy``
    to a name that lacks it). The temporary file exists (empty, umask mode) when the block starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file(path.parent, f".{path.name}.", suffix or path.suffix or ".tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# --- sets of files ---------------------------------------------------------------------------

def backup_path(path: str | Path) -> Path:
    """Where a set swap keeps the old set of ``path`` between its renames: ``.<name>.previous``."""
    path = Path(path)
    return path.with_name(f".{path.name}{BACKUP_SUFFIX}")


def staging_prefix(path: str | Path) -> str:
    """Name prefix of the staging folders of ``path``'s set writes (``.<name>.staging-``)."""
    return f".{Path(path).name}{STAGING_MARK}"


def recover_dir(path: str | Path) -> bool:
    """Settle an interrupted swap of the set at ``path``; True when the previous set was put back.

    No ``path`` but a backup: the swap stopped between its two renames, so the backup (the last
    complete set) is renamed back. Both present: the swap had put the new set in place, and the
    backup, maybe partly removed, is the replaced set: it is removed.
    """
    path = Path(path)
    backup = backup_path(path)
    if not backup.is_dir():
        return False
    if path.exists():
        shutil.rmtree(backup, ignore_errors=True)
        return False
    try:
        os.rename(backup, path)
    except FileNotFoundError:  # another process settled it first
        return False
    return True


def restore_interrupted_swap(path: str | Path) -> bool:
    """For a reader: when ``path`` (a file or folder) is missing because the swap of the set
    holding it was interrupted, put that set back (:func:`recover_dir`); True when it did.

    Walks up from ``path`` through the missing folders only, so an existing input costs one stat.
    """
    path = Path(path)
    restored = False
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        restored = recover_dir(candidate) or restored
    return restored


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_abandoned_staging(path: str | Path) -> list[Path]:
    """Remove staging folders of ``path`` left by writers that are no longer running."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = staging_prefix(path)
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def swap_in(staged: Path, path: Path) -> None:
    """Put the complete set ``staged`` at ``path`` (see the module docstring for the three steps)."""
    backup = backup_path(path)
    if path.exists():
        os.rename(path, backup)
        os.rename(staged, path)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(staged, path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; it replaces ``path`` as a whole when the
    block succeeds. When the block raises, ``path`` keeps its previous set and the staging
    folder is removed. Leftovers of an earlier interrupted write are settled first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    remove_abandoned_staging(path)
    staged = _new_dir(path.parent, f"{staging_prefix(path)}{os.getpid()}-")
    try:
        yield staged
        swap_in(staged, path)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def staged_path(final: str | Path, target: str | Path, staged: str | Path) -> Path:
    """Where ``final`` (a path inside the set ``target``) is written while ``staged`` is being built."""
    return Path(staged) / Path(final).relative_to(target)


# --- single files ----------------------------------------------------------------------------

def write_torch(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically, the same object giving the same bytes.

    Saved through a file handle: given a path, torch names the archive's inner folder after the
    file, here a random temporary name, so identical weights would hash differently in every run
    (and DVC would see a changed output where nothing changed).
    """
    import torch  # here, not at the top: the data stages use this module without torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: str | Path, frame: Any) -> None:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
