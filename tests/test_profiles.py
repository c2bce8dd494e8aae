"""Profiles: the paper's method is one validated switch away from the default, and `gpu` is that
method on a GPU (paper.yaml plus execution keys only), derived rather than copied."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from virtual_biopsy.cli.main import main
from virtual_biopsy.cli.profile import (
    EXECUTION_KEYS,
    EXTENDS_KEY,
    method_differences,
    profile_overrides,
    profile_params,
    resolve_profile,
)
from virtual_biopsy.core.config import ConfigError, Params, flatten, load_params, params_from_dict, read_yaml
from virtual_biopsy.core.experiments import exp_run_command

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "profiles"
PARAMS = ROOT / "params.yaml"


def _gpu_method_keys_that_differ_from_paper(profiles: Path) -> dict:
    """What the gpu-equals-paper test checks, for the real profiles or a modified copy of them."""
    return method_differences(profiles / "gpu.yaml", profiles / "paper.yaml", PARAMS)


def _copy_profiles(dest: Path, gpu_sections: dict | None = None) -> Path:
    """profiles/ copied to ``dest``, with ``gpu_sections`` laid over gpu.yaml's own keys."""
    shutil.copytree(PROFILES, dest)
    if gpu_sections:
        gpu = read_yaml((dest / "gpu.yaml").read_text())
        for section, keys in gpu_sections.items():
            gpu.setdefault(section, {}).update(keys)
        (dest / "gpu.yaml").write_text(yaml.safe_dump(gpu))
    return dest


# --- what the profiles hold ------------------------------------------------------------------------
def test_paper_profile_sets_the_papers_image_size_and_architectures():
    overrides = profile_overrides(PROFILES / "paper.yaml", PARAMS)
    assert overrides["preprocess.image_size"] == 256
    assert overrides["classifier.architectures"] == ["resnet18", "resnet50", "vgg16"]
    assert overrides["classifier.epochs"] == 300 and overrides["generator.epochs"] == 200
    command = exp_run_command(overrides, "paper")
    assert command[:5] == ["dvc", "exp", "run", "-n", "paper"]
    assert 'classifier.architectures=["resnet18", "resnet50", "vgg16"]' in command


def test_paper_generator_objective_is_adversarial_cycle_x10_identity_x5_without_paired_term():
    own = read_yaml((PROFILES / "paper.yaml").read_text())["generator"]
    # written in paper.yaml itself, so a change to the CPU default in params.yaml cannot alter them
    assert (own["lambda_cycle"], own["lambda_identity"], own["lambda_paired"]) == (10.0, 5.0, 0.0)
    generator = profile_params(PROFILES / "paper.yaml", PARAMS).generator
    assert (generator.lambda_cycle, generator.lambda_identity, generator.lambda_paired) == (10.0, 5.0, 0.0)
    # where the paper is silent: the authors' public code's batch; lr 1e-5 is the paper's fine-tuning rate
    assert generator.batch_size == 8 and generator.lr == pytest.approx(1e-5)
    assert generator.pretrained_weights == "models/pretrain/{view}.pt"  # fine-tuned after pre-training [P 5.2.1]


def test_every_key_of_both_profiles_is_accepted_by_the_params_checks():
    known = set(flatten(Params()))
    for name in ("paper", "gpu"):
        resolved = resolve_profile(PROFILES / f"{name}.yaml")
        assert EXTENDS_KEY not in resolved
        params_from_dict(resolved)                      # alone, over config.py's defaults
        profile_params(PROFILES / f"{name}.yaml", PARAMS)  # over params.yaml, as it is applied
        unknown = set(flatten(resolved)) - known
        assert not unknown, f"{name}.yaml sets keys config.py does not have: {sorted(unknown)}"


def test_execution_keys_are_real_params_keys():
    assert EXECUTION_KEYS <= set(flatten(Params()))


# --- gpu is paper plus execution keys --------------------------------------------------------------
def test_gpu_profile_extends_paper_and_sets_execution_keys_only():
    own = read_yaml((PROFILES / "gpu.yaml").read_text())
    assert own.pop(EXTENDS_KEY) == "paper.yaml"
    assert set(flatten(own)) <= EXECUTION_KEYS, sorted(set(flatten(own)) - EXECUTION_KEYS)
    params = profile_params(PROFILES / "gpu.yaml", PARAMS)
    assert params.generator.device == "cuda" and params.classifier.device == "cuda"


