"""`vbiopsy tune`: an Optuna search over one classifier's hyperparameters, tracked in MLflow.

    vbiopsy tune [--arch resnet18 --modality CESM --view CC] [--trials 20] [--metric mcc|auc]
                 [--storage sqlite:///optuna.db | postgresql+psycopg2://...] [--folds K] [--apply]
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from virtual_biopsy.core.config import ARCHITECTURES, MODALITIES, VIEWS, ConfigError, load_params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.tuning import objective, storage, study
from virtual_biopsy.tuning.objective import METRICS, TuningError
from virtual_biopsy.tuning.study import TuneRequest, best_params_path, run_tuning

COMMAND = "tune"


def description() -> str:
    """The usage above, then the sections of the tuning modules' docstrings (written once, there)."""
    sections = [module.__doc__.split("\n\n", 1)[1].strip("\n") for module in (objective, storage, study)]
    return "\n\n".join([__doc__.strip(), *sections])


def _count(text: str) -> int:
    """An integer count; MLflow passes numeric parameters as e.g. ``20.0``."""
    value = float(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text}")
    return int(value)


def run_tune_command(args: argparse.Namespace) -> int:
    paths = ProjectPaths(Path(args.root))
    try:
        params = load_params(args.params or paths.root / "params.yaml")
        request = TuneRequest(
            arch=args.arch, modality=args.modality, view=args.view,
            trials=args.trials if args.trials is not None else params.tune.trials,
            metric=args.metric or params.tune.metric, storage=args.storage or params.tune.storage,
            study_name=args.study, max_folds=args.folds, device=args.device, worker=args.worker,
            use_mlflow=not args.no_mlflow,
        )
        result = run_tuning(paths, params, request)
    except (ConfigError, TuningError, FileNotFoundError, ValueError) as exc:
        print(f"{COMMAND}: {exc}", file=sys.stderr)
        return 1
    command = " ".join(shlex.quote(c) for c in result["command"])
    print(f"{COMMAND}: best validation {request.metric} {result['value']:.4f} (trial {result['trial']} of study "
          f"{result['study']}) -> {best_params_path(paths)}")
    print(command)
    if args.apply:
        return subprocess.call(result["command"], cwd=paths.root)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        COMMAND, help="Optuna search over a classifier's hyperparameters (validation MCC/AUC), tracked in MLflow",
        description=description(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default="resnet18", choices=ARCHITECTURES)
    parser.add_argument("--modality", default="CESM", choices=MODALITIES)
    parser.add_argument("--view", default="CC", choices=VIEWS)
    parser.add_argument("--trials", type=_count, default=None, help="trials this worker runs (default tune.trials)")
    parser.add_argument("--metric", choices=METRICS, default=None, help="validation metric (default tune.metric)")
    parser.add_argument("--storage", default=None, help="SQLAlchemy URL of the study (default tune.storage)")
    parser.add_argument("--study", default=None, help="study name (default classifier-ARCH-MOD-VIEW-METRIC)")
    parser.add_argument("--folds", type=_count, default=None, help="tune on the first K folds only (default all)")
    parser.add_argument("--worker", type=int, default=0, help="index of this worker (seeds its sampler)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda ...)")
    parser.add_argument("--root", default=".", help="project root")
    parser.add_argument("--params", default=None, help="params file (default ROOT/params.yaml)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--apply", action="store_true", help="run the printed dvc exp run command")
    parser.set_defaults(func=run_tune_command)


def main(argv: list[str] | None = None) -> int:
    """``python -m virtual_biopsy.cli.tune ARGS`` is ``vbiopsy tune ARGS``."""
    parser = argparse.ArgumentParser(prog="vbiopsy")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
