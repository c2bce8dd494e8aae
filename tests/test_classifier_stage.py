"""train_classifier stage: own modality and view only, no test patient in training or weighting,
the predictions contract (with synthetic CESM rows), MLflow fold runs, and resume after a stop."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from virtual_biopsy.core.config import MODALITIES, VIEWS, load_params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import (
    CohortError,
    biopsy_images,
    check_single_input,
    patient_subsets,
    synthetic_images,
)
from virtual_biopsy.evaluation.predictions import (
    PREDICTION_COLUMNS,
    predictions_path,
    read_predictions_file,
)
from virtual_biopsy.models.weights import load_classifier
from virtual_biopsy.stages import train_classifier as stage
from virtual_biopsy.training.checkpoint import INPUTS_KEY_FILE, discard_stale_checkpoint
from virtual_biopsy.training.classifier_trainer import predict_proba

ARCH = "resnet18"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_le_as_synthetic_cesm(paths: ProjectPaths) -> None:
    """data/imputed as the impute stage writes it, with the LE image itself as the "imputed" CESM.

    Training generators is the train_generator/impute stages' business (and slow); this stage
    only needs the imputed index contract: one synthetic CESM row per LE image, linked by
    source_image_id. Inverting the image makes it differ from both real images.
    """
    index = pd.read_csv(paths.processed_index, dtype={"image_id": str, "patient_id": str, "study_id": str},
                        keep_default_na=False)
    le = index[index["modality"] == "FFDM"].reset_index(drop=True)
    images = np.load(paths.processed_images, mmap_mode="r")
    synthetic = (1.0 - np.asarray(images[le["row"].to_numpy()])).astype(np.float32)
    imputed = le.assign(source_image_id=le["image_id"], image_id="syn-" + le["image_id"], modality="CESM",
                        synthetic=True, row=np.arange(len(le)))
    paths.imputed_dir.mkdir(parents=True)
    np.save(paths.imputed_images, synthetic)
    imputed.to_csv(paths.imputed_index, index=False)


@pytest.fixture(scope="module")
def tiny_data(processed_project, copy_project, tmp_path_factory) -> Path:
    """conftest's ``processed_project`` (16 balanced patients, 2 folds, 2 epochs of a ResNet18 at
    32 px) plus imputed CESM. Read only: ``copy_project`` it for a stage run, which then starts
    without models or outputs."""
    paths = copy_project(processed_project, tmp_path_factory.mktemp("classifier-project"))
    write_le_as_synthetic_cesm(paths)
    return paths.root


def read_index(paths: ProjectPaths) -> pd.DataFrame:
    return pd.read_csv(paths.processed_index, dtype={"image_id": str, "patient_id": str, "study_id": str},
                       keep_default_na=False)


@pytest.fixture(scope="module")
def cesm_run(tiny_data, copy_project, tmp_path_factory) -> tuple[ProjectPaths, dict]:
    """The CESM-CC classifier trained on the tiny project, logged to MLflow."""
    paths = copy_project(tiny_data, tmp_path_factory.mktemp("cesm-run"))
    summary = stage.run_train_classifier(paths, load_params(paths.root / "params.yaml"), ARCH, "CESM", "CC")
    return paths, summary


# ---------------------------------------------------------------------------------------------
# What a classifier sees
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("view", VIEWS)
def test_classifier_sees_only_early_biopsied_images_of_its_own_modality_and_view(tiny_data, modality, view):
    index = read_index(ProjectPaths(tiny_data))
    images = biopsy_images(index, modality, view)
    rows = index.set_index("image_id").loc[images["image_id"]]
    assert not images.empty
    assert set(rows["modality"]) == {modality} and set(rows["view"]) == {view}
    assert set(rows["phase"]) == {"early"} and set(rows["label"]) <= {"malignant", "benign"}
    expected = index[(index["modality"] == modality) & (index["view"] == view) & (index["phase"] == "early")
                     & index["label"].isin(["malignant", "benign"])]
    assert set(images["image_id"]) == set(expected["image_id"])
    assert (images["lesion_id"] == rows["patient_id"].to_numpy() + "|" + rows["study_id"].to_numpy() + "|"
            + rows["laterality"].to_numpy()).all()


def test_classifier_refuses_images_of_another_view():
    mixed = pd.DataFrame({"modality": ["CESM", "CESM"], "view": ["CC", "MLO"]})
    with pytest.raises(CohortError, match="view"):
        check_single_input(mixed, "CESM", "CC")


def test_synthetic_rows_carry_the_lesion_of_their_le_source(tiny_data):
    paths = ProjectPaths(tiny_data)
    index = read_index(paths)
    imputed = pd.read_csv(paths.imputed_index, dtype=str, keep_default_na=False)
    synthetic = synthetic_images(imputed, index, "MLO")
    le = biopsy_images(index, "FFDM", "MLO").set_index("image_id")
    assert set(synthetic["image_id"]) == set(le.index)  # image_id of a synthetic row is its LE input's
    assert (synthetic["lesion_id"].to_numpy() == le.loc[synthetic["image_id"], "lesion_id"].to_numpy()).all()
    assert (synthetic["y"].to_numpy() == le.loc[synthetic["image_id"], "y"].to_numpy()).all()
    assert set(synthetic["source"]) == {"synthetic"} and set(synthetic["view"]) == {"MLO"}
    # Every synthetic lesion is a real CESM lesion of the same view.
    assert set(synthetic["lesion_id"]) <= set(biopsy_images(index, "CESM", "MLO")["lesion_id"])


# ---------------------------------------------------------------------------------------------
# No test patient in training or weighting
# ---------------------------------------------------------------------------------------------
def test_fold_patient_subsets_are_disjoint(tiny_data):
    folds = pd.read_csv(ProjectPaths(tiny_data).splits, dtype={"patient_id": str})
    for fold in folds["fold"].unique():
        subsets = patient_subsets(folds, int(fold))
        assert not subsets["test"] & (subsets["train"] | subsets["val"])
        assert not subsets["train"] & subsets["val"]


def test_stage_refuses_folds_that_put_a_test_patient_in_training(tiny_data, copy_project, tmp_path, capsys):
    paths = copy_project(tiny_data, tmp_path)
    folds = pd.read_csv(paths.splits, dtype={"patient_id": str})
    leaked = folds[(folds["fold"] == 0) & (folds["subset"] == "test")].iloc[:1].assign(subset="train")
    pd.concat([folds, leaked]).to_csv(paths.splits, index=False)
    code = stage.main(["--arch", ARCH, "--modality", "FFDM", "--view", "CC", "--root", str(paths.root), "--no-mlflow"])
    assert code == 1
    assert f"patient(s) ['{leaked['patient_id'].iloc[0]}'] are in both train and test" in capsys.readouterr().err
    assert not paths.classifier_dir(ARCH, "FFDM", "CC").exists()


def test_scored_and_weighting_patients_are_the_folds_val_and_test_patients(cesm_run):
    paths, summary = cesm_run
    predictions = read_predictions_file(predictions_path(paths, ARCH, "CESM", "CC"), ARCH, "CESM", "CC")
    folds = pd.read_csv(paths.splits, dtype={"patient_id": str})
    for fold in sorted(folds["fold"].unique()):
        subsets = patient_subsets(folds, int(fold))
        rows = predictions[predictions["fold"] == fold]
        for subset in ("val", "test"):
            assert set(rows.loc[rows["subset"] == subset, "patient_id"]) <= subsets[subset]
        assert not set(rows["patient_id"]) & subsets["train"]


# ---------------------------------------------------------------------------------------------
# Outputs and tracking
# ---------------------------------------------------------------------------------------------
def test_cesm_stage_writes_contract_predictions_with_real_and_synthetic_rows(cesm_run):
    paths, summary = cesm_run
    path = predictions_path(paths, ARCH, "CESM", "CC")
    assert tuple(pd.read_csv(path, nrows=0).columns) == PREDICTION_COLUMNS
    predictions = read_predictions_file(path, ARCH, "CESM", "CC")
    folds = sorted(pd.read_csv(paths.splits)["fold"].unique())
    assert sorted(predictions["fold"].unique()) == folds
    for (fold, subset), group in predictions.groupby(["fold", "subset"]):
        assert set(group["source"]) == {"real", "synthetic"}, (fold, subset)
        real = group[group["source"] == "real"]
        synthetic = group[group["source"] == "synthetic"]
        assert set(synthetic["lesion_id"]) == set(real["lesion_id"])
    for fold in folds:
        assert paths.classifier_weights(ARCH, "CESM", "CC", fold).is_file()
    weights = json.loads(paths.val_mcc(ARCH, "CESM", "CC").read_text())
    assert [f["fold"] for f in weights["folds"]] == folds
    assert all(-1 <= f["val_mcc"] <= 1 for f in weights["folds"])


def test_saved_fold_weights_reproduce_the_written_test_probabilities(cesm_run):
    paths, _ = cesm_run
    model, info = load_classifier(paths.classifier_weights(ARCH, "CESM", "CC", 0))
    assert (info["arch"], info["modality"], info["view"], info["fold"]) == (ARCH, "CESM", "CC", 0)
    predictions = read_predictions_file(predictions_path(paths, ARCH, "CESM", "CC"), ARCH, "CESM", "CC")
    test = predictions[(predictions["fold"] == 0) & (predictions["subset"] == "test") & (predictions["source"] == "real")]
    rows = read_index(paths).set_index("image_id").loc[test["image_id"], "row"].to_numpy()
    images = np.load(paths.processed_images, mmap_mode="r")
    p = predict_proba(model, images, rows)
    np.testing.assert_allclose(p, test["p_malignant"].to_numpy(), atol=1e-6)


def test_stage_logs_one_readable_mlflow_run_per_fold_with_epoch_curves(cesm_run):
    from virtual_biopsy.mlops import tracking

    paths, _ = cesm_run
    client = tracking.get_client(paths.root)
    exp = tracking.experiment_id(client, paths.root)
    runs = client.search_runs([exp], filter_string="tags.stage = 'train_classifier'")
    names = {r.info.run_name: r for r in runs}
    assert {"train_classifier resnet18 CESM-CC", "resnet18 CESM-CC fold 0", "resnet18 CESM-CC fold 1"} <= set(names)
    fold_run = names["resnet18 CESM-CC fold 0"]
    assert {fold_run.data.tags[k] for k in ("arch", "modality", "view", "fold")} == {ARCH, "CESM", "CC", "0"}
    assert {"test_auc", "test_auc_synthetic", "val_mcc", "best_epoch"} <= set(fold_run.data.metrics)
    curve = client.get_metric_history(fold_run.info.run_id, "val_loss")
    assert len(curve) >= 1 and sorted(m.step for m in curve) == list(range(len(curve)))
    artifacts = [a.path for a in client.list_artifacts(fold_run.info.run_id, "weights")]
    assert artifacts == ["weights/fold0.pt"]


class Interrupted(Exception):
    """Stands for a kill after the first epoch's checkpoint is on disk."""


