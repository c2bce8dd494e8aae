"""virtual-biopsy: multimodal breast-cancer virtual biopsy (FFDM + CESM) with CESM imputation.

Every top-level name is a folder that is one layer; a module imports only from its own layer or
below (``tests/test_architecture.py`` enforces it, and that nothing imports a stage module):

0. core        config (frozen dataclasses from params.yaml), paths, atomic writes, process pool
1. dicom       DICOM reading, writing, CESM marks, synthetic-CESM objects
2. data        simulated test bed, importers, ingest, preprocess, splits, quality, cohorts
   models      networks, weight files, MCC late fusion (no I/O beyond weight files, no MLflow)
3. training    the fit loop, the two trainers, datasets, augmentation, checkpoints, torchrun
4. evaluation  metrics, scoring, the paper's settings, tables, figures, gate checks
5. mlops       every MLflow call: runs, registry, the pipeline's parent run, the team server
6. serving     the fused pipeline (Algorithm 1 as a pyfunc), cohort imputation, predict
   tuning      Optuna search over classifier hyperparameters (validation folds only)
7. stages      one thin module per DVC stage (nothing imports them)
   cli         ``vbiopsy`` and its sub-commands
"""
__version__ = "0.1.0"
