"""Benchmark: can the paper-scale reproduction (profiles/gpu.yaml) run in one GPU-hour?

Times a measured fraction of the work of every network of the profile (each classifier
architecture and the CycleGAN, at the profile's image size and batch sizes, through the real
data path: memory-mapped array -> augmenting dataset -> pinned-memory DataLoader -> bf16
channels_last step), prints images/s per architecture and as a fraction of the same step on
tensors already on the device (model-only throughput), and extrapolates to the whole
reproduction: every fold x modality x view classifier and every fold x view generator for the
profile's full epoch budget (no early stop assumed, so an upper bound).

Packing (``--jobs 1,2,4,8``): fold jobs are small (ResNet18 at 256 px, batch 16 leaves most of an
H100 idle), so the reproduction runs several at once on one device (training.executor: local
worker processes or Ray tasks with a fractional ``num_gpus``). For every network and every job
count N, N processes each train the network on the same device at the same time (started together
behind a barrier); the table prints the samples/s of all N together and per job, and the whole
reproduction's wall time is extrapolated with each network's best N. On a CPU each job gets one
torch thread, as a local executor's worker does.

Without a GPU it says so and runs the same measurement on the CPU (default: a few steps at 64 px).

    .venv/bin/python bench/gpu_profile.py [--profile profiles/gpu.yaml] [--params params.yaml] [--steps 20]
                                          [--jobs 1,2,4,8]

The profile is read as `vbiopsy profile` applies it (its `extends` resolved, on top of params.yaml).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from throughput import synchronise

from virtual_biopsy.cli.profile import profile_params
from virtual_biopsy.core.config import GeneratorConfig
from virtual_biopsy.models import build_classifier
from virtual_biopsy.training import AffineAugment, LabelledImageDataset, PairedImageDataset, open_images
from virtual_biopsy.training.classifier_trainer import train_step
from virtual_biopsy.training.generator_trainer import CycleGANLoss, build_cyclegan, _optimisers
from virtual_biopsy.training.generator_trainer import train_step as gan_step
from virtual_biopsy.training.loop import epoch_loader, prepare_module, to_device

# Paper Table 1/2: early-phase biopsied images per modality and view, LE/DES pairs per view.
BIOPSY_IMAGES_PER_MODALITY_VIEW = 115
PAIRS_PER_VIEW = 1139  # (1598 early + 680 late) / 2 views
# CDD-CESM (the pre-training set, paper 5.2.1): 2006 images, 1003 LE/DES pairs over two views.
PRETRAIN_PAIRS_PER_VIEW = 501
TRAIN_SHARE = 0.8
GOAL_S = 3600.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=Path("profiles/gpu.yaml"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the base the profile applies to")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per network (default 20 GPU, 2 CPU)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers on GPU")
    parser.add_argument("--cpu-image-size", type=int, default=64, help="image size of the CPU fallback")
    parser.add_argument("--jobs", default="1,2,4,8",
                        help="concurrent job counts to measure (comma-separated; '' skips the packing table)")
    return parser.parse_args()


def timed(step, batches, warmup: int, device: torch.device) -> float:
    """Seconds per step over ``batches`` after ``warmup`` untimed steps."""
    iterator = iter(batches)
    for _ in range(warmup):
        step(*next(iterator))
    synchronise(device)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        step(*batch)
        count += 1
    synchronise(device)
    return (time.perf_counter() - start) / max(count, 1)


def repeat(loader_factory, n: int):
    """``n`` batches from loaders re-created as needed (epochs of the small benchmark array)."""
    out, epoch = 0, 0
    while out < n:
        for batch in loader_factory(epoch):
            yield batch
            out += 1
            if out == n:
                return
        epoch += 1


def classifier_rates(arch: str, images: np.ndarray, batch: int, steps: int, warmup: int, device: torch.device,
                     workers: int) -> tuple[float, float]:
    """(data path, model only) images/s of one training step of ``arch``."""
    def fresh():
        model = prepare_module(build_classifier(arch, seed=0), device).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        return lambda x, y: train_step(model, optimiser, to_device(x, device), y.to(device, non_blocking=True), device)

    dataset = LabelledImageDataset(images, np.arange(len(images)), np.arange(len(images)) % 2, augment=AffineAugment())
    pin = device.type == "cuda"
    loaders = repeat(lambda e: epoch_loader(dataset, batch, 0, e, True, workers, pin_memory=pin), warmup + steps)
    data_s = timed(fresh(), loaders, warmup, device)
    size = images.shape[1]
    fixed = (torch.rand(batch, 1, size, size, device=device), torch.randint(0, 2, (batch,), device=device))
    model_s = timed(fresh(), [fixed] * (warmup + steps), warmup, device)
    return batch / data_s, batch / model_s


def generator_rates(cfg: GeneratorConfig, images: np.ndarray, steps: int, warmup: int, device: torch.device,
                    workers: int) -> tuple[float, float]:
    def fresh():
        nets = build_cyclegan(cfg, seed=0)
        for net in nets.values():
            prepare_module(net, device).train()
        opt_g, opt_d = _optimisers(nets, cfg)
        loss = CycleGANLoss(cfg.lambda_cycle, cfg.lambda_identity)
        return lambda a, b: gan_step(nets, loss, opt_g, opt_d, to_device(a, device), to_device(b, device), device)

    half = len(images) // 2
    dataset = PairedImageDataset(images, np.arange(half), np.arange(half, 2 * half), augment=AffineAugment())
    pin = device.type == "cuda"
    loaders = repeat(lambda e: epoch_loader(dataset, cfg.batch_size, 0, e, True, workers, pin_memory=pin), warmup + steps)
    data_s = timed(fresh(), loaders, warmup, device)
    size = images.shape[1]
    fixed = tuple(torch.rand(cfg.batch_size, 1, size, size, device=device) for _ in range(2))
    model_s = timed(fresh(), [fixed] * (warmup + steps), warmup, device)
    return cfg.batch_size / data_s, cfg.batch_size / model_s


def _packed_job(kind: str, arch: str, cfg: GeneratorConfig, images_path: str, batch: int, steps: int, warmup: int,
                device_name: str, barrier, results) -> None:
    """One of N concurrent jobs: ``warmup`` untimed steps, the barrier, ``steps`` timed steps."""
    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread per job, as the local executor's workers run
    images = open_images(Path(images_path))
    if kind == "classifier":
        model = prepare_module(build_classifier(arch, seed=0), device).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        dataset = LabelledImageDataset(images, np.arange(len(images)), np.arange(len(images)) % 2,
                                       augment=AffineAugment())

        def step(x, y):
            return train_step(model, optimiser, to_device(x, device), y.to(device, non_blocking=True), device)
    else:
        nets = build_cyclegan(cfg, seed=0)
        for net in nets.values():
            prepare_module(net, device).train()
        opt_g, opt_d = _optimisers(nets, cfg)
        loss = CycleGANLoss(cfg.lambda_cycle, cfg.lambda_identity)
        half = len(images) // 2
        dataset = PairedImageDataset(images, np.arange(half), np.arange(half, 2 * half), augment=AffineAugment())

        def step(a, b):
            return gan_step(nets, loss, opt_g, opt_d, to_device(a, device), to_device(b, device), device)
    batches = iter(repeat(lambda e: epoch_loader(dataset, batch, 0, e, True, 0, pin_memory=device.type == "cuda"),
                          warmup + steps))
    for _ in range(warmup):
        step(*next(batches))
    synchronise(device)
    barrier.wait()
    start = time.perf_counter()
    for batch_items in batches:
        step(*batch_items)
    synchronise(device)
    results.put(time.perf_counter() - start)


class PackedJobDied(RuntimeError):
    """One of N concurrent jobs died (killed for memory, a crash): that N does not fit this device."""


def _collect(processes, results, jobs: int, kind: str, arch: str) -> list[float]:
    """Each job's timed wall, or PackedJobDied as soon as one job is dead without a result (the
    others would wait at the barrier for ever): the survivors are killed."""
    walls: list[float] = []
    while len(walls) < jobs:
        try:
            walls.append(results.get(timeout=5))
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead:
                for process in processes:
                    if process.is_alive():
                        process.kill()
                    process.join()
                reason = "killed (out of memory?)" if -9 in dead else f"exit code {dead[0]}"
                raise PackedJobDied(f"{jobs} concurrent {kind} {arch} jobs: one {reason}") from None
    return walls


def packed_rate(kind: str, arch: str, cfg: GeneratorConfig, images_path: Path, batch: int, steps: int, warmup: int,
                device: torch.device, jobs: int) -> float:
    """Samples/s of ``jobs`` concurrent training processes together (sum of batch x steps / slowest wall)."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(jobs), context.Queue()
    processes = [context.Process(target=_packed_job, args=(kind, arch, cfg, str(images_path), batch, steps, warmup,
                                                            str(device), barrier, results)) for _ in range(jobs)]
    for process in processes:
        process.start()
    walls = _collect(processes, results, jobs, kind, arch)
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise PackedJobDied(f"a packed {kind} {arch} job exited with {process.exitcode}")
    return jobs * batch * steps / max(walls)


