"""Classifier training for the virtual biopsy (paper 5.1.1).

Cross-entropy, Adam (lr, weight decay), ReduceLROnPlateau on the validation loss (factor
``lr_factor``, patience ``lr_patience``), early stopping on the validation loss with warm-up, and
the best weights restored at the end.

Class imbalance: the paper trains with plain cross-entropy on its ~72 % malignant data and
handles imbalance in evaluation (MCC, G-mean) and fusion (MCC weights), so that is the default.
``class_weights`` (benign, malignant) is available for experiments; it is off unless given.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from virtual_biopsy.core.atomic import write_text
from virtual_biopsy.core.config import ClassifierConfig
from virtual_biopsy.models.classifiers import MALIGNANT_CLASS
from virtual_biopsy.training import distributed
from virtual_biopsy.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    restore_rng_state,
)
from virtual_biopsy.training.datasets import LabelledImageDataset
from virtual_biopsy.training.early_stopping import EarlyStopping
from virtual_biopsy.training.loop import (
    EpochCallback,
    EpochState,
    as_metrics,
    autocast_for,
    epoch_loader,
    prepare_module,
    resolve_device,
    run_config,
    seeded_torch,
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
) -> ClassifierTrainingResult:
    """Train ``model`` (2 logits) for up to ``cfg.epochs`` epochs; leave the best weights in it.

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same run (same cfg, seed,
    data sizes and architecture); a finished run is returned again without training.
    ``on_epoch_end`` follows the contract in ``training.loop`` (metrics ``train/loss``,
    ``train/accuracy``, ``val/loss``, ``val/accuracy``, ``lr``).

    Under ``torchrun`` every rank trains its share of each global batch of ``cfg.batch_size``
    with DistributedDataParallel (``training.distributed``); only rank 0 checkpoints and calls
    ``on_epoch_end``, and the result equals the single-process run's up to float rounding.
    """
    device = resolve_device(device)
    context = distributed.init_from_env(device)
    device = distributed.rank_device(device, context)
    prepare_module(model, device)
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32, device=device)
    if weight is not None and weight.shape != (2,):
        raise ValueError(f"class_weights: expected two weights (benign, malignant), got {list(class_weights)}")
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience
    )
    stopper = EarlyStopping(cfg.warmup_epochs, cfg.patience)
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
    checkpointer = Checkpointer(checkpoint_dir, fingerprint)
    history: list[dict[str, float]] = []
    start_epoch, finished = 0, False
    with seeded_torch(seed, device), distributed.data_parallel(model, device) as trained:
        record = checkpointer.load_latest()
        if record is not None:
            model.load_state_dict(record["model"])
            optimiser.load_state_dict(record["optimiser"])
            scheduler.load_state_dict(record["scheduler"])
            stopper.load_state_dict(record["early_stopping"])
            history, start_epoch, finished = record["history"], record["epoch"] + 1, record["finished"]
            restore_rng_state(record["rng"])
        for epoch in range(start_epoch, 0 if finished else cfg.epochs):
            train_loss, train_accuracy = _train_epoch(trained, optimiser, train_ds, cfg, seed, epoch, device, weight, num_workers)
            val_loss, val_accuracy = evaluate_loss(model, val_ds, cfg.batch_size, device, weight)
            metrics = as_metrics(
                {
                    "train/loss": train_loss,
                    "train/accuracy": train_accuracy,
                    "val/loss": val_loss,
                    "val/accuracy": val_accuracy,
                    "lr": optimiser.param_groups[0]["lr"],
                }
            )
            scheduler.step(val_loss)
            history.append({"epoch": float(epoch), **metrics})
            finished = stopper.step(epoch, val_loss, model.state_dict()) or epoch == cfg.epochs - 1
            (checkpointer.save if distributed.is_main_process() else _skip)(
                {
                    "model": state_on_cpu(model),
                    "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "early_stopping": stopper.state_dict(),
                    "epoch": epoch,
                    "finished": finished,
                    "history": history,
                }
            )
            if on_epoch_end is not None:
                state = EpochState(epoch, {"classifier": model}, stopper.is_best(epoch), stopper.best_epoch, stopper.best_loss, history)
                distributed.run_on_main(on_epoch_end, epoch, metrics, state, device=device)
            if finished:
                break
    best_state = stopper.best_state or state_on_cpu(model)
    model.load_state_dict(best_state)
    return ClassifierTrainingResult(
        state=best_state,
        best_epoch=stopper.best_epoch,
        best_val_loss=stopper.best_loss,
        epochs_run=len(history),
        stopped_early=len(history) < cfg.epochs,
        history=history,
    )


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


def _train_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    train_ds: LabelledImageDataset,
    cfg: ClassifierConfig,
    seed: int,
    epoch: int,
    device: torch.device,
    weight: torch.Tensor | None,
    num_workers: int,
) -> tuple[float, float]:
    model.train()
    loader = epoch_loader(train_ds, cfg.batch_size, seed, epoch, shuffle=True, num_workers=num_workers,
                          pin_memory=device.type == "cuda", shard=True)
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in tqdm(loader, desc=f"classifier epoch {epoch}", leave=False,
                               disable=None if distributed.is_main_process() else True):
        labels = labels.to(device)
        loss, batch_correct = train_step(model, optimiser, to_device(images, device), labels, device, weight)
        loss_sum += loss * len(labels)
        correct += batch_correct
        seen += len(labels)
    loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], device)
    return loss_sum / seen, correct / seen


def _skip(*_: object) -> None:
    """Ranks other than 0 write nothing."""


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


INPUTS_KEY_FILE = "inputs.sha256"  # beside last.pt: which images the checkpoint was trained on


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
        print(f"train_classifier: discarding checkpoint {ckpt} of other input images", file=sys.stderr)
        shutil.rmtree(ckpt)
    write_text(key_file, key + "\n")


def train_classifier_with_resume(model: torch.nn.Module, train_ds, val_ds, cfg: ClassifierConfig, seed: int, ckpt: Path,
                      callback, device: str) -> ClassifierTrainingResult:
    """train_classifier, resuming from ``ckpt``; a checkpoint of another configuration is discarded.

    The model folder persists between ``dvc repro`` runs so that a killed run resumes; after a
    change of params or data its checkpoints belong to another run and are stale.
    """
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        return train_classifier(model, train_ds, val_ds, cfg, seed, checkpoint_dir=ckpt, on_epoch_end=callback,
                                device=device)
    except CheckpointError as exc:
        print(f"train_classifier: discarding stale checkpoint ({exc})", file=sys.stderr)
        for stale in ckpt.glob("*.pt"):
            stale.unlink()
        model.load_state_dict(initial)
        return train_classifier(model, train_ds, val_ds, cfg, seed, checkpoint_dir=ckpt, on_epoch_end=callback,
                                device=device)
