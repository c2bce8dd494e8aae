"""DVC stage ``observer_ceiling``: what a location-known observer reads from the test folds' images.

    python -m virtual_biopsy.stages.observer_ceiling [--root .] [--params params.yaml] [--no-mlflow]

Reads the preprocessed images with their lesion masks (data/processed) and the folds; writes
reports/ceilings/ (observer_scores.csv per fold, ceilings.csv and ceilings.md: mean ± SE over
folds per modality, view and reading, plus the simulator's latent-uptake AUC where the lesion
table has it) and logs them. Nothing is trained (evaluation.ceilings). Without lesion masks (a
site with no outlines) the tables are empty and the stage says so.
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from virtual_biopsy.core.atomic import atomic_dir, write_csv, write_text
from virtual_biopsy.core.config import ConfigError
from virtual_biopsy.data.cohorts import read_folds, read_processed_index, require_inputs
from virtual_biopsy.evaluation.ceilings import ceiling_metrics, ceilings_markdown, observer_ceilings
from virtual_biopsy.stages.common import open_stage_run, stage_inputs, stage_parser

STAGE = "observer_ceiling"


def run_observer_ceiling(paths, params):
    """Compute and write the ceilings; return (Ceilings, written files)."""
    index = read_processed_index(paths)
    folds = read_folds(paths)
    require_inputs([(paths.processed_lesion_masks, "preprocess"), (paths.processed_lesions, "preprocess")])
    images = np.load(paths.processed_images, mmap_mode="r")
    masks = np.load(paths.processed_lesion_masks, mmap_mode="r")
    lesions = pd.read_csv(paths.processed_lesions, dtype={"image_id": str})
    cls = params.classifier
    result = observer_ceilings(images, masks, index, folds, lesions, tuple(cls.modalities), tuple(cls.views))
    files = {"observer_scores.csv": result.scores, "ceilings.csv": result.table,
             "ceilings.md": ceilings_markdown(result.table)}
    with atomic_dir(paths.ceilings_dir) as staged:  # one set: no stale file survives a rerun
        for name, content in files.items():
            (write_text if isinstance(content, str) else write_csv)(staged / name, content)
    return result, [paths.ceilings_dir / name for name in files]


def main(argv: list[str] | None = None) -> int:
    args = stage_parser(STAGE, __doc__).parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        with open_stage_run(STAGE, paths, params, args) as run:
            result, files = run_observer_ceiling(paths, params)
            if run:
                run.log_metrics(ceiling_metrics(result.table))
                run.log_artifacts(paths.ceilings_dir, "ceilings")
    except (ConfigError, ValueError, OSError) as exc:  # expected bad input: one line, exit code 1
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    print(files[-1].read_text(encoding="utf-8"))
    print(f"{STAGE}: wrote {len(files)} files to {paths.ceilings_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