def packing_table(params, images_path: Path, steps: int, warmup: int, device: torch.device,
                  job_counts: list[int]) -> dict[str, tuple[int, float]]:
    """Print samples/s for each network and job count; return each network's best (jobs, samples/s)."""
    classifier, generator = params.classifier, params.generator
    networks = [("classifier", arch, classifier.batch_size) for arch in classifier.architectures]
    networks.append(("generator", "cyclegan", generator.batch_size))
    print(f"packing on one {'GPU' if device.type == 'cuda' else 'CPU'}: samples/s of N concurrent jobs "
          f"(all together | per job | vs 1 job)", flush=True)
    print(f"{'network':9s} " + " ".join(f"{'N=' + str(n):>24s}" for n in job_counts), flush=True)
    best = {}
    for kind, arch, batch in networks:
        cells, single = [], None
        for n in job_counts:
            try:
                rate = packed_rate(kind, arch, generator, images_path, batch, steps, warmup, device, n)
            except PackedJobDied as exc:  # more jobs than the device holds: no larger N is tried
                print(f"  {exc}", flush=True)
                cells.append(f"{'does not fit':>24s}")
                cells.extend(f"{'-':>24s}" for _ in job_counts[len(cells):])
                break
            single = single or rate / n
            cells.append(f"{rate:8.1f} |{rate / n:7.1f} | x{rate / single:4.2f}")
            if arch not in best or rate > best[arch][1]:
                best[arch] = (n, rate)
        print(f"{arch:9s} " + " ".join(f"{c:>24s}" for c in cells), flush=True)
    return best


