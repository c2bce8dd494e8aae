"""Torch datasets over rows of the processed image array (``data/processed/images.npy``).

The array is float32 (N, S, S) in [0, 1], opened with ``np.load(path, mmap_mode='r')`` so that
only the rows a batch needs are read from disk. Datasets hold row indices into it, never copies.

Augmentation randomness is a pure function of (seed, epoch, item index): every sample's draw is
the same however many loader workers run and whether or not the run was resumed from a
checkpoint. Trainers call :meth:`set_epoch` before each epoch.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from virtual_biopsy.core.config import ARCHITECTURES, MODALITIES, VIEWS, GeneratorConfig
from virtual_biopsy.training.augment import AffineAugment


def open_images(path: str | Path) -> np.ndarray:
    """Open the processed image array read-only as a memory map, checking its shape and dtype."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such processed image array")
    try:
        images = np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise ValueError(f"{path}: not a .npy array ({exc})") from exc
    _check_image_array(images, str(path))
    return images


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index, ...), well mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class _ImageRows(Dataset):
    """Shared plumbing: validated rows of the image array and per-item augmentation seeding."""

    def __init__(self, images: np.ndarray, augment: AffineAugment | None, seed: int) -> None:
        _check_image_array(images, "images")
        self.images = images
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Select the augmentation draws of ``epoch`` (and of run ``seed``, when given)."""
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def _rows(self, rows: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D sequence of row indices, got shape {rows.shape}")
        out_of_range = rows[(rows < 0) | (rows >= len(self.images))]
        if out_of_range.size:
            raise IndexError(
                f"{name}: row(s) {out_of_range[:5].tolist()} outside the image array of {len(self.images)} rows"
            )
        return rows

    def _read(self, *rows: int) -> torch.Tensor:
        """The given array rows stacked as channels, (C, S, S) float32."""
        return torch.from_numpy(np.stack([np.asarray(self.images[r], dtype=np.float32) for r in rows]))

    def _maybe_augment(self, stacked: torch.Tensor, index: int) -> torch.Tensor:
        if self.augment is None:
            return stacked
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))
        return self.augment(stacked, generator)


class PairedImageDataset(_ImageRows):
    """LE/DES pairs for generator training: item i is (LE (1, S, S), DES (1, S, S)).

    Both images of a pair go through the same random affine (they are warped as two channels of
    one tensor), so they stay aligned.
    """

    def __init__(
        self,
        images: np.ndarray,
        le_rows: Sequence[int] | np.ndarray,
        des_rows: Sequence[int] | np.ndarray,
        augment: AffineAugment | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(images, augment, seed)
        self.le_rows = self._rows(le_rows, "le_rows")
        self.des_rows = self._rows(des_rows, "des_rows")
        if len(self.le_rows) != len(self.des_rows):
            raise ValueError(
                f"le_rows and des_rows must pair up one to one, got {len(self.le_rows)} and {len(self.des_rows)}"
            )

    def __len__(self) -> int:
        return len(self.le_rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._maybe_augment(self._read(self.le_rows[index], self.des_rows[index]), index)
        return pair[0:1], pair[1:2]


class LabelledImageDataset(_ImageRows):
    """Labelled images for classifier training: item i is (image (1, S, S), label int64 0/1)."""

    def __init__(
        self,
        images: np.ndarray,
        rows: Sequence[int] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        augment: AffineAugment | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(images, augment, seed)
        self.rows = self._rows(rows, "rows")
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.shape != self.rows.shape:
            raise ValueError(f"labels: expected {len(self.rows)} labels (one per row), got shape {self.labels.shape}")
        invalid = sorted(set(np.unique(self.labels).tolist()) - {0, 1})
        if invalid:
            raise ValueError(f"labels: expected 0 (benign) or 1 (malignant), got {invalid}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self._maybe_augment(self._read(self.rows[index]), index)
        return image, torch.tensor(self.labels[index])


def _check_image_array(images: np.ndarray, name: str) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 3 or images.shape[1] != images.shape[2]:
        shape = getattr(images, "shape", None)
        raise ValueError(f"{name}: expected a square image array (N, S, S), got shape {shape}")
    if images.dtype != np.float32:
        raise ValueError(f"{name}: expected float32 images in [0, 1], got dtype {images.dtype}")


def classifier_fold_seed(seed: int, arch: str, modality: str, view: str, fold: int) -> int:
    """Each (arch, modality, view, fold) draws its own, reproducible random stream."""
    return derive_seed(seed, ARCHITECTURES.index(arch), MODALITIES.index(modality), VIEWS.index(view), fold)


def labelled_dataset(images: np.ndarray, frame: pd.DataFrame, seed: int, augment: bool,
                     strength: float = 1.0) -> LabelledImageDataset:
    """Images of ``frame`` with labels ``y``; paper 5.1 augmentation scaled by ``strength`` when ``augment``."""
    transform = AffineAugment(strength) if augment and strength > 0 else None
    return LabelledImageDataset(images, frame["row"].to_numpy(), frame["y"].to_numpy(), augment=transform, seed=seed)


def paired_dataset(images: np.ndarray, pairs: pd.DataFrame, cfg: GeneratorConfig, seed: int,
                   augment: bool) -> PairedImageDataset:
    return PairedImageDataset(images, pairs["le_row"].to_numpy(), pairs["des_row"].to_numpy(),
                              augment=AffineAugment() if augment and cfg.augment else None, seed=seed)


def generator_fold_seed(seed: int, view: str, fold: int) -> int:
    return derive_seed(seed, VIEWS.index(view), fold)
