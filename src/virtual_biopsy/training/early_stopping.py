"""Early stopping on validation loss with a warm-up phase (paper 5.1.1 and 5.2.1).

Semantics (one place, so generator and classifier loops agree):

- the best state is the one with the lowest validation loss over *all* epochs, warm-up included;
- no stop happens during the first ``warmup_epochs`` epochs (0-based epochs 0 .. warmup-1);
- afterwards training stops once ``patience`` epochs have passed without improvement, counting
  from the later of the best epoch and the end of warm-up, so a model always gets ``patience``
  post-warm-up epochs to beat a warm-up best (the paper's 50 + 50 reads this way).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch


class EarlyStopping:
    """Tracks the best validation loss and its state; :meth:`step` says when to stop."""

    def __init__(self, warmup_epochs: int, patience: int, min_delta: float = 0.0) -> None:
        if warmup_epochs < 0 or patience < 1:
            raise ValueError(
                f"early stopping needs warmup_epochs >= 0 and patience >= 1, got {warmup_epochs} and {patience}"
            )
        self.warmup_epochs = warmup_epochs
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_epoch = -1
        self.best_state: dict[str, Any] | None = None

    def step(self, epoch: int, val_loss: float, state: Mapping[str, Any]) -> bool:
        """Record ``epoch``'s validation loss (and a copy of ``state`` if best); True = stop now."""
        if not math.isfinite(val_loss):
            raise FloatingPointError(f"validation loss is {val_loss} at epoch {epoch}; training diverged")
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch = float(val_loss), epoch
            self.best_state = _detached_copy(state)
        return self.should_stop(epoch)

    def should_stop(self, epoch: int) -> bool:
        if epoch < self.warmup_epochs:
            return False
        counting_from = max(self.best_epoch, self.warmup_epochs - 1)
        return epoch - counting_from >= self.patience

    def is_best(self, epoch: int) -> bool:
        return epoch == self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "warmup_epochs": self.warmup_epochs,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("warmup_epochs", "patience", "min_delta", "best_loss", "best_epoch", "best_state"):
            setattr(self, key, state[key])


def _detached_copy(state: Mapping[str, Any]) -> dict[str, Any]:
    """Deep copy with tensors moved to CPU, so later optimiser steps cannot change the best."""
    return {
        key: value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        for key, value in state.items()
    }
