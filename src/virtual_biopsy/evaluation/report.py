"""The whole evaluation computed from the classifiers' predictions and the generator reports, as
tables and figures in memory (the evaluate stage writes them and logs them; nothing here does I/O).

Order of work (paper 6): fusion weights per fold from validation lesions only (settings), the
settings' fused test probabilities, their scores per fold (Table A1), the paired tests of the
claimed differences (paired_tests), the weights' stability (weight_stability), the ACR breakdown
(Table 4), the missing-CESM sweep (robustness, Figure 5), the generator quality (Table 3) and the
ROC curves.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from virtual_biopsy.core.config import EvaluateConfig
from virtual_biopsy.evaluation import figures
from virtual_biopsy.evaluation.calibration_fit import (
    calibration_markdown,
    fit_calibrations,
    score_calibration,
    validation_probabilities,
)
from virtual_biopsy.evaluation.ceilings import ceiling_shares, ceilings_markdown, shares_markdown
from virtual_biopsy.evaluation.paired_tests import paired_comparisons, paired_comparisons_markdown
from virtual_biopsy.evaluation.robustness import robustness_scores, summarize_robustness
from virtual_biopsy.evaluation.settings import SETTING_SLUGS, fold_scores, lesion_probabilities, prepare_folds
from virtual_biopsy.evaluation.tables import (
    acr_breakdown,
    acr_breakdown_markdown,
    acr_scores,
    headline_metrics,
    table3,
    table3_lesion_markdown,
    table3_markdown,
    table_a1,
    table_a1_markdown,
)
from virtual_biopsy.evaluation.weight_stability import (
    weight_stability,
    weight_stability_markdown,
    weight_warnings,
)

ROBUSTNESS_COLUMNS = ["arch", "setting", "share", "metric", "mean", "sem", "n_folds"]


@dataclass(frozen=True)
class Evaluation:
    """Every table of the evaluation (figures are drawn from them by :func:`evaluation_figures`)."""

    predictions: pd.DataFrame    # what was read (PREDICTION_COLUMNS)
    probabilities: pd.DataFrame  # fused p per arch, fold, setting and test lesion
    fold_scores: pd.DataFrame
    table_a1: pd.DataFrame
    paired: pd.DataFrame         # paired tests of the settings' AUC differences
    weights: pd.DataFrame        # every fusion weight with its validation lesions and MCC interval
    acr_breakdown: pd.DataFrame
    robustness: pd.DataFrame
    table3: pd.DataFrame
    roc: pd.DataFrame
    headline: dict
    ceilings: pd.DataFrame       # observer ceilings (evaluation.ceilings), empty without lesion masks
    ceiling_shares: pd.DataFrame  # F and C AUC as a share of their ceiling, per architecture
    calibration: pd.DataFrame    # per arch x setting: temperature, qhat, ECE/Brier before/after, coverage
    reliability: pd.DataFrame    # reliability points before/after calibration (test lesions)
    calibration_fits: dict       # arch -> setting -> {temperature, qhat, n_val} (the serving artefact's settings)
    conformal_level: float

    @property
    def weight_warnings(self) -> list[str]:
        return weight_warnings(self.weights)

    @property
    def has_robustness(self) -> bool:
        return not self.robustness.empty


def evaluate_settings(predictions: pd.DataFrame, generator_reports: dict, modalities: tuple[str, ...],
                      views: tuple[str, ...], cfg: EvaluateConfig, seed: int,
                      ceilings: pd.DataFrame | None = None) -> Evaluation:
    """Compute the evaluation; ``seed`` drives the robustness draws and the bootstrap resamples;
    ``ceilings`` is the observer_ceiling stage's table (evaluation.ceilings), None when absent."""
    folds = prepare_folds(predictions, tuple(modalities), tuple(views))
    probabilities = lesion_probabilities(folds)
    fits = fit_calibrations(validation_probabilities(folds, predictions), cfg.conformal_level)
    calibrated, reliability = score_calibration(probabilities, fits, cfg.calibration_bins)
    scores = fold_scores(probabilities)
    headline = headline_metrics(scores)
    both_modalities = set(modalities) == {"FFDM", "CESM"}
    robustness = (summarize_robustness(robustness_scores(folds, cfg.robustness_shares, cfg.robustness_draws, seed))
                  if both_modalities else pd.DataFrame(columns=ROBUSTNESS_COLUMNS))
    return Evaluation(
        predictions=predictions, probabilities=probabilities, fold_scores=scores, table_a1=table_a1(scores),
        paired=paired_comparisons(probabilities, n_boot=cfg.bootstrap_resamples, seed=seed),
        weights=weight_stability(folds, seed=seed, draws=cfg.bootstrap_resamples,
                                 min_per_class=cfg.min_weight_lesions),
        acr_breakdown=acr_breakdown(acr_scores(probabilities)), robustness=robustness,
        table3=table3(generator_reports), roc=figures.roc_points(probabilities), headline=headline,
        ceilings=ceilings if ceilings is not None else pd.DataFrame(),
        ceiling_shares=ceiling_shares(ceilings, headline) if ceilings is not None and len(ceilings) else pd.DataFrame(),
        calibration=calibrated, reliability=reliability, calibration_fits=fits, conformal_level=cfg.conformal_level,
    )


