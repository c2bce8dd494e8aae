"""params.yaml is read into frozen dataclasses; mistakes are errors that name the key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from virtual_biopsy.core.config import (
    ConfigError,
    Params,
    load_params,
    params_from_dict,
    params_hash,
)

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_file_loads_and_is_frozen():
    params = load_params(ROOT / "params.yaml")
    assert params.preprocess.image_size >= 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.preprocess.image_size = 1  # type: ignore[misc]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"generator.*unknown key.*'lamda_cycle'"):
        params_from_dict({"generator": {"lamda_cycle": 10}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"split.folds.*integer"):
        params_from_dict({"split": {"folds": "five"}})


def test_unknown_architecture_is_refused():
    with pytest.raises(ConfigError, match="alexnet"):
        params_from_dict({"classifier": {"architectures": ["alexnet"]}})


def test_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("split: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)


def test_params_hash_changes_with_any_value():
    assert params_hash(Params()) == params_hash(Params())
    assert params_hash(Params()) != params_hash(Params(seed=1))


def test_device_must_be_auto_cpu_cuda_or_a_cuda_index():
    assert params_from_dict({"generator": {"device": "cuda:1"}, "classifier": {"device": "cpu"}}).generator.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"classifier.device: must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        params_from_dict({"classifier": {"device": "gpu"}})


# ---- value rules: every numeric knob refuses what the pipeline cannot use, naming the key ----------
BAD_VALUES = [
    ({"seed": -1}, "seed: must be at least 0, got -1"),
    ({"synth": {"patients": 0}}, "synth.patients: must be at least 1, got 0"),
    ({"synth": {"image_height": 20}}, r"synth.image_height: must lie in \[48, 8192\], got 20"),
    ({"synth": {"aspect_ratio": 5.0}}, r"synth.aspect_ratio: must lie in \[0.3, 2\], got 5.0"),
    ({"synth": {"lesion_share": 1.5}}, r"synth.lesion_share: must lie in \[0, 1\], got 1.5"),
    ({"synth": {"noise_sd": -0.01}}, "synth.noise_sd: must be at least 0, got -0.01"),
    ({"synth": {"acr_mix": [0.5, 0.5, 0.5, -0.5]}}, "synth.acr_mix: needs four shares >= 0"),
    ({"ingest": {"workers": 0}}, "ingest.workers: must be at least 1, got 0"),
    ({"ingest": {"max_rejected_share": 2}}, r"ingest.max_rejected_share: must lie in \[0, 1\], got 2"),
    ({"ingest": {"pseudonym_salt": " "}}, "ingest.pseudonym_salt: must not be empty"),
    ({"preprocess": {"image_size": 8}}, r"preprocess.image_size: must lie in \[16, 4096\], got 8"),
    ({"preprocess": {"image_size": 66}}, "preprocess.image_size: must be a multiple of 4"),
    ({"preprocess": {"workers": 0}}, "preprocess.workers: must be at least 1, got 0"),
    ({"validate_data": {"age_range": [90, 18]}}, "validate_data.age_range: low end 90 is above high end 18"),
    ({"validate_data": {"image_std_range": [0.1]}}, r"validate_data.image_std_range: expected a list of 2 values"),
    ({"validate_data": {"malignant_share_range": [0.5, 1.2]}}, r"validate_data.malignant_share_range: must lie within"),
    ({"validate_data": {"min_patients": 0}}, "validate_data.min_patients: must be at least 1, got 0"),
    ({"validate_data": {"max_patients": 5}}, "validate_data.max_patients: must be at least 20, got 5"),
    ({"split": {"folds": 1}}, "split.folds: must be at least 2, got 1"),
    ({"split": {"val_share": 0.0}}, r"split.val_share: must lie in \(0, 1\), got 0.0"),
    ({"split": {"val_share": 0.9}}, "split.val_share: 0.9 plus the test share 1/5 = 0.2 leaves no patient to train on"),
    ({"split": {"test_share": 0.1}}, "split.test_share: must equal 1/split.folds = 0.2"),
    ({"split": {"folds": 10, "test_share": 0.2}}, "split.test_share: must equal 1/split.folds = 0.1"),
    ({"generator": {"epochs": 0}}, "generator.epochs: must be at least 1, got 0"),
    ({"generator": {"ngf": 0}}, "generator.ngf: must be at least 1, got 0"),
    ({"generator": {"n_residual_blocks": 0}}, "generator.n_residual_blocks: must be at least 1, got 0"),
    ({"generator": {"batch_size": 0}}, "generator.batch_size: must be at least 1, got 0"),
    ({"generator": {"patience": 0}}, "generator.patience: must be at least 1, got 0"),
    ({"generator": {"warmup_epochs": -1}}, "generator.warmup_epochs: must be at least 0, got -1"),
    ({"generator": {"lr": 0}}, "generator.lr: must be greater than 0, got 0.0"),
    ({"generator": {"weight_decay": -1e-5}}, "generator.weight_decay: must be at least 0, got -1e-05"),
    ({"generator": {"beta1": 1.0}}, r"generator.beta1: must lie in \[0, 1\), got 1.0"),
    ({"generator": {"lambda_cycle": -10}}, "generator.lambda_cycle: must be at least 0, got -10.0"),
    ({"generator": {"sample_every": -1}}, "generator.sample_every: must be at least 0, got -1"),
    ({"generator": {"max_steps_per_epoch": 0}}, "generator.max_steps_per_epoch: must be at least 1, got 0"),
    ({"classifier": {"max_steps_per_epoch": 0}}, "classifier.max_steps_per_epoch: must be at least 1, got 0"),
    ({"generator": {"views": ["CC", "CC"]}}, "generator.views: lists 'CC' twice"),
    ({"generator": {"views": []}}, "generator.views: must list at least one of"),
    ({"classifier": {"epochs": -3}}, "classifier.epochs: must be at least 1, got -3"),
    ({"classifier": {"batch_size": 0}}, "classifier.batch_size: must be at least 1, got 0"),
    ({"classifier": {"lr": -0.1}}, "classifier.lr: must be greater than 0, got -0.1"),
    ({"classifier": {"lr": float("nan")}}, "classifier.lr: expected a finite number, got nan"),
    ({"classifier": {"lr": float("inf")}}, "classifier.lr: expected a finite number, got inf"),
    ({"classifier": {"weight_decay": -0.5}}, "classifier.weight_decay: must be at least 0, got -0.5"),
    ({"classifier": {"patience": 0}}, "classifier.patience: must be at least 1, got 0"),
    ({"classifier": {"lr_patience": -1}}, "classifier.lr_patience: must be at least 0, got -1"),
    ({"classifier": {"warmup_epochs": -2}}, "classifier.warmup_epochs: must be at least 0, got -2"),
    ({"classifier": {"lr_factor": 1.0}}, r"classifier.lr_factor: must lie in \(0, 1\), got 1.0"),
    ({"classifier": {"augment_strength": 1.5}}, r"classifier.augment_strength: must lie in \[0, 1\], got 1.5"),
    ({"classifier": {"architectures": []}}, "classifier.architectures: must list at least one of"),
    ({"classifier": {"modalities": ["MRI"]}}, "classifier.modalities: unknown value 'MRI'"),
    ({"classifier": {"architectures": ["vgg16"]}, "preprocess": {"image_size": 16}},
     "classifier.architectures: vgg16 needs preprocess.image_size of at least 32, got 16"),
    ({"evaluate": {"robustness_shares": [0, 150]}}, r"evaluate.robustness_shares\[1\]: must lie in \[0, 100\], got 150"),
    ({"evaluate": {"robustness_shares": []}}, "evaluate.robustness_shares: must list at least one share"),
    ({"evaluate": {"robustness_draws": 0}}, "evaluate.robustness_draws: must be at least 1, got 0"),
    ({"gate": {"floors": {"F+C": {"auc": 1.5}}}}, r"gate.floors.F\+C.auc: must lie in \[0, 1\], got 1.5"),
    ({"gate": {"floors": {"F+C": {"mcc": "high"}}}}, r"gate.floors.F\+C.mcc: expected a number, got 'high'"),
    ({"gate": {"generator_floors": {"psnr": -3}}}, "gate.generator_floors.psnr: must lie in"),
    ({"gate": {"imputation_tolerance": -0.02}}, r"gate.imputation_tolerance: must lie in \[0, 1\], got -0.02"),
    ({"tune": {"trials": 0}}, "tune.trials: must be at least 1, got 0"),
    ({"tune": {"storage": ""}}, "tune.storage: must not be empty"),
]


@pytest.mark.parametrize("raw, message", BAD_VALUES, ids=[m.split(":")[0].replace("\\", "") for _, m in BAD_VALUES])
def test_value_the_pipeline_cannot_use_is_refused_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        params_from_dict(raw)


def test_bad_value_in_a_file_names_the_file_and_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("classifier:\n  epochs: -3\n")
    with pytest.raises(ConfigError, match=r"params.yaml: classifier.epochs: must be at least 1, got -3$"):
        load_params(tmp_path / "params.yaml")


def test_exponent_floats_are_numbers_as_users_write_them(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "generator:\n  lr: 1e-3\n  weight_decay: 1E-5\n  lambda_cycle: 1.0e1\n"
        "classifier:\n  lr: 2e-4\ntune:\n  space:\n    lr: {low: 1e-5, high: 1e-2, log: true}\n")
    params = load_params(tmp_path / "params.yaml")
    assert (params.generator.lr, params.generator.weight_decay, params.generator.lambda_cycle) == (1e-3, 1e-5, 10.0)
    assert params.classifier.lr == 2e-4
    assert params.tune.space["lr"] == {"low": 1e-5, "high": 1e-2, "log": True}
    # a mapping read by a plain YAML 1.1 reader (profiles, `dvc exp run -S` values) carries "1e-3" strings
    assert params_from_dict({"classifier": {"lr": "1e-3"}}).classifier.lr == 1e-3
    with pytest.raises(ConfigError, match=r"classifier.lr: expected a number, got 'fast'"):
        params_from_dict({"classifier": {"lr": "fast"}})


def test_test_share_follows_the_fold_count_unless_given_consistently():
    assert params_from_dict({}).split.test_share == pytest.approx(0.2)
    assert params_from_dict({"split": {"folds": 4}}).split.test_share == pytest.approx(0.25)
    assert params_from_dict({"split": {"folds": 3, "test_share": 0.33}}).split.test_share == 0.33
    assert params_from_dict({"split": {"folds": 10, "test_share": None}}).split.test_share == pytest.approx(0.1)


def test_defaults_committed_params_and_every_profile_are_valid():
    from virtual_biopsy.cli.profile import profile_overrides

    assert params_from_dict({}) == Params()
    load_params(ROOT / "params.yaml")
    for profile in sorted((ROOT / "profiles").glob("*.yaml")):
        assert profile_overrides(profile, ROOT / "params.yaml"), profile.name


def test_split_stage_with_a_bad_val_share_exits_1_with_one_line_naming_the_key(processed_project, tmp_path):
    import shutil
    import subprocess
    import sys

    import yaml

    interim = tmp_path / "data" / "interim"
    interim.mkdir(parents=True)
    shutil.copy(processed_project / "data" / "interim" / "manifest.csv", interim / "manifest.csv")
    params = yaml.safe_load((processed_project / "params.yaml").read_text())
    params["split"]["val_share"] = 0.9
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "virtual_biopsy.stages.split", "--root", str(tmp_path), "--no-mlflow"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("split: ") and "split.val_share: 0.9 plus the test share 1/2" in lines[0]
    assert not (tmp_path / "data" / "splits").exists()
