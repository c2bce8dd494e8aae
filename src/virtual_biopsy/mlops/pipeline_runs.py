"""`vbiopsy pipeline start|finish|summary`: the parent MLflow run around one `dvc repro`.

``make demo`` and CI call ``start`` before ``dvc repro`` and export the printed run id as
``VBIOPSY_PARENT_RUN_ID`` so every stage's run nests under one parent; ``finish`` closes it with
the headline metrics; ``summary`` tells the user where the results are.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from virtual_biopsy.core.config import load_params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.mlops import tracking

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
    client = tracking.get_client(root)
    run = tracking.StageRun(client, args.run_id, "", root, {})
    headline = ProjectPaths(root).reports / "metrics.json"
    if headline.exists():
        run.log_metrics(_flatten_numbers(json.loads(headline.read_text())))
        run.log_artifact(headline)
    client.set_terminated(args.run_id, status="FINISHED")
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
        for arch, entry in json.loads(gate.read_text()).items():
            champion = entry.get("champion") or "none"
            print(f"Gate {arch}: {entry['registered_model']} v{entry['version']} {entry['decision']}"
                  f" (champion: v{champion}); details: vbiopsy registry status")
    print("\nMLflow UI on these runs:")
    print(f"  {tracking.ui_command(root)}   # then open http://127.0.0.1:5000")
    print("Compare runs by settings: filter with  tags.stage = 'evaluate'  and sort by metrics.test_auc\n")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="parent MLflow run around dvc repro (used by make demo / CI)")
    parser.add_argument("--root", default=".", help="project root (default: current directory)")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("start", help="open a parent run and print its id").set_defaults(func=start)
    done = actions.add_parser("finish", help="log headline metrics on the parent run and close it")
    done.add_argument("run_id")
    done.set_defaults(func=finish)
    actions.add_parser("summary", help="print where the results are and how to open the MLflow UI").set_defaults(
        func=summary
    )
