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
