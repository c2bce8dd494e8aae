"""Self-describing weight files: the state dict with what is needed to rebuild the network.

``{"state_dict": ..., "arch" | "ngf", "n_residual_blocks", "view", "fold", ...}``, written through
core.atomic (same weights, same bytes), read back without params.yaml.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from virtual_biopsy.core.atomic import restore_interrupted_swap, write_torch
from virtual_biopsy.core.config import GeneratorConfig
from virtual_biopsy.models.classifiers import build_classifier
from virtual_biopsy.models.cyclegan import ResnetGenerator


def save_classifier_weights(path: Path, state: dict[str, torch.Tensor], **info: Any) -> None:
    """Write a state dict under ``state_dict`` with what identifies it (arch, modality, view, fold ...)."""
    write_torch(path, {"state_dict": state, **info})


def load_classifier(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the classifier saved by :func:`save_classifier_weights`; returns (network in eval mode, info)."""
    if not path.is_file() and not restore_interrupted_swap(path):
        raise FileNotFoundError(f"{path}: no such classifier weights file (run the train_classifier stage)")
    record = torch.load(path, map_location="cpu", weights_only=True)
    model = build_classifier(str(record["arch"]))
    model.load_state_dict(record["state_dict"])
    model.eval()
    return model, {k: v for k, v in record.items() if k != "state_dict"}


def save_generator_weights(path: Path, state: dict[str, torch.Tensor], cfg: GeneratorConfig, **info: Any) -> None:
    """Write a generator's state dict with what is needed to rebuild it (architecture, size, view, fold)."""
    record = {"state_dict": state, "ngf": cfg.ngf, "n_residual_blocks": cfg.n_residual_blocks, **info}
    write_torch(path, record)


def load_generator_weights(path: Path) -> tuple[ResnetGenerator, dict[str, Any]]:
    """Rebuild the generator saved by :func:`save_generator_weights`; returns (network, info)."""
    if not path.is_file() and not restore_interrupted_swap(path):
        raise FileNotFoundError(f"{path}: no such generator weights file (run the train_generator stage)")
    record = torch.load(path, map_location="cpu", weights_only=True)
    generator = ResnetGenerator(channels=1, ngf=int(record["ngf"]), n_residual_blocks=int(record["n_residual_blocks"]))
    generator.load_state_dict(record["state_dict"])
    generator.eval()
    info = {k: v for k, v in record.items() if k != "state_dict"}
    return generator, info
