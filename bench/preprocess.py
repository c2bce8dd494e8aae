"""Benchmark: ingest + preprocess wall time as a ratio to merely reading every file's pixels.

    .venv/bin/python bench/preprocess.py [--root .] [--params params.yaml] [--keep]

Uses ROOT/data/raw when it exists, else generates the default dataset (params.yaml synth section)
into a temporary folder. Times, on the same files and after one untimed read to warm the OS
cache: (a) one pass of ``pydicom.dcmread(f).pixel_array`` over every file, single process;
(b) the ingest and preprocess stages' work as the stages do it (process pools of
ingest.workers / preprocess.workers, writes included; MLflow logging excluded: it does not scale
with the data). Prints both, the ratio (target <= 2.0 on 2 cores) and peak memory (max resident
set size of this process and, separately, of its worker processes).
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from virtual_biopsy.core.config import load_params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.stages.ingest import run_ingest
from virtual_biopsy.stages.preprocess import run_preprocess

TARGET_RATIO = 2.0


def read_every_pixel_array(files: list[Path]) -> float:
    """Seconds for one single-process pass decoding every file's pixel data."""
    started = time.perf_counter()
    for path in files:
        pydicom.dcmread(path).pixel_array
    return time.perf_counter() - started


def prepare_project(root: Path, params_file: Path, work: Path) -> ProjectPaths:
    """A project folder whose data/raw holds the benchmark dataset."""
    project = ProjectPaths(work)
    shutil.copy(params_file, work / "params.yaml")
    raw = root / "data" / "raw"
    if (raw / "metadata.csv").exists():
        (work / "data").mkdir(parents=True)
        (work / "data" / "raw").symlink_to(raw.resolve())
        print(f"dataset: {raw}")
        return project
    from virtual_biopsy.data.synthetic import synthesize

    params = load_params(params_file)
    started = time.perf_counter()
    synthesize(project.raw, params.synth, params.seed)
    print(f"dataset: generated default synth dataset in {time.perf_counter() - started:.1f} s")
    return project


def _max_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=".", type=Path)
    parser.add_argument("--params", default=None, type=Path)
    args = parser.parse_args(argv)
    params_file = args.params or args.root / "params.yaml"
    with tempfile.TemporaryDirectory(prefix="vbiopsy-bench-") as tmp:
        project = prepare_project(args.root, params_file, Path(tmp))
        params = load_params(project.root / "params.yaml")
        files = sorted(p for p in (project.raw / "images").rglob("*") if p.is_file())
        read_every_pixel_array(files)  # warm the OS file cache for both timings alike
        read_s = read_every_pixel_array(files)
        started = time.perf_counter()
        result = run_ingest(project, params)
        ingest_s = time.perf_counter() - started
        summary = run_preprocess(project, params)
        pipeline_s = time.perf_counter() - started
    ratio = pipeline_s / read_s
    print(f"files: {len(files)} ({result.summary['accepted']} accepted), image size {summary['image_size']}, "
          f"workers ingest/preprocess {params.ingest.workers}/{params.preprocess.workers}")
    print(f"(a) read every pixel_array, 1 process: {read_s:.2f} s")
    print(f"(b) ingest + preprocess:               {pipeline_s:.2f} s (ingest {ingest_s:.2f} s, "
          f"preprocess {pipeline_s - ingest_s:.2f} s)")
    print(f"ratio (b)/(a): {ratio:.2f} (target <= {TARGET_RATIO})")
    print(f"peak memory (max RSS): main process {_max_rss_mib(resource.RUSAGE_SELF):.0f} MiB, "
          f"largest worker {_max_rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
