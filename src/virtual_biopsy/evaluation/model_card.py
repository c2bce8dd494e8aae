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


def model_card_markdown(*, arch: str, registered_name: str, data_version: str, simulated_share: float,
                        cohort: Mapping[str, Any], metrics: Mapping[str, Mapping[str, Any]],
                        paired: Sequence[Mapping[str, Any]], weight_warnings: Sequence[str],
                        generator_means: Mapping[str, Mapping[str, Any]], serving_fold: int,
                        decision: str, reasons: Sequence[str],
                        ceilings: Sequence[Mapping[str, Any]] = ()) -> str:
    """The model card as markdown. ``simulated_share``: share of the data's images that are simulated;
    ``ceilings``: F and C beside their observer ceilings (gate_checks.read_evidence)."""
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
        f"Fused virtual-biopsy pipeline (paper Algorithm 1), {arch} classifiers of the serving fold "
        f"{serving_fold}, per-view CycleGAN generators for missing CESM, MCC-weighted late fusion (eq. 7-8).",
        "",
        "## Intended use",
        "",
        INTENDED_USE + " Input: one breast's FFDM (low-energy) CC and MLO images, with CESM images "
        "when acquired; missing CESM views are imputed and marked synthetic. Output: p(malignant) "
        "of the lesion and the class by max membership (p >= 0.5).",
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
        "Calibration: not assessed. p is the fused output of the classifiers, not a calibrated "
        "probability; do not read it as a risk.",
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
