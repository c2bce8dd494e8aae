"""DVC stage pretrain_cohort: the simulated CDD-CESM release that pre-training imports by default.

    python -m virtual_biopsy.stages.pretrain_cohort [--root .] [--params params.yaml]

Writes data/external/cdd-cesm/ in the CDD-CESM release's layout (JPEGs in "Low energy images of
CDD-CESM" / "Subtracted images of CDD-CESM", "Radiology manual annotations.xlsx" with sheet
"all", the VIA segmentation CSV, SIMULATED.txt): a second simulated cohort with its own seed and
scanner look (params ``pretrain.cohort``; data/cdd_cesm_cohort.py). With the real release, set
``pretrain.release_dir`` to its folder: import_pretrain then reads that one, and this stage's
output goes unused. A folder at data/external/cdd-cesm that this stage did not write is never
replaced (exit 1 naming it). Nothing is logged to MLflow: like ``vbiopsy synth`` it makes data.
"""
from __future__ import annotations

import sys

from virtual_biopsy.core.config import ConfigError
from virtual_biopsy.data.cdd_cesm_cohort import CohortError, write_cohort
from virtual_biopsy.stages.common import stage_inputs, stage_parser

STAGE = "pretrain_cohort"


def main(argv: list[str] | None = None) -> int:
    args = stage_parser(STAGE, __doc__, mlflow_flag=False).parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        counts = write_cohort(paths.simulated_release, params.pretrain.cohort, params.synth)
    except (ConfigError, CohortError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    print(f"{STAGE}: {counts['images']} JPEGs of {counts['patients']} simulated patients ({counts['breasts']} breasts, "
          f"{counts['lesion_outlines']} lesion outlines) in the CDD-CESM layout -> {paths.simulated_release}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
