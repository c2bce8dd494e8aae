"""Latency of `vbiopsy predict` per study and where the time goes (models loaded once, warm-up first).

    .venv/bin/python bench/predict.py [--repeats 10] [--sizes 64 256] [--generators cpu paper] [--folds 5]
                                      [--breasts 2] [--source-rows N] [--arch resnet18] [--threads N]
    .venv/bin/python bench/predict.py --quick      # 1 repetition at 64 px: checks that it runs

What one study is
    One simulated patient's DICOM files (the project's generator, ``vbiopsy synth``'s code, at
    ``--source-rows`` detector rows; default params.yaml's synth.image_height), two breasts by
    default (``--breasts 1`` for one breast, as this benchmark measured before). The same code as
    `vbiopsy predict` runs on it (serving/predict.py): read_study + preprocess_study, then
    predict_images, study_saliency, study_page + write_report, write_dicom_results.

Cases, per image size (``--sizes``)
    CESM acquired (nothing imputed: the generator size does not matter), and both CESM views
    imputed, once per generator size (``--generators``): ``cpu`` = params.yaml's generator.ngf and
    n_residual_blocks (the CPU default), ``paper`` = profiles/paper.yaml's (ngf 64, 9 residual
    blocks). Networks are untrained: latency does not depend on the weights.

Levels (cumulative), each with p50 / p95 over ``--repeats`` studies and the ratio of p50 to the
1.5 s target (issue #16)
    prediction (read + preprocess, imputation, classification and fusion), + saliency (Grad-CAM of
    the four classifiers), + HTML report (build + write), + DICOM results (SR + one map per breast
    and classifier, build + write). Every repetition times all six stages once, so the four levels
    come from the same runs; a stage's share is its median over the sum of the stage medians.
    Imputation is the generators' forward passes; classification is the rest of predict_images.

The pipeline is the served one of issue #16: ``--folds`` (default 5) folds' classifiers per modality
and view, each fold fused with its own weights, calibrated and averaged, with the conformal set
(the calibration is the identity here: it costs the same arithmetic); saliency is the mean of the
folds' Grad-CAM maps, so it runs once per fold and classifier. ``--folds 1`` times
``gate.serving: best_fold``.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from virtual_biopsy.core.config import SynthConfig
from virtual_biopsy.data.synthetic import synthesize
from virtual_biopsy.models import ResnetGenerator, build_classifier
from virtual_biopsy.serving.fused_model import FoldClassifiers, FusedPipeline, identity_calibration
from virtual_biopsy.serving.predict import (
    page_notes, predict_images, preprocess_study, read_study, study_page, study_saliency, write_dicom_results,
)
from virtual_biopsy.serving.report import ModelIdentity, write_report

ROOT = Path(__file__).resolve().parents[1]
TARGET_MS = 1500.0  # issue #16: p50 at most 1.5 s per study at 256 px on 2 CPU cores
STAGES = ("preprocess", "imputation", "classification", "saliency", "report", "dicom")
LEVELS = (("prediction", 3), ("+ saliency", 4), ("+ HTML report", 5), ("+ DICOM results", 6))  # first n stages
DEFAULT_FOLDS = 5


def ensemble_note(folds: int) -> str:
    if folds == 1:
        return "one fold (gate.serving: best_fold): one classifier per modality and view"
    return (f"fold ensemble of {folds} folds (gate.serving: ensemble): {4 * folds} classifiers, each fold fused "
            "with its own weights, calibrated and averaged; Grad-CAM of every fold, averaged")
QUICK_REPEATS, QUICK_SIZES = 1, (64,)
DEFAULT_REPEATS, DEFAULT_SIZES = 10, (64, 256)
SYNTH_PATIENTS = 3  # a few, so that one of them surely has both breasts imaged (most simulated patients do)


# ---------------------------------------------------------------------------------------------
# What is timed: generator sizes, the study, the pipeline
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratorSize:
    """A CycleGAN generator's size as a profile states it."""

    name: str
    ngf: int
    n_residual_blocks: int

    def describe(self) -> str:
        return f"{self.name} (ngf {self.ngf}, {self.n_residual_blocks} res. blocks)"