def evaluation_tables(result: Evaluation) -> dict[str, pd.DataFrame | str]:
    """File name -> content of every table the evaluate stage writes (CSV frames, markdown text)."""
    a1 = table_a1_markdown(result.table_a1)
    if not result.paired.empty:
        a1 += "\nPaired comparisons (pooled out-of-fold test lesions):\n\n" + paired_comparisons_markdown(result.paired)
    if not result.ceilings.empty:
        a1 += ("\nObserver ceilings (a reader told where the lesion is; same test folds; AUC mean ± SE):\n\n"
               + ceilings_markdown(result.ceilings)
               + "\nF and C as a share of their ceiling ((AUC - 0.5) / (ceiling - 0.5); ceiling: contrast, views fused):\n\n"
               + shares_markdown(result.ceiling_shares))
    return {
        "table_a1.csv": result.table_a1, "table_a1.md": a1,
        "paired_tests.csv": result.paired,
        "table3.csv": result.table3, "table3.md": table3_markdown(result.table3) + "\nLesion-aware (breast only; inside the lesion mask):\n\n"
        + table3_lesion_markdown(result.table3),
        "robustness.csv": result.robustness,
        "acr_breakdown.csv": result.acr_breakdown, "acr_breakdown.md": acr_breakdown_markdown(result.acr_breakdown),
        "roc.csv": result.roc, "fold_scores.csv": result.fold_scores,
        "weights.csv": result.weights, "weights.md": weight_stability_markdown(result.weights),
        "test_probabilities.csv": result.probabilities,
        "calibration.csv": result.calibration,
        "calibration.md": calibration_markdown(result.calibration, result.conformal_level),
        "reliability.csv": result.reliability,
        **({"ceiling_shares.csv": result.ceiling_shares} if not result.ceiling_shares.empty else {}),
    }


def evaluation_figures(result: Evaluation) -> dict[str, object]:
    """File name -> matplotlib figure: Figure 4, Figure 5 (when both modalities ran), ROC curves."""
    out = {"figure4.png": figures.figure4(result.table_a1)}
    if result.has_robustness:
        out["figure5.png"] = figures.figure5(result.robustness)
    out["roc.png"] = figures.roc_figure(result.roc)
    out["reliability.png"] = figures.reliability_figure(result.reliability)
    return out


PAIRED_METRICS = {"auc_difference": "auc_difference", "delong_p": "delong_p", "boot_low": "auc_difference_ci_low",
                  "boot_high": "auc_difference_ci_high"}


def paired_metrics(paired: pd.DataFrame, arch: str | None = None, setting: str | None = None) -> dict[str, float]:
    """MLflow metrics of the paired tests: for the stage run (``arch`` None) every comparison as
    ``<arch>.<A>_vs_<B>.<metric>``; for one setting's run its comparisons as ``vs_<B>_<metric>``."""
    out: dict[str, float] = {}
    for _, row in paired.iterrows():
        a, b = SETTING_SLUGS[row["setting_a"]], SETTING_SLUGS[row["setting_b"]]
        if arch is None:
            out |= {f"{row['arch']}.{a}_vs_{b}.{name}": row[column] for column, name in PAIRED_METRICS.items()}
        elif row["arch"] == arch and row["setting_a"] == setting:
            out |= {f"vs_{b}_{name}": row[column] for column, name in PAIRED_METRICS.items()}
    return out
