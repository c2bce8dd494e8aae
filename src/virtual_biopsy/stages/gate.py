"""DVC stage gate: register the fused pipeline of each architecture; promote it only if every check passes.

    python -m virtual_biopsy.stages.gate [--root .] [--params params.yaml]

Per architecture in ``classifier.architectures``:

1. assemble the candidate (:func:`build_candidate`): the serving fold is the one whose fused
   output p has the best *validation* MCC (outputs/predictions, real CESM; ties: lowest fold),
   with that fold's four classifiers (models/classifier/...) and its eq. 7/8 weights as the
   evaluation computes them; the generators are each view's serving generator
   (models/generator/<VIEW>/serving.pt);
2. run the checks of :mod:`virtual_biopsy.gate` on reports/metrics.json, reports/generator,
   reports/validation/metrics.json, reports/split/summary.json and the current champion;
3. log the pyfunc in a ``gate`` stage run, register it as a new version of
   ``virtual-biopsy-<arch>``, point ``challenger`` at it, record every check on the version's tags
   and the run, and move ``champion`` to it only when every check passed;
4. write reports/gate.json.

A rejected candidate is a normal outcome (exit 0, the reasons printed and recorded); exit 1 is
for inputs that are missing or broken.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from virtual_biopsy import gate, metrics, pipeline
from virtual_biopsy.atomic import write_json
from virtual_biopsy.config import MODALITIES, VIEWS, ConfigError, Params
from virtual_biopsy.evaluation.predictions import PredictionsError, load_predictions
from virtual_biopsy.evaluation.settings import (
    SETTING_SLUGS,
    lesion_table,
    modality_probability,
    validation_weights,
)
from virtual_biopsy.fusion import fuse
from virtual_biopsy.paths import ProjectPaths
from virtual_biopsy.stages.common import stage_inputs, stage_parser
from virtual_biopsy.stages.train_classifier import fold_weights_path as classifier_weights_path
from virtual_biopsy.stages.train_classifier import load_classifier
from virtual_biopsy.stages.train_generator import load_generator_weights, report_path, serving_weights_path

STAGE = "gate"


class GateStageError(ValueError):
    """The gate's inputs are missing or broken (not a rejection: that is a normal outcome)."""


def gate_report_path(paths: ProjectPaths) -> Path:
    return paths.reports / "gate.json"


