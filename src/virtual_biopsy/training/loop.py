"""Pieces the fit loop (``training.fit``) and both trainers share: the per-epoch callback
contract, data order, devices.

The callback contract
---------------------
``on_epoch_end(epoch, metrics, state)`` is called once per finished epoch, *after* that epoch's
checkpoint is on disk:

- ``epoch``: 0-based index of the finished epoch;
- ``metrics``: flat ``{name: float}`` of this epoch (names like ``train/loss``, ``val/loss``,
  ``lr``), ready for ``mlflow.log_metrics(metrics, step=epoch)``;
- ``state``: an :class:`EpochState` with the live networks (e.g. to log sample images), whether
  this epoch is the best so far, and the history.

The callback must not change the networks. To stop training (Optuna pruning, a time limit),
raise: the exception propagates out of the trainer, and since the epoch's checkpoint is already
saved, calling the trainer again with the same ``checkpoint_dir`` resumes at the next epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from virtual_biopsy.training import distributed
from virtual_biopsy.training.datasets import derive_seed

# Seed-derivation tags keep the random streams of one run independent of each other.
SHUFFLE_STREAM = 1
TORCH_STREAM = 2


@dataclass
class EpochState:
    """What an ``on_epoch_end`` callback may look at (read only)."""

    epoch: int
    models: dict[str, nn.Module]
    is_best: bool
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


class EpochCallback(Protocol):
    def __call__(self, epoch: int, metrics: dict[str, float], state: EpochState) -> None: ...


def epoch_loader(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, shuffle: bool, num_workers: int = 0,
    pin_memory: bool = False, shard: bool = False, max_steps: int | None = None,
) -> DataLoader:
    """A DataLoader whose order and augmentation depend only on (seed, epoch).

    A trailing batch of a single image is dropped when shuffling: batch norm cannot train on one
    sample whose feature maps are 1x1 (ResNet at small sizes), and shuffling puts that image in
    another batch next epoch.

    ``shard=True`` under torchrun (see ``training.distributed``): this rank's share of the same
    order, ``batch_size`` being the global batch (training: its share of every global batch;
    evaluation: a contiguous share of the items). ``pin_memory`` for fast host-to-GPU copies.

    ``max_steps``: at most this many (global) batches, the first of the epoch's order, so a
    capped epoch is still a fresh random subset each epoch (smoke runs: ``max_steps_per_epoch``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("cannot train or evaluate on an empty dataset")
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch, seed=seed)
    order = np.arange(len(dataset))
    if shuffle:
        generator = torch.Generator().manual_seed(derive_seed(seed, SHUFFLE_STREAM, epoch))
        order = torch.randperm(len(dataset), generator=generator).numpy()
        if len(order) % batch_size == 1 and len(order) > 1:
            order = order[:-1]
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        order = order[: max_steps * batch_size]
    if shard and distributed.is_distributed():
        rank, ranks = distributed.rank(), distributed.world_size()
        if shuffle:
            batches = distributed.shard_order(order, batch_size, rank, ranks)
        else:
            mine = order[distributed.shard_range(len(order), rank, ranks)]
            batches = [mine[start : start + batch_size].tolist() for start in range(0, len(mine), batch_size)]
        return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=num_workers,
                      pin_memory=pin_memory)


DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"


def resolve_device(device: str | torch.device) -> torch.device:
    """The requested device, with a clear error when CUDA is asked for but absent.

    ``"auto"`` (the params.yaml default) is CUDA when this machine has a GPU, else the CPU.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r}: not a torch device; choose {DEVICE_CHOICES}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available on this machine")
    return device


def run_config(cfg: Any) -> dict[str, Any]:
    """A config section as a checkpoint fingerprint: ``device`` says where, not what, is trained,
    so a run checkpointed on one device resumes on another."""
    return {key: value for key, value in dataclasses.asdict(cfg).items() if key != "device"}


def prepare_module(module: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; on CUDA use channels_last, the layout tensor cores want for convs."""
    module.to(device)
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    return module


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
    return batch.to(device)


@contextlib.contextmanager
def autocast_for(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA (no loss scaling needed for bf16); full float32 on CPU."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def seeded_torch(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG (dropout draws from it) without leaking that into the caller."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, TORCH_STREAM))
        yield


def state_on_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict (safe to keep while training goes on)."""
    return {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()}


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def as_metrics(values: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in values.items()}
