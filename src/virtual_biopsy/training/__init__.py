"""Training: the trainers, their shared fit loop, datasets, augmentation, early stopping and
checkpoints (pure PyTorch + numpy).

Usable by hand from a notebook; the stage modules call the same functions and log to MLflow
through the ``on_epoch_end`` callback (contract in :mod:`virtual_biopsy.training.loop`). Both
trainers run :func:`virtual_biopsy.training.fit.fit`; each supplies only its own steps.
"""
from virtual_biopsy.training.augment import AffineAugment
from virtual_biopsy.training.checkpoint import Checkpointer, CheckpointError
from virtual_biopsy.training.classifier_trainer import (
    ClassifierTrainingResult,
    predict_proba,
    train_classifier,
)
from virtual_biopsy.training.datasets import (
    LabelledImageDataset,
    PairedImageDataset,
    open_images,
)
from virtual_biopsy.training.early_stopping import EarlyStopping
from virtual_biopsy.training.fit import FitOutcome, Trainee, fit
from virtual_biopsy.training.generator_trainer import (
    CycleGANLoss,
    GeneratorTrainingResult,
    build_generator,
    generate,
    train_cyclegan,
)
from virtual_biopsy.training.loop import EpochCallback, EpochState

__all__ = [
    "AffineAugment",
    "CheckpointError",
    "Checkpointer",
    "ClassifierTrainingResult",
    "CycleGANLoss",
    "EarlyStopping",
    "EpochCallback",
    "EpochState",
    "FitOutcome",
    "GeneratorTrainingResult",
    "LabelledImageDataset",
    "PairedImageDataset",
    "Trainee",
    "build_generator",
    "fit",
    "generate",
    "open_images",
    "predict_proba",
    "train_classifier",
    "train_cyclegan",
]