# ---------------------------------------------------------------------------------------------
# The candidate
# ---------------------------------------------------------------------------------------------
def fold_validation(predictions, arch: str, views: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per fold: eq. 7/8 weights from real validation predictions and the fused validation MCC."""
    out = []
    for fold, rows in predictions[predictions["arch"] == arch].groupby("fold", sort=True):
        where = f"predictions of {arch} fold {fold}"
        val = lesion_table(rows[(rows["subset"] == "val") & (rows["source"] == "real")], where)
        weights = validation_weights(val, MODALITIES, views, where)
        p_mod = {m: modality_probability(val, m, views, weights) for m in MODALITIES}
        p = fuse(p_mod, weights.modalities)
        keep = ~np.isnan(p)
        mcc = metrics.mcc(val["label"].to_numpy()[keep], metrics.classify(p[keep])) if keep.any() else float("nan")
        out.append({"fold": int(fold), "weights": weights, "val_mcc": float(mcc)})
    if not out:
        raise GateStageError(f"no predictions of {arch}: run the train_classifier stage")
    return out


def serving_fold(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """The fold with the best validation MCC of p (nan counts as worst; ties go to the lowest fold)."""
    return max(folds, key=lambda f: (-np.inf if np.isnan(f["val_mcc"]) else f["val_mcc"], -f["fold"]))


def build_candidate(paths: ProjectPaths, params: Params, arch: str) -> pipeline.FusedPipeline:
    """Assemble the fused pipeline of ``arch`` from the stages' outputs (module docstring, step 1)."""
    try:
        predictions = load_predictions(paths, [arch], MODALITIES, VIEWS)
    except PredictionsError as exc:
        raise GateStageError(str(exc)) from exc
    folds = fold_validation(predictions, arch, VIEWS)
    chosen = serving_fold(folds)
    generators, generator_info = {}, {}
    for view in VIEWS:
        generators[view], info = load_generator_weights(serving_weights_path(paths, view))
        generator_info[view] = {k: info.get(k) for k in ("fold", "policy", "image_size")}
    sizes = {int(i["image_size"]) for i in generator_info.values() if i.get("image_size") is not None}
    if sizes - {params.preprocess.image_size}:
        raise GateStageError(f"generators were trained at {sorted(sizes)} px but preprocess.image_size is "
                             f"{params.preprocess.image_size}: rerun train_generator")
    classifiers = {(m, v): load_classifier(classifier_weights_path(paths, arch, m, v, chosen["fold"]))[0]
                   for m in MODALITIES for v in VIEWS}
    weights = chosen["weights"]
    info = {"serving_fold": chosen["fold"], "fold_val_mcc": {f["fold"]: f["val_mcc"] for f in folds},
            "validation_mcc": {**{f"{m}_{v}": weights.views[m].mcc[v] for m in MODALITIES for v in VIEWS},
                               **{m: weights.modalities.mcc[m] for m in MODALITIES}},
            "generators": generator_info}
    return pipeline.FusedPipeline(
        arch, params.preprocess.image_size, generators, classifiers,
        {m: {v: float(w) for v, w in weights.views[m].weights.items()} for m in MODALITIES},
        {m: float(w) for m, w in weights.modalities.weights.items()}, info)


# ---------------------------------------------------------------------------------------------
# Reports the checks read
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path, stage: str) -> Any:
    if not path.exists():
        raise GateStageError(f"{path}: missing (run the {stage} stage first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GateStageError(f"{path}: not valid JSON ({exc})") from exc


def read_reports(paths: ProjectPaths, arch: str) -> dict[str, Any]:
    """The gate's evidence for ``arch``, as plain dicts."""
    all_metrics = _read_json(paths.reports / "metrics.json", "evaluate")
    if arch not in all_metrics:
        raise GateStageError(f"{paths.reports / 'metrics.json'}: no metrics for {arch} (run the evaluate stage)")
    return {
        "metrics": all_metrics[arch],
        "validation_metrics": _read_json(paths.reports / "validation" / "metrics.json", "validate_data"),
        "split_summary": _read_json(paths.reports / "split" / "summary.json", "split"),
        "generator_means": {v: _read_json(report_path(paths, v), "train_generator").get("mean", {}) for v in VIEWS},
    }


def slug(name: str) -> str:
    """An MLflow-safe key for a check or setting name (``F+Ĉ`` -> ``F_Chat``)."""
    for setting in sorted(SETTING_SLUGS, key=len, reverse=True):
        name = name.replace(setting, SETTING_SLUGS[setting])
    return name


def metric_tags(arch_metrics: dict[str, Any]) -> dict[str, Any]:
    """``metric.<setting>.<name>`` tags: what a later gate compares the next candidate with."""
    return {f"metric.{slug(s)}.{k}": v for s, values in arch_metrics.items() for k, v in values.items()
            if v is not None and not k.endswith("_sem")}


def decision_tags(decision: gate.GateDecision) -> dict[str, str]:
    """The decision and every check as version tags."""
    tags = {gate.gate_tag("decision"): decision.decision, gate.gate_tag("reasons"): "; ".join(decision.reasons) or "none"}
    for c in decision.checks:
        tags[gate.gate_tag(f"check.{slug(c.name)}")] = f"{c.verdict()} (value {c.value}, threshold {c.threshold})"
    return tags


def champion_record(name: str, root: Path) -> dict[str, Any] | None:
    """The current champion's version, data version and AUCs (from its tags), or None."""
    from virtual_biopsy import registry

    version = registry.get_alias(name, registry.CHAMPION, root)
    if version is None:
        return None
    tags = registry.get_version_tags(name, version, root)
    return {"version": version, "data_version": tags.get("data_version"),
            "auc": {s: tags.get(f"metric.{slug(s)}.auc") for s in gate.COMPARED_SETTINGS}}


def decide(paths: ProjectPaths, params: Params, arch: str, champion: dict[str, Any] | None) -> gate.GateDecision:
    """Run every gate check for ``arch`` against ``champion`` (None: no champion)."""
    from virtual_biopsy import tracking

    reports = read_reports(paths, arch)
    return gate.evaluate_candidate(params.gate, data_version=tracking.data_version(paths.root), champion=champion,
                                   **reports)


# ---------------------------------------------------------------------------------------------
# Registration and the decision
# ---------------------------------------------------------------------------------------------
def register_candidate(run, candidate: pipeline.FusedPipeline, tags: dict[str, Any]) -> str:
    """Log the pyfunc (bundle, signature, input example, package code) and register a new version."""
    from virtual_biopsy import registry

    with tempfile.TemporaryDirectory() as tmp:
        bundle = pipeline.save_bundle(candidate, Path(tmp) / pipeline.BUNDLE_ARTIFACT)
        with run.child(f"pipeline-{candidate.arch}", tags={"arch": candidate.arch}) as model_run:
            model_run.log_dict(pipeline.describe(candidate), "pipeline.json")
            return registry.log_and_register_pyfunc(
                model_run, pipeline.FusedPipelineModel(), "fused_pipeline", pipeline.registered_name(candidate.arch),
                artifacts={pipeline.BUNDLE_ARTIFACT: str(bundle)}, signature=pipeline.pyfunc_signature(),
                input_example=pipeline.input_example(candidate.image_size),
                code_paths=[str(pipeline.package_dir())], pip_requirements=pipeline.pip_requirements(),
                tags=tags, description=f"Fused virtual-biopsy pipeline (Algorithm 1), {candidate.arch}, "
                                       f"serving fold {candidate.info.get('serving_fold')}")


def log_decision(run, decision: gate.GateDecision) -> None:
    """Every check's value and verdict on the stage run."""
    run.log_metrics({f"gate.{slug(c.name)}.passed": float(c.passed) for c in decision.checks}
                    | {f"gate.{slug(c.name)}.value": float(c.value) for c in decision.checks
                       if isinstance(c.value, (int, float))})
    run.set_tags({"gate.decision": decision.decision})
    run.log_dict(decision.to_json(), "gate/decision.json")


def gate_architecture(paths: ProjectPaths, params: Params, arch: str, run) -> dict[str, Any]:
    """Steps 1-3 of the module docstring for one architecture; returns its gate.json entry."""
    from virtual_biopsy import registry

    name = pipeline.registered_name(arch)
    candidate = build_candidate(paths, params, arch)
    champion = champion_record(name, paths.root)
    decision = decide(paths, params, arch, champion)
    tags = {"arch": arch, "serving_fold": candidate.info["serving_fold"], **run.context,
            **metric_tags(read_reports(paths, arch)["metrics"]), **decision_tags(decision)}
    version = register_candidate(run, candidate, tags)
    registry.set_alias(name, registry.CHALLENGER, version, paths.root)
    previous = None
    if decision.promoted:
        previous = registry.promote(name, version, paths.root, {gate.gate_tag("promoted_by"): "gate"})
    log_decision(run, decision)
    return {"registered_model": name, "version": version, "champion": registry.get_alias(name, registry.CHAMPION,
            paths.root), "previous_champion": previous, "serving_fold": candidate.info["serving_fold"],
            **decision.to_json()}


def run_gate(paths: ProjectPaths, params: Params) -> dict[str, Any]:
    """Gate every configured architecture; write reports/gate.json; return it."""
    from virtual_biopsy import tracking

    report = {}
    with tracking.stage_run(STAGE, root=paths.root, params=params) as run:
        for arch in params.classifier.architectures:
            report[arch] = gate_architecture(paths, params, arch, run)
        write_json(gate_report_path(paths), report)
        run.log_artifact(gate_report_path(paths), "gate")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__, mlflow_flag=False)
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        report = run_gate(paths, params)
    except (ConfigError, GateStageError, PredictionsError, FileNotFoundError, ValueError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    for arch, entry in report.items():
        line = f"{STAGE} {arch}: {entry['registered_model']} v{entry['version']} {entry['decision']}"
        if entry["decision"] == gate.PROMOTED:
            print(f"{line} -> @champion (previous champion: {entry['previous_champion'] or 'none'})")
        else:
            print(f"{line} (@challenger; champion stays {entry['champion'] or 'unset'}): " + "; ".join(entry["reasons"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
