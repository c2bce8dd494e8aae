"""Per-epoch training checkpoints that make an interrupted run resumable, bit for bit.

A checkpoint holds everything the rest of the run depends on: network and optimiser states,
scheduler and early-stopping state, the finished epoch, the history, and the random states of
torch (CPU and CUDA), numpy and Python. Data order and augmentation are functions of
(seed, epoch) (see ``training.datasets``), so together these make a resumed CPU run end with the
same weights as an uninterrupted one.

Each checkpoint carries a *fingerprint* of what was being trained (configuration, seed, data
sizes); resuming with a different one is an error rather than a silent mix of two runs.
It is written with ``write_torch`` (temp file + rename): a kill during the write leaves the previous checkpoint.

The fingerprint holds data *sizes*, not pixels: :func:`discard_stale_checkpoint` keeps a stage's
checkpoint folder from resuming a run trained on other images of the same count.
"""
from __future__ import annotations

import hashlib
import random
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from virtual_biopsy.core.atomic import write_text, write_torch

if TYPE_CHECKING:
    import pandas as pd

CHECKPOINT_NAME = "last.pt"
INPUTS_KEY_FILE = "inputs.sha256"  # beside last.pt: which images the checkpoint was trained on


class CheckpointError(ValueError):
    """A checkpoint cannot be read or belongs to a different training run."""


def capture_rng_state() -> dict[str, Any]:
    """The global random states as plain tensors, lists and ints (loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = {**state["numpy"], "state": dict(state["numpy"]["state"])}
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and finds the last checkpoint of one training run in ``checkpoint_dir``.

    ``checkpoint_dir=None`` disables checkpointing (saving does nothing, nothing is resumed).
    """

    def __init__(self, checkpoint_dir: str | Path | None, fingerprint: Mapping[str, Any]) -> None:
        self.path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
        self.fingerprint = _plain(fingerprint)

    def save(self, payload: Mapping[str, Any]) -> None:
        """Write ``payload`` plus the fingerprint and RNG states; atomic (temp file + rename)."""
        if self.path is None:
            return
        record = {**payload, "fingerprint": self.fingerprint, "rng": capture_rng_state()}
        write_torch(self.path, record)

    def discard(self) -> None:
        """Delete the checkpoint, and any temporary file a kill during its write left beside it."""
        if self.path is None:
            return
        for stale in (self.path, *self.path.parent.glob(f".{self.path.name}.*")):
            stale.unlink(missing_ok=True)  # missing_ok: under torchrun every rank discards

    def load_latest(self) -> dict[str, Any] | None:
        """The last checkpoint of this run, or None when there is none yet."""
        if self.path is None or not self.path.exists():
            return None
        try:
            record = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated or foreign files
            raise CheckpointError(f"{self.path}: cannot read checkpoint ({exc})") from exc
        if record.get("fingerprint") != self.fingerprint:
            differing = sorted(
                key
                for key in set(record.get("fingerprint", {})) | set(self.fingerprint)
                if record.get("fingerprint", {}).get(key) != self.fingerprint.get(key)
            )
            raise CheckpointError(
                f"{self.path}: checkpoint belongs to a different training run (differs in {differing}); "
                "delete it or use another checkpoint folder"
            )
        return record


def inputs_key(images: np.ndarray, train: pd.DataFrame, val: pd.DataFrame) -> str:
    """Hash of the exact images a fold trains and early-stops on: ids and pixels.

    The trainer's checkpoint fingerprint covers config, seed and data *sizes*; a change of
    preprocessing (another image size or window) keeps the sizes and would otherwise resume,
    or return as finished, a model trained on other pixels.
    """
    digest = hashlib.sha256()
    for frame in (train, val):
        digest.update("\n".join(frame["image_id"].astype(str)).encode())
        digest.update(np.ascontiguousarray(images[np.sort(frame["row"].to_numpy())]).tobytes())
    return digest.hexdigest()


def discard_stale_checkpoint(ckpt: Path, key: str) -> None:
    """Remove ``ckpt`` unless it was written for the inputs ``key``; then record ``key`` in it."""
    key_file = ckpt / INPUTS_KEY_FILE
    if ckpt.exists() and (not key_file.is_file() or key_file.read_text().strip() != key):
        print(f"discarding checkpoint {ckpt} of other input images", file=sys.stderr)
        shutil.rmtree(ckpt)
    write_text(key_file, key + "\n")


def _plain(value: Any) -> Any:
    """Fingerprints compare after a save/load round trip: keep only str/int/float/bool/None/list/dict."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
