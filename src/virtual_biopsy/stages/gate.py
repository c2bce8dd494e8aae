"""DVC stage gate: register the fused pipeline of each architecture; promote it only if every check passes.

    python -m virtual_biopsy.stages.gate [--root .] [--params params.yaml]

Per architecture in ``classifier.architectures``:

1. assemble the candidate (:func:`build_candidate`): with ``gate.serving: ensemble`` (default)
   every fold's four classifiers (models/classifier/...), each fold with its own eq. 7/8 weights
   as the evaluation computes them from that fold's validation predictions; with
   ``best_fold`` the one fold whose fused output p has the best *validation* MCC
   (outputs/predictions, real CESM; ties: lowest fold). The generators are each view's serving
   generator (models/generator/<VIEW>/serving.pt), one per view in both modes; the calibration
   (temperature and conformal qhat per setting) is outputs/calibration/<arch>.json of the
   evaluate stage;
2. run the checks of :mod:`virtual_biopsy.evaluation.gate_checks` on reports/metrics.json, reports/generator,
   reports/validation/metrics.json, reports/split/summary.json and the current champion;
3. log the pyfunc in a ``gate`` stage run, register it as a new version of
   ``virtual-biopsy-<arch>``, point ``challenger`` at it, record every check on the version's tags
   and the run, and move ``champion`` to it only when every check passed;
4. write reports/gate.json: per architecture the registered model's name, the serving mode and
   folds (and the best validation fold), the
   decision, its reasons and every check. Registry version numbers (the new version, the
   champion, the previous champion) are the store's counts, not results of the run: they are
   printed, set as the stage run's tags (``<arch>.version``, ...) and logged with the rest as
   its ``gate/gate.json`` artifact, but kept out of the DVC-tracked file: it depends on the
   evidence and on the champion's metrics (the one input DVC does not track), not on how many
   versions the store holds. The model card (evaluation/model_card.py) goes to
   reports/model_cards/<arch>.md, the model's artifacts and the version's description. Next to the checks, under ``evidence`` (and as ``gate.evidence.*``
   version tags), the paired tests of the settings' AUC differences and the fusion weights that
   rest on too few validation lesions (reports/evaluation): reported, not decided on.

A rejected candidate is a normal outcome (exit 0, the reasons printed and recorded); exit 1 is
for inputs that are missing or broken.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from virtual_biopsy.core.atomic import atomic_dir, write_json, write_text
from virtual_biopsy.core.config import MODALITIES, VIEWS, ConfigError, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.evaluation import gate_checks
from virtual_biopsy.evaluation.gate_checks import (
    GateInputError,
    decide,
    decision_tags,
    fold_validation,
    metric_tags,
    read_reports,
    serving_fold,
    slug,
)
from virtual_biopsy.evaluation.model_card import cohort_counts, model_card_markdown
from virtual_biopsy.evaluation.predictions import PredictionsError, load_predictions
from virtual_biopsy.mlops import registry, tracking
from virtual_biopsy.models.weights import load_classifier, load_generator_weights
from virtual_biopsy.serving import fused_model
from virtual_biopsy.stages.common import stage_inputs, stage_parser

STAGE = "gate"
# Keys of a gate entry that are registry version numbers: in MLflow and on the console, not in reports/gate.json.
REGISTRY_KEYS = ("version", "champion", "previous_champion")


# ---------------------------------------------------------------------------------------------
# The candidate
# ---------------------------------------------------------------------------------------------


def read_gate_predictions(paths: ProjectPaths, arch: str):
    try:
        return load_predictions(paths, [arch], MODALITIES, VIEWS)
    except PredictionsError as exc:
        raise GateInputError(str(exc)) from exc


def calibration_file(paths: ProjectPaths, arch: str) -> Path:
    """outputs/calibration/<arch>.json: the evaluate stage's temperature and conformal qhat per setting."""
    return paths.calibration_file(arch)


def _fold_classifiers(paths: ProjectPaths, arch: str, fold: dict[str, Any]) -> fused_model.FoldClassifiers:
    weights = fold["weights"]
    return fused_model.FoldClassifiers(
        arch, int(fold["fold"]),
        {(m, v): load_classifier(paths.classifier_weights(arch, m, v, fold["fold"]))[0] for m in MODALITIES for v in VIEWS},
        {m: {v: float(w) for v, w in weights.views[m].weights.items()} for m in MODALITIES},
        {m: float(w) for m, w in weights.modalities.weights.items()})


