"""Benchmark: classifier training throughput through the real data path vs. random tensors.

For each architecture: memory-mapped processed array -> LabelledImageDataset (affine
augmentation) -> DataLoader (epoch_loader) -> one cross-entropy update (train_step), as the
train_classifier stage runs them, against the same update of a twin model (same seed) on a
batch already in memory. One step of each is timed in turn (alternating which goes first), so
both see the same machine load; the ratio (median over the paired steps) says how much the
input pipeline costs (target: >= 0.9).

    .venv/bin/python bench/classifier.py --image-size 64 --batch-size 16 --steps 10
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from throughput import Interleaved, measure_interleaved, processed_like_array, synchronise, throughput_parser
import torch

from virtual_biopsy.models import ARCHITECTURES, build_classifier
from virtual_biopsy.training import AffineAugment, LabelledImageDataset, open_images
from virtual_biopsy.training.classifier_trainer import train_step
from virtual_biopsy.training.loop import epoch_loader, prepare_module, resolve_device, to_device


def parse_args() -> argparse.Namespace:
    parser = throughput_parser(__doc__, batch_size=16, steps=10, warmup_steps=2)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    return parser.parse_args()


def fresh_step(arch: str, device: torch.device):
    model = prepare_module(build_classifier(arch, seed=0), device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    return lambda images, labels: train_step(model, optimiser, images, labels, device)


def bench_architecture(arch: str, dataset: LabelledImageDataset, args: argparse.Namespace,
                       device: torch.device) -> Interleaved:
    """Paired step timings of the data path and of random tensors for one architecture."""
    data_update, random_update = fresh_step(arch, device), fresh_step(arch, device)
    size = dataset.images.shape[1]
    random_images = torch.rand(args.batch_size, 1, size, size)
    random_labels = torch.randint(0, 2, (args.batch_size,))
    loader = iter(epoch_loader(dataset, args.batch_size, seed=0, epoch=0, shuffle=True, num_workers=args.workers))

    def train(update):
        def step(batch) -> int:
            images, labels = batch
            update(to_device(images, device), labels.to(device))
            return len(labels)
        return step

    return measure_interleaved(lambda: next(loader), train(data_update), train(random_update),
                               (random_images, random_labels), args.steps, args.warmup_steps,
                               lambda: synchronise(device))


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
            timings = bench_architecture(arch, dataset, args, device)
            print(
                f"{arch} {images.shape[1]}px batch {args.batch_size} on {device} ({torch.get_num_threads()} threads): "
                f"{timings.summary()}",
                flush=True,
            )


if __name__ == "__main__":
    main()
