"""The fit loop both trainers run: epochs, early stopping, checkpoints, resuming, torchrun, callbacks.

A trainer hands :func:`fit` what is its own, a :class:`Trainee`: its networks, one epoch of
updates, its validation, and the checkpoint entries of its optimisers. Everything else happens
here, in one order for the classifier and the CycleGAN alike. Per epoch:

    train_epoch -> validate -> history -> early stopping -> checkpoint (rank 0)
    -> on_epoch_end (rank 0; contract in ``training.loop``) -> stop when finished

Resuming: a checkpoint of the same run (same fingerprint) in ``checkpoint_dir`` restores the
trainee, early stopping, the history and the random states, and the loop goes on at the next
epoch, so a resumed CPU run ends bit for bit where an uninterrupted one does; a finished run is
returned again without training. A checkpoint of *another* run is an error, or, with
``restart_if_stale``, deleted so that training starts over: a stage's model folder outlives a
change of params, and its checkpoint then belongs to a run that no longer exists.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from virtual_biopsy.training import distributed
from virtual_biopsy.training.checkpoint import Checkpointer, CheckpointError, restore_rng_state
from virtual_biopsy.training.early_stopping import EarlyStopping
from virtual_biopsy.training.loop import EpochCallback, EpochState, as_metrics, resolve_device, seeded_torch


class Trainee(Protocol):
    """One trainer's own part of a fit."""

    networks: Mapping[str, nn.Module]
    """Every network trained, by name: wrapped for torchrun, shown to ``on_epoch_end``."""
    kept_network: str
    """The name of the network whose best-epoch state early stopping keeps."""

    def train_epoch(self, epoch: int, wrapped: Mapping[str, nn.Module]) -> dict[str, float]:
        """One epoch of updates through ``wrapped`` (``networks`` in DDP under torchrun): ``train/...`` metrics."""

    def validate(self) -> tuple[float, dict[str, float]]:
        """After the epoch's updates: (the loss early stopping watches, ``val/...`` metrics and ``lr``)."""

    def state_dict(self) -> dict[str, Any]:
        """This trainee's checkpoint entries: its network and optimiser states."""

    def load_state_dict(self, record: Mapping[str, Any]) -> None:
        """Restore from a checkpoint holding the entries of :meth:`state_dict`."""


class EpochBudget(Protocol):
    """The fields of a training config section that bound the loop (both sections have them)."""

    epochs: int
    warmup_epochs: int
    patience: int


@dataclass
class FitOutcome:
    best_state: dict[str, torch.Tensor] | None  # the kept network at its best epoch; None if no epoch ran
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    history: list[dict[str, float]]

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def training_device(device: str | torch.device) -> torch.device:
    """The device this process trains on, after joining the torchrun process group if started by one.

    ``device`` as in :func:`training.loop.resolve_device`; under torchrun on CUDA, each rank's own GPU.
    """
    device = resolve_device(device)
    context = distributed.init_from_env(device)
    return distributed.rank_device(device, context)


def fit(
    trainee: Trainee,
    budget: EpochBudget,
    seed: int,
    device: torch.device,
    checkpoint_dir: str | Path | None,
    fingerprint: Mapping[str, Any],
    on_epoch_end: EpochCallback | None = None,
    restart_if_stale: bool = False,
) -> FitOutcome:
    """Train ``trainee`` for up to ``budget.epochs`` epochs on ``device`` (from :func:`training_device`).

    ``fingerprint`` says which run a checkpoint in ``checkpoint_dir`` belongs to (config, seed,
    data sizes, ...); see the module docstring for resuming and ``restart_if_stale``. The
    networks are left as the last epoch trained them; the kept network's best state is returned.
    """
    stopper = EarlyStopping(budget.warmup_epochs, budget.patience)
    checkpointer = Checkpointer(checkpoint_dir, fingerprint)
    history: list[dict[str, float]] = []
    start_epoch, finished = 0, False
    with seeded_torch(seed, device), contextlib.ExitStack() as stack:
        # Each network is its own DDP module (identity at world size 1): a trainee's update may
        # back-propagate into some of them only (the CycleGAN's generator and discriminator steps).
        wrapped = {name: stack.enter_context(distributed.data_parallel(net, device))
                   for name, net in trainee.networks.items()}
        record = _resumable_record(checkpointer, restart_if_stale)
        if record is not None:
            trainee.load_state_dict(record)
            stopper.load_state_dict(record["early_stopping"])
            history, start_epoch, finished = record["history"], record["epoch"] + 1, record["finished"]
            restore_rng_state(record["rng"])
        for epoch in range(start_epoch, 0 if finished else budget.epochs):
            train_metrics = trainee.train_epoch(epoch, wrapped)
            val_loss, val_metrics = trainee.validate()
            metrics = as_metrics({**train_metrics, **val_metrics})
            history.append({"epoch": float(epoch), **metrics})
            kept_state = trainee.networks[trainee.kept_network].state_dict()
            finished = stopper.step(epoch, val_loss, kept_state) or epoch == budget.epochs - 1
            if distributed.is_main_process():  # the other ranks write nothing
                checkpointer.save({**trainee.state_dict(), "early_stopping": stopper.state_dict(), "epoch": epoch,
                                   "finished": finished, "history": history})
            if on_epoch_end is not None:
                state = EpochState(epoch, dict(trainee.networks), stopper.is_best(epoch), stopper.best_epoch,
                                   stopper.best_loss, history)
                distributed.run_on_main(on_epoch_end, epoch, metrics, state, device=device)
            if finished:
                break
    return FitOutcome(stopper.best_state, stopper.best_epoch, stopper.best_loss,
                      stopped_early=len(history) < budget.epochs, history=history)


def _resumable_record(checkpointer: Checkpointer, restart_if_stale: bool) -> dict[str, Any] | None:
    try:
        return checkpointer.load_latest()
    except CheckpointError as exc:
        if not restart_if_stale:
            raise
        print(f"discarding stale checkpoint ({exc})", file=sys.stderr)
        checkpointer.discard()
        return None