def test_ffdm_stage_resumed_after_an_interruption_writes_the_same_predictions(tiny_data, copy_project, tmp_path):
    straight = copy_project(tiny_data, tmp_path / "straight")
    resumed = copy_project(tiny_data, tmp_path / "resumed")
    params = load_params(straight.root / "params.yaml")
    stage.run_train_classifier(straight, params, ARCH, "FFDM", "MLO", use_mlflow=False)

    def stop_after_first_epoch_of_fold_1(fold: int, epoch: int, metrics: dict) -> None:
        if (fold, epoch) == (1, 0):
            raise Interrupted

    model_dir = resumed.classifier_dir(ARCH, "FFDM", "MLO")
    model_dir.mkdir(parents=True)
    (model_dir / "fold7.pt").write_bytes(b"a fold of an older run with more folds")
    with pytest.raises(Interrupted):
        stage.run_train_classifier(resumed, params, ARCH, "FFDM", "MLO", use_mlflow=False,
                                   epoch_callback=stop_after_first_epoch_of_fold_1)
    assert not predictions_path(resumed, ARCH, "FFDM", "MLO").exists()  # nothing half-written
    # Fold 0 finished, but its weights only join the folder with every other fold's; its checkpoint
    # and fold 1's stay where the resumed run looks for them.
    assert sorted(p.name for p in model_dir.iterdir()) == ["checkpoints", "fold7.pt"]
    assert (model_dir / "checkpoints" / "fold0" / "last.pt").is_file()
    assert (model_dir / "checkpoints" / "fold1" / "last.pt").is_file()
    stage.run_train_classifier(resumed, params, ARCH, "FFDM", "MLO", use_mlflow=False)
    assert sorted(p.name for p in model_dir.iterdir()) == ["fold0.pt", "fold1.pt", "val_mcc.json"]

    expected = read_predictions_file(predictions_path(straight, ARCH, "FFDM", "MLO"), ARCH, "FFDM", "MLO")
    found = read_predictions_file(predictions_path(resumed, ARCH, "FFDM", "MLO"), ARCH, "FFDM", "MLO")
    assert set(found["source"]) == {"real"}
    pd.testing.assert_frame_equal(found, expected, check_exact=False, atol=1e-6)


def test_checkpoint_of_other_input_images_is_discarded_and_one_of_the_same_kept(tmp_path):
    ckpt = tmp_path / "fold0"
    discard_stale_checkpoint(ckpt, "pixels-a")
    (ckpt / "last.pt").write_bytes(b"checkpoint of pixels-a")
    discard_stale_checkpoint(ckpt, "pixels-a")
    assert (ckpt / "last.pt").exists()
    discard_stale_checkpoint(ckpt, "pixels-b")  # e.g. preprocess.image_size changed
    assert not (ckpt / "last.pt").exists()
    assert (ckpt / INPUTS_KEY_FILE).read_text().strip() == "pixels-b"
