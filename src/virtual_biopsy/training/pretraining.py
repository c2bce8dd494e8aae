"""Pre-training one view's CycleGAN on a second dataset, the start of fine-tuning (paper 5.2.1).

"After a pre-training on the public dataset [CDD-CESM], we fine-tuned the CycleGAN separately
for the CC and MLO views." One CycleGAN per view trains on every LE/DES pair of the pre-training
cohort except those of a held-out share of its patients (``pretrain.val_share``), whose paired L1
drives early stopping. The network sizes, loss weights and batch size are the generator
section's, so the weights fit train_generator; epochs, warm-up, patience and learning rate are
``pretrain``'s (:func:`pretraining_config`).

The weight file (:func:`save_pretrained`) is a generator file of models/weights.py, LE -> DES
generator at its best validation epoch, plus the other three networks under ``networks`` as the
last epoch left them (the checkpoint's), so fine-tuning starts from the whole pre-trained CycleGAN.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from virtual_biopsy.core.config import VIEWS, GeneratorConfig, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import CohortError, require_inputs, view_pairs
from virtual_biopsy.models.weights import save_generator_weights
from virtual_biopsy.training.checkpoint import CHECKPOINT_NAME, discard_stale_checkpoint, inputs_key
from virtual_biopsy.training import executor
from virtual_biopsy.training.datasets import derive_seed, open_images, paired_dataset
from virtual_biopsy.training.generator_trainer import GeneratorTrainingResult, train_cyclegan
from virtual_biopsy.training.loop import EpochCallback, resolve_device

PRETRAIN_STREAM = 2000  # seed stream of pre-training, apart from the folds' (datasets.generator_fold_seed)
OTHER_NETWORKS = ("generator_ba", "discriminator_a", "discriminator_b")


class PretrainError(ValueError):
    """The pre-training cohort cannot be pre-trained on (too few patients or pairs of a view)."""


@dataclass
class PretrainOutcome:
    """One view's pre-training: the trained networks and what they were trained on."""

    view: str
    result: GeneratorTrainingResult
    other_networks: dict[str, dict[str, torch.Tensor]]
    subsets: dict[str, pd.DataFrame]
    seed: int


def pretrain_seed(seed: int, view: str) -> int:
    return derive_seed(seed, VIEWS.index(view), PRETRAIN_STREAM)


def pretraining_config(params: Params) -> GeneratorConfig:
    """The CycleGAN settings of pre-training: the generator section's sizes, losses, batch,
    optimiser and device, ``pretrain``'s epochs, warm-up, patience and learning rate, from scratch.

    Key by key, not a copy of the generator section: dvc.yaml lists exactly these keys as the
    pretrain_generator stage's params, so changing what only fine-tuning reads (its epochs, rate,
    pretrained_weights) does not rerun pre-training.
    """
    return GeneratorConfig(
        ngf=params.generator.ngf, ndf=params.generator.ndf, n_residual_blocks=params.generator.n_residual_blocks,
        batch_size=params.generator.batch_size, weight_decay=params.generator.weight_decay,
        beta1=params.generator.beta1, lambda_cycle=params.generator.lambda_cycle,
        lambda_identity=params.generator.lambda_identity, lambda_paired=params.generator.lambda_paired,
        augment=params.generator.augment, device=params.generator.device,
        max_steps_per_epoch=params.generator.max_steps_per_epoch,
        epochs=params.pretrain.epochs, warmup_epochs=params.pretrain.warmup_epochs,
        patience=params.pretrain.patience, lr=params.pretrain.lr, sample_every=0, pretrained_weights=None)


def holdout_pairs(pairs: pd.DataFrame, val_share: float, seed: int) -> dict[str, pd.DataFrame]:
    """The pairs split by patient: ``val`` holds ``round(val_share * patients)`` of them (at least
    one, and one fewer than all), drawn with ``seed``; ``train`` the others."""
    patients = np.array(sorted(pairs["patient_id"].unique()))
    if len(patients) < 2:
        raise PretrainError(f"{len(patients)} patient(s) with LE/DES pairs; pre-training needs at least 2 "
                            "(one to train on, one to early-stop on)")
    n_val = min(max(1, int(round(val_share * len(patients)))), len(patients) - 1)
    held_out = set(np.random.default_rng(seed).permutation(patients)[:n_val])
    is_val = pairs["patient_id"].isin(held_out)
    return {"train": pairs[~is_val].reset_index(drop=True), "val": pairs[is_val].reset_index(drop=True)}


