"""Benchmark: CycleGAN training throughput through the real data path vs. random tensors.

Data path = memory-mapped processed array -> PairedImageDataset (paired affine augmentation) ->
DataLoader -> one CycleGAN update. Compute-only = the same networks and update on tensors that
are already in memory. The ratio says how much of the training time the input pipeline costs
(target: >= 0.9). One step of each is timed in turn (alternating which goes first), so both
see the same machine load; the ratio is the median over the paired steps.

    .venv/bin/python bench/generator.py --image-size 64 --batch-size 8 --steps 10
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from throughput import measure_interleaved, processed_like_array, synchronise, throughput_parser
import torch

from virtual_biopsy.core.config import GeneratorConfig
from virtual_biopsy.training import AffineAugment, PairedImageDataset, open_images
from virtual_biopsy.training.generator_trainer import CycleGANLoss, _optimisers, build_cyclegan, train_step
from virtual_biopsy.training.loop import epoch_loader, prepare_module, resolve_device, to_device


def parse_args() -> argparse.Namespace:
    parser = throughput_parser(__doc__, batch_size=8, steps=10, warmup_steps=2)
    parser.add_argument("--ngf", type=int, default=GeneratorConfig.ngf)
    parser.add_argument("--ndf", type=int, default=GeneratorConfig.ndf)
    parser.add_argument("--n-residual-blocks", type=int, default=GeneratorConfig.n_residual_blocks)
    return parser.parse_args()


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
        random_a, random_b = torch.rand(args.batch_size, 1, size, size), torch.rand(args.batch_size, 1, size, size)
        loader = iter(epoch_loader(dataset, args.batch_size, seed=0, epoch=0, shuffle=True, num_workers=args.workers))
        data_update, random_update = fresh_step(), fresh_step()

        def train(update):
            def step(batch) -> int:
                real_a, real_b = batch
                update(to_device(real_a, device), to_device(real_b, device))
                return len(real_a)
            return step

        timings = measure_interleaved(lambda: next(loader), train(data_update), train(random_update),
                                      (random_a, random_b), args.steps, args.warmup_steps, lambda: synchronise(device))
    print(
        f"cyclegan {size}px batch {args.batch_size} ngf {cfg.ngf} ndf {cfg.ndf} blocks {cfg.n_residual_blocks} "
        f"on {device} ({torch.get_num_threads()} threads): {timings.summary()}"
    )


if __name__ == "__main__":
    main()
