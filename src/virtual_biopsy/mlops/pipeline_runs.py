"""`vbiopsy pipeline start|finish|summary|links`: the parent MLflow run around one `dvc repro`.

``make demo`` and CI call ``start`` before ``dvc repro`` and export the printed run id as
``VBIOPSY_PARENT_RUN_ID`` so every stage's run nests under one parent; ``finish`` closes it with
the headline metrics; ``summary`` tells the user where the results are, ending with ``links``:
the command that serves the MLflow UI and the UI pages to open (in model-training mode).

Between ``start`` and ``finish`` each stage reopens the parent and ends it again with the
pipeline's status so far (tracking's module doc), so a driver that dies before ``finish`` leaves
no RUNNING parent once a stage has run. ``finish`` sets the final status: by default the stages'
verdict (FAILED if the latest attempt of a stage failed, KILLED if one was killed, FINISHED
otherwise); ``--aborted`` (a driver's exit trap) says the pipeline did not complete: the stages'
FAILED or KILLED, else FAILED; ``--status`` sets it outright.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from virtual_biopsy.core.config import load_params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.mlops import tracking, ui_links

# Files a user looks at first, in reading order (those that exist are listed).
RESULT_FILES = (
    ("Data-quality report", "reports/validation/data_docs/index.html"),
    ("Generator quality (Table 3)", "reports/evaluation/table3.md"),
    ("Virtual biopsy (Table A1)", "reports/evaluation/table_a1.md"),
    ("Robustness to missing CESM (Figure 5)", "reports/evaluation/figure5.png"),
    ("Settings compared (Figure 4)", "reports/evaluation/figure4.png"),
    ("ACR breakdown (Table 4)", "reports/evaluation/acr_breakdown.md"),
    ("Promotion gate", "reports/gate.json"),
)


def start(args: argparse.Namespace) -> int:
    print(tracking.start_pipeline_run(args.root, load_params(Path(args.root) / "params.yaml")))
    return 0


def finish(args: argparse.Namespace) -> int:
    root = Path(args.root)
    headline = ProjectPaths(root).reports / "metrics.json"
    if headline.exists() and not args.aborted:  # an aborted run's metrics.json is an older run's
        run = tracking.StageRun(tracking.get_client(root), args.run_id, "", root, {})
        run.log_metrics(_flatten_numbers(json.loads(headline.read_text())))
        run.log_artifact(headline)
    status = tracking.finish_pipeline_run(root, args.run_id, args.status, aborted=args.aborted)
    if status == "RUNNING":
        print(f"pipeline run {args.run_id}: a stage under it is still running; it ends the run when it ends")
    return 0


def _flatten_numbers(obj: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}".replace("Ĉ", "C_hat").replace("+", "_plus_")
        if isinstance(value, dict):
            out.update(_flatten_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def summary(args: argparse.Namespace) -> int:
    root = Path(args.root)
    print("\nResults")
    for title, rel in RESULT_FILES:
        if (root / rel).exists():
            print(f"  {title:<40} {rel}")
    table = root / "reports/evaluation/table_a1.md"
    if table.exists():
        print("\n" + table.read_text())
    gate = root / "reports/gate.json"
    if gate.exists():
        from virtual_biopsy.mlops import registry  # version numbers live in the registry, not in gate.json

        for arch, entry in json.loads(gate.read_text()).items():
            name = entry["registered_model"]
            challenger = registry.get_alias(name, registry.CHALLENGER, root)
            champion = registry.get_alias(name, registry.CHAMPION, root)
            print(f"Gate {arch}: {name} v{challenger or '?'} {entry['decision']}"
                  f" (champion: {'v' + champion if champion else 'none'}); details: vbiopsy registry status")
    print_ui_links(root)
    return 0


def print_ui_links(root: Path) -> None:
    """The command that serves the MLflow UI and the pages to open (model-training mode, see ui_links.UI_MODE)."""
    print("\nMLflow UI on these runs:")
    print(f"  {ui_links.ui_command(root)}")
    for title, url in ui_links.ui_links(root).items():
        print(f"  {title}:\n    {url}")
    print()


def links(args: argparse.Namespace) -> int:
    print_ui_links(Path(args.root))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="parent MLflow run around dvc repro (used by make demo / CI)")
    parser.add_argument("--root", default=".", help="project root (default: current directory)")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("start", help="open a parent run and print its id").set_defaults(func=start)
    done = actions.add_parser("finish", help="log headline metrics on the parent run and close it")
    done.add_argument("run_id")
    done.add_argument("--status", choices=("FINISHED", "FAILED", "KILLED"), default=None,
                      help="final status (default: from the stage runs under it)")
    done.add_argument("--aborted", action="store_true",
                      help="the pipeline did not complete (exit trap): FAILED unless a stage says KILLED")
    done.set_defaults(func=finish)
    actions.add_parser("summary", help="print where the results are and how to open the MLflow UI").set_defaults(
        func=summary
    )
    actions.add_parser("links", help="print the command that serves the MLflow UI and the pages to open").set_defaults(
        func=links
    )
