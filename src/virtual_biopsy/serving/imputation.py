"""Algorithm 1, step 1 over a whole cohort: synthetic CESM for every LE image, out of fold.

Each LE image is imputed by the fold generator that never saw its patient (data.imputation plans
which); the result is ``data/imputed`` (``images.npy`` + ``index.csv``), which the classifiers'
Ĉ setting and ``vbiopsy impute --dicom-out`` read.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from virtual_biopsy.core.atomic import atomic_dir, staged_path, write_csv
from virtual_biopsy.core.config import Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import require_inputs
from virtual_biopsy.data.imputation import ImputeError, imputed_index, plan_imputation


def impute_out_of_fold(paths: ProjectPaths, params: Params, device: str = "cpu") -> tuple[np.ndarray, pd.DataFrame]:
    """(synthetic images (N, S, S), imputed index) for every LE image of ``generator.views``."""
    # Imported here, not at the top: `vbiopsy --help` imports the impute command, and torch takes seconds.
    from virtual_biopsy.models.weights import load_generator_weights
    from virtual_biopsy.training.datasets import open_images
    from virtual_biopsy.training.generator_trainer import generate

    require_inputs([(paths.processed_images, "preprocess"), (paths.processed_index, "preprocess"),
                    (paths.splits, "split")])
    images = open_images(paths.processed_images)
    plan = plan_imputation(pd.read_csv(paths.processed_index), pd.read_csv(paths.splits), params.generator.views)
    synthetic = np.empty((len(plan), *images.shape[1:]), dtype=np.float32)
    for (view, fold), group in plan.groupby(["generator_view", "generator_fold"]):
        generator, info = load_generator_weights(paths.generator_weights(view, fold))
        if info.get("view") != view or int(info.get("fold", -1)) != fold:
            raise ImputeError(f"{paths.generator_weights(view, fold)}: holds view {info.get('view')} "
                              f"fold {info.get('fold')}, expected {view} fold {fold}")
        synthetic[group.index.to_numpy()] = generate(
            generator, np.asarray(images[group["row"].to_numpy()]), params.generator.batch_size, device
        )
    return synthetic, imputed_index(plan)


def write_imputed(paths: ProjectPaths, synthetic: np.ndarray, index: pd.DataFrame) -> None:
    """Write data/imputed: the images and the index that describes them, swapped in as one set."""
    with atomic_dir(paths.imputed_dir) as staged:
        np.save(staged_path(paths.imputed_images, paths.imputed_dir, staged), synthetic)
        write_csv(staged_path(paths.imputed_index, paths.imputed_dir, staged), index)


def imputed_outputs_stale(paths: ProjectPaths, params: Params) -> bool:
    """True when data/imputed is missing or older than a generator or the processed data."""
    index = paths.imputed_index
    if not index.exists() or not paths.imputed_images.exists():
        return True
    inputs = [paths.processed_images, paths.splits,
              *(p for v in params.generator.views for p in paths.generator_dir(v).glob("fold*.pt"))]
    return any(p.exists() and p.stat().st_mtime > index.stat().st_mtime for p in inputs)
