"""Cost of ``predict --report``'s saliency per study: Grad-CAM of the four classifiers on two breasts.

    .venv/bin/python bench/saliency.py [--studies 10] [--sizes 32 256] [--arch resnet18]

Untrained networks of the served architecture (the cost does not depend on the weights); one study
is two breasts, so each classifier runs once on a batch of two images (serving/saliency.py's
pipeline_saliency, as predict calls it). Prints p50 and p95 in milliseconds after one warm-up.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from virtual_biopsy.models import ResnetGenerator, build_classifier
from virtual_biopsy.serving.fused_model import FusedPipeline
from virtual_biopsy.serving.saliency import pipeline_saliency

BREASTS_PER_STUDY = 2


def untrained_pipeline(arch: str, size: int) -> FusedPipeline:
    generators = {v: ResnetGenerator(channels=1, ngf=4, n_residual_blocks=1) for v in ("CC", "MLO")}  # unused here
    classifiers = {(m, v): build_classifier(arch, seed=i) for i, (m, v) in
                   enumerate((m, v) for m in ("FFDM", "CESM") for v in ("CC", "MLO"))}
    half = {"CC": 0.5, "MLO": 0.5}
    return FusedPipeline.single_fold(arch, size, generators, classifiers, {"FFDM": half, "CESM": half},
                                     {"FFDM": 0.5, "CESM": 0.5})


def study_milliseconds(pipeline: FusedPipeline, studies: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = pipeline.image_size
    out = []
    for i in range(studies + 1):
        ffdm = [{v: rng.random((size, size), dtype=np.float32) for v in ("CC", "MLO")} for _ in range(BREASTS_PER_STUDY)]
        cesm = [{v: rng.random((size, size), dtype=np.float32) for v in ("CC", "MLO")} for _ in range(BREASTS_PER_STUDY)]
        start = time.perf_counter()
        pipeline_saliency(pipeline.folds[0], ffdm, cesm)  # one fold's four classifiers
        if i:  # the first study is warm-up
            out.append(time.perf_counter() - start)
    return np.array(out) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
          f"{BREASTS_PER_STUDY} breasts x 4 classifiers per study")
    for size in args.sizes:
        ms = study_milliseconds(untrained_pipeline(args.arch, size), args.studies)
        print(f"{args.arch} {size:>4} px  Grad-CAM per study: p50 {np.percentile(ms, 50):7.1f} ms  "
              f"p95 {np.percentile(ms, 95):7.1f} ms  (n={len(ms)})")


if __name__ == "__main__":
    main()
