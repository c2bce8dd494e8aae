"""DVC stage ``saliency_eval``: does Grad-CAM point at the lesion? (pointing game, mass in the lesion)

    python -m virtual_biopsy.stages.saliency_eval [--root .] [--params params.yaml] [--no-mlflow]

For each architecture, fold, modality and view: Grad-CAM (serving/saliency.py) of fold k's
classifier f_{m,v} on fold k's TEST lesion images -- real FFDM, real CESM, and the imputed CESM
(Ĉ) of the LE images -- scored against the lesion masks of preprocess within the breast
(evaluation/saliency_metrics.py). A fused setting's per-view maps are its classifiers' per-image
maps, so F+C and F+Ĉ pool the images of their inputs. Writes reports/saliency/ (pointing_game.csv,
summary.json, examples.png) and logs them. Nothing is trained.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd

from virtual_biopsy.core.atomic import atomic_dir, write_csv, write_text
from virtual_biopsy.core.config import ConfigError
from virtual_biopsy.data.cohorts import read_folds, read_imputed_index, read_processed_index, require_inputs, synthetic_images
from virtual_biopsy.data.imputation import test_fold_of_patients
from virtual_biopsy.evaluation import saliency_metrics as sm
from virtual_biopsy.evaluation.ceilings import observer_frame
from virtual_biopsy.evaluation.saliency_figure import saliency_examples_figure
from virtual_biopsy.evaluation.setting_inputs import SETTING_TEST_INPUTS
from virtual_biopsy.models.weights import load_classifier
from virtual_biopsy.serving.saliency import grad_cam
from virtual_biopsy.stages.common import open_stage_run, stage_inputs, stage_parser

STAGE = "saliency_eval"
BATCH = 64        # images per Grad-CAM call: bounded memory at any image size
EXAMPLES = 4      # panels of examples.png: the first arch's first test images of each input


def _images_to_score(paths, params):
    """(frame of images to score, processed images, imputed images, masks)."""
    index, folds = read_processed_index(paths), read_folds(paths)
    require_inputs([(paths.processed_lesion_masks, "preprocess")])
    imputed_index = read_imputed_index(paths)
    images = np.load(paths.processed_images, mmap_mode="r")
    imputed = np.load(paths.imputed_images, mmap_mode="r")
    masks = np.load(paths.processed_lesion_masks, mmap_mode="r")
    cls = params.classifier
    real = observer_frame(index, folds, masks, tuple(cls.modalities), tuple(cls.views))
    synthetic = (pd.concat([synthetic_images(imputed_index, index, v) for v in cls.views], ignore_index=True)
                 if "CESM" in cls.modalities else pd.DataFrame(columns=["image_id", "patient_id", "row"]))
    frame = sm.saliency_images(real, synthetic, index, test_fold_of_patients(folds)) if len(real) else \
        pd.DataFrame(columns=list(sm.IMAGE_COLUMNS))
    frame = frame[frame["fold"].isin(set(folds["fold"]))].reset_index(drop=True)
    keep = sm.lesions_in_breast(masks[frame["mask_row"].to_numpy()],
                                sm.breast_regions(images[frame["breast_row"].to_numpy()])) if len(frame) else []
    return frame[np.asarray(keep, bool)].reset_index(drop=True), images, imputed, masks


def _maps(arch, frame, images, imputed, paths):
    """Grad-CAM of every image in ``frame`` by its fold's classifier of its modality and view, in frame order."""
    maps = np.zeros((len(frame), *images.shape[1:]), dtype=np.float32)
    for (fold, modality, view), group in frame.groupby(["fold", "modality", "view"], sort=True):
        model, _ = load_classifier(paths.classifier_weights(arch, modality, view, int(fold)))
        pixels = np.stack([(imputed if source == "synthetic" else images)[row]
                           for source, row in zip(group["source"], group["row"])])
        positions = group.index.to_numpy()
        for start in range(0, len(group), BATCH):
            maps[positions[start:start + BATCH]] = grad_cam(model, arch, pixels[start:start + BATCH]).maps
    return maps


def _examples(frame, maps, images, imputed, masks):
    out = []
    for (modality, source), group in frame.groupby(["modality", "source"], sort=False):
        i = group.index[0]
        name = {"FFDM": "FFDM", "CESM": "real CESM"}[modality] if source == "real" else "synthetic CESM"
        pixels = (imputed if source == "synthetic" else images)[frame.at[i, "row"]]
        out.append((f"{name} {frame.at[i, 'view']}", np.asarray(pixels), maps[i], np.asarray(masks[frame.at[i, "mask_row"]])))
    return out[:EXAMPLES]


def run_saliency_eval(paths, params):
    """Score every architecture's maps and write the report; return (table, summary, files)."""
    frame, images, imputed, masks = _images_to_score(paths, params)
    scored, examples = [], []
    for arch in params.classifier.architectures:
        maps = _maps(arch, frame, images, imputed, paths)
        breasts = sm.breast_regions(images[frame["breast_row"].to_numpy()])
        scores = sm.score_images(maps, masks[frame["mask_row"].to_numpy()], breasts)
        scored.append(pd.concat([frame.assign(arch=arch), scores], axis=1))
        examples = examples or _examples(frame, maps, images, imputed, masks)
    scored_frame = pd.concat(scored, ignore_index=True) if scored else pd.DataFrame()
    table = (sm.pointing_game_table(scored_frame, SETTING_TEST_INPUTS, resamples=params.evaluate.bootstrap_resamples,
                                    seed=params.seed) if len(scored_frame) else pd.DataFrame(columns=list(sm.TABLE_COLUMNS)))
    summary = sm.saliency_summary(table)
    with atomic_dir(paths.saliency_dir) as staged:  # one set: no stale file survives a rerun
        write_csv(staged / "pointing_game.csv", table)
        write_text(staged / "summary.json", json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        saliency_examples_figure(staged / "examples.png", examples)
    return table, summary, [paths.saliency_dir / n for n in ("pointing_game.csv", "summary.json", "examples.png")]


def main(argv: list[str] | None = None) -> int:
    args = stage_parser(STAGE, __doc__).parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        with open_stage_run(STAGE, paths, params, args) as run:
            table, summary, files = run_saliency_eval(paths, params)
            if run:
                run.log_metrics(summary)
                run.log_artifacts(paths.saliency_dir, "saliency")
    except (ConfigError, ValueError, OSError) as exc:  # expected bad input: one line, exit code 1
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    print(table[table["modality"] == sm.ALL].to_string(index=False) if len(table) else "no test lesion image with a mask")
    print(f"{STAGE}: wrote {len(files)} files to {paths.saliency_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
