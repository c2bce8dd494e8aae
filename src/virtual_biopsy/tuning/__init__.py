"""``vbiopsy tune``: Optuna search over classifier hyperparameters on validation folds only.

objective.py  the search space, the folds (train and val patients only) and the trial objective
storage.py    the Optuna storage and study that several workers share
study.py      one worker's run of a study, its MLflow run, and the best params it writes

The command line is :mod:`virtual_biopsy.cli.tune`.
"""
from virtual_biopsy.tuning.objective import (
    CHANCE,
    METRICS,
    SEARCHABLE,
    ClassifierObjective,
    TuningError,
    TuningFold,
    check_space,
    suggest,
    trial_config,
    tuning_folds,
    validation_score,
)
from virtual_biopsy.tuning.storage import default_study_name, open_storage, open_study
from virtual_biopsy.tuning.study import (
    PARENT_RUN_ATTR,
    TuneRequest,
    apply_command,
    best_overrides,
    best_params_path,
    run_tuning,
    write_best_params,
)

__all__ = [
    "CHANCE",
    "METRICS",
    "PARENT_RUN_ATTR",
    "SEARCHABLE",
    "ClassifierObjective",
    "TuneRequest",
    "TuningError",
    "TuningFold",
    "apply_command",
    "best_overrides",
    "best_params_path",
    "check_space",
    "default_study_name",
    "open_storage",
    "open_study",
    "run_tuning",
    "suggest",
    "trial_config",
    "tuning_folds",
    "validation_score",
    "write_best_params",
]
