"""Benchmark: CycleGAN training throughput through the real data path vs. random tensors.

Data path = memory-mapped processed array -> PairedImageDataset (paired affine augmentation) ->
DataLoader -> one CycleGAN update. Compute-only = the same networks and update on tensors that
are already in memory. The ratio says how much of the training time the input pipeline costs
(target: >= 0.9).

    .venv/bin/python bench/generator.py --image-size 64 --batch-size 8 --steps 10
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from throughput import processed_like_array, throughput_parser
import torch

from virtual_biopsy.config import GeneratorConfig
from virtual_biopsy.training import AffineAugment, PairedImageDataset, open_images
from virtual_biopsy.training.generator_trainer import CycleGANLoss, _optimisers, build_cyclegan, train_step
from virtual_biopsy.training.loop import epoch_loader, prepare_module, resolve_device, to_device


def parse_args() -> argparse.Namespace:
    parser = throughput_parser(__doc__, batch_size=8, steps=10, warmup_steps=2)
    parser.add_argument("--ngf", type=int, default=GeneratorConfig.ngf)
    parser.add_argument("--ndf", type=int, default=GeneratorConfig.ndf)
    parser.add_argument("--n-residual-blocks", type=int, default=GeneratorConfig.n_residual_blocks)
    return parser.parse_args()


def measure_interleaved(compute_step, data_step, random_batch, loader_batches, warmup: int, device: torch.device):
    """Images/s of (data path, random tensors), timing one step of each in turn.

    Interleaving makes both figures see the same machine load, which on a shared CPU drifts
    more between two back-to-back runs than the difference being measured.
    """
    timings = {"data": 0.0, "random": 0.0}
    images = 0
    for index, (real_a, real_b) in enumerate(_timed_batches(loader_batches, timings, warmup)):
        start = time.perf_counter()
        data_step(to_device(real_a, device), to_device(real_b, device))
        _synchronise(device)
        middle = time.perf_counter()
        compute_step(to_device(random_batch[0], device), to_device(random_batch[1], device))
        _synchronise(device)
        if index >= warmup:
            timings["data"] += middle - start
            timings["random"] += time.perf_counter() - middle
            images += len(real_a)
    return images / timings["data"], images / timings["random"]


def _timed_batches(batches: Iterable, timings: dict[str, float], warmup: int) -> Iterator:
    """Yield batches, adding the time spent producing each (after warm-up) to the data path."""
    iterator = iter(batches)
    index = 0
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        if index >= warmup:
            timings["data"] += time.perf_counter() - start
        index += 1
        yield batch


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = GeneratorConfig(ngf=args.ngf, ndf=args.ndf, n_residual_blocks=args.n_residual_blocks, batch_size=args.batch_size)
    total = args.warmup_steps + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        path = args.images or processed_like_array(Path(tmp), 2 * total * args.batch_size, args.image_size)
        images = open_images(path)
        half = len(images) // 2
        dataset = PairedImageDataset(images, np.arange(half), np.arange(half, 2 * half), augment=AffineAugment())

        def fresh_step():
            nets = {name: prepare_module(net, device) for name, net in build_cyclegan(cfg, seed=0).items()}
            opt_g, opt_d = _optimisers(nets, cfg)
            loss = CycleGANLoss(cfg.lambda_cycle, cfg.lambda_identity)
            return lambda a, b: train_step(nets, loss, opt_g, opt_d, a, b, device)

        size = images.shape[1]
        random_batch = (torch.rand(args.batch_size, 1, size, size), torch.rand(args.batch_size, 1, size, size))
        loader = epoch_loader(dataset, args.batch_size, seed=0, epoch=0, shuffle=True, num_workers=args.workers)
        data_path, compute_only = measure_interleaved(
            fresh_step(), fresh_step(), random_batch, _take(loader, total), args.warmup_steps, device
        )
    print(
        f"cyclegan {size}px batch {args.batch_size} ngf {cfg.ngf} ndf {cfg.ndf} blocks {cfg.n_residual_blocks} "
        f"on {device} ({torch.get_num_threads()} threads): "
        f"data path {data_path:.1f} img/s, random tensors {compute_only:.1f} img/s, "
        f"ratio {data_path / compute_only:.2f}"
    )


def _take(iterable: Iterable, count: int) -> Iterator:
    """Consume the loader inside the timing loop (so loading is timed), but only ``count`` batches."""
    iterator = iter(iterable)
    for _ in range(count):
        yield next(iterator)


if __name__ == "__main__":
    main()
