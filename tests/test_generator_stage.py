"""train_generator stage on a tiny simulated project (fixture ``generator_project`` in conftest)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cohorts import CohortError, view_pairs
from virtual_biopsy.mlops import registry, tracking
from virtual_biopsy.models.weights import load_generator_weights
from virtual_biopsy.stages import train_generator

TABLE3_FIELDS = {"fold", "mse", "psnr", "ssim", "baseline_mse", "baseline_psnr", "baseline_ssim", "best_epoch"}


def report(root) -> dict:
    return json.loads((root / "reports" / "generator" / "CC.json").read_text())


def test_report_holds_table3_fields_for_every_fold_and_their_mean(generator_project):
    rep = report(generator_project)
    assert rep["view"] == "CC"
    assert [f["fold"] for f in rep["folds"]] == [0, 1]
    for fold in rep["folds"]:
        assert TABLE3_FIELDS <= set(fold)
        assert 0 <= fold["mse"] and -1 <= fold["ssim"] <= 1 and np.isfinite(fold["baseline_psnr"])
    for key in ("mse", "psnr", "ssim", "baseline_ssim"):
        assert rep["mean"][key] == pytest.approx(np.mean([f[key] for f in rep["folds"]]))
    assert (generator_project / "reports" / "generator" / "figure3_CC.png").stat().st_size > 0


def test_report_adds_breast_only_and_lesion_metrics_for_the_generator_and_the_le_baseline(generator_project):
    from virtual_biopsy.evaluation.scoring import LESION_METRIC_NAMES

    rep = report(generator_project)
    for fold in rep["folds"]:
        assert {*LESION_METRIC_NAMES, *(f"baseline_{k}" for k in LESION_METRIC_NAMES)} <= set(fold)
        assert fold["lesion_images"] > 0
        assert -1 <= fold["breast_ssim"] <= 1 and fold["breast_mse"] >= 0
        # LE carries no iodine: taken as the CESM estimate its lesions enhance less than the real DES's.
        assert fold["baseline_enhancement_error"] < 0
        assert fold["baseline_abs_enhancement_error"] >= abs(fold["baseline_enhancement_error"]) - 1e-12
    # Breast-only SSIM leaves the air and padding out, where the baseline and G(LE) are both 0 = real.
    assert rep["mean"]["baseline_breast_ssim"] < rep["mean"]["baseline_ssim"]


def test_every_fold_leaves_final_weights_and_no_checkpoint_for_the_dvc_cache(generator_project):
    """Checkpoints exist to resume a killed run; once every fold finished they are removed."""
    model_dir = generator_project / "models" / "generator" / "CC"
    for fold in (0, 1):
        assert (model_dir / f"fold{fold}.pt").is_file()
    assert not (model_dir / "checkpoints").exists()
    generator, info = load_generator_weights(model_dir / "fold1.pt")
    assert (info["view"], info["fold"], info["image_size"]) == ("CC", 1, 32)
    assert generator(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_rerun_reproduces_the_report(generator_project, tmp_path):
    before = report(generator_project)
    copy = tmp_path / "project"  # a copy, so the shared project keeps its registered report
    shutil.copytree(generator_project, copy, ignore=shutil.ignore_patterns("mlruns"))
    model_dir = ProjectPaths(copy).generator_dir("CC")
    (model_dir / "fold7.pt").write_bytes(b"a fold of an older run with more folds")
    assert train_generator.main(["--view", "CC", "--root", str(copy), "--no-mlflow"]) == 0
    # The model folder is replaced as one set: the stale fold is gone, the weights are the same bytes.
    assert sorted(p.name for p in model_dir.iterdir()) == ["fold0.pt", "fold1.pt", "serving.pt"]
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["CC"]
    for name in ("fold0.pt", "fold1.pt"):
        assert (model_dir / name).read_bytes() == (generator_project / "models" / "generator" / "CC" / name).read_bytes()
    after = report(copy)
    assert [f["ssim"] for f in after["folds"]] == pytest.approx([f["ssim"] for f in before["folds"]])
    assert [f["best_epoch"] for f in after["folds"]] == [f["best_epoch"] for f in before["folds"]]


def test_serving_generator_is_registered_with_alias_challenger_and_tags(generator_project):
    rep = report(generator_project)
    name = registry.generator_model_name("CC")
    version = registry.get_alias(name, registry.CHALLENGER, root=generator_project)
    # The version number lives in MLflow only (the stage run's tag), not in the DVC-tracked report.
    assert not {"version", "registered_model", "alias"} & set(rep["serving"])
    client = tracking.get_client(generator_project)
    stage_runs = client.search_runs([tracking.experiment_id(client, generator_project)],
                                    filter_string="tags.stage = 'train_generator' and tags.registered_model = "
                                                  f"'{name}'")
    assert version is not None and [r.data.tags["registered_version"] for r in stage_runs] == [version]
    tags = registry.get_version_tags(name, version, root=generator_project)
    assert tags["view"] == "CC" and tags["policy"] == "best_fold"
    assert tags["fold"] == str(rep["serving"]["fold"])
    assert float(tags["test_ssim"]) == pytest.approx(rep["serving"]["test"]["ssim"], rel=1e-4)
    assert tags["data_version"] == tracking.data_version(generator_project)
    model = registry.load_model(registry.model_uri(name, alias=registry.CHALLENGER), root=generator_project)
    with torch.no_grad():
        out = model(torch.rand(3, 1, 32, 32))
    assert out.shape == (3, 1, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_fold_runs_log_epoch_losses_sample_grids_and_weights(generator_project):
    client = tracking.get_client(generator_project)
    exp = tracking.experiment_id(client, generator_project)
    runs = client.search_runs([exp], filter_string="tags.stage = 'train_generator' and tags.fold = '0'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["view"] == "CC"
    assert len(client.get_metric_history(run.info.run_id, "train_loss_g")) == 2
    assert "test_ssim" in run.data.metrics and "val_ssim" in run.data.metrics
    folders = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples", "weights", "checkpoint"} <= folders
    assert client.list_artifacts(run.info.run_id, "samples")


def test_view_pairs_rejects_a_pair_key_without_its_des_partner(generator_project):
    index = pd.read_csv(ProjectPaths(generator_project).processed_index)
    pairs = view_pairs(index, "CC")
    assert len(pairs) == (index["view"] == "CC").sum() // 2
    assert (pairs["le_row"] != pairs["des_row"]).all()
    orphan = index.drop(index[(index["view"] == "CC") & (index["modality"] == "CESM")].index[:1])
    with pytest.raises(CohortError, match="exactly one LE and one DES"):
        view_pairs(orphan, "CC")


def test_stage_without_splits_fails_with_one_line(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    assert train_generator.main(["--view", "CC", "--root", str(tmp_path), "--no-mlflow"]) == 1
    assert "run the preprocess stage first" in capsys.readouterr().err
