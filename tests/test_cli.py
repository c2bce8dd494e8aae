"""The `vbiopsy` command line: every sub-command is registered, and listing them stays cheap."""
from __future__ import annotations

import argparse
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from virtual_biopsy.cli.main import COMMANDS, build_parser

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "virtual_biopsy"


def _modules_with_register() -> set[str]:
    """Dotted names of the package's modules that define a top-level ``register`` (a sub-command)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        if any(isinstance(node, ast.FunctionDef) and node.name == "register" for node in tree.body):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_every_module_that_defines_a_sub_command_is_listed():
    # A module with register() that COMMANDS leaves out would be a command nobody can run.
    assert _modules_with_register() == set(COMMANDS.values())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_listed_module_registers_the_command_it_is_listed_under(name):
    sub = argparse.ArgumentParser(prog="vbiopsy").add_subparsers(dest="command")
    importlib.import_module(COMMANDS[name]).register(sub)
    assert list(sub.choices) == [name]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_answers_help_with_its_own_usage(name, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([name, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: vbiopsy {name} ")


def test_unknown_command_fails_naming_it_and_the_commands_there_are(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["frobnicate"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err
    assert all(f"'{name}'" in err for name in COMMANDS)


def test_missing_command_fails_asking_for_one(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([])
    assert exited.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_building_the_parser_does_not_import_torch_or_mlflow():
    # `vbiopsy --help` builds every sub-command's parser; importing torch and MLflow for that took
    # four seconds. A fresh interpreter, because this test session has long since imported both.
    code = ("import sys; from virtual_biopsy.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
