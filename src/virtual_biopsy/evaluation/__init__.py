"""The paper's evaluation (5.1.2, 5.1.3, 5.3, 6; Tables 3, A1, 4; Figures 4, 5), without I/O side effects.

Modules
    predictions  the predictions / generator-report contracts and their checked readers
    settings     fusion weights from validation, settings F, C, Ĉ, F+C, F+Ĉ on test, scoring
    robustness   the missing-CESM sweep C*, F+C* over shares of synthetic patients
    tables       Table A1, Table 3, Table 4 (ACR), headline metrics
    figures      Figure 4, Figure 5, ROC curves

The stage ``virtual_biopsy.stages.evaluate`` wires them to files and MLflow. Nothing here trains
a model, and test predictions only ever meet weights computed from validation predictions.
"""
from virtual_biopsy.evaluation.predictions import (
    PREDICTION_COLUMNS,
    PredictionsError,
    generator_report_path,
    load_generator_reports,
    load_predictions,
    predictions_path,
)
from virtual_biopsy.evaluation.robustness import robustness_scores, summarize_robustness, synthetic_patients
from virtual_biopsy.evaluation.settings import (
    SETTINGS,
    FoldData,
    fold_scores,
    lesion_probabilities,
    prepare_folds,
    score,
    weights_table,
)
from virtual_biopsy.evaluation.tables import (
    acr_breakdown,
    acr_breakdown_markdown,
    acr_scores,
    headline_metrics,
    table3,
    table3_markdown,
    table_a1,
    table_a1_markdown,
)

__all__ = [
    "PREDICTION_COLUMNS", "PredictionsError", "generator_report_path", "load_generator_reports",
    "load_predictions", "predictions_path", "robustness_scores", "summarize_robustness",
    "synthetic_patients", "SETTINGS", "FoldData", "fold_scores", "lesion_probabilities",
    "prepare_folds", "score", "weights_table", "acr_breakdown", "acr_breakdown_markdown",
    "acr_scores", "headline_metrics", "table3", "table3_markdown", "table_a1", "table_a1_markdown",
]