def test_gpu_runs_the_same_method_as_paper():
    assert _gpu_method_keys_that_differ_from_paper(PROFILES) == {}


def test_a_method_key_changed_in_gpu_is_reported_as_a_difference_from_paper(tmp_path):
    profiles = _copy_profiles(tmp_path / "profiles", {"generator": {"lr": 0.0002}, "classifier": {"batch_size": 32}})
    assert _gpu_method_keys_that_differ_from_paper(profiles) == {
        "classifier.batch_size": (32, 16),
        "generator.lr": (0.0002, pytest.approx(1e-5)),
    }


def test_an_execution_key_changed_in_gpu_is_not_a_method_difference(tmp_path):
    profiles = _copy_profiles(tmp_path / "profiles", {"generator": {"device": "cuda:1"}, "ingest": {"workers": 3}})
    assert _gpu_method_keys_that_differ_from_paper(profiles) == {}


def test_gpu_inherits_a_method_change_made_in_paper(tmp_path):
    profiles = _copy_profiles(tmp_path / "profiles")
    paper = read_yaml((profiles / "paper.yaml").read_text())
    paper["generator"]["epochs"] = 150
    (profiles / "paper.yaml").write_text(yaml.safe_dump(paper))
    assert profile_params(profiles / "gpu.yaml", PARAMS).generator.epochs == 150
    assert _gpu_method_keys_that_differ_from_paper(profiles) == {}


# --- extends: how a profile names its base ---------------------------------------------------------
def test_own_keys_replace_the_base_profiles_and_keep_its_other_keys_in_the_section(tmp_path):
    (tmp_path / "base.yaml").write_text("generator:\n  epochs: 40\n  lr: 0.01\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ngenerator:\n  lr: 0.02\n")
    assert resolve_profile(tmp_path / "child.yaml") == {"generator": {"epochs": 40, "lr": 0.02}}


def test_extends_naming_a_missing_profile_is_refused_naming_it(tmp_path):
    (tmp_path / "child.yaml").write_text("extends: papr.yaml\n")
    with pytest.raises(ConfigError, match=r"child.yaml: extends: papr.yaml: no such profile .*child"):
        resolve_profile(tmp_path / "child.yaml")


def test_extends_that_is_not_a_profile_file_name_is_refused(tmp_path):
    for value in ("paper", "../profiles/paper.yaml", "[paper.yaml]"):
        (tmp_path / "child.yaml").write_text(f"extends: {value}\n")
        with pytest.raises(ConfigError, match=r"child.yaml: extends: expected the file name of a profile"):
            resolve_profile(tmp_path / "child.yaml")


def test_extends_going_round_in_a_circle_is_refused_naming_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"circle \(a.yaml -> b.yaml -> a.yaml\)"):
        resolve_profile(tmp_path / "a.yaml")


def test_profile_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- generator\n")
    with pytest.raises(ConfigError, match=r"list.yaml: a profile is a mapping"):
        resolve_profile(tmp_path / "list.yaml")


def test_profile_with_unknown_key_is_refused_naming_it(tmp_path):
    (tmp_path / "bad.yaml").write_text("classifier:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*classifier.*epoch"):
        profile_overrides(tmp_path / "bad.yaml", PARAMS)


def test_profile_extending_one_with_a_bad_value_is_refused_naming_the_profile_applied(tmp_path):
    (tmp_path / "base.yaml").write_text("generator:\n  lr: 0\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\n")
    with pytest.raises(ConfigError, match=r"child.yaml: generator.lr: must be greater than 0"):
        profile_overrides(tmp_path / "child.yaml", PARAMS)


