"""Benchmark: ingest + preprocess wall time as a ratio to merely reading every file's pixels.

    .venv/bin/python bench/preprocess.py [--root .] [--params params.yaml]
    .venv/bin/python bench/preprocess.py --full-size [--images 68] [--dataset DIR] [--without-lesions]

Default mode: uses ROOT/data/raw when it exists, else generates the default dataset (params.yaml
synth section) into a temporary folder; preprocess at preprocess.image_size; target ratio <= 2.0.

``--full-size``: the paper's geometry. Generates, with the project's own generator (vbiopsy synth
at image_height 2850, so 2850 x 2394 16-bit frames, with their lesion masks), the smallest cohort
of at least ``--images`` images (into ``--dataset`` when given and reused from there on the next
run, else a temporary folder), and measures it twice: whole, and its first half by patients (hard
links, metadata and lesion rows filtered), each in a fresh process, so that the two peak-memory
figures are each size's own; preprocess at 256 px (the paper's size); target ratio <= 1.5 and the
larger dataset's peaks within 10 % (+ 50 MiB) of the smaller one's (memory must not grow with N).
``--without-lesions`` measures the same DICOM files without the generator's lesion truth (no
lesions.csv, no masks): the dataset as issue #15 measured it, before lesion masks existed; with
them, ingest also decodes and checks every mask PNG and preprocess carries each one through.

Each measurement times, on the same files and after one untimed read to warm the OS cache:
(a) one pass of ``pydicom.dcmread(f).pixel_array`` over every file, single process; (b) the ingest
and preprocess stages' work as the stages do it (process pools of ingest.workers /
preprocess.workers, writes included; MLflow logging excluded: it does not scale with the data).
Prints both, the ratio (b)/(a), CPU seconds of the main process and of the worker processes (on
a machine shared with other work, wall time stretches but CPU time does not), and peak memory:
max resident set size of the main process (VmHWM, /proc/self/status) and of the largest worker
(``resource.getrusage(RUSAGE_CHILDREN)``; psutil is not used).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pydicom

from virtual_biopsy.core.config import Params, load_params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.stages.ingest import run_ingest
from virtual_biopsy.stages.preprocess import run_preprocess

TARGET_RATIO = 2.0
FULL_SIZE_TARGET_RATIO = 1.5
FULL_SIZE_ROWS = 2850        # paper: 2850 x 2396 detector, 0.1 mm
FULL_SIZE_PROCESSED = 256    # paper's processed size
MEMORY_GROWTH_ALLOWED = 1.10, 50.0  # larger dataset's peak <= factor * smaller's + MiB


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


def _own_peak_rss_mib() -> float:
    """This process's peak RSS since it started: VmHWM of /proc/self/status. (getrusage's
    RUSAGE_SELF keeps the peak of the process that exec'd it, here the bench, which generated the
    dataset.) getrusage where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return _max_rss_mib(resource.RUSAGE_SELF)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure(project: ProjectPaths, params: Params) -> dict:
    """Time (a) and (b) on ``project``'s raw data; peak memory and CPU of this process and its workers."""
    files = sorted(p for p in (project.raw / "images").rglob("*") if p.is_file())
    read_every_pixel_array(files)  # warm the OS file cache for both timings alike
    read_s = read_every_pixel_array(files)
    cpu_main, cpu_workers = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = run_ingest(project, params)
    ingest_s = time.perf_counter() - started
    summary = run_preprocess(project, params)
    pipeline_s = time.perf_counter() - started
    return {
        "files": len(files), "accepted": result.summary["accepted"], "lesion_masks": summary["lesion_masks"],
        "image_size": summary["image_size"], "workers": [params.ingest.workers, params.preprocess.workers],
        "read_s": read_s, "ingest_s": ingest_s, "preprocess_s": pipeline_s - ingest_s, "pipeline_s": pipeline_s,
        "ratio": pipeline_s / read_s,
        "cpu_main_s": _cpu_seconds(resource.RUSAGE_SELF) - cpu_main,
        "cpu_workers_s": _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_workers,
        "peak_main_mib": _own_peak_rss_mib(),
        "peak_worker_mib": _max_rss_mib(resource.RUSAGE_CHILDREN),
    }


