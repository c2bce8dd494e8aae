"""Classifier training for the virtual biopsy (paper 5.1.1).

Cross-entropy, Adam (lr, weight decay), ReduceLROnPlateau on the validation loss (factor
``lr_factor``, patience ``lr_patience``), early stopping on the validation loss with warm-up, and
the best weights restored at the end.

Class imbalance: the paper trains with plain cross-entropy on its ~72 % malignant data and
handles imbalance in evaluation (MCC, G-mean) and fusion (MCC weights), so that is the default.
``class_weights`` (benign, malignant) is available for experiments; it is off unless given.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from virtual_biopsy.core.config import ClassifierConfig
from virtual_biopsy.models.classifiers import MALIGNANT_CLASS
from virtual_biopsy.training import distributed
from virtual_biopsy.training.datasets import LabelledImageDataset
from virtual_biopsy.training.fit import fit, training_device
from virtual_biopsy.training.loop import (
    EpochCallback,
    autocast_for,
    epoch_loader,
    prepare_module,
    resolve_device,
    run_config,
    state_on_cpu,
    to_device,
)


@dataclass
class ClassifierTrainingResult:
    """Outcome of :func:`train_classifier`; the model passed in already holds ``state``."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]]


def train_classifier(
    model: nn.Module,
    train_ds: LabelledImageDataset,
    val_ds: LabelledImageDataset,
    cfg: ClassifierConfig,
    seed: int,
    checkpoint_dir: str | Path | None = None,
    on_epoch_end: EpochCallback | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    class_weights: Sequence[float] | None = None,
    restart_if_stale: bool = False,
) -> ClassifierTrainingResult:
    """Train ``model`` (2 logits) for up to ``cfg.epochs`` epochs; leave the best weights in it.

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same run (same cfg, seed,
    data sizes and architecture); a finished run is returned again without training. A
    checkpoint of another run raises :class:`CheckpointError`, or with ``restart_if_stale`` is
    deleted and training starts over (``training.fit``). ``on_epoch_end`` follows the contract
    in ``training.loop`` (metrics ``train/loss``, ``train/accuracy``, ``val/loss``,
    ``val/accuracy``, ``lr``).

    Under ``torchrun`` every rank trains its share of each global batch of ``cfg.batch_size``
    with DistributedDataParallel (``training.distributed``); only rank 0 checkpoints and calls
    ``on_epoch_end``, and the result equals the single-process run's up to float rounding.
    """
    device = training_device(device)
    prepare_module(model, device)
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32, device=device)
    if weight is not None and weight.shape != (2,):
        raise ValueError(f"class_weights: expected two weights (benign, malignant), got {list(class_weights)}")
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience
    )
    fingerprint = {
        "kind": "classifier",
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": run_config(cfg),
        "seed": seed,
        "train": len(train_ds),
        "val": len(val_ds),
        "class_weights": None if class_weights is None else [float(w) for w in class_weights],
    }
    trainee = _ClassifierTrainee(model, optimiser, scheduler, train_ds, val_ds, cfg, seed, device, weight, num_workers)
    outcome = fit(trainee, cfg, seed, device, checkpoint_dir, fingerprint, on_epoch_end, restart_if_stale)
    best_state = outcome.best_state or state_on_cpu(model)
    model.load_state_dict(best_state)
    return ClassifierTrainingResult(
        state=best_state,
        best_epoch=outcome.best_epoch,
        best_val_loss=outcome.best_val_loss,
        epochs_run=outcome.epochs_run,
        stopped_early=outcome.stopped_early,
        history=outcome.history,
    )