def _section_value(path: Path, section: str, key: str) -> int:
    """``section.key`` of a YAML file as an int; ValueError naming the file and key when absent."""
    data = yaml.safe_load(path.read_text()) or {}
    value = (data.get(section) or {}).get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{path}: {section}.{key} is {value!r}; this benchmark needs an integer there")
    return value


def generator_size(name: str, root: Path = ROOT) -> GeneratorSize:
    """The generator size of the CPU default (``cpu``: params.yaml) or the paper profile (``paper``)."""
    files = {"cpu": root / "params.yaml", "paper": root / "profiles" / "paper.yaml"}
    if name not in files:
        raise ValueError(f"generator size {name!r}: expected one of {sorted(files)}")
    path = files[name]
    return GeneratorSize(name, _section_value(path, "generator", "ngf"),
                         _section_value(path, "generator", "n_residual_blocks"))


def study_files(raw: Path, breasts: int) -> list[Path]:
    """Early-phase files of the first patient in ``raw``'s metadata.csv with both breasts imaged,
    keeping ``breasts`` (1 or 2) of them: the study `vbiopsy predict` would be given."""
    if breasts not in (1, 2):
        raise ValueError(f"breasts per study must be 1 or 2, got {breasts}")
    meta = pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)
    early = meta[meta["phase"] == "early"]
    sides = early.groupby("patient_id")["laterality"].nunique()
    bilateral = sorted(sides[sides == 2].index)
    if not bilateral:
        raise ValueError(f"{raw / 'metadata.csv'}: no patient with both breasts imaged; synthesize more patients")
    rows = early[early["patient_id"] == bilateral[0]]
    kept = sorted(rows["laterality"].unique())[:breasts]
    return [raw / f for f in sorted(rows[rows["laterality"].isin(kept)]["file"])]


def write_studies(folder: Path, source_rows: int, breasts: int, seed: int = 0) -> dict[bool, Path]:
    """Simulate a few patients at ``source_rows`` rows and lay out one study twice:
    ``{True: with CESM (LE + DES), False: low energy only (both CESM views imputed)}``."""
    raw = folder / "raw"
    synthesize(raw, SynthConfig(patients=SYNTH_PATIENTS, image_height=source_rows), seed=seed)
    files = study_files(raw, breasts)
    studies = {True: folder / "study_with_cesm", False: folder / "study_low_energy_only"}
    for with_cesm, study in studies.items():
        study.mkdir()
        for path in files:
            if with_cesm or "LOW_ENERGY" in path.name:
                shutil.copy(path, study)
    return studies


