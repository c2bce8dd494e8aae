"""DVC stage impute: synthetic CESM for every FFDM (LE) image, out of fold (paper Algorithm 1, step 1).

    python -m virtual_biopsy.stages.impute [--root .] [--params params.yaml] [--device cpu] [--no-mlflow]

Which model imputes which image
    Each patient is in exactly one fold's *test* set (data/splits). That fold's generator was
    trained on that fold's train patients only, so it never saw the patient: every LE image is
    imputed by the generator of the fold that tests its patient (data/imputation.py).

Outputs (atomic)
    data/imputed/images.npy   float32 (N, S, S) in [0, 1]
    data/imputed/index.csv    the LE row's manifest columns with modality CESM and synthetic True,
                              a new image_id, source_image_id, generator_view, generator_fold, row

``vbiopsy impute --dicom-out DIR`` (cli/impute.py) writes these images as DICOM for a clinician.
"""
from __future__ import annotations

import sys

import pandas as pd

from virtual_biopsy.core.config import ConfigError
from virtual_biopsy.data.imputation import ImputeError
from virtual_biopsy.serving.imputation import impute_out_of_fold, write_imputed
from virtual_biopsy.stages.common import add_device_option, stage_inputs, stage_parser

STAGE = "impute"


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__)
    add_device_option(parser, "generator")
    args = parser.parse_args(argv)
    from virtual_biopsy.mlops import tracking
    from virtual_biopsy.training.loop import resolve_device

    try:
        paths, params = stage_inputs(args)
        with tracking.stage_run(STAGE, root=paths.root, params=params, enabled=not args.no_mlflow) as run:
            synthetic, index = impute_out_of_fold(paths, params, str(resolve_device(args.device or params.generator.device)))
            write_imputed(paths, synthetic, index)
            counts = index.groupby(["generator_view", "generator_fold"]).size()
            run.log_metrics({"images": len(index), **{f"images_{v}_fold{f}": n for (v, f), n in counts.items()}})
    except (ConfigError, ImputeError, FileNotFoundError, ValueError, RuntimeError, pd.errors.ParserError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    print(f"{STAGE}: {len(index)} synthetic CESM images -> {paths.imputed_images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