def report(m: dict, target: float) -> None:
    print(f"files: {m['files']} ({m['accepted']} accepted, {m['lesion_masks']} with a lesion mask), "
          f"processed size {m['image_size']}, workers ingest/preprocess {m['workers'][0]}/{m['workers'][1]}")
    print(f"(a) read every pixel_array, 1 process: {m['read_s']:.2f} s")
    print(f"(b) ingest + preprocess:               {m['pipeline_s']:.2f} s (ingest {m['ingest_s']:.2f} s, "
          f"preprocess {m['preprocess_s']:.2f} s; CPU: main {m['cpu_main_s']:.2f} s, workers {m['cpu_workers_s']:.2f} s)")
    print(f"ratio (b)/(a): {m['ratio']:.2f} (target <= {target})")
    print(f"peak memory (max RSS): main process {m['peak_main_mib']:.0f} MiB, "
          f"largest worker {m['peak_worker_mib']:.0f} MiB")


# --- full-size mode --------------------------------------------------------------------------------

def full_size_params(params: Params, images: int) -> Params:
    """``params`` with the synth cohort of at least ``images`` images at 2850 rows, preprocessed to 256 px."""
    from virtual_biopsy.data.synthetic import draw_cohort

    def image_count(patients: int) -> int:  # LE + DES of CC and MLO, once more for a late phase
        cohort = draw_cohort(dataclasses.replace(params.synth, patients=patients), params.seed)
        return sum(4 * (2 if breast.late else 1) for breast in cohort)

    patients = max(1, math.ceil(images / 12))
    while image_count(patients) < images:
        patients += 1
    synth = dataclasses.replace(params.synth, patients=patients, image_height=FULL_SIZE_ROWS)
    return dataclasses.replace(params, synth=synth,
                               preprocess=dataclasses.replace(params.preprocess, image_size=FULL_SIZE_PROCESSED))


def write_params(params_file: Path, params: Params, target: Path) -> None:
    """params.yaml for a bench project: ``params_file`` with the full-size synth and preprocess values."""
    import yaml

    values = yaml.safe_load(params_file.read_text())
    values.setdefault("synth", {}).update(patients=params.synth.patients, image_height=params.synth.image_height)
    values.setdefault("preprocess", {}).update(image_size=params.preprocess.image_size)
    target.write_text(yaml.safe_dump(values, sort_keys=False))


def full_size_dataset(raw: Path, params: Params) -> None:
    """Generate the full-size raw folder, unless ``raw`` already holds this cohort."""
    from virtual_biopsy.data.synthetic import synthesize

    stamp = raw.parent / "bench-synth.json"
    wanted = json.loads(json.dumps({"synth": dataclasses.asdict(params.synth), "seed": params.seed}))  # tuples -> lists
    if (raw / "metadata.csv").exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        print(f"dataset: {raw} (reused)")
        return
    started = time.perf_counter()
    summary = synthesize(raw, params.synth, params.seed, force=True)
    seconds = time.perf_counter() - started
    stamp.write_text(json.dumps(wanted))
    print(f"dataset: generated {summary['images']} images of {params.synth.patients} patients at "
          f"{params.synth.image_height} rows in {seconds:.1f} s ({seconds / summary['images']:.2f} s per image)")