class TimedModule(nn.Module):
    """A network that adds the seconds of each forward pass to ``seconds``: how imputation is
    told apart from classification inside predict_images."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.net(x)
        self.seconds += time.perf_counter() - start
        return out


def untrained_pipeline(arch: str, size: int, generator: GeneratorSize, folds: int = DEFAULT_FOLDS) -> FusedPipeline:
    """The served pipeline's networks untrained: ``folds`` folds of the four classifiers as built for
    training (each fold its own seeds and weights), timed generators, the identity calibration."""
    generators = {v: TimedModule(ResnetGenerator(channels=1, ngf=generator.ngf,
                                                 n_residual_blocks=generator.n_residual_blocks))
                  for v in ("CC", "MLO")}
    pairs = [(m, v) for m in ("FFDM", "CESM") for v in ("CC", "MLO")]
    half = {"CC": 0.5, "MLO": 0.5}
    serving_folds = [FoldClassifiers(arch, k, {(m, v): build_classifier(arch, seed=4 * k + i)
                                               for i, (m, v) in enumerate(pairs)},
                                     {"FFDM": half, "CESM": half}, {"FFDM": 0.5, "CESM": 0.5})
                     for k in range(folds)]
    return FusedPipeline(arch, size, generators, serving_folds, identity_calibration(),
                         {"serving": "ensemble" if folds > 1 else "best_fold"})


def imputation_seconds(fused: FusedPipeline) -> float:
    return sum(g.seconds for g in fused.generators.values())


def run_study(fused: FusedPipeline, study: Path, out: Path) -> tuple[dict[str, float], int, int]:
    """One study through predict's code, writing under ``out``: (seconds per stage, breasts, DICOM
    files written)."""
    model = ModelIdentity("untrained benchmark pipeline", "virtual-biopsy-bench", "0")
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    seconds = {}
    _, breasts, notes = read_study(study)
    images = preprocess_study(fused, breasts)
    seconds["preprocess"] = lap()
    imputed_before = imputation_seconds(fused)
    results = predict_images(fused, images)
    predicted = lap()
    seconds["imputation"] = imputation_seconds(fused) - imputed_before
    seconds["classification"] = predicted - seconds["imputation"]
    saliency = study_saliency(fused, images, results)
    seconds["saliency"] = lap()
    write_report(study_page(fused, breasts, images, results, saliency, model, page_notes(notes, study)), out / "report")
    seconds["report"] = lap()
    written = write_dicom_results(fused, breasts, results, saliency, model, out / "dicom")
    seconds["dicom"] = lap()
    return seconds, len(breasts), len(written)


def measure(fused: FusedPipeline, study: Path, repeats: int, scratch: Path) -> dict[str, list[float]]:
    """Milliseconds per stage over ``repeats`` studies after one warm-up study (allocator, kernels,
    first imports). Each study writes into a fresh folder, removed outside the timed part."""
    stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
    for i in range(repeats + 1):
        out = scratch / f"run{i}"
        seconds, breasts, written = run_study(fused, study, out)
        shutil.rmtree(out)
        if written != 1 + 4 * breasts:
            raise RuntimeError(f"{study}: wrote {written} DICOM results, expected 1 SR + 4 maps per breast "
                               f"x {breasts} breasts")
        if i:  # the first study is warm-up
            for stage in STAGES:
                stage_ms[stage].append(seconds[stage] * 1000)
    return stage_ms


# ---------------------------------------------------------------------------------------------
# Summary and table (pure: tested in tests/test_bench_predict.py)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LevelFigure:
    name: str
    p50_ms: float
    p95_ms: float

    @property
    def ratio_to_target(self) -> float:
        return self.p50_ms / TARGET_MS


@dataclass(frozen=True)
class StageFigure:
    name: str
    p50_ms: float
    share: float  # of the sum of all stage medians


@dataclass(frozen=True)
class Summary:
    repeats: int
    levels: tuple[LevelFigure, ...]
    stages: tuple[StageFigure, ...]


def summarize(stage_ms: Mapping[str, Sequence[float]]) -> Summary:
    """The four cumulative levels (p50, p95 of the per-study sums) and each stage's median and share.

    ``stage_ms[stage]`` holds one value per study for every stage of STAGES, all of one length."""
    missing = [s for s in STAGES if s not in stage_ms]
    if missing:
        raise ValueError(f"stage timings lack {missing}; expected every stage of {list(STAGES)}")
    lengths = {s: len(stage_ms[s]) for s in STAGES}
    if len(set(lengths.values())) != 1 or not lengths[STAGES[0]]:
        raise ValueError(f"stage timings must hold the same number (>= 1) of studies per stage, got {lengths}")
    table = np.array([stage_ms[s] for s in STAGES], dtype=float)  # (stage, study)
    levels = tuple(LevelFigure(name, float(np.percentile(table[:n].sum(0), 50)), float(np.percentile(table[:n].sum(0), 95)))
                   for name, n in LEVELS)
    medians = np.median(table, axis=1)
    total = medians.sum()
    stages = tuple(StageFigure(s, float(m), float(m / total) if total > 0 else 0.0) for s, m in zip(STAGES, medians))
    return Summary(table.shape[1], levels, stages)


def format_summary(title: str, summary: Summary) -> str:
    """One case's block: the levels with the ratio to the target, then the stage breakdown."""
    lines = [f"{title}  (n={summary.repeats})",
             f"  {'level':<17}{'p50 ms':>9}{'p95 ms':>9}{'p50 / 1.5 s':>13}"]
    lines += [f"  {lv.name:<17}{lv.p50_ms:9.1f}{lv.p95_ms:9.1f}{lv.ratio_to_target:13.2f}" for lv in summary.levels]
    lines.append(f"  {'stage':<17}{'p50 ms':>9}{'share':>9}")
    lines += [f"  {st.name:<17}{st.p50_ms:9.1f}{st.share:9.0%}" for st in summary.stages]
    return "\n".join(lines)