def test_missing_profile_lists_the_available_ones(tmp_path):
    (tmp_path / "paper.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"no such profile.*paper"):
        profile_overrides(tmp_path / "gpu.yaml", PARAMS)


# --- applying a profile ----------------------------------------------------------------------------
def test_exp_run_command_spells_null_and_booleans_as_dvc_reads_them():
    command = exp_run_command({"generator.pretrained_weights": None, "generator.augment": False}, "x")
    assert command[-3:] == ["generator.pretrained_weights=null", "-S", "generator.augment=false"]


def test_cli_prints_the_exp_run_command_with_paper_and_gpu_keys(capsys):
    assert main(["profile", "gpu", "--root", str(ROOT)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("dvc exp run -n profile-gpu ")
    assert "generator.device=cuda" in printed and "generator.lambda_identity=5.0" in printed


def test_cli_with_a_bad_profile_prints_one_line_and_exits_1(tmp_path, capsys):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "bad.yaml").write_text("extends: nowhere.yaml\n")
    assert main(["profile", "bad", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("vbiopsy profile: ") and "nowhere.yaml: no such profile" in err


def _git_dvc_project(root: Path) -> Path:
    """A git + DVC project holding the repo's params.yaml and profiles/ and one stage that does nothing."""
    root.mkdir()
    shutil.copy(PARAMS, root / "params.yaml")
    shutil.copytree(PROFILES, root / "profiles")
    (root / "dvc.yaml").write_text("stages:\n  noop:\n    cmd: echo applied\n    params: [seed]\n")
    dvc = str(Path(sys.prefix) / "bin" / "dvc")
    for command in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "config", "core.analytics", "false"],
                    ["git", "add", "-A"],
                    ["git", "-c", "user.email=t@example.org", "-c", "user.name=test", "commit", "-q", "-m", "init"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    return root


@pytest.mark.slow
def test_applying_gpu_via_the_cli_writes_the_merged_params(tmp_path, monkeypatch):
    project = _git_dvc_project(tmp_path / "project")
    monkeypatch.setenv("PATH", f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}")  # `dvc` by name
    for key, value in (("GIT_AUTHOR_NAME", "test"), ("GIT_COMMITTER_NAME", "test"),
                       ("GIT_AUTHOR_EMAIL", "t@example.org"), ("GIT_COMMITTER_EMAIL", "t@example.org")):
        monkeypatch.setenv(key, value)  # dvc commits the experiment
    assert main(["profile", "gpu", "--run", "--root", str(project)]) == 0
    # What the stages now read: params.yaml with paper.yaml, then gpu.yaml's own keys, on top.
    assert load_params(project / "params.yaml") == profile_params(PROFILES / "gpu.yaml", PARAMS)


# --- paper-smoke is paper with its counts cut (make paper-smoke) ------------------------------------
# The keys paper-smoke may change: how many patients, folds, epochs, steps and draws, and the raw
# rows synthesised (every image is still resized to preprocess.image_size). Nothing that sets a
# network's size, a batch, a loss weight, a rate or the image size the networks see.
SMOKE_COUNT_KEYS = frozenset({
    "synth.patients", "synth.image_height", "pretrain.cohort.patients", "pretrain.cohort.image_height",
    "validate_data.min_patients", "split.folds", "split.test_share",  # test_share follows from folds (1/folds)
    "pretrain.epochs", "pretrain.warmup_epochs", "pretrain.patience",
    "generator.epochs", "generator.warmup_epochs", "generator.patience", "generator.max_steps_per_epoch",
    "classifier.epochs", "classifier.warmup_epochs", "classifier.patience", "classifier.lr_patience",
    "classifier.max_steps_per_epoch",
    "evaluate.robustness_draws", "evaluate.bootstrap_resamples",
})
# What "paper scale" means for the smoke run: these must be paper's, key by key.
PAPER_SCALE_KEYS = (
    "preprocess.image_size", "generator.ngf", "generator.ndf", "generator.n_residual_blocks",
    "generator.batch_size", "classifier.batch_size", "classifier.architectures", "classifier.modalities",
    "classifier.views", "generator.views", "generator.lambda_cycle", "generator.lambda_identity",
    "generator.lambda_paired", "generator.lr", "pretrain.lr", "classifier.lr", "generator.pretrained_weights",
    "generator.augment", "classifier.augment", "classifier.augment_strength", "split.val_share", "pretrain.val_share",
)
SMOKE_SCRIPT = ROOT / "scripts" / "paper_smoke.py"


def _smoke_method_keys_that_differ_from_paper(profiles: Path) -> dict:
    return method_differences(profiles / "paper-smoke.yaml", profiles / "paper.yaml", PARAMS)


def _paper_smoke_script():
    """scripts/paper_smoke.py as a module (scripts/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_smoke", SMOKE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_paper_smoke_extends_paper_and_sets_count_and_execution_keys_only():
    own = read_yaml((PROFILES / "paper-smoke.yaml").read_text())
    assert own.pop(EXTENDS_KEY) == "paper.yaml"
    allowed = SMOKE_COUNT_KEYS | EXECUTION_KEYS
    assert set(flatten(own)) <= allowed, sorted(set(flatten(own)) - allowed)
    differences = _smoke_method_keys_that_differ_from_paper(PROFILES)
    assert differences and set(differences) <= SMOKE_COUNT_KEYS, sorted(set(differences) - SMOKE_COUNT_KEYS)


def test_paper_smoke_runs_paper_sizes_batches_architectures_and_objective():
    smoke = flatten(profile_params(PROFILES / "paper-smoke.yaml", PARAMS))
    paper = flatten(profile_params(PROFILES / "paper.yaml", PARAMS))
    assert {key: smoke[key] for key in PAPER_SCALE_KEYS} == {key: paper[key] for key in PAPER_SCALE_KEYS}
    assert (smoke["preprocess.image_size"], smoke["generator.ngf"], smoke["generator.ndf"],
            smoke["generator.n_residual_blocks"]) == (256, 64, 64, 9)
    assert (smoke["generator.batch_size"], smoke["classifier.batch_size"]) == (8, 16)
    assert list(smoke["classifier.architectures"]) == ["resnet18", "resnet50", "vgg16"]
    assert smoke["generator.pretrained_weights"] == "models/pretrain/{view}.pt"  # pre-training runs, and is used


def test_paper_smoke_caps_steps_epochs_and_folds():
    smoke = profile_params(PROFILES / "paper-smoke.yaml", PARAMS)
    assert smoke.generator.max_steps_per_epoch is not None and smoke.classifier.max_steps_per_epoch is not None
    assert smoke.split.folds == 2 and smoke.validate_data.min_patients <= smoke.synth.patients
    assert max(smoke.generator.epochs, smoke.pretrain.epochs, smoke.classifier.epochs) <= 2


def test_a_size_changed_in_paper_smoke_is_a_difference_outside_the_count_keys(tmp_path):
    profiles = _copy_profiles(tmp_path / "profiles")
    smoke = read_yaml((profiles / "paper-smoke.yaml").read_text())
    smoke["generator"]["ngf"] = 32
    smoke["classifier"]["batch_size"] = 4
    (profiles / "paper-smoke.yaml").write_text(yaml.safe_dump(smoke))
    differences = _smoke_method_keys_that_differ_from_paper(profiles)
    assert set(differences) - SMOKE_COUNT_KEYS == {"generator.ngf", "classifier.batch_size"}


def test_paper_smoke_copy_is_a_git_repository_of_the_working_tree_with_the_profile_applied(tmp_path):
    script = _paper_smoke_script()
    copy = tmp_path / "copy"
    copy.mkdir()
    script.copy_working_tree(ROOT, copy)
    changed = script.apply_profile(copy, PROFILES / "paper-smoke.yaml")
    assert load_params(copy / "params.yaml") == profile_params(PROFILES / "paper-smoke.yaml", PARAMS)
    assert changed["preprocess.image_size"] == (load_params(PARAMS).preprocess.image_size, 256)
    assert (copy / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
    assert not (copy / ".venv").exists() and not (copy / "data" / "raw").exists()  # ignored paths stay behind
    log = subprocess.run(["git", "log", "--format=%s"], cwd=copy, capture_output=True, text=True, check=True).stdout
    assert log.startswith("paper-smoke: working tree of ")
    status = subprocess.run(["git", "status", "--porcelain"], cwd=copy, capture_output=True, text=True, check=True)
    assert status.stdout.strip() == "M params.yaml"  # committed by the script once its dataset is recorded
