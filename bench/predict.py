"""Latency of the fused pipeline per study (one breast, FFDM CC+MLO; models loaded once).

    .venv/bin/python bench/predict.py [--studies 20] [--sizes 64 256] [--arch resnet18]

Untrained but full-size networks (latency does not depend on the weights): the classifier
architecture as built for training and CycleGAN generators of the paper's size (ngf 64, 9
residual blocks). Two cases per size: CESM acquired (nothing imputed) and CESM missing (both views
imputed). Prints p50 and p95 in milliseconds over ``--studies`` studies after one warm-up.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from virtual_biopsy.models import ResnetGenerator, build_classifier
from virtual_biopsy.serving.fused_model import FusedPipeline, predict_breast


def full_size_pipeline(arch: str, size: int) -> FusedPipeline:
    generators = {v: ResnetGenerator(channels=1, ngf=64, n_residual_blocks=9) for v in ("CC", "MLO")}
    classifiers = {(m, v): build_classifier(arch, seed=i) for i, (m, v) in
                   enumerate((m, v) for m in ("FFDM", "CESM") for v in ("CC", "MLO"))}
    half = {"CC": 0.5, "MLO": 0.5}
    return FusedPipeline(arch, size, generators, classifiers, {"FFDM": half, "CESM": half}, {"FFDM": 0.5, "CESM": 0.5})


def latencies(fused: FusedPipeline, studies: int, with_cesm: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = fused.image_size
    seconds = []
    for i in range(studies + 1):
        images = [rng.random((size, size), dtype=np.float32) for _ in range(4)]
        start = time.perf_counter()
        predict_breast(fused, images[0], images[1], *(images[2:] if with_cesm else (None, None)))
        if i:  # the first call is warm-up (allocator, kernels)
            seconds.append(time.perf_counter() - start)
    return np.array(seconds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for size in args.sizes:
        fused = full_size_pipeline(args.arch, size)
        for with_cesm in (True, False):
            ms = latencies(fused, args.studies, with_cesm)
            case = "CESM acquired " if with_cesm else "CESM imputed x2"
            print(f"{args.arch} {size:>4} px  {case}: p50 {np.percentile(ms, 50):7.1f} ms  "
                  f"p95 {np.percentile(ms, 95):7.1f} ms  (n={len(ms)})")


if __name__ == "__main__":
    main()