@dataclass
class _ClassifierTrainee:
    """The classifier's part of ``training.fit``: Adam steps on cross-entropy, a plateau schedule."""

    model: nn.Module
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    train_ds: LabelledImageDataset
    val_ds: LabelledImageDataset
    cfg: ClassifierConfig
    seed: int
    device: torch.device
    weight: torch.Tensor | None
    num_workers: int
    kept_network: str = "classifier"

    @property
    def networks(self) -> dict[str, nn.Module]:
        return {"classifier": self.model}

    def train_epoch(self, epoch: int, wrapped: Mapping[str, nn.Module]) -> dict[str, float]:
        model = wrapped["classifier"]
        model.train()
        loader = epoch_loader(self.train_ds, self.cfg.batch_size, self.seed, epoch, shuffle=True,
                              num_workers=self.num_workers, pin_memory=self.device.type == "cuda", shard=True,
                              max_steps=self.cfg.max_steps_per_epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        for images, labels in tqdm(loader, desc=f"classifier epoch {epoch}", leave=False,
                                   disable=None if distributed.is_main_process() else True):
            labels = labels.to(self.device)
            loss, batch_correct = train_step(model, self.optimiser, to_device(images, self.device), labels,
                                             self.device, self.weight)
            loss_sum += loss * len(labels)
            correct += batch_correct
            seen += len(labels)
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], self.device)
        return {"train/loss": loss_sum / seen, "train/accuracy": correct / seen}

    def validate(self) -> tuple[float, dict[str, float]]:
        val_loss, val_accuracy = evaluate_loss(self.model, self.val_ds, self.cfg.batch_size, self.device, self.weight)
        lr = self.optimiser.param_groups[0]["lr"]  # the rate this epoch trained with, read before the plateau step
        self.scheduler.step(val_loss)
        return val_loss, {"val/loss": val_loss, "val/accuracy": val_accuracy, "lr": lr}

    def state_dict(self) -> dict[str, Any]:
        return {"model": state_on_cpu(self.model), "optimiser": self.optimiser.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, record: Mapping[str, Any]) -> None:
        self.model.load_state_dict(record["model"])
        self.optimiser.load_state_dict(record["optimiser"])
        self.scheduler.load_state_dict(record["scheduler"])


def train_step(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    weight: torch.Tensor | None = None,
) -> tuple[float, int]:
    """One cross-entropy update; returns (mean loss of the batch, number of correct predictions).

    Under torchrun the batch is this rank's share of the global batch: the loss that is
    back-propagated is scaled so that DDP's gradient average is the gradient of the global batch
    mean (``distributed.global_mean_scale``); the returned loss is the mean over this rank's share.
    """
    optimiser.zero_grad(set_to_none=True)
    with autocast_for(device):
        logits = model(images)
    if distributed.is_distributed():
        count = float(len(labels)) if weight is None else float(weight[labels].sum().item())
        local_sum = F.cross_entropy(logits.float(), labels, weight=weight, reduction="sum")
        (local_sum * distributed.global_mean_scale(count, device)).backward()
        optimiser.step()
        return local_sum.item() / count, int((logits.argmax(dim=1) == labels).sum().item())
    loss = F.cross_entropy(logits.float(), labels, weight=weight)
    loss.backward()
    optimiser.step()
    return loss.item(), int((logits.argmax(dim=1) == labels).sum().item())


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset: LabelledImageDataset,
    batch_size: int,
    device: str | torch.device = "cpu",
    weight: torch.Tensor | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``dataset``, in eval mode."""
    device = torch.device(device)
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in epoch_loader(dataset, batch_size, seed=0, epoch=0, shuffle=False,
                                       pin_memory=device.type == "cuda", shard=True):
        labels = labels.to(device)
        with autocast_for(device):
            logits = model(to_device(images, device))
        # Sum then divide by the count: a weighted batch mean would weight batches, not images.
        loss_sum += F.cross_entropy(logits.float(), labels, weight=weight, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == labels).sum().item())
        seen += len(labels)
    loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], device)
    return loss_sum / seen, correct / seen


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images: np.ndarray,
    rows: Sequence[int] | np.ndarray,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Probability of malignancy (class 1) for ``images[rows]``: float64 array of len(rows)."""
    device = resolve_device(device)
    rows = np.asarray(rows, dtype=np.int64)
    model.eval()
    out = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = torch.from_numpy(np.stack([np.asarray(images[r], dtype=np.float32) for r in chunk]))[:, None]
        with autocast_for(device):
            logits = model(to_device(batch, device))
        out[start : start + len(chunk)] = torch.softmax(logits.float(), dim=1)[:, MALIGNANT_CLASS].cpu().numpy()
    return out
