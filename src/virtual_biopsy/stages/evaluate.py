"""DVC stage ``evaluate``: fusion, the paper's settings, robustness sweep, ACR breakdown, figures.

    python -m virtual_biopsy.stages.evaluate [--root .] [--params params.yaml] [--no-mlflow]

Reads the classifiers' predictions (``outputs/predictions``) and the generator reports
(``reports/generator``); writes ``reports/evaluation/*`` (tables as CSV and markdown, figures as
PNG, ROC and reliability points for ``dvc plots``; calibration.csv/md: ECE, Brier before and after
temperature scaling and conformal coverage on the test lesions), ``reports/metrics.json`` (headline
metrics for ``dvc metrics`` and the gate) and ``outputs/calibration/<arch>.json`` (the temperature
and conformal threshold per setting, fitted on validation lesions only, that the gate puts into
the served pipeline), then logs them to MLflow. :func:`run_evaluation` does the work
without MLflow; :func:`log_evaluation` is the only part that talks to the tracking store.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from virtual_biopsy import evaluation as ev
from virtual_biopsy.core.atomic import (
    atomic_dir,
    atomic_path,
    write_csv,
    write_json,
    write_text,
)
from virtual_biopsy.core.config import ConfigError, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.evaluation.calibration_fit import serving_artefact
from virtual_biopsy.evaluation.report import (
    Evaluation,
    evaluate_settings,
    evaluation_figures,
    evaluation_tables,
    paired_metrics,
)
from virtual_biopsy.evaluation.setting_inputs import (
    SETTING_TEST_INPUTS,
    setting_params,
    setting_tables,
    setting_tags,
)
from virtual_biopsy.evaluation.settings import SETTING_SLUGS, SETTING_SYNTHETIC_SHARE
from virtual_biopsy.stages.common import (
    open_stage_run,
    relative,
    stage_inputs,
    stage_parser,
)

STAGE = "evaluate"
METRIC_NAMES = ("auc", "gmean", "mcc")


@dataclass(frozen=True)
class EvaluationResult:
    """What the stage computed (evaluation.report.Evaluation) and where it wrote it."""

    output_dir: Path
    metrics_file: Path
    files: dict[str, Path]
    tables: Evaluation


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run_evaluation(root: str | Path, params: Params) -> EvaluationResult:
    """Compute every table and figure from the predictions and generator reports; write them.

    Nothing is trained. Fusion weights come from validation predictions only (settings module).
    """
    paths = ProjectPaths(Path(root))
    cls = params.classifier
    predictions = ev.load_predictions(paths, cls.architectures, cls.modalities, cls.views)
    generator = ev.load_generator_reports(paths, params.generator.views)
    result = evaluate_settings(predictions, generator, tuple(cls.modalities), tuple(cls.views), params.evaluate,
                               params.seed, ceilings=ev.load_ceilings(paths))
    tables, drawn = evaluation_tables(result), evaluation_figures(result)
    out = paths.evaluation_dir
    # reports/evaluation is one set: written to a staging folder, swapped in once (no stale file stays).
    with atomic_dir(out) as staged:
        for name, content in tables.items():
            (write_text if isinstance(content, str) else write_csv)(staged / name, content)
        for name, fig in drawn.items():
            _save_figure(fig, staged / name)
    write_json(paths.metrics_file, result.headline)
    # The served calibration (gate puts it into the registered pipeline): one set, swapped in whole.
    with atomic_dir(paths.calibration_dir) as staged:
        for arch, entries in result.calibration_fits.items():
            write_json(staged / f"{arch}.json", serving_artefact(entries, result.conformal_level))
    return EvaluationResult(out, paths.metrics_file, {name: out / name for name in [*tables, *drawn]}, result)


def _log_setting_inputs(run, result: EvaluationResult, root: Path, params: Params, arch: str, setting: str) -> None:
    run.log_params(setting_params(arch, setting, params.classifier.views, result.tables.probabilities))
    files = sorted({relative(ev.predictions_path(ProjectPaths(root), arch, m, v), root)
                    for m, _ in SETTING_TEST_INPUTS[setting] for v in params.classifier.views})
    run.log_tables(setting_tables(result.tables.predictions, arch, setting), name=f"predictions {arch} {setting}",
                   targets="label", predictions="p_malignant", source={"tables": ", ".join(files)})


def log_evaluation(run, result: EvaluationResult, root: str | Path, params: Params) -> None:
    """Log the evaluation to the stage's MLflow run: headline metrics and files, one child run
    per architecture × setting (its inputs as params and datasets, per-fold values as steps) and
    per robustness sweep."""
    root = Path(root)
    evaluation = result.tables
    run.log_metrics({f"{arch}.{SETTING_SLUGS[setting]}.test_{m}": values.get(m)
                     for arch, per_setting in evaluation.headline.items()
                     for setting, values in per_setting.items() for m in METRIC_NAMES
                     if values.get(m) is not None})
    run.log_artifacts(result.output_dir, "evaluation")
    run.log_artifact(result.metrics_file)
    run.log_metrics(paired_metrics(evaluation.paired))
    run.log_metrics({f"{r['arch']}.{r['setting']}.share_of_ceiling": r["share"]
                     for _, r in evaluation.ceiling_shares.iterrows() if pd.notna(r["share"])})
    run.set_tags({"weight_warnings": len(evaluation.weight_warnings)})
    run.log_metrics({f"{r['arch']}.{SETTING_SLUGS[r['setting']]}.test_{key}": r[column]
                     for _, r in evaluation.calibration.iterrows()
                     for key, column in (("ece_uncalibrated", "ece_before"), ("ece_calibrated", "ece_after"),
                                         ("brier_uncalibrated", "brier_before"), ("brier_calibrated", "brier_after"),
                                         ("conformal_coverage", "coverage"), ("temperature", "temperature"))
                     if pd.notna(r[column])})
    for (arch, setting), group in evaluation.fold_scores.groupby(["arch", "setting"], sort=False):
        with run.child(f"{arch} {setting}",
                       tags=setting_tags(arch, setting, SETTING_SYNTHETIC_SHARE[setting])) as child:
            _log_setting_inputs(child, result, root, params, arch, setting)
            values = evaluation.headline[arch][setting]
            child.log_metrics({f"test_{m}": values.get(m) for m in METRIC_NAMES if values.get(m) is not None}
                              | {f"test_{m}_sem": values.get(f"{m}_sem") for m in METRIC_NAMES
                                 if values.get(f"{m}_sem") is not None})
            child.log_metrics(paired_metrics(evaluation.paired, arch, setting))
            for _, row in group.iterrows():
                child.log_metrics({f"fold_test_{m}": row[m] for m in METRIC_NAMES}, step=int(row["fold"]))
    _log_robustness(run, result, root, params)


def _log_robustness(run, result: EvaluationResult, root: Path, params: Params) -> None:
    """One child per architecture and setting of the sweep; the share of synthetic CESM is the step."""
    robustness = result.tables.robustness
    sweep = robustness[robustness["setting"] != "F"]
    for (arch, setting), group in sweep.groupby(["arch", "setting"], sort=False):
        with run.child(f"{arch} {setting} robustness",
                       tags=setting_tags(arch, setting, None) | {"synthetic_share": "0-100"}) as child:
            _log_setting_inputs(child, result, root, params, arch, setting)
            child.log_params({"robustness_shares": ",".join(str(s) for s in params.evaluate.robustness_shares),
                              "robustness_draws": params.evaluate.robustness_draws, "seed": params.seed})
            for share, at_share in group.groupby("share"):
                child.log_metrics({f"test_{r['metric']}": r["mean"] for _, r in at_share.iterrows()}, step=int(share))


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("evaluate", __doc__).parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        root = paths.root
        with open_stage_run(STAGE, paths, params, args,
                            tags={"archs": ",".join(params.classifier.architectures)}) as run:
            result = run_evaluation(root, params)
            if run:
                log_evaluation(run, result, root, params)
    except (ConfigError, ValueError, OSError) as exc:  # expected bad input: one line, exit code 1
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    print(result.files["table_a1.md"].read_text(encoding="utf-8"))
    for warning in result.tables.weight_warnings:
        print(f"evaluate: warning: fusion weight {warning}", file=sys.stderr)
    print(f"evaluate: wrote {len(result.files)} files to {result.output_dir} and {result.metrics_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
