"""What the training-throughput benchmarks (classifier.py, generator.py) share: their common
command-line options and a processed-like image array to read through the real data path."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


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
