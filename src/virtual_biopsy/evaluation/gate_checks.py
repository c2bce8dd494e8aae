"""The promotion gate: pure checks on a candidate fused pipeline and the decision they make.

No files and no MLflow here: the stage (``stages/gate.py``) reads the reports and the registry and
passes plain dicts in; every check returns a :class:`Check` holding its value, threshold and
verdict, so the same record goes to reports/gate.json, the model version's tags and the run.

Checks (each must pass for ``champion`` to move)
    data_quality        no critical data-quality expectation failed (reports/validation/metrics.json)
    split_leakage       no patient in two subsets of a fold (reports/split/summary.json)
    floor.<S>.<metric>  mean test metric of setting S >= params ``gate.floors[S][metric]``
    imputation          AUC(F+Ĉ) >= AUC(F) - ``gate.imputation_tolerance``: imputed CESM must not
                        make the fused pipeline worse than FFDM alone
    generator.<V>.<m>   mean test SSIM / PSNR of the view's generator >= ``gate.generator_floors``
    champion.<S>.auc    AUC of S >= champion's AUC - ``gate.champion_tolerance``, only when the
                        champion was evaluated on the same data version (otherwise the numbers are
                        not comparable and the check records that it was skipped, passing)
A missing or undefined (null) metric fails its check: a candidate is promoted on evidence only.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from virtual_biopsy.core.config import MODALITIES, VIEWS, GateConfig, Params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.evaluation import metrics
from virtual_biopsy.evaluation.settings import (
    SETTING_SLUGS,
    lesion_table,
    modality_probability,
    validation_weights,
)
from virtual_biopsy.models.fusion import fuse

PROMOTED = "promoted"
REJECTED = "rejected"
COMPARED_SETTINGS = ("F+C", "F+Ĉ")  # the outputs the pipeline serves: with real and with imputed CESM


def gate_tag(name: str) -> str:
    """Key of a gate record on a model version (``gate.decision``, ``gate.reasons``, ``gate.check.*``)."""
    return f"gate.{name}"


@dataclass(frozen=True)
class Check:
    """One gate check: what was measured, against what, and whether it passed."""

    name: str
    value: Any
    threshold: Any
    passed: bool
    detail: str

    def verdict(self) -> str:
        return "pass" if self.passed else "fail"


@dataclass(frozen=True)
class GateDecision:
    """All checks of one candidate; promoted exactly when every check passed."""

    checks: tuple[Check, ...]

    @property
    def promoted(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def decision(self) -> str:
        return PROMOTED if self.promoted else REJECTED

    @property
    def reasons(self) -> list[str]:
        """Why it was rejected (one line per failed check); empty when promoted."""
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {"decision": self.decision, "reasons": self.reasons,
                "checks": [{**asdict(c), "verdict": c.verdict()} for c in self.checks]}


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / null / nan."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def at_least(name: str, value: Any, threshold: float, what: str) -> Check:
    """``value >= threshold``; a missing value fails."""
    number = _number(value)
    if number is None:
        return Check(name, None, threshold, False, f"{what} is missing or undefined")
    passed = number >= threshold
    return Check(name, number, threshold, passed, f"{what} {number:.4g} {'>=' if passed else '<'} {threshold:.4g}")


def check_data_quality(validation_metrics: Mapping[str, Any], data_version: str) -> Check:
    """No critical expectation failed on the data version the candidate was trained on."""
    failed = _number(validation_metrics.get("critical_failed"))
    if failed is None:
        return Check("data_quality", None, 0, False, "reports/validation/metrics.json has no critical_failed count")
    passed = failed == 0
    return Check("data_quality", int(failed), 0, passed,
                 f"{int(failed)} critical data-quality expectation(s) failed on data version {data_version}")


def check_split_leakage(split_summary: Mapping[str, Any]) -> Check:
    """No patient shared between the subsets of a fold."""
    leakage = _number(split_summary.get("leakage"))
    if leakage is None:
        return Check("split_leakage", None, 0, False, "reports/split/summary.json has no leakage count")
    return Check("split_leakage", int(leakage), 0, leakage == 0, f"{int(leakage)} leaking patient(s) across subsets")


def check_floors(metrics: Mapping[str, Mapping[str, Any]], floors: Mapping[str, Mapping[str, float]]) -> list[Check]:
    """Mean test metric per setting >= its floor (``metrics`` is reports/metrics.json for one arch)."""
    return [at_least(f"floor.{setting}.{name}", (metrics.get(setting) or {}).get(name), float(floor),
                     f"{setting} test {name}")
            for setting, per_metric in floors.items() for name, floor in per_metric.items()]


def check_imputation(metrics: Mapping[str, Mapping[str, Any]], tolerance: float) -> Check:
    """AUC of F+Ĉ (imputed CESM) not below AUC of F (FFDM alone) by more than ``tolerance``."""
    f_auc = _number((metrics.get("F") or {}).get("auc"))
    if f_auc is None:
        return Check("imputation", None, None, False, "F test auc is missing or undefined")
    return at_least("imputation", (metrics.get("F+Ĉ") or {}).get("auc"), f_auc - tolerance,
                    f"F+Ĉ test auc (F {f_auc:.4g} - tolerance {tolerance:g})")


def check_generators(generator_means: Mapping[str, Mapping[str, Any]], floors: Mapping[str, float]) -> list[Check]:
    """Each view's generator: mean test SSIM / PSNR (reports/generator/<VIEW>.json ``mean``) >= floors."""
    return [at_least(f"generator.{view}.{name}", (means or {}).get(name), float(floor), f"{view} generator test {name}")
            for view, means in generator_means.items() for name, floor in floors.items()]