def reproduction_seconds(params, rates: dict[str, float]) -> dict[str, float]:
    """Wall seconds of each network's share of the reproduction at ``rates`` samples/s (no early stop)."""
    classifier, generator, folds = params.classifier, params.generator, params.split.folds
    pretrain = getattr(params, "pretrain", None)
    pretrain_epochs = int(getattr(pretrain, "epochs", generator.epochs)) if pretrain is not None else generator.epochs
    images_per_epoch = BIOPSY_IMAGES_PER_MODALITY_VIEW * (TRAIN_SHARE + 0.1)
    seconds = {arch: classifier.epochs * folds * 2 * 2 * images_per_epoch / rates[arch]
               for arch in classifier.architectures}
    seconds["cyclegan"] = generator.epochs * folds * 2 * PAIRS_PER_VIEW * (TRAIN_SHARE + 0.1) / rates["cyclegan"]
    seconds["pre-training"] = pretrain_epochs * 2 * PRETRAIN_PAIRS_PER_VIEW * 0.9 / rates["cyclegan"]
    return seconds


def main() -> int:
    args = parse_args()
    params = profile_params(args.profile, args.params)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        size = params.preprocess.image_size
        print(f"GPU: {torch.cuda.get_device_name(device)}; profile {args.profile} at {size} px")
    else:
        size = args.cpu_image_size
        print(f"no GPU present: measuring on the CPU ({torch.get_num_threads()} threads) at {size} px instead of "
              f"{params.preprocess.image_size} px; the extrapolation below is for this CPU")
    steps = args.steps or (20 if cuda else 2)
    warmup = args.warmup_steps if cuda else 1
    workers = args.workers if cuda else 0
    classifier, generator, folds = params.classifier, params.generator, params.split.folds
    rows = max(64, 2 * (warmup + steps) * max(classifier.batch_size, generator.batch_size))
    total_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.npy"
        np.save(path, np.random.default_rng(0).random((rows, size, size), dtype=np.float32))
        images = open_images(path)
        # Each classifier epoch: the train images once with updates, the val images once more
        # (scored at about three times the training rate; counted here as training, an upper bound).
        images_per_epoch = BIOPSY_IMAGES_PER_MODALITY_VIEW * (TRAIN_SHARE + 0.1)
        for arch in classifier.architectures:
            data_rate, model_rate = classifier_rates(arch, images, classifier.batch_size, steps, warmup, device, workers)
            seconds = classifier.epochs * folds * 2 * 2 * images_per_epoch / data_rate
            total_s += seconds
            print(f"{arch:9s} {data_rate:8.1f} img/s data path, {model_rate:8.1f} img/s model only "
                  f"({data_rate / model_rate:.2f} of model-only); {folds} folds x 2 modalities x 2 views x "
                  f"{classifier.epochs} epochs: {seconds / 60:.1f} min", flush=True)
        data_rate, model_rate = generator_rates(generator, images, steps, warmup, device, workers)
        seconds = generator.epochs * folds * 2 * PAIRS_PER_VIEW * (TRAIN_SHARE + 0.1) / data_rate
        total_s += seconds
        print(f"cyclegan  {data_rate:8.1f} pairs/s data path, {model_rate:8.1f} pairs/s model only "
              f"({data_rate / model_rate:.2f} of model-only); {folds} folds x 2 views x {generator.epochs} epochs: "
              f"{seconds / 60:.1f} min", flush=True)
        pre_s = reproduction_seconds(params, {**{a: 1.0 for a in classifier.architectures}, "cyclegan": data_rate})
        total_s += pre_s["pre-training"]
        print(f"pre-training (CDD-CESM size, 2 views): {pre_s['pre-training'] / 60:.1f} min at one job", flush=True)
        verdict = "within" if total_s <= GOAL_S else "over"
        where = "GPU" if cuda else "CPU"
        print(f"whole reproduction, one job at a time (no early stopping, upper bound): {total_s / 3600:.2f} h on "
              f"this {where}; {verdict} the 1 GPU-hour goal" + ("" if cuda else " (goal applies to one H100)"),
              flush=True)
        job_counts = [int(n) for n in args.jobs.split(",") if n.strip()]
        if job_counts:
            best = packing_table(params, path, steps, warmup, device, job_counts)
            packed = reproduction_seconds(params, {a: rate for a, (_, rate) in best.items()})
            packed_s = sum(packed.values())
            print("best packing: " + ", ".join(f"{a} N={n}" for a, (n, _) in best.items())
                  + f"; whole reproduction, pre-training included: {packed_s / 3600:.2f} h on this {where} "
                  f"({total_s / packed_s:.2f}x faster than one job at a time); "
                  f"{'within' if packed_s <= GOAL_S else 'over'} the 1 GPU-hour goal", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