def _fold_record(fold: dict[str, Any]) -> dict[str, Any]:
    weights = fold["weights"]
    return {"fold": fold["fold"], "val_mcc": fold["val_mcc"],
            "validation_mcc": {**{f"{m}_{v}": weights.views[m].mcc[v] for m in MODALITIES for v in VIEWS},
                               **{m: weights.modalities.mcc[m] for m in MODALITIES}},
            "view_weights": {m: {v: float(w) for v, w in weights.views[m].weights.items()} for m in MODALITIES},
            "modality_weights": {m: float(w) for m, w in weights.modalities.weights.items()}}


def build_candidate(paths: ProjectPaths, params: Params, arch: str, predictions) -> fused_model.FusedPipeline:
    """Assemble the fused pipeline of ``arch`` from the stages' outputs (module docstring, step 1)."""
    folds = fold_validation(predictions, arch, VIEWS)
    chosen = serving_fold(folds)
    serving = params.gate.serving
    served = folds if serving == "ensemble" else [chosen]
    try:
        calibration = fused_model.read_calibration(calibration_file(paths, arch))
    except fused_model.BundleError as exc:
        raise GateInputError(str(exc)) from exc
    generators, generator_info = {}, {}
    for view in VIEWS:
        generators[view], info = load_generator_weights(paths.serving_generator(view))
        generator_info[view] = {k: info.get(k) for k in ("fold", "policy", "image_size")}
    sizes = {int(i["image_size"]) for i in generator_info.values() if i.get("image_size") is not None}
    if sizes - {params.preprocess.image_size}:
        raise GateInputError(f"generators were trained at {sorted(sizes)} px but preprocess.image_size is "
                             f"{params.preprocess.image_size}: rerun train_generator")
    info = {"serving": serving, "serving_folds": [int(f["fold"]) for f in served],
            "best_fold": chosen["fold"], "fold_val_mcc": {f["fold"]: f["val_mcc"] for f in folds},
            "folds": [_fold_record(f) for f in served], "generators": generator_info,
            "calibration_file": str(calibration_file(paths, arch).relative_to(paths.root))}
    return fused_model.FusedPipeline(arch, params.preprocess.image_size, generators,
                                     [_fold_classifiers(paths, arch, f) for f in served], calibration, info)


# ---------------------------------------------------------------------------------------------
# Registration and the decision
# ---------------------------------------------------------------------------------------------
def register_candidate(run, candidate: fused_model.FusedPipeline, tags: dict[str, Any], card: str) -> str:
    """Log the pyfunc (bundle, signature, input example, package code) with its model card and
    register a new version whose description is the card (the MLflow UI renders it)."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = fused_model.save_bundle(candidate, Path(tmp) / fused_model.BUNDLE_ARTIFACT)
        with run.child(f"pipeline-{candidate.arch}", tags={"arch": candidate.arch}) as model_run:
            model_run.log_dict(fused_model.describe(candidate), "pipeline.json")
            model_run.log_text(card, "model_card.md")
            return registry.log_and_register_pyfunc(
                model_run, fused_model.FusedPipelineModel(), "fused_pipeline", fused_model.registered_name(candidate.arch),
                artifacts={fused_model.BUNDLE_ARTIFACT: str(bundle)}, signature=fused_model.pyfunc_signature(),
                input_example=fused_model.input_example(candidate.image_size),
                code_paths=[str(fused_model.package_dir())], pip_requirements=fused_model.pip_requirements(),
                tags=tags, description=card)


def log_decision(run, decision: gate_checks.GateDecision) -> None:
    """Every check's value and verdict on the stage run."""
    run.log_metrics({f"gate.{slug(c.name)}.passed": float(c.passed) for c in decision.checks}
                    | {f"gate.{slug(c.name)}.value": float(c.value) for c in decision.checks
                       if isinstance(c.value, (int, float))})
    run.set_tags({"gate.decision": decision.decision})
    run.log_dict(decision.to_json(), "gate/decision.json")


def serving_summary(candidate: fused_model.FusedPipeline) -> dict[str, Any]:
    """What the model card says about how the candidate serves: mode, folds, calibration, generators."""
    return {"mode": candidate.serving, "folds": [f.fold for f in candidate.folds],
            "best_fold": candidate.info.get("best_fold"), "calibration": candidate.calibration.to_json(),
            "calibration_file": candidate.info.get("calibration_file"),
            "generators": {v: {"name": registry.generator_model_name(v), **(candidate.info["generators"].get(v) or {})}
                           for v in VIEWS}}


