"""Benchmark: classifier training throughput through the real data path vs. random tensors.

For each architecture: memory-mapped processed array -> LabelledImageDataset (affine
augmentation) -> DataLoader -> one cross-entropy update, against the same update on a batch
already in memory. One step of each is timed in turn, so both see the same machine load. The
ratio says how much the input pipeline costs (target: >= 0.9).

    .venv/bin/python bench/classifier.py --image-size 64 --batch-size 16 --steps 3
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from throughput import processed_like_array, throughput_parser
import torch

from virtual_biopsy.models import ARCHITECTURES, build_classifier
from virtual_biopsy.training import AffineAugment, LabelledImageDataset, open_images
from virtual_biopsy.training.classifier_trainer import train_step
from virtual_biopsy.training.loop import epoch_loader, prepare_module, resolve_device, to_device


def parse_args() -> argparse.Namespace:
    parser = throughput_parser(__doc__, batch_size=16, steps=3, warmup_steps=1)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    return parser.parse_args()


def fresh_step(arch: str, device: torch.device):
    model = prepare_module(build_classifier(arch, seed=0), device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    return lambda images, labels: train_step(model, optimiser, images, labels, device)


def bench_architecture(arch: str, dataset: LabelledImageDataset, args: argparse.Namespace, device: torch.device):
    """(data path, random tensors) images/s for one architecture, steps timed alternately."""
    data_step, compute_step = fresh_step(arch, device), fresh_step(arch, device)
    size = dataset.images.shape[1]
    random_images = torch.rand(args.batch_size, 1, size, size)
    random_labels = torch.randint(0, 2, (args.batch_size,))
    loader = iter(epoch_loader(dataset, args.batch_size, seed=0, epoch=0, shuffle=True, num_workers=args.workers))
    data_time = random_time = 0.0
    images = 0
    for index in range(args.warmup_steps + args.steps):
        start = time.perf_counter()
        batch, labels = next(loader)
        data_step(to_device(batch, device), labels.to(device))
        _synchronise(device)
        middle = time.perf_counter()
        compute_step(to_device(random_images, device), random_labels.to(device))
        _synchronise(device)
        if index >= args.warmup_steps:
            data_time += middle - start
            random_time += time.perf_counter() - middle
            images += len(labels)
    return images / data_time, images / random_time


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = (args.warmup_steps + args.steps) * args.batch_size + 1
    with tempfile.TemporaryDirectory() as tmp:
        images = open_images(args.images or processed_like_array(Path(tmp), rows, args.image_size))
        labels = np.arange(len(images)) % 2
        dataset = LabelledImageDataset(images, np.arange(len(images)), labels, augment=AffineAugment())
        for arch in args.architectures:
            data_path, compute_only = bench_architecture(arch, dataset, args, device)
            print(
                f"{arch} {images.shape[1]}px batch {args.batch_size} on {device} ({torch.get_num_threads()} threads): "
                f"data path {data_path:.1f} img/s, random tensors {compute_only:.1f} img/s, "
                f"ratio {data_path / compute_only:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
