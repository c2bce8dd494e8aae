"""The paper's evaluation (5.1.2, 5.1.3, 5.2, 5.3, 6; Tables 3, A1, 4; Figures 3, 4, 5) and the cross-validation that produces it.

Modules
    predictions  the predictions / generator-report contracts and their checked readers
    settings     fusion weights from validation, settings F, C, Ĉ, F+C, F+Ĉ on test, scoring
    robustness   the missing-CESM sweep C*, F+C* over shares of synthetic patients
    tables       Table A1, Table 3, Table 4 (ACR), headline metrics
    figures      Figure 3, Figure 4, Figure 5, ROC curves, sample grids
    scoring      one trained classifier or generator scored on its val/test images; fold summaries
    generator_cv   train and score one generator fold; choose the serving generator
    classifier_cv  train, save and score one classifier fold
    setting_inputs what each setting fuses, as run tags, params and input tables
    metrics      the paper's formulas (AUC, G-mean, MCC, SSIM, PSNR, MSE)
    gate_checks  the validation stage's checks of a fused pipeline

The stages (train_generator, train_classifier, evaluate) wire them to files and MLflow. Only the
two ``*_cv`` modules train (a fold, on its train patients); test predictions only ever meet
weights computed from validation predictions.
"""
from virtual_biopsy.evaluation.predictions import (
    PREDICTION_COLUMNS,
    PredictionsError,
    generator_report_path,
    load_ceilings,
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
    "PREDICTION_COLUMNS", "PredictionsError", "generator_report_path", "load_ceilings", "load_generator_reports",
    "load_predictions", "predictions_path", "robustness_scores", "summarize_robustness",
    "synthetic_patients", "SETTINGS", "FoldData", "fold_scores", "lesion_probabilities",
    "prepare_folds", "score", "weights_table", "acr_breakdown", "acr_breakdown_markdown",
    "acr_scores", "headline_metrics", "table3", "table3_markdown", "table_a1", "table_a1_markdown",
]
