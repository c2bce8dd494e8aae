"""Profiles: the paper's settings are one validated switch away from the default."""
from __future__ import annotations

from pathlib import Path

import pytest

from virtual_biopsy.cli.profile import profile_overrides
from virtual_biopsy.core.config import ConfigError
from virtual_biopsy.core.experiments import exp_run_command

ROOT = Path(__file__).resolve().parents[1]


def test_paper_profile_sets_the_papers_image_size_and_architectures():
    overrides = profile_overrides(ROOT / "profiles" / "paper.yaml", ROOT / "params.yaml")
    assert overrides["preprocess.image_size"] == 256
    assert overrides["classifier.architectures"] == ["resnet18", "resnet50", "vgg16"]
    assert overrides["classifier.epochs"] == 300 and overrides["generator.epochs"] == 200
    command = exp_run_command(overrides, "paper")
    assert command[:5] == ["dvc", "exp", "run", "-n", "paper"]
    assert 'classifier.architectures=["resnet18", "resnet50", "vgg16"]' in command


def test_profile_with_unknown_key_is_refused_naming_it(tmp_path):
    (tmp_path / "bad.yaml").write_text("classifier:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*classifier.*epoch"):
        profile_overrides(tmp_path / "bad.yaml", ROOT / "params.yaml")


def test_missing_profile_lists_the_available_ones(tmp_path):
    (tmp_path / "paper.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"no such profile.*paper"):
        profile_overrides(tmp_path / "gpu.yaml", ROOT / "params.yaml")
