"""DVC stage ``evaluate``: fusion, the paper's settings, robustness sweep, ACR breakdown, figures.

    python -m virtual_biopsy.stages.evaluate [--root .] [--params params.yaml] [--no-mlflow]

Reads the classifiers' predictions (``outputs/predictions``) and the generator reports
(``reports/generator``); writes ``reports/evaluation/*`` (tables as CSV and markdown, figures as
PNG, ROC points for ``dvc plots``) and ``reports/metrics.json`` (headline metrics for
``dvc metrics`` and the gate), then logs them to MLflow. :func:`run_evaluation` does the work
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
from virtual_biopsy.evaluation import figures
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
    """What the stage computed and where it wrote it (tables are also returned for callers/tests)."""

    output_dir: Path
    metrics_file: Path
    files: dict[str, Path]
    fold_scores: pd.DataFrame
    table_a1: pd.DataFrame
    robustness: pd.DataFrame
    acr_breakdown: pd.DataFrame
    headline: dict
    predictions: pd.DataFrame | None = None  # what was read (PREDICTION_COLUMNS)
    probabilities: pd.DataFrame | None = None  # fused p per arch, fold, setting and test lesion


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

    folds = ev.prepare_folds(predictions, tuple(cls.modalities), tuple(cls.views))
    probabilities = ev.lesion_probabilities(folds)
    scores = ev.fold_scores(probabilities)
    table_a1 = ev.table_a1(scores)
    acr = ev.acr_breakdown(ev.acr_scores(probabilities))
    both_modalities = set(cls.modalities) == {"FFDM", "CESM"}
    robustness = (ev.summarize_robustness(ev.robustness_scores(
        folds, params.evaluate.robustness_shares, params.evaluate.robustness_draws, params.seed))
        if both_modalities else pd.DataFrame(columns=["arch", "setting", "share", "metric", "mean", "sem", "n_folds"]))
    table3 = ev.table3(generator)
    roc = figures.roc_points(probabilities)
    headline = ev.headline_metrics(scores)

    out = paths.evaluation_dir
    names = ["table_a1.csv", "table_a1.md", "table3.csv", "table3.md", "robustness.csv", "acr_breakdown.csv",
             "acr_breakdown.md", "roc.csv", "fold_scores.csv", "weights.csv", "test_probabilities.csv",
             "figure4.png", "figure5.png", "roc.png"]
    if not both_modalities:
        names.remove("figure5.png")
    files = {name: out / name for name in names}
    # reports/evaluation is one set: written to a staging folder, swapped in once (no stale file stays).
    with atomic_dir(out) as staged:
        written = {name: staged / name for name in names}
        write_csv(written["table_a1.csv"], table_a1)
        write_text(written["table_a1.md"], ev.table_a1_markdown(table_a1))
        write_csv(written["table3.csv"], table3)
        write_text(written["table3.md"], ev.table3_markdown(table3))
        write_csv(written["robustness.csv"], robustness)
        write_csv(written["acr_breakdown.csv"], acr)
        write_text(written["acr_breakdown.md"], ev.acr_breakdown_markdown(acr))
        write_csv(written["roc.csv"], roc)
        write_csv(written["fold_scores.csv"], scores)
        write_csv(written["weights.csv"], ev.weights_table(folds))
        write_csv(written["test_probabilities.csv"], probabilities)
        _save_figure(figures.figure4(table_a1), written["figure4.png"])
        if both_modalities:
            _save_figure(figures.figure5(robustness), written["figure5.png"])
        _save_figure(figures.roc_figure(roc), written["roc.png"])
    write_json(paths.metrics_file, headline)
    return EvaluationResult(out, paths.metrics_file, files, scores, table_a1, robustness, acr, headline,
                            predictions, probabilities)


def _log_setting_inputs(run, result: EvaluationResult, root: Path, params: Params, arch: str, setting: str) -> None:
    run.log_params(setting_params(arch, setting, params.classifier.views, result.probabilities))
    files = sorted({relative(ev.predictions_path(ProjectPaths(root), arch, m, v), root)
                    for m, _ in SETTING_TEST_INPUTS[setting] for v in params.classifier.views})
    run.log_tables(setting_tables(result.predictions, arch, setting), name=f"predictions {arch} {setting}",
                   targets="label", predictions="p_malignant", source={"tables": ", ".join(files)})


def log_evaluation(run, result: EvaluationResult, root: str | Path, params: Params) -> None:
    """Log the evaluation to the stage's MLflow run: headline metrics and files, one child run
    per architecture × setting (its inputs as params and datasets, per-fold values as steps) and
    per robustness sweep."""
    root = Path(root)
    run.log_metrics({f"{arch}.{SETTING_SLUGS[setting]}.test_{m}": values.get(m)
                     for arch, per_setting in result.headline.items()
                     for setting, values in per_setting.items() for m in METRIC_NAMES
                     if values.get(m) is not None})
    run.log_artifacts(result.output_dir, "evaluation")
    run.log_artifact(result.metrics_file)
    for (arch, setting), group in result.fold_scores.groupby(["arch", "setting"], sort=False):
        with run.child(f"{arch} {setting}",
                       tags=setting_tags(arch, setting, SETTING_SYNTHETIC_SHARE[setting])) as child:
            _log_setting_inputs(child, result, root, params, arch, setting)
            values = result.headline[arch][setting]
            child.log_metrics({f"test_{m}": values.get(m) for m in METRIC_NAMES if values.get(m) is not None}
                              | {f"test_{m}_sem": values.get(f"{m}_sem") for m in METRIC_NAMES
                                 if values.get(f"{m}_sem") is not None})
            for _, row in group.iterrows():
                child.log_metrics({f"fold_test_{m}": row[m] for m in METRIC_NAMES}, step=int(row["fold"]))
    _log_robustness(run, result, root, params)


def _log_robustness(run, result: EvaluationResult, root: Path, params: Params) -> None:
    """One child per architecture and setting of the sweep; the share of synthetic CESM is the step."""
    robustness = result.robustness
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
    print(ev.table_a1_markdown(result.table_a1))
    print(f"evaluate: wrote {len(result.files)} files to {result.output_dir} and {result.metrics_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