def check_against_champion(metrics: Mapping[str, Mapping[str, Any]], data_version: str,
                           champion: Mapping[str, Any] | None, tolerance: float) -> list[Check]:
    """Candidate AUC per served setting vs the champion's, when both saw the same data version.

    ``champion``: None when there is none, else ``{"version", "data_version", "auc": {setting: value}}``.
    The checks name the champion's data version and AUCs, not its registry version number (a
    count of the store that reports/gate.json must not carry; the gate run's tags hold it).
    """
    if champion is None:
        return [Check("champion", None, None, True, "no champion yet: nothing to compare with")]
    if champion.get("data_version") != data_version:
        return [Check("champion", champion.get("data_version"), None, True,
                      "the champion was evaluated on data version "
                      f"{champion.get('data_version')}, the candidate on {data_version}: not comparable, skipped")]
    checks = []
    for setting in COMPARED_SETTINGS:
        reference = _number((champion.get("auc") or {}).get(setting))
        if reference is None:
            checks.append(Check(f"champion.{setting}.auc", None, None, True,
                                f"the champion has no {setting} auc: skipped"))
            continue
        checks.append(at_least(f"champion.{setting}.auc", (metrics.get(setting) or {}).get("auc"),
                               reference - tolerance,
                               f"{setting} test auc (champion {reference:.4g} "
                               f"- tolerance {tolerance:g})"))
    return checks


def evaluate_candidate(cfg: GateConfig, *, metrics: Mapping[str, Mapping[str, Any]], data_version: str,
                       validation_metrics: Mapping[str, Any], split_summary: Mapping[str, Any],
                       generator_means: Mapping[str, Mapping[str, Any]],
                       champion: Mapping[str, Any] | None) -> GateDecision:
    """Every check of the module docstring, in a fixed order."""
    return GateDecision((
        check_data_quality(validation_metrics, data_version),
        check_split_leakage(split_summary),
        *check_floors(metrics, cfg.floors),
        check_imputation(metrics, cfg.imputation_tolerance),
        *check_generators(generator_means, cfg.generator_floors),
        *check_against_champion(metrics, data_version, champion, cfg.champion_tolerance),
    ))


class GateInputError(ValueError):
    """The gate's inputs are missing or broken (not a rejection: that is a normal outcome)."""


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
        raise GateInputError(f"no predictions of {arch}: run the train_classifier stage")
    return out