def pretrain_view(images: np.ndarray, pairs: pd.DataFrame, params: Params, view: str,
                  checkpoint_dir: Path, on_epoch_end: EpochCallback | None = None,
                  device: str = "cpu") -> PretrainOutcome:
    """Pre-train the CycleGAN of ``view`` on ``pairs`` (rows of ``images``) with
    :func:`pretraining_config`; resumable from ``checkpoint_dir`` (a checkpoint of other images or
    settings is discarded)."""
    seed = pretrain_seed(params.seed, view)
    subsets = holdout_pairs(pairs, params.pretrain.val_share, seed)
    cfg = pretraining_config(params)
    discard_stale_checkpoint(checkpoint_dir, inputs_key(images, image_rows(subsets["train"]),
                                                        image_rows(subsets["val"])))
    result = train_cyclegan(paired_dataset(images, subsets["train"], cfg, seed, augment=True),
                            paired_dataset(images, subsets["val"], cfg, seed, augment=False), cfg, seed,
                            checkpoint_dir=checkpoint_dir, on_epoch_end=on_epoch_end, device=device,
                            restart_if_stale=True)
    return PretrainOutcome(view, result, last_epoch_networks(checkpoint_dir), subsets, seed)


def pretrain_job(paths: ProjectPaths, params: Params, view: str, run, device: str) -> PretrainOutcome:
    """:func:`pretrain_view` as an executor job (training.executor; one per view) that may run in
    another process: it opens the cohort's processed images memory-mapped, resolves ``device``
    where it runs, and logs each epoch's losses to ``run``, a handed-over run (``attach()``)."""
    source = paths.pretrain
    require_inputs([(source.processed_images, "import_pretrain"), (source.processed_index, "import_pretrain")])
    images = open_images(source.processed_images)
    pairs = view_pairs(pd.read_csv(source.processed_index), view)
    if pairs.empty:
        raise CohortError(f"{source.processed_index}: no LE/DES pairs of view {view}")
    handle = run.attach()
    epochs = pretraining_config(params).epochs

    def on_epoch_end(epoch: int, metrics: dict[str, float], state) -> None:
        handle.log_metrics({k.replace("/", "_"): v for k, v in metrics.items()}, step=epoch)
        executor.report_epoch(epoch, epochs, metrics)

    return pretrain_view(images, pairs, params, view, paths.pretrain_checkpoint(view), on_epoch_end,
                         str(resolve_device(device)))


def image_rows(pairs: pd.DataFrame) -> pd.DataFrame:
    """Both images of every pair as (image_id, row): what training.checkpoint.inputs_key hashes,
    so a change of the DES images alone (another scanner look) also makes a checkpoint stale."""
    return pd.DataFrame({"image_id": [*pairs["pair_key"].astype(str) + ":LE", *pairs["pair_key"].astype(str) + ":DES"],
                         "row": [*pairs["le_row"], *pairs["des_row"]]})


def last_epoch_networks(checkpoint_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """generator_ba and both discriminators as the last epoch left them (from its checkpoint)."""
    record = torch.load(Path(checkpoint_dir) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    return {name: record["networks"][name] for name in OTHER_NETWORKS}


def save_pretrained(path: Path, outcome: PretrainOutcome, cfg: GeneratorConfig, image_size: int) -> None:
    """Write the pre-trained CycleGAN of one view in the project's generator weight format."""
    save_generator_weights(path, outcome.result.generator_state, cfg, view=outcome.view, fold="pretrain",
                           image_size=int(image_size), best_epoch=outcome.result.best_epoch,
                           networks=outcome.other_networks, ndf=cfg.ndf)


def describe_pretraining(outcome: PretrainOutcome) -> dict[str, Any]:
    """The view's pre-training report: pairs and patients used, epochs, validation L1."""
    result = outcome.result
    return {
        "view": outcome.view,
        "pairs": {name: len(part) for name, part in outcome.subsets.items()},
        "patients": {name: int(part["patient_id"].nunique()) for name, part in outcome.subsets.items()},
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
        "best_val_l1": result.best_val_loss,
    }
