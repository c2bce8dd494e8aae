"""``vbiopsy tune``: Optuna search over classifier hyperparameters on validation folds only."""
