"""`vbiopsy` command line: one sub-command per user task.

Each sub-command lives in the module that owns the concept and exposes
``register(subparsers)``, which adds its parser and sets ``func``; this file only lists them, so
adding a command never means editing a god module.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> module with register(subparsers)
COMMANDS = {
    "synth": "virtual_biopsy.data.synthetic",
    "import": "virtual_biopsy.data.importers",
    "pipeline": "virtual_biopsy.mlops.pipeline_runs",
    "impute": "virtual_biopsy.cli.impute",
    "profile": "virtual_biopsy.cli.profile",
    "server": "virtual_biopsy.mlops.server",
    "registry": "virtual_biopsy.cli.registry",
    "predict": "virtual_biopsy.serving.predict",
    "tune": "virtual_biopsy.cli.tune",
    "compare-generators": "virtual_biopsy.cli.compare",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vbiopsy",
        description="Virtual biopsy platform: synthetic CESM data, DVC stages, MLflow tracking and registry.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
