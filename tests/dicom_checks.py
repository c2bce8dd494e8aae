"""DICOM conformance checks shared by the tests: dciodvfy (Debian dicom3tools) on a written file."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

# dciodvfy comes with `make test` (scripts/install_system_deps.sh); the mark only spares a bare
# pytest run on a machine without it.
needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dciodvfy (Debian dicom3tools) missing; scripts/install_system_deps.sh installs it")


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy reports for ``path`` (warnings ignored); the file must be
    recognised as a Mammography For Presentation object first."""
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (report.stdout + report.stderr).splitlines()
    if "MammographyImageForPresentation" not in [line.strip() for line in lines]:
        return [f"not recognised as a mammography image: {lines[:3]}"]
    return [line for line in lines if line.startswith("Error")]


def dciodvfy_iod_errors(path: Path, iod: str) -> list[str]:
    """The ``Error`` lines dciodvfy reports for ``path``, after checking that it recognised the file
    as the IOD named ``iod`` (its first output line, e.g. ``EnhancedSR`` or ``Segmentation``)."""
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (report.stdout + report.stderr).splitlines()
    if iod not in [line.strip() for line in lines]:
        return [f"not recognised as {iod}: {lines[:3]}"]
    return [line for line in lines if line.startswith("Error")]