def serving_fold(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """The fold with the best validation MCC of p (nan counts as worst; ties go to the lowest fold)."""
    return max(folds, key=lambda f: (-np.inf if np.isnan(f["val_mcc"]) else f["val_mcc"], -f["fold"]))


def _read_json(path: Path, stage: str) -> Any:
    if not path.exists():
        raise GateInputError(f"{path}: missing (run the {stage} stage first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GateInputError(f"{path}: not valid JSON ({exc})") from exc


def read_reports(paths: ProjectPaths, arch: str) -> dict[str, Any]:
    """The gate's evidence for ``arch``, as plain dicts."""
    all_metrics = _read_json(paths.reports / "metrics.json", "evaluate")
    if arch not in all_metrics:
        raise GateInputError(f"{paths.reports / 'metrics.json'}: no metrics for {arch} (run the evaluate stage)")
    return {
        "metrics": all_metrics[arch],
        "validation_metrics": _read_json(paths.reports / "validation" / "metrics.json", "validate_data"),
        "split_summary": _read_json(paths.reports / "split" / "summary.json", "split"),
        "generator_means": {v: _read_json(paths.generator_report(v), "train_generator").get("mean", {}) for v in VIEWS},
    }


def _read_csv(path: Path, stage: str):
    import pandas as pd

    if not path.exists():
        raise GateInputError(f"{path}: missing (run the {stage} stage first)")
    try:
        return pd.read_csv(path, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise GateInputError(f"{path}: not a readable CSV table ({exc})") from exc


def read_evidence(paths: ProjectPaths, arch: str) -> dict[str, Any]:
    """What the gate reports next to its checks without deciding on it: the paired tests of the
    settings' AUC differences (DeLong p, patient-bootstrap interval) and the fusion weights that
    rest on too few validation lesions (reports/evaluation/paired_tests.csv, weights.csv)."""
    paired = _read_csv(paths.evaluation_dir / "paired_tests.csv", "evaluate")
    weights = _read_csv(paths.evaluation_dir / "weights.csv", "evaluate")
    comparisons = [
        {"comparison": f"{r['setting_a']} vs {r['setting_b']}", "auc_difference": _number(r["auc_difference"]),
         "ci_low": _number(r["boot_low"]), "ci_high": _number(r["boot_high"]), "ci_level": _number(r["boot_level"]),
         "delong_p": _number(r["delong_p"]), "n_lesions": int(r["n_lesions"])}
        for _, r in paired[paired["arch"] == arch].iterrows()]
    thin = weights[(weights["arch"] == arch) & weights["warning"].fillna("").astype(bool)]
    return {"paired_tests": comparisons,
            "weight_warnings": [f"fold {r['fold']} {r['level']} {r['input']}: {r['warning']}" for _, r in thin.iterrows()],
            "ceilings": _ceilings(paths, arch)}


def _ceilings(paths: ProjectPaths, arch: str) -> list[dict[str, Any]]:
    """F and C of ``arch`` beside their observer ceilings (reports/evaluation/ceiling_shares.csv,
    evaluation.ceilings); empty when the evaluation had no lesion masks to compute them from."""
    path = paths.evaluation_dir / "ceiling_shares.csv"
    if not path.exists():
        return []
    shares = _read_csv(path, "evaluate")
    return [{"setting": r["setting"], "auc": _number(r["auc"]), "ceiling_auc": _number(r["ceiling_auc"]),
             "ceiling_sem": _number(r["ceiling_sem"]), "share": _number(r["share"])}
            for _, r in shares[shares["arch"] == arch].iterrows()]


def simulated_share(paths: ProjectPaths) -> float:
    """Share of the processed images that are simulated (``simulated`` column of the index)."""
    import pandas as pd

    index = paths.processed_index
    if not index.exists():
        raise GateInputError(f"{index}: missing (run the preprocess stage first)")
    column = pd.read_csv(index, usecols=lambda c: c == "simulated")
    if "simulated" not in column or column.empty:
        raise GateInputError(f"{index}: no 'simulated' column (rerun preprocess)")
    return float(column["simulated"].astype(str).str.lower().eq("true").mean())


def evidence_tags(evidence: Mapping[str, Any]) -> dict[str, str]:
    """``gate.evidence.<A>_vs_<B>`` = "difference [low, high], DeLong p" and the weight-warning count."""
    tags = {gate_tag("evidence.weight_warnings"): str(len(evidence["weight_warnings"]))}
    for c in evidence["paired_tests"]:
        ci = "n/a" if c["ci_low"] is None else f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
        p = "n/a" if c["delong_p"] is None else f"{c['delong_p']:.3g}"
        tags[gate_tag(f"evidence.{slug(c['comparison'].replace(' vs ', '_vs_'))}")] = (
            f"AUC difference {c['auc_difference']:+.3f} {ci}, DeLong p {p}")
    return tags


def slug(name: str) -> str:
    """An MLflow-safe key for a check or setting name (``F+Ĉ`` -> ``F_Chat``)."""
    for setting in sorted(SETTING_SLUGS, key=len, reverse=True):
        name = name.replace(setting, SETTING_SLUGS[setting])
    return name


def metric_tags(arch_metrics: dict[str, Any]) -> dict[str, Any]:
    """``metric.<setting>.<name>`` tags: what a later gate compares the next candidate with."""
    return {f"metric.{slug(s)}.{k}": v for s, values in arch_metrics.items() for k, v in values.items()
            if v is not None and not k.endswith("_sem")}


def decision_tags(decision: GateDecision) -> dict[str, str]:
    """The decision and every check as version tags."""
    tags = {gate_tag("decision"): decision.decision, gate_tag("reasons"): "; ".join(decision.reasons) or "none"}
    for c in decision.checks:
        tags[gate_tag(f"check.{slug(c.name)}")] = f"{c.verdict()} (value {c.value}, threshold {c.threshold})"
    return tags


def decide(paths: ProjectPaths, params: Params, arch: str, champion: dict[str, Any] | None,
           data_version: str) -> GateDecision:
    """Run every gate check for ``arch`` (trained on ``data_version``) against ``champion`` (None: none)."""
    return evaluate_candidate(params.gate, data_version=data_version, champion=champion, **read_reports(paths, arch))
