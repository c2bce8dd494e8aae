"""Saliency against lesion masks: the pointing game, the mass in the lesion, their chance levels and
the saliency_eval stage on a tiny project (untrained classifiers, 64 px: a 2 x 2 Grad-CAM grid)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from virtual_biopsy.core.config import SynthConfig
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.evaluation.saliency_metrics import (
    SaliencyMetricError,
    chance_level,
    hit_rate_interval,
    pointing_game_hit,
    saliency_mass_in_mask,
)


def _mask(shape=(8, 8), rows=slice(0, 2), cols=slice(0, 2)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[rows, cols] = 1
    return mask


# --- metric functions on hand-made maps ------------------------------------------------------------
def test_a_map_peaking_inside_the_lesion_hits_and_one_peaking_outside_misses():
    saliency = np.full((8, 8), 0.1)
    saliency[1, 1] = 1.0
    assert pointing_game_hit(saliency, _mask())
    saliency[1, 1], saliency[6, 6] = 0.5, 1.0
    assert not pointing_game_hit(saliency, _mask())


def test_a_tie_hits_when_any_maximal_pixel_is_in_the_lesion():
    saliency = np.zeros((8, 8))
    saliency[0, 0] = saliency[7, 7] = 1.0  # one maximum inside, one outside
    assert pointing_game_hit(saliency, _mask())
    saliency[0, 0] = 0.99
    assert not pointing_game_hit(saliency, _mask())


def test_mass_in_lesion_is_the_maps_sum_inside_over_its_sum():
    saliency = np.zeros((8, 8))
    saliency[0, 0], saliency[0, 1], saliency[5, 5] = 3.0, 1.0, 4.0
    assert saliency_mass_in_mask(saliency, _mask()) == pytest.approx(0.5)
    flat = np.ones((8, 8))
    assert saliency_mass_in_mask(flat, _mask()) == pytest.approx(chance_level(_mask())) == pytest.approx(4 / 64)


def test_a_region_restricts_the_maximum_the_mass_and_the_chance_level():
    region = np.zeros((8, 8), bool)
    region[:, :4] = True                       # the left half is the breast
    saliency = np.full((8, 8), 0.1)
    saliency[0, 0], saliency[4, 7] = 0.5, 1.0  # global peak outside the breast, breast peak in the lesion
    assert not pointing_game_hit(saliency, _mask())
    assert pointing_game_hit(saliency, _mask(), region)
    inside = saliency[region]
    assert saliency_mass_in_mask(saliency, _mask(), region) == pytest.approx((0.5 + 3 * 0.1) / inside.sum())
    assert chance_level(_mask(), region) == pytest.approx(4 / 32)


@pytest.mark.parametrize("saliency, mask, message", [
    (np.ones((8, 8)), np.zeros((8, 7)), "differs from the map's"),
    (np.ones((8, 8)), np.zeros((8, 8)), "lesion mask is empty"),
    (np.full((8, 8), -0.1), _mask(), "negative values"),
    (np.zeros((8, 8)), _mask(), "all zero"),
    (np.full((8, 8), np.nan), _mask(), "nan or inf"),
    (np.ones(8), _mask(), "expected a 2-D map"),
    (np.ones((8, 8)), _mask() * 2, "must be binary"),
])
def test_bad_maps_and_masks_are_refused_with_the_reason(saliency, mask, message):
    for metric in (pointing_game_hit, saliency_mass_in_mask):
        with pytest.raises(SaliencyMetricError, match=message):
            metric(saliency, mask)


def test_hit_rate_interval_resamples_patients_not_images():
    # patient a: 4 hits; patient b: 4 misses. By image the rate is 0.5; by patient a draw holds
    # 0, 1 or 2 copies of a, so the rate over draws is only ever 0, 0.5 or 1.
    hits = [True] * 4 + [False] * 4
    result = hit_rate_interval(hits, ["a"] * 4 + ["b"] * 4, resamples=500, seed=1)
    assert result.rate == 0.5 and (result.images, result.patients) == (8, 2)
    assert (result.low, result.high) == (0.0, 1.0)
    one_each = hit_rate_interval(hits, list("abcdefgh"), resamples=500, seed=1)
    assert 0.0 < one_each.low < 0.5 < one_each.high < 1.0  # eight independent patients: narrower


def test_all_hits_give_a_degenerate_interval_at_one_and_mismatched_inputs_are_refused():
    assert hit_rate_interval([True, True, True], ["a", "b", "c"], resamples=50).low == 1.0
    with pytest.raises(SaliencyMetricError, match="one patient per image"):
        hit_rate_interval([True, False], ["a"])
    with pytest.raises(SaliencyMetricError, match="no images"):
        hit_rate_interval([], [])


# --- the stage -------------------------------------------------------------------------------------
STAGE_PARAMS = {
    "seed": 5,
    "preprocess": {"image_size": 64, "workers": 1},
    "ingest": {"workers": 1},
    "split": {"folds": 2, "val_share": 0.25, "test_share": 0.5},
    "generator": {"ngf": 4, "ndf": 4, "n_residual_blocks": 1},
}


@pytest.fixture(scope="module")
def saliency_project(make_project, tmp_path_factory):
    """synth (16 patients) -> ingest -> preprocess (64 px) -> split (2 folds), then untrained
    generators through the real impute stage and untrained resnet18 classifiers per fold."""
    import torch

    from virtual_biopsy.core.config import GeneratorConfig
    from virtual_biopsy.models import ResnetGenerator, build_classifier
    from virtual_biopsy.models.weights import save_classifier_weights, save_generator_weights
    from virtual_biopsy.stages import impute

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("saliency") / "project"
    paths = make_project(root, STAGE_PARAMS, synth=SynthConfig(patients=16, image_height=96, malignant_share=0.5))
    tiny = GeneratorConfig(ngf=4, n_residual_blocks=1)
    for fold in (0, 1):
        for view in ("CC", "MLO"):
            generator = ResnetGenerator(channels=1, ngf=tiny.ngf, n_residual_blocks=tiny.n_residual_blocks)
            save_generator_weights(paths.generator_weights(view, fold), generator.state_dict(), tiny, view=view, fold=fold)
            for m, modality in enumerate(("FFDM", "CESM")):
                model = build_classifier("resnet18", seed=fold * 4 + m * 2 + (view == "MLO"))
                save_classifier_weights(paths.classifier_weights("resnet18", modality, view, fold), model.state_dict(),
                                        arch="resnet18", modality=modality, view=view, fold=fold)
    assert impute.main(["--root", str(root), "--no-mlflow"]) == 0
    from virtual_biopsy.stages import saliency_eval

    assert saliency_eval.main(["--root", str(root)]) == 0  # with MLflow: the project's embedded store
    return paths


def _table(paths: ProjectPaths) -> pd.DataFrame:
    return pd.read_csv(paths.saliency_dir / "pointing_game.csv")


def _test_lesion_images(paths: ProjectPaths) -> pd.DataFrame:
    """Real early biopsied images of test patients that carry a lesion mask, counted independently."""
    index = pd.read_csv(paths.processed_index, dtype={"patient_id": str, "image_id": str})
    folds = pd.read_csv(paths.splits, dtype={"patient_id": str})
    masks = np.load(paths.processed_lesion_masks)
    tested = set(folds.loc[folds["subset"] == "test", "patient_id"])
    keep = (index["phase"] == "early") & index["label"].isin(["malignant", "benign"]) & index["patient_id"].isin(tested)
    rows = index[keep]
    return rows[masks[rows["row"].to_numpy()].reshape(len(rows), -1).any(axis=1)]


def test_stage_scores_every_test_lesion_image_of_each_input_per_view(saliency_project):
    table = _table(saliency_project).set_index(["setting", "modality", "view"])
    expected = _test_lesion_images(saliency_project).groupby(["modality", "view"]).size()
    assert expected.sum() > 0
    for (modality, view), n in expected.items():
        setting = "F" if modality == "FFDM" else "C"
        assert table.loc[(setting, modality, view), "images"] == n
    # Ĉ: one imputed image per test FFDM lesion image, scored on that LE image's mask
    for view in ("CC", "MLO"):
        assert table.loc[("Ĉ", "CESM", view), "images"] == expected["FFDM", view]


def test_fused_settings_pool_the_images_of_their_inputs(saliency_project):
    table = _table(saliency_project)
    overall = table[table["modality"] == "all"].set_index("setting")["images"]
    assert overall["F+C"] == overall["F"] + overall["C"]
    assert overall["F+Ĉ"] == overall["F"] + overall["Ĉ"]
    fused = table[(table["setting"] == "F+C") & (table["modality"] != "all")].set_index(["modality", "view"])
    single = table[table["setting"].isin(["F", "C"]) & (table["modality"] != "all")].set_index(["modality", "view"])
    pd.testing.assert_frame_equal(fused.drop(columns="setting").sort_index(), single.drop(columns="setting").sort_index())


def test_rates_lie_in_their_interval_and_chance_is_the_lesions_share_of_the_breast(saliency_project):
    table = _table(saliency_project)
    scored = table[table["hit_rate"].notna()]
    assert len(scored) > 0, "every map was flat: the 64 px grid should localise"
    assert ((scored["ci_low"] <= scored["hit_rate"]) & (scored["hit_rate"] <= scored["ci_high"])).all()
    assert scored[["mass_in_lesion", "chance_hit"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (scored["chance_hit"] == scored["chance_mass"]).all()
    assert (scored["chance_hit"] < 0.5).all()  # a lesion is a small part of its breast


def test_summary_figure_and_mlflow_run_hold_the_pooled_rows(saliency_project):
    from virtual_biopsy.mlops import tracking

    summary = json.loads((saliency_project.saliency_dir / "summary.json").read_text())
    overall = _table(saliency_project).query("modality == 'all'").set_index("setting")
    assert summary["saliency.resnet18.F.images"] == overall.loc["F", "images"]
    assert (saliency_project.saliency_dir / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = tracking.get_client(saliency_project.root)
    runs = client.search_runs([tracking.experiment_id(client, saliency_project.root)],
                              filter_string="tags.stage = 'saliency_eval'")
    assert len(runs) == 1
    assert runs[0].data.metrics["saliency.resnet18.F.images"] == overall.loc["F", "images"]
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id, "saliency")} >= {
        "saliency/pointing_game.csv", "saliency/summary.json", "saliency/examples.png"}


def test_stage_names_the_missing_classifier_weights(saliency_project, copy_project, tmp_path, capsys):
    from virtual_biopsy.stages import saliency_eval

    root = copy_project(saliency_project.root, tmp_path / "copy").root  # data only: no models/
    assert saliency_eval.main(["--root", str(root), "--no-mlflow"]) == 1
    assert "no such classifier weights file" in capsys.readouterr().err
