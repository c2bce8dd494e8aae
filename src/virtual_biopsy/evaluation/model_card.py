"""The model card of a registered fused pipeline: what it is for, what it was evaluated on, how well
it did with what uncertainty, and what it must not be used for (Mitchell et al. 2019, "Model Cards
for Model Reporting", adapted to a research pipeline).

Pure text from plain inputs: the gate writes it to reports/model_cards/<arch>.md, logs it with the
model and sets it as the registry version's description (the MLflow UI renders it). It carries no
registry version number, run id or time, so the same evidence gives the same bytes.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from virtual_biopsy.evaluation.settings import SETTINGS

INTENDED_USE = (
    "Research use only. Not a medical device and not validated for clinical decisions: it must not "
    "replace a biopsy or a radiologist's reading."
)


def cohort_counts(predictions: pd.DataFrame, arch: str) -> dict[str, Any]:
    """Counts of the evaluation cohort: the out-of-fold test lesions (each lesion is tested in
    exactly one fold), by label, by ACR category, and test images by view (real images)."""
    rows = predictions[(predictions["arch"] == arch) & (predictions["subset"] == "test")
                       & (predictions["source"] == "real")]
    lesions = rows.drop_duplicates("lesion_id")
    labels = lesions["label"].astype(int)
    acr = lesions["acr"].fillna("").astype(str).replace("", "not reported")
    return {
        "patients": int(lesions["patient_id"].nunique()), "lesions": int(len(lesions)),
        "malignant": int((labels == 1).sum()), "benign": int((labels == 0).sum()),
        "acr": {k: int(v) for k, v in sorted(acr.value_counts().items())},
        "images_by_view": {k: int(v) for k, v in sorted(rows.drop_duplicates("image_id")["view"].value_counts().items())},
    }


def _pct(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * float(value):.1f}"


def _metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["| setting | AUC | G-mean | MCC |", "| --- | --- | --- | --- |"]
    for setting in (s for s in SETTINGS if s in metrics):
        m = metrics[setting]
        lines.append(f"| {setting} | " + " | ".join(
            f"{_pct(m.get(k))} ± {_pct(m.get(f'{k}_sem'))}" for k in ("auc", "gmean", "mcc")) + " |")
    return lines


def _paired_lines(paired: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| comparison | AUC difference | 95 % CI (patient bootstrap) | DeLong p |", "| --- | --- | --- | --- |"]
    for c in paired:
        ci = "n/a" if c.get("ci_low") is None else f"{100 * c['ci_low']:+.1f} to {100 * c['ci_high']:+.1f}"
        p = "n/a" if c.get("delong_p") is None else ("< 0.001" if c["delong_p"] < 0.001 else f"{c['delong_p']:.3g}")
        lines.append(f"| {c['comparison']} | {_pct(c.get('auc_difference'))} | {ci} | {p} |")
    return lines


def _ceiling_lines(ceilings: Sequence[Mapping[str, Any]]) -> list[str]:
    if not ceilings:
        return ["Observer ceilings: not computed (no lesion masks in the data)."]
    lines = ["Observer ceilings (a reader told where the lesion is reads its contrast to the surround, views "
             "fused; same test folds). Share = (AUC - 50) / (ceiling - 50):", "",
             "| setting | AUC | ceiling AUC | share of ceiling |", "| --- | --- | --- | --- |"]
    for c in ceilings:
        share = "n/a" if c.get("share") is None else f"{100 * c['share']:.0f} %"
        lines.append(f"| {c['setting']} | {_pct(c.get('auc'))} | {_pct(c.get('ceiling_auc'))} ± "
                     f"{_pct(c.get('ceiling_sem'))} | {share} |")
    return lines


def _serving_sentence(arch: str, serving: Mapping[str, Any]) -> str:
    folds = list(serving["folds"])
    if serving["mode"] == "ensemble":
        return (f"an ensemble of {len(folds)} folds ({', '.join(map(str, folds))}): each fold's four {arch} "
                "classifiers fused with that fold's own weights, the calibrated p averaged over folds.")
    return (f"one fold ({folds[0]}, the best validation MCC of p; gate.serving: best_fold) with its four "
            f"{arch} classifiers and weights.")


def _serving_lines(serving: Mapping[str, Any]) -> list[str]:
    """Serving mode, calibration, conformal level and the generator of each view."""
    calibration = serving["calibration"]
    settings = calibration.get("settings", {})
    per_setting = "; ".join(
        f"{s}: T = {e['temperature']:.3g}, qhat = {e['qhat']:.3g}"
        + (f" ({e['n_val']} validation lesions)" if e.get("n_val") is not None else "")
        for s, e in settings.items() if isinstance(e, Mapping) and "temperature" in e and "qhat" in e)
    generators = "; ".join(f"{v}: {g.get('name', v)} (fold {g.get('fold')}, policy {g.get('policy')})"
                           for v, g in serving["generators"].items())
    return [
        "## Serving",
        "",
        f"- Folds served: {len(serving['folds'])} ({serving['mode']}); best validation fold: {serving.get('best_fold')}. "
        "The spread between folds (sd, min, max of the folds' calibrated p) is returned with every prediction.",
        f"- Calibration: {calibration['method']} scaling per setting, p_cal = sigmoid(logit(p) / T), applied to "
        f"each fold's fused p before averaging; fitted on {calibration.get('fitted_on') or 'unstated'}"
        + (f" (`{serving['calibration_file']}`)" if serving.get("calibration_file") else "") + f". {per_setting}.",
        f"- Conformal prediction set at level {calibration['conformal_level']:.2f} (split conformal, LAC score "
        "1 - p(true class), on the calibrated ensemble p; never empty). Setting F+C when both CESM views are "
        "acquired, F+Ĉ when one or both are imputed.",
        f"- Generators (one registered serving generator per view, the same in every fold): {generators}.",
        "",
    ]


def model_card_markdown(*, arch: str, registered_name: str, data_version: str, simulated_share: float,
                        cohort: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]],
                        paired: Sequence[Mapping[str, Any]], weight_warnings: Sequence[str],
                        generator_means: Mapping[str, Mapping[str, Any]], serving: Mapping[str, Any],
                        decision: str, reasons: Sequence[str],
                        ceilings: Sequence[Mapping[str, Any]] = ()) -> str:
    """The model card as markdown. ``simulated_share``: share of the data's images that are simulated;
    ``ceilings``: F and C beside their observer ceilings (gate_checks.read_evidence); ``serving``:
    how the pipeline serves (stages.gate.serving_summary: ``mode`` ensemble | best_fold, ``folds``,
    ``best_fold``, ``calibration`` as in outputs/calibration/<arch>.json, ``calibration_file``,
    ``generators`` per view with the registered ``name``, ``fold`` and ``policy``)."""
    simulated = simulated_share > 0
    data_note = ("**Simulated data.** Every metric below comes from the project's simulated test bed "
                 "(`vbiopsy synth`), whose physics is not fitted to real scanners: it checks the pipeline, it "
                 "is not evidence of clinical performance." if simulated_share >= 1 else
                 f"{100 * simulated_share:.0f} % of the images are simulated." if simulated else
                 "Acquired (not simulated) images.")
    acr = ", ".join(f"{k}: {v}" for k, v in cohort["acr"].items())
    views = ", ".join(f"{k}: {v}" for k, v in cohort["images_by_view"].items())
    lines = [
        f"# Model card: {registered_name}",
        "",
        f"Fused virtual-biopsy pipeline (paper Algorithm 1): {_serving_sentence(arch, serving)} "
        "Per-view CycleGAN generators impute missing CESM; MCC-weighted late fusion (eq. 7-8).",
        "",
        *_serving_lines(serving),
        "",
        "## Intended use",
        "",
        INTENDED_USE + " Input: one breast's FFDM (low-energy) CC and MLO images, with CESM images "
        "when acquired; missing CESM views are imputed and marked synthetic. Output: p(malignant) "
        "of the lesion (calibrated, the mean over the serving folds), its spread between folds, a "
        "conformal prediction set and the class by max membership (p >= 0.5).",
        "",
        "## Data",
        "",
        f"- Data version (data.dvc md5): `{data_version}`",
        f"- {data_note}",
        f"- Evaluation cohort (out-of-fold test lesions, each patient tested in one fold): {cohort['patients']} "
        f"patients, {cohort['lesions']} lesions ({cohort['malignant']} malignant, {cohort['benign']} benign); "
        f"ACR {acr}; test images by view: {views}.",
        "",
        "## Performance (test lesions, mean ± SE over folds, ×100)",
        "",
        *_metrics_table(metrics),
        "",
        "Paired comparisons on the pooled out-of-fold test lesions:",
        "",
        *_paired_lines(paired),
        "",
        "Generator quality (mean over folds): " + "; ".join(
            f"{view} SSIM {m.get('ssim', float('nan')):.3f}, PSNR {m.get('psnr', float('nan')):.2f} dB"
            for view, m in generator_means.items()) + ".",
        "",
        *_ceiling_lines(ceilings),
        "",

        "## Limitations",
        "",
        "- Fusion weights rest on few validation lesions per fold"
        + (f" ({len(weight_warnings)} weights below the documented minimum, reports/evaluation/weights.md)."
           if weight_warnings else "."),
        "- Synthetic CESM is an estimate from FFDM, not an acquisition: results on imputed CESM (Ĉ, F+Ĉ) "
        "depend on the generator and on how far the site's images are from its training data.",
        "- Evaluated on one site's cohort by cross-validation; no external validation.",
        "",
        "## Gate decision",
        "",
        f"{decision}" + (": " + "; ".join(reasons) if reasons else " (every check passed)") + ".",
        "",
    ]
    return "\n".join(lines)