def first_patients(raw: Path, target: Path, share: float, lesions: bool = True) -> int:
    """``target``: a raw folder of the first ``share`` of ``raw``'s patients (hard links), with
    their lesion truth unless ``lesions`` is False; its image count."""
    metadata = pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)
    patients = sorted(metadata["patient_id"].unique())
    kept = set(patients[: max(1, round(len(patients) * share))])
    metadata = metadata[metadata["patient_id"].isin(kept)]
    table = pd.read_csv(raw / "lesions.csv", dtype=str, keep_default_na=False)
    table = table[table["file"].isin(set(metadata["file"]))] if lesions else table.iloc[:0]
    for relative in [*metadata["file"], *table["mask"]]:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.link(raw / relative, target / relative)
    metadata.to_csv(target / "metadata.csv", index=False, lineterminator="\n")
    if lesions:
        table.to_csv(target / "lesions.csv", index=False, lineterminator="\n")
    return len(metadata)


def measure_in_new_process(project_root: Path) -> dict:
    """:func:`measure` in a fresh interpreter, so its peak-memory figures are this dataset's own."""
    done = subprocess.run([sys.executable, __file__, "--measure", str(project_root)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def full_size(params_file: Path, images: int, dataset: Path | None, lesions: bool) -> int:
    params = full_size_params(load_params(params_file), images)
    with tempfile.TemporaryDirectory(prefix="vbiopsy-bench-full-") as tmp:
        generated = Path(dataset) if dataset is not None else Path(tmp) / "generated"
        generated.mkdir(parents=True, exist_ok=True)
        full_size_dataset(generated / "raw", params)
        measured = []
        for name, share in (("half", 0.5), ("whole", 1.0)):  # hard-linked copies: outputs never go to --dataset
            project = ProjectPaths(Path(tmp) / name)
            project.raw.mkdir(parents=True)
            write_params(params_file, params, project.root / "params.yaml")
            first_patients(generated / "raw", project.raw, share, lesions)
            measured.append(measure_in_new_process(project.root))
    small, large = measured
    print("lesion truth: " + ("the generator's lesions.csv and masks (ingest checks them, preprocess carries them)"
                              if lesions else "left out (--without-lesions): DICOM files and metadata.csv only"))
    for m in (small, large):
        print()
        report(m, FULL_SIZE_TARGET_RATIO)
    factor, slack = MEMORY_GROWTH_ALLOWED
    growth_ok = all(large[k] <= factor * small[k] + slack for k in ("peak_main_mib", "peak_worker_mib"))
    print(f"\npeak memory, {small['files']} -> {large['files']} images: main {small['peak_main_mib']:.0f} -> "
          f"{large['peak_main_mib']:.0f} MiB, largest worker {small['peak_worker_mib']:.0f} -> "
          f"{large['peak_worker_mib']:.0f} MiB ({'does not grow' if growth_ok else 'GROWS'} with the image count)")
    return 0 if large["ratio"] <= FULL_SIZE_TARGET_RATIO and growth_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=".", type=Path)
    parser.add_argument("--params", default=None, type=Path)
    parser.add_argument("--full-size", action="store_true",
                        help=f"a generated dataset at {FULL_SIZE_ROWS} rows, preprocessed to {FULL_SIZE_PROCESSED} px")
    parser.add_argument("--images", type=int, default=68, help="full-size mode: at least this many images")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="full-size mode: keep the generated project here (reused when it matches)")
    parser.add_argument("--without-lesions", action="store_true",
                        help="full-size mode: measure the DICOM files and metadata.csv without the lesion truth")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    if args.measure is not None:
        project = ProjectPaths(args.measure)
        print(json.dumps(measure(project, load_params(project.root / "params.yaml"))))
        return 0
    params_file = args.params or args.root / "params.yaml"
    if args.full_size:
        return full_size(params_file, args.images, args.dataset, not args.without_lesions)
    with tempfile.TemporaryDirectory(prefix="vbiopsy-bench-") as tmp:
        project = prepare_project(args.root, params_file, Path(tmp))
        m = measure(project, load_params(project.root / "params.yaml"))
    report(m, TARGET_RATIO)
    return 0 if m["ratio"] <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