def gate_architecture(paths: ProjectPaths, params: Params, arch: str, run, cards: Path) -> dict[str, Any]:
    """Steps 1-3 of the module docstring for one architecture, its model card into the folder
    ``cards``; returns its gate.json entry."""
    name = fused_model.registered_name(arch)
    predictions = read_gate_predictions(paths, arch)
    candidate = build_candidate(paths, params, arch, predictions)
    champion = registry.champion_record(name, paths.root)
    data_version = tracking.data_version(paths.root)
    decision = decide(paths, params, arch, champion, data_version)
    evidence = gate_checks.read_evidence(paths, arch)
    reports = read_reports(paths, arch)
    card = model_card_markdown(
        arch=arch, registered_name=name, data_version=data_version,
        simulated_share=gate_checks.simulated_share(paths), cohort=cohort_counts(predictions, arch),
        metrics=reports["metrics"], paired=evidence["paired_tests"], weight_warnings=evidence["weight_warnings"],
        generator_means=reports["generator_means"], serving=serving_summary(candidate),
        decision=decision.decision, reasons=decision.reasons, ceilings=evidence["ceilings"])
    write_text(cards / paths.model_card(arch).name, card)
    tags = {"arch": arch, "serving": candidate.serving,
            "serving_folds": ",".join(str(f.fold) for f in candidate.folds), **run.context,
            **metric_tags(reports["metrics"]), **decision_tags(decision), **gate_checks.evidence_tags(evidence)}
    version = register_candidate(run, candidate, tags, card)
    registry.set_alias(name, registry.CHALLENGER, version, paths.root)
    previous = None
    if decision.promoted:
        previous = registry.promote(name, version, paths.root, {gate_checks.gate_tag("promoted_by"): "gate"})
    log_decision(run, decision)
    run.set_tags(gate_checks.evidence_tags(evidence))
    return {"registered_model": name, "version": version, "champion": registry.get_alias(name, registry.CHAMPION,
            paths.root), "previous_champion": previous, "serving": candidate.serving,
            "serving_folds": [f.fold for f in candidate.folds], "best_fold": candidate.info["best_fold"],
            **decision.to_json(), "evidence": evidence}


def tracked_report(report: dict[str, Any]) -> dict[str, Any]:
    """What reports/gate.json holds: the report without registry version numbers (REGISTRY_KEYS)."""
    return {arch: {k: v for k, v in entry.items() if k not in REGISTRY_KEYS} for arch, entry in report.items()}


def run_gate(paths: ProjectPaths, params: Params) -> dict[str, Any]:
    """Gate every configured architecture; write reports/gate.json; return the full report (with versions)."""
    report = {}
    # The model cards are one set: a card of an architecture no longer configured does not stay.
    with tracking.stage_run(STAGE, root=paths.root, params=params) as run, atomic_dir(paths.model_cards_dir) as cards:
        for arch in params.classifier.architectures:
            report[arch] = gate_architecture(paths, params, arch, run, cards)
        write_json(paths.gate_report, tracked_report(report))
        run.set_tags({f"{arch}.{key}": entry[key] for arch, entry in report.items() for key in REGISTRY_KEYS})
        run.log_dict(report, "gate/gate.json")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(STAGE, __doc__, mlflow_flag=False)
    args = parser.parse_args(argv)
    try:
        paths, params = stage_inputs(args)
        report = run_gate(paths, params)
    except (ConfigError, GateInputError, PredictionsError, FileNotFoundError, ValueError) as exc:
        print(f"{STAGE}: {exc}", file=sys.stderr)
        return 1
    for arch, entry in report.items():
        line = (f"{STAGE} {arch}: {entry['registered_model']} v{entry['version']} ({entry['serving']} of fold(s) "
                f"{', '.join(map(str, entry['serving_folds']))}) {entry['decision']}")
        if entry["decision"] == gate_checks.PROMOTED:
            print(f"{line} -> @champion (previous champion: {entry['previous_champion'] or 'none'})")
        else:
            print(f"{line} (@challenger; champion stays {entry['champion'] or 'unset'}): " + "; ".join(entry["reasons"]))
        for c in entry["evidence"]["paired_tests"]:
            ci = "n/a" if c["ci_low"] is None else f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
            print(f"  {c['comparison']}: AUC difference {c['auc_difference']:+.3f}, 95 % CI {ci}, DeLong p "
                  f"{'n/a' if c['delong_p'] is None else format(c['delong_p'], '.3g')}")
        if entry["evidence"]["weight_warnings"]:
            print(f"  {len(entry['evidence']['weight_warnings'])} fusion weights rest on too few validation lesions "
                  "(reports/evaluation/weights.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
