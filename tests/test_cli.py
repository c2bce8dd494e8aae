"""The `vbiopsy` command line: every sub-command is listed, and listing them stays cheap."""
from __future__ import annotations

import subprocess
import sys

from virtual_biopsy.cli.main import COMMANDS, build_parser


def test_help_lists_every_sub_command():
    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text


def test_building_the_parser_does_not_import_torch_or_mlflow():
    # `vbiopsy --help` builds every sub-command's parser; importing torch and MLflow for that took
    # four seconds. A fresh interpreter, because this test session has long since imported both.
    code = ("import sys; from virtual_biopsy.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
