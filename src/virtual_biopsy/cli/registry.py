"""`vbiopsy registry status | promote VERSION | rollback`: the fused pipelines' aliases by hand.

    vbiopsy registry status [--arch resnet18]
    vbiopsy registry promote 3 [--arch resnet18] [--force --reason "..."]
    vbiopsy registry rollback [--arch resnet18]

``promote`` runs the gate's checks first (same code as the gate stage) on this workspace's
reports, which must belong to the version's data version; it refuses (exit 1, reasons printed)
when a check fails unless ``--force --reason`` is given, and then records the reason on the
version. ``rollback`` moves ``champion`` back to the champion it replaced. Both only move
aliases and record tags; nothing is retrained or deleted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from virtual_biopsy.core.config import ConfigError, load_params
from virtual_biopsy.core.paths import ProjectPaths

ALIASES_SHOWN = ("champion", "challenger")


def _context(args: argparse.Namespace):
    paths = ProjectPaths(Path(args.root))
    params = load_params(args.params or paths.root / "params.yaml")
    arch = args.arch or params.classifier.architectures[0]
    return paths, params, arch


def status(args: argparse.Namespace) -> int:
    """Print every configured architecture's aliases with their gate verdicts."""
    from virtual_biopsy.mlops import registry

    paths, params, _ = _context(args)
    for arch in ([args.arch] if args.arch else params.classifier.architectures):
        name = registry.pipeline_model_name(arch)
        aliases = registry.aliases(name, paths.root)
        print(f"{name}:" + ("" if aliases else " not registered yet (run the gate stage)"))
        shown: list[str] = []
        for alias in ALIASES_SHOWN:
            version = aliases.get(alias)
            if version is None:
                print(f"  @{alias:<10} unset")
                continue
            tags = registry.get_version_tags(name, version, paths.root)
            line = f"  @{alias:<10} v{version}  gate: {tags.get('gate.decision', 'n/a')}"
            if tags.get("gate.decision") == "rejected":
                line += f" ({tags.get('gate.reasons')})"
            if tags.get("gate.forced") == "true":
                line += f"  [forced: {tags.get('gate.force_reason')}]"
            if tags.get(registry.PREVIOUS_CHAMPION_TAG):
                line += f"  previous champion v{tags[registry.PREVIOUS_CHAMPION_TAG]}"
            print(line)
            if version not in shown:
                shown.append(version)
        for version in shown:
            print(gate_report(version, registry.get_version_tags(name, version, paths.root)))
    return 0


def gate_report(version: str, tags: dict[str, str]) -> str:
    """The gate checks recorded on a version, one line each: name, verdict, value and threshold."""
    prefix = "gate.check."
    checks = sorted((key[len(prefix):], value) for key, value in tags.items() if key.startswith(prefix))
    if not checks:
        return f"  gate report v{version}: none recorded"
    width = max(len(check) for check, _ in checks)
    return "\n".join([f"  gate report v{version}:", *(f"    {check:<{width}}  {value}" for check, value in checks)])


def promote(args: argparse.Namespace) -> int:
    """Move champion to VERSION after the gate's checks pass (or with --force --reason)."""
    from virtual_biopsy.evaluation import gate_checks
    from virtual_biopsy.evaluation.gate_checks import decide, decision_tags
    from virtual_biopsy.mlops import registry, tracking
    from virtual_biopsy.mlops.registry import champion_record

    paths, params, arch = _context(args)
    name = registry.pipeline_model_name(arch)
    if args.force and not args.reason:
        print("registry promote: --force needs --reason \"...\" (recorded on the version)", file=sys.stderr)
        return 2
    args.version = registry.version_number(name, args.version)  # "abc", "0": RegistryError naming the model
    tags = registry.get_version_tags(name, args.version, paths.root)  # no such version: RegistryError
    if args.force:
        previous = registry.promote(name, args.version, paths.root, {
            gate_checks.gate_tag("promoted_by"): "manual", gate_checks.gate_tag("forced"): "true",
            gate_checks.gate_tag("force_reason"): args.reason})
        print(f"{name} v{args.version} -> @champion (forced: {args.reason}; previous champion: {previous or 'none'})")
        return 0
    here = tracking.data_version(paths.root)
    if tags.get("data_version") != here:
        print(f"registry promote: {name} v{args.version} was built from data version {tags.get('data_version')}, "
              f"this workspace's reports are for {here}; check out that revision, or use --force --reason",
              file=sys.stderr)
        return 1
    champion = champion_record(name, paths.root)
    if champion is not None and champion["version"] == str(args.version):
        champion = None  # compared with itself the champion check says nothing
    decision = decide(paths, params, arch, champion, tracking.data_version(paths.root))
    registry.set_version_tags(name, args.version, decision_tags(decision), paths.root)
    if not decision.promoted:
        print(f"registry promote: {name} v{args.version} refused by the gate:", file=sys.stderr)
        for reason in decision.reasons:
            print(f"  {reason}", file=sys.stderr)
        return 1
    previous = registry.promote(name, args.version, paths.root, {gate_checks.gate_tag("promoted_by"): "manual"})
    print(f"{name} v{args.version} -> @champion (every gate check passed; previous champion: {previous or 'none'})")
    return 0


def rollback(args: argparse.Namespace) -> int:
    """Move champion back to the champion it replaced."""
    from virtual_biopsy.mlops import registry

    paths, _, arch = _context(args)
    name = registry.pipeline_model_name(arch)
    current, previous = registry.rollback(name, paths.root)  # nothing to roll back: ValueError, one line
    print(f"{name}: @champion v{current} -> v{previous} (rolled back)")
    return 0


def _run(handler):
    """``handler`` with expected failures (bad params, unknown version, missing report) as one line."""
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ConfigError, ValueError, FileNotFoundError) as exc:  # RegistryError is a ValueError
            print(f"registry {args.action}: {exc}", file=sys.stderr)
            return 1
    return run


def register(subparsers) -> None:
    """Add `vbiopsy registry` with its three actions."""
    parser = subparsers.add_parser("registry", help="fused pipelines in the model registry: status, promote, rollback")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=".", help="project root (default: current directory)")
    common.add_argument("--params", default=None, help="params file (default: ROOT/params.yaml)")
    common.add_argument("--arch", default=None, help="classifier architecture (default: the first configured)")
    actions.add_parser("status", parents=[common], help="aliases and their gate verdicts").set_defaults(func=_run(status))
    p = actions.add_parser("promote", parents=[common], help="move champion to VERSION (runs the gate checks)")
    p.add_argument("version", help="model version number")
    p.add_argument("--force", action="store_true", help="promote even if a gate check fails (needs --reason)")
    p.add_argument("--reason", default=None, help="why the gate is overridden (recorded as a version tag)")
    p.set_defaults(func=_run(promote))
    actions.add_parser("rollback", parents=[common], help="move champion back to the previous champion"
                       ).set_defaults(func=_run(rollback))
