"""`vbiopsy registry`: a version that does not exist or is not a number, and a rollback with
nothing to roll back to, are one line naming the model and version (exit 1), not a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from virtual_biopsy.cli.main import main as vbiopsy
from virtual_biopsy.mlops import registry

NAME = "virtual-biopsy-resnet18"


@pytest.mark.parametrize("version, message", [
    ("99", f"registry promote: {NAME} v99: no such version; registered versions: v1"),
    ("abc", f"registry promote: {NAME}: 'abc' is not a model version (versions are numbered 1, 2, 3, ...)"),
    ("0", f"registry promote: {NAME}: '0' is not a model version"),
    ("1.5", f"registry promote: {NAME}: '1.5' is not a model version"),
])
def test_promote_of_a_missing_or_malformed_version_is_one_line_naming_model_and_version(
        gated_project, capsys, version, message):
    assert vbiopsy(["registry", "promote", version, "--root", str(gated_project)]) == 1
    assert vbiopsy(["registry", "promote", version, "--root", str(gated_project), "--force", "--reason", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(message) for line in err), err
    assert registry.get_alias(NAME, "champion", gated_project) == "1"


def test_rollback_with_no_previous_champion_is_one_line(gated_project, capsys):
    assert vbiopsy(["registry", "rollback", "--root", str(gated_project)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"registry rollback: {NAME}: champion v1 has no previous champion recorded; nothing to roll back to"]


def test_an_unregistered_model_is_named_by_promote_and_rollback(tmp_path, capsys):
    root = Path(tmp_path)
    (root / "params.yaml").write_text("seed: 1\n")
    assert vbiopsy(["registry", "promote", "1", "--root", str(root)]) == 1
    assert vbiopsy(["registry", "rollback", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # (MLflow logs a few INFO lines while it creates the new project's embedded store)
    assert [line for line in err.splitlines() if line.startswith("registry ")] == [
        f"registry promote: {NAME} v1: no such version; the model has no versions yet (run the gate stage)",
        f"registry rollback: {NAME}: no champion to roll back"]


def test_command_line_prints_nothing_but_the_message(gated_project):
    done = subprocess.run([str(Path(sys.executable).with_name("vbiopsy")), "registry", "promote", "99",
                           "--root", str(gated_project)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"registry promote: {NAME} v99: no such version; registered versions: v1"]
