"""Shared fixtures. Tiny datasets come from the project's own generator (vbiopsy synth)."""
from __future__ import annotations

import os

import pytest

# Tests never talk to a tracking server by accident: each test that needs MLflow points it at a
# store inside its own temp folder.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
