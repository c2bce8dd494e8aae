"""The observer_ceiling stage and the ceiling rows of the evaluation (evaluation.ceilings)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import lesion_ids
from virtual_biopsy.evaluation import ceilings
from virtual_biopsy.evaluation.observer import FEATURES, FUSED
from virtual_biopsy.stages import observer_ceiling


@pytest.fixture(scope="module")
def ceiling_project(processed_project, copy_project, tmp_path_factory):
    root = copy_project(processed_project, tmp_path_factory.mktemp("ceilings") / "project").root
    assert observer_ceiling.main(["--root", str(root), "--no-mlflow"]) == 0
    return root


def _read(root, name):
    return pd.read_csv(ProjectPaths(root).ceilings_dir / name)


def test_stage_writes_a_ceiling_per_modality_view_and_reading_and_the_latent_uptake(ceiling_project):
    table = _read(ceiling_project, "ceilings.csv")
    got = set(zip(table["modality"], table["view"], table["feature"]))
    for modality in ("FFDM", "CESM"):
        for view in ("CC", "MLO", FUSED):
            for feature in FEATURES:
                assert (modality, view, feature) in got
    assert ("CESM", FUSED, ceilings.LATENT) in got
    assert table["auc_mean"].between(0, 1).all()
    # The simulator's true uptake separates its classes far better than chance (means 0.55 vs 0.30).
    latent = table[table["feature"] == ceilings.LATENT]["auc_mean"].iloc[0]
    assert latent > 0.8
    assert "| CESM | fused | contrast |" in (ProjectPaths(ceiling_project).ceilings_dir / "ceilings.md").read_text()


def test_each_lesion_is_read_only_in_the_fold_that_tests_its_patient(ceiling_project):
    paths = ProjectPaths(ceiling_project)
    scores = _read(ceiling_project, "observer_scores.csv")
    index = pd.read_csv(paths.processed_index, dtype={"patient_id": str})
    folds = pd.read_csv(paths.splits, dtype={"patient_id": str})
    lesions = index[(index["phase"] == "early") & index["label"].isin(["malignant", "benign"])
                    & (index["modality"] == "FFDM")].assign(lesion_id=lambda f: lesion_ids(f))
    for fold, group in folds[folds["subset"] == "test"].groupby("fold"):
        tested = lesions[lesions["patient_id"].isin(group["patient_id"])].drop_duplicates("lesion_id")
        row = scores[(scores["fold"] == fold) & (scores["modality"] == "FFDM") & (scores["view"] == FUSED)
                     & (scores["feature"] == "contrast")].iloc[0]
        assert row["n_malignant"] == (tested["label"] == "malignant").sum()
        assert row["n_benign"] == (tested["label"] == "benign").sum()


def test_share_of_ceiling_is_the_chance_corrected_ratio_of_the_headline_ceiling():
    table = pd.DataFrame([
        {"modality": "FFDM", "view": FUSED, "feature": "contrast", "auc_mean": 0.8, "auc_sem": 0.05},
        {"modality": "CESM", "view": FUSED, "feature": "contrast", "auc_mean": 0.9, "auc_sem": 0.02},
        {"modality": "CESM", "view": FUSED, "feature": "mean", "auc_mean": 0.99, "auc_sem": 0.01},
    ])
    shares = ceilings.ceiling_shares(table, {"resnet18": {"F": {"auc": 0.65}, "C": {"auc": 0.9}}})
    f, c = (shares[shares["setting"] == s].iloc[0] for s in ("F", "C"))
    assert f["share"] == pytest.approx((0.65 - 0.5) / (0.8 - 0.5))
    assert c["share"] == pytest.approx(1.0) and c["ceiling_auc"] == 0.9  # the contrast reading, not the mean
    missing = ceilings.ceiling_shares(table.iloc[:0], {"resnet18": {"F": {"auc": 0.65}}})
    assert missing["share"].isna().all()


def test_without_lesion_masks_the_stage_writes_empty_tables_and_says_so(processed_project, copy_project, tmp_path):
    import numpy as np

    root = copy_project(processed_project, tmp_path / "project").root
    paths = ProjectPaths(root)
    masks = np.load(paths.processed_lesion_masks)
    np.save(paths.processed_lesion_masks, np.zeros_like(masks))
    assert observer_ceiling.main(["--root", str(root), "--no-mlflow"]) == 0
    assert (paths.ceilings_dir / "ceilings.md").read_text().startswith("No lesion masks")
    assert math.isnan(ceilings.headline_ceiling(pd.read_csv(paths.ceilings_dir / "ceilings.csv"), "F")[0])


def test_missing_masks_name_the_stage_to_run(processed_project, copy_project, tmp_path, capsys):
    root = copy_project(processed_project, tmp_path / "project").root
    ProjectPaths(root).processed_lesion_masks.unlink()
    assert observer_ceiling.main(["--root", str(root), "--no-mlflow"]) == 1
    err = capsys.readouterr().err
    assert "lesion_masks.npy" in err and "preprocess" in err
