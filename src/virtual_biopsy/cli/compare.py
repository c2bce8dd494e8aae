"""`vbiopsy compare-generators A.json B.json`: two generator runs of one view, fold by fold."""
from __future__ import annotations

import argparse
import sys

# The metrics' names only: the evaluation package (torch, pandas) is imported when the command
# runs, so that building the parser for any command stays fast.
COMPARED_METRICS = ("mse", "psnr", "ssim", "breast_psnr", "breast_ssim", "enhancement_error", "contrast_ratio_share")


def run(args: argparse.Namespace) -> int:
    from virtual_biopsy.evaluation.generator_comparison import (
        ComparisonError,
        compare_generator_reports,
        comparison_markdown,
        read_generator_report,
    )

    names = (args.name_a, args.name_b)
    try:
        a, b = read_generator_report(args.a), read_generator_report(args.b)
        table = compare_generator_reports(a, b, args.metrics, names=(args.a, args.b))
    except ComparisonError as exc:
        print(f"vbiopsy compare-generators: {exc}", file=sys.stderr)
        return 1
    print(comparison_markdown(table, str(a.get("view")), names), end="")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare-generators",
        help="compare two train_generator reports of one view fold by fold (paired t-test)",
        description="Compare two runs of one view's generator cross-validation (reports/generator/<VIEW>.json "
                    "of train_generator, e.g. with and without pre-training: save the first report, run "
                    "`dvc exp run -S generator.pretrained_weights=null train_generator@CC`, compare). Both runs "
                    "must share the split; prints mean ± SE over folds, the paired difference and the paired "
                    "t-test's two-sided p per metric.")
    parser.add_argument("a", help="first report (JSON)")
    parser.add_argument("b", help="second report (JSON)")
    parser.add_argument("--name-a", default="A", help="column name of the first run (default A)")
    parser.add_argument("--name-b", default="B", help="column name of the second run (default B)")
    parser.add_argument("--metrics", nargs="+", default=list(COMPARED_METRICS),
                        help=f"per-fold metrics to compare (default: {' '.join(COMPARED_METRICS)})")
    parser.set_defaults(func=run)
