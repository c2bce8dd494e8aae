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
