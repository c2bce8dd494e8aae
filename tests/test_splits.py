"""Patient-grouped stratified folds: no leakage, stratification, determinism, full test coverage."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from virtual_biopsy.core.config import SplitConfig
from virtual_biopsy.data.splits import (
    SplitError,
    check_folds,
    make_folds,
    patient_strata,
)


def cohort_manifest(malignant: int = 30, benign: int = 12, none: int = 20) -> pd.DataFrame:
    """A manifest with the given number of patients per stratum: 4 LE/DES images per breast.

    Malignant patients also get a benign lesion in the other breast (they must still count as
    malignant), and every patient has a late-phase acquisition with the lesion label repeated.
    """
    rows = []
    labels = ["malignant"] * malignant + ["benign"] * benign + ["none"] * none
    for i, label in enumerate(labels):
        patient = f"P{i:04d}"
        other = "benign" if label == "malignant" else "none"
        for laterality, breast_label in (("R", label), ("L", other)):
            for phase in ("early", "late"):
                for view in ("CC", "MLO"):
                    for modality in ("FFDM", "CESM"):
                        rows.append({"image_id": f"{patient}-{laterality}-{phase}-{view}-{modality}",
                                     "patient_id": patient, "phase": phase, "view": view,
                                     "laterality": laterality, "modality": modality, "label": breast_label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return cohort_manifest()


@pytest.fixture(scope="module")
def folds(manifest) -> pd.DataFrame:
    return make_folds(manifest, SplitConfig(folds=5, val_share=0.10), seed=7)


def test_patient_strata_ranks_malignant_over_benign_over_none():
    manifest = cohort_manifest(malignant=1, benign=1, none=1)
    assert patient_strata(manifest).to_dict() == {"P0000": "malignant", "P0001": "benign", "P0002": "none"}


def test_patient_strata_ignores_late_phase_labels():
    manifest = cohort_manifest(malignant=0, benign=0, none=1)
    late = manifest["phase"] == "late"
    manifest.loc[late, "label"] = "malignant"
    assert patient_strata(manifest).to_dict() == {"P0000": "none"}


def test_no_patient_is_in_two_subsets_of_any_fold(folds):
    per_fold = folds.groupby(["fold", "patient_id"])["subset"].nunique()
    assert per_fold.max() == 1
    assert len(folds) == folds["patient_id"].nunique() * 5


def test_every_patient_is_in_exactly_one_test_fold(folds, manifest):
    test_folds = folds[folds["subset"] == "test"].groupby("patient_id")["fold"].nunique()
    assert set(test_folds.index) == set(manifest["patient_id"])
    assert (test_folds == 1).all()


def test_every_val_and_test_set_holds_both_classes(folds, manifest):
    strata = patient_strata(manifest)
    for (fold, subset), part in folds.groupby(["fold", "subset"]):
        present = set(strata[part["patient_id"]])
        assert {"malignant", "benign"} <= present, (fold, subset, present)


def test_strata_are_spread_within_one_patient_per_test_fold(folds, manifest):
    strata = patient_strata(manifest)
    test = folds[folds["subset"] == "test"].join(strata, on="patient_id")
    per_fold = test.groupby(["stratum", "fold"]).size().unstack(fill_value=0)
    assert (per_fold.max(axis=1) - per_fold.min(axis=1) <= 1).all()


def test_val_share_and_strata_proportions_are_kept(folds, manifest):
    strata = patient_strata(manifest)
    n_patients = len(strata)
    val = folds[folds["subset"] == "val"].join(strata, on="patient_id")
    sizes = val.groupby("fold").size()
    assert (sizes == round(0.10 * n_patients)).all()
    overall = strata.value_counts(normalize=True)
    for _, part in val.groupby("fold"):
        share = part["stratum"].value_counts(normalize=True).reindex(overall.index, fill_value=0)
        assert np.abs(share - overall).max() <= 0.2  # 6 patients: one patient is ~0.17


def test_same_seed_gives_same_folds_and_other_seed_differs(manifest, folds):
    again = make_folds(manifest, SplitConfig(folds=5, val_share=0.10), seed=7)
    pd.testing.assert_frame_equal(folds, again)
    other = make_folds(manifest, SplitConfig(folds=5, val_share=0.10), seed=8)
    assert not folds.equals(other)


def test_folds_do_not_depend_on_manifest_row_order(manifest, folds):
    shuffled = manifest.sample(frac=1.0, random_state=3)
    pd.testing.assert_frame_equal(folds, make_folds(shuffled, SplitConfig(folds=5, val_share=0.10), seed=7))


def test_too_few_benign_patients_raises_naming_the_subset():
    manifest = cohort_manifest(malignant=20, benign=3, none=5)
    with pytest.raises(SplitError, match=r"only 3 benign patient\(s\) for 5 folds.*subset test"):
        make_folds(manifest, SplitConfig(folds=5), seed=1)


def test_validation_without_a_benign_patient_is_reported_by_fold_and_subset():
    # 2 benign patients and 2 folds: each test set takes one, the other is needed in train AND val.
    manifest = cohort_manifest(malignant=10, benign=2, none=4)
    with pytest.raises(SplitError, match=r"fold \d, subset (train|val): no benign patient"):
        make_folds(manifest, SplitConfig(folds=2, val_share=0.2), seed=1)


def test_check_folds_counts_leakage_when_a_patient_sits_in_two_subsets(folds, manifest):
    leaked = pd.concat([folds, pd.DataFrame([{"patient_id": "P0000", "fold": 0, "subset": "train"},
                                             {"patient_id": "P0000", "fold": 0, "subset": "test"}])])
    report = check_folds(leaked, manifest, 5)
    assert report.leakage == 1
    assert not report.valid


def test_check_folds_reports_patient_missing_from_a_fold(folds, manifest):
    dropped = folds[~((folds["fold"] == 2) & (folds["patient_id"] == "P0005"))]
    report = check_folds(dropped, manifest, 5)
    assert any("fold 2" in p and "without a subset" in p for p in report.problems)


def test_fold_counts_add_up_to_every_patient_in_every_fold(folds, manifest):
    counts = check_folds(folds, manifest, 5).counts
    assert set(counts.columns) >= {"fold", "subset", "patients", "malignant_patients", "benign_patients",
                                   "none_patients", "malignant_images", "benign_images"}
    assert (counts.groupby("fold")["patients"].sum() == manifest["patient_id"].nunique()).all()
    # each malignant patient has 2 early FFDM malignant images (CC, MLO) in every fold
    assert (counts.groupby("fold")["malignant_images"].sum() == 30 * 2).all()


def test_manifest_without_patient_ids_is_rejected():
    manifest = cohort_manifest(malignant=5, benign=5, none=0)
    manifest.loc[0, "patient_id"] = None
    with pytest.raises(SplitError, match="without a patient_id"):
        make_folds(manifest, SplitConfig(folds=2), seed=0)


# ---- the stage ---------------------------------------------------------------------------------
def test_split_stage_writes_folds_counts_and_zero_leakage_summary(tmp_path):
    import json

    from virtual_biopsy.stages import split

    (tmp_path / "data" / "interim").mkdir(parents=True)
    cohort_manifest().to_csv(tmp_path / "data" / "interim" / "manifest.csv", index=False)
    (tmp_path / "params.yaml").write_text("seed: 3\nsplit:\n  folds: 5\n")
    assert split.main(["--root", str(tmp_path), "--no-mlflow"]) == 0
    folds = pd.read_csv(tmp_path / "data" / "splits" / "folds.csv")
    assert list(folds.columns) == ["patient_id", "fold", "subset"]
    summary = json.loads((tmp_path / "reports" / "split" / "summary.json").read_text())
    assert summary["leakage"] == 0 and summary["folds"] == 5
    counts = pd.read_csv(tmp_path / "reports" / "split" / "fold_counts.csv")
    assert len(counts) == 5 * 3


def test_split_stage_fails_with_one_line_naming_the_subset(tmp_path, capsys):
    from virtual_biopsy.stages import split

    (tmp_path / "data" / "interim").mkdir(parents=True)
    cohort_manifest(malignant=20, benign=2, none=3).to_csv(tmp_path / "data" / "interim" / "manifest.csv", index=False)
    (tmp_path / "params.yaml").write_text("seed: 3\n")
    assert split.main(["--root", str(tmp_path), "--no-mlflow"]) == 1
    assert "benign patient(s) for 5 folds" in capsys.readouterr().err


def test_a_fold_whose_train_set_would_be_empty_is_refused():
    # 0.79 + the test share 0.2 stays below 1 (config accepts it), but round(0.79 * 16) = 13 val
    # patients take every patient a fold does not test
    manifest = cohort_manifest(malignant=8, benign=5, none=3)
    with pytest.raises(SplitError, match=r"fold 0, subset train: no patient"):
        make_folds(manifest, SplitConfig(folds=5, val_share=0.79), seed=1)
