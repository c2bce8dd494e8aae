"""Shared fixtures. Tiny datasets come from the project's own generator (vbiopsy synth)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never talk to a tracking server by accident: each test that needs MLflow points it at a
# store inside its own temp folder.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    """A data/raw-like folder (DICOM studies + metadata.csv) of 16 simulated patients, 96 px high."""
    from virtual_biopsy.config import SynthConfig
    from virtual_biopsy.data.synthetic import synthesize

    raw = tmp_path_factory.mktemp("tiny") / "raw"
    synthesize(raw, SynthConfig(patients=16, image_height=96), seed=7)
    return raw
