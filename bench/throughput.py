"""What the training benchmarks (classifier.py, generator.py, gpu_profile.py) share: their common
command-line options, a processed-like image array to read through the real data path, waiting
for queued GPU work, and the interleaved timing of a data-path step against a random-tensor step."""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Batch = Any  # what a loader yields: (images, labels) or (domain A, domain B)


def throughput_parser(doc: str, *, batch_size: int, steps: int, warmup_steps: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--steps", type=int, default=steps, help="timed training steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=warmup_steps, help="untimed steps first (allocator, caches)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--images", type=Path, help="a processed images.npy to read (default: a temporary one)")
    return parser


def processed_like_array(folder: Path, rows: int, size: int) -> Path:
    """A float32 (rows, size, size) array in [0, 1] saved as .npy, like data/processed/images.npy."""
    path = folder / "images.npy"
    np.save(path, np.random.default_rng(0).random((rows, size, size), dtype=np.float32))
    return path


def synchronise(device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously); nothing to wait for on CPU."""
    if device.type == "cuda":
        import torch  # here: the timing helpers and their tests need no torch

        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Interleaved:
    """Seconds per timed step of each side; step i of both sides ran back to back.

    ``data_seconds`` includes ``load_seconds``: fetching the batch through the loader.
    """

    data_seconds: list[float]
    load_seconds: list[float]
    random_seconds: list[float]
    images_per_step: int

    @property
    def data_rate(self) -> float:
        return self.images_per_step * len(self.data_seconds) / sum(self.data_seconds)

    @property
    def random_rate(self) -> float:
        return self.images_per_step * len(self.random_seconds) / sum(self.random_seconds)

    @property
    def step_ratios(self) -> np.ndarray:
        """Per step: random-tensor time / data-path time (1.0 = the data path costs nothing)."""
        return np.asarray(self.random_seconds) / np.asarray(self.data_seconds)

    def summary(self) -> str:
        low, median, high = np.quantile(self.step_ratios, [0.25, 0.5, 0.75])
        load_share = np.median(np.asarray(self.load_seconds) / np.asarray(self.data_seconds))
        return (
            f"data path {self.data_rate:.1f} img/s, random tensors {self.random_rate:.1f} img/s, "
            f"ratio {median:.2f} (median of {len(self.data_seconds)} paired steps, quartiles {low:.2f}-{high:.2f}; "
            f"total-time ratio {self.data_rate / self.random_rate:.2f}); "
            f"loading {1e3 * np.median(self.load_seconds):.1f} ms/batch = {100 * load_share:.1f} % of a data-path step"
        )


def measure_interleaved(
    next_batch: Callable[[], Batch], data_train: Callable[[Batch], int],
    random_train: Callable[[Batch], int], random_batch: Batch, steps: int, warmup: int,
    synchronise: Callable[[], None] = lambda: None,
) -> Interleaved:
    """Time ``warmup + steps`` steps of each side, one of each in turn; the first ``warmup`` are not kept.

    Data side: ``next_batch()`` (the real loader) then ``data_train(batch)``. Random side:
    ``random_train(random_batch)``, a twin model on a batch already in memory. The train
    callables return their number of images, which must agree. Interleaving makes both sides
    see the same machine load, which on a shared CPU drifts more between two back-to-back runs
    than the difference being measured; the order within a pair alternates so that neither
    side always runs right after the other's model has evicted its caches. Per-step ratios let
    a load spike in one step be told apart from a steady cost.
    """
    data_seconds: list[float] = []
    load_seconds: list[float] = []
    random_seconds: list[float] = []
    counts: set[int] = set()

    def data_side() -> None:
        start = time.perf_counter()
        batch = next_batch()
        loaded = time.perf_counter()
        count = data_train(batch)
        synchronise()
        if timed:
            data_seconds.append(time.perf_counter() - start)
            load_seconds.append(loaded - start)
            counts.add(count)

    def random_side() -> None:
        start = time.perf_counter()
        count = random_train(random_batch)
        synchronise()
        if timed:
            random_seconds.append(time.perf_counter() - start)
            counts.add(count)

    for index in range(warmup + steps):
        timed = index >= warmup
        for side in (data_side, random_side) if index % 2 == 0 else (random_side, data_side):
            side()
    if len(counts) != 1:
        raise ValueError(f"the two sides must train on batches of one size, got {sorted(counts)}")
    return Interleaved(data_seconds, load_seconds, random_seconds, counts.pop())