def format_overview(rows: Sequence[tuple[str, Summary]]) -> str:
    """The last table: per case, the full study (all four levels' last) against the target."""
    width = max(len(title) for title, _ in rows)
    lines = [f"{'case':<{width}}  {'p50 ms':>8}  {'p95 ms':>8}  {'p50 / 1.5 s':>11}  largest stage"]
    for title, summary in rows:
        full = summary.levels[-1]
        largest = max(summary.stages, key=lambda st: st.share)
        lines.append(f"{title:<{width}}  {full.p50_ms:8.1f}  {full.p95_ms:8.1f}  {full.ratio_to_target:11.2f}  "
                     f"{largest.name} {largest.share:.0%}")
    return "\n".join(lines)


def cases(sizes: Sequence[int], generators: Sequence[GeneratorSize]) -> list[tuple[int, bool, GeneratorSize]]:
    """(image size, CESM acquired?, generator size) to time: acquired once per size (no generator
    runs), imputed once per generator size."""
    return [case for size in sizes
            for case in [(size, True, generators[0]), *((size, False, g) for g in generators)]]


def case_title(size: int, with_cesm: bool, generator: GeneratorSize, arch: str) -> str:
    what = "CESM acquired" if with_cesm else f"CESM imputed x2, generator {generator.describe()}"
    return f"{arch} {size:>4} px  {what}"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-study latency of `vbiopsy predict` (prediction, + Grad-CAM saliency, + HTML report, "
                    "+ DICOM results) of the fold ensemble with the time per stage and the ratio to the 1.5 s "
                    "target of issue #16.",
        epilog="Full measurement (the figures of the README): run without options on an idle machine. "
               "--quick checks that it runs.")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"studies timed per case after one warm-up (default {DEFAULT_REPEATS}; "
                             f"--quick: {QUICK_REPEATS})")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help=f"image sizes in px (default {' '.join(map(str, DEFAULT_SIZES))}; --quick: 64)")
    parser.add_argument("--generators", nargs="+", choices=("cpu", "paper"), default=["cpu", "paper"],
                        help="generator sizes for the imputed case: cpu = params.yaml, paper = profiles/paper.yaml "
                             "(ngf 64, 9 residual blocks); default both")
    parser.add_argument("--breasts", type=int, choices=(1, 2), default=2,
                        help="breasts per study (default 2: SR + 8 maps; 1 = the study of earlier figures)")
    parser.add_argument("--source-rows", type=int, default=None,
                        help="detector rows of the simulated DICOM images (default params.yaml synth.image_height)")
    parser.add_argument("--arch", default="resnet18", help="classifier architecture (default resnet18)")
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                        help=f"serving folds (default {DEFAULT_FOLDS}: the fold ensemble; 1 = gate.serving best_fold)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's own)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_REPEATS} repetition at 64 px only (sizes/repeats given explicitly still win)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.repeats < 1 or args.folds < 1 or any(s < 32 for s in args.sizes):
        parser.error(f"--repeats and --folds must be >= 1 and every size >= 32 px "
                     f"(got {args.repeats}, {args.folds}, {args.sizes})")
    if args.source_rows is None:
        args.source_rows = _section_value(ROOT / "params.yaml", "synth", "image_height")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generators = [generator_size(name) for name in args.generators]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {args.breasts} breast(s) per study, "
          f"simulated DICOM of {args.source_rows} rows; {args.repeats} timed studies per case after one warm-up")
    print(ensemble_note(args.folds))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        studies = write_studies(Path(tmp), args.source_rows, args.breasts)
        for size, with_cesm, generator in cases(args.sizes, generators):
            fused = untrained_pipeline(args.arch, size, generator, args.folds)
            summary = summarize(measure(fused, studies[with_cesm], args.repeats, Path(tmp)))
            title = case_title(size, with_cesm, generator, args.arch)
            print("\n" + format_summary(title, summary), flush=True)
            rows.append((title, summary))
    print("\nfull study (prediction + saliency + HTML report + DICOM results) against the 1.5 s target:")
    print(format_overview(rows))
    print(ensemble_note(args.folds))


if __name__ == "__main__":
    main()
