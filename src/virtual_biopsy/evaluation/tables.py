"""The paper's tables from per-fold scores: Table A1, Table 3, Table 4 (ACR), headline metrics.

Conventions (paper): each cell is the mean over the cross-validation folds ± the standard error
over folds; Table A1 and Table 4 show AUC and G-mean on [0, 100] and MCC on [-100, 100]. Table 4
is laid out as in the paper: rows metric × ACR × setting, a column per architecture, each cell
``mean ± SE (n=lesions)``, and an AVG column = the mean of the architectures' means ± their standard
deviation across architectures (this reproduces the paper's AVG numbers, e.g. 68.33, 80.83, 88.34
-> 79.17 ± 10.11); see ``acr_breakdown``.

A metric undefined for a group (one class only: no ROC curve, G-mean 0/0, MCC 0 by convention)
is never reported as 0: the cell says ``undefined`` (Table 4: ``n/a (one class, n=N)``) and the CSV
carries the reason. Folds where it is undefined are left out of the mean; ``n_folds`` says over how
many folds a cell averages.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from virtual_biopsy.evaluation import metrics
from virtual_biopsy.evaluation.settings import SETTINGS, score

METRIC_NAMES = ("auc", "gmean", "mcc")
METRIC_LABELS = {"auc": "AUC", "gmean": "G-mean", "mcc": "MCC"}
PAPER_SCALE = 100.0
ACR_SETTINGS = ("F", "F+C", "F+Ĉ")
ACR_GROUPS = ("a", "b", "c", "d")
AVERAGE = "AVG"
GENERATOR_METRICS = ("mse", "psnr", "ssim", "baseline_psnr", "baseline_ssim")


def _ordered(values, preferred) -> list:
    present = list(dict.fromkeys(values))
    return [v for v in preferred if v in present] + [v for v in present if v not in preferred]


def _undefined_reason(reasons: pd.Series) -> str:
    """Why a metric is undefined in every fold, in words (``only malignant lesions in every fold``)."""
    found = sorted({r for r in reasons if r})
    return f"{'; '.join(found) or 'undefined'} in every fold"


def summarize_folds(scores: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Long table: ``by`` + metric, mean, sem, n_folds, reason (on the metric's natural scale)."""
    rows = []
    for key, group in scores.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in METRIC_NAMES:
            mean, sem = metrics.mean_and_sem(group[metric].to_numpy(dtype=float))
            defined = int(group[metric].notna().sum())
            rows.append({**dict(zip(by, key)), "metric": metric, "mean": mean, "sem": sem, "n_folds": defined,
                         "reason": "" if defined else _undefined_reason(group["undefined_reason"])})
    return pd.DataFrame(rows)


def format_cell(mean: float, spread: float, scale: float = 1.0, digits: int = 2, reason: str = "") -> str:
    """``61.52 ± 10.67``; the mean alone when there is no spread; ``undefined (why)`` without a mean."""
    if mean is None or math.isnan(mean):
        return f"undefined ({reason})" if reason else "undefined"
    text = f"{mean * scale:.{digits}f}"
    if spread is not None and not math.isnan(spread):
        text += f" ± {spread * scale:.{digits}f}"
    return text


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- Table A1 ------------------------------------------------------------------------------------
def table_a1(scores: pd.DataFrame) -> pd.DataFrame:
    """Table A1: one row per architecture and setting, metrics ×100, mean and SEM over folds."""
    long = summarize_folds(scores, ["arch", "setting"])
    rows = []
    for arch in _ordered(long["arch"], ()):
        for setting in _ordered(long.loc[long["arch"] == arch, "setting"], SETTINGS):
            cells = long[(long["arch"] == arch) & (long["setting"] == setting)].set_index("metric")
            row: dict[str, object] = {"arch": arch, "setting": setting}
            for metric in METRIC_NAMES:
                row[f"{metric}_mean"] = cells.at[metric, "mean"] * PAPER_SCALE
                row[f"{metric}_sem"] = cells.at[metric, "sem"] * PAPER_SCALE
                row[f"{metric}_n_folds"] = int(cells.at[metric, "n_folds"])
            row["undefined_reason"] = "; ".join(sorted({r for r in cells["reason"] if r}))
            rows.append(row)
    return pd.DataFrame(rows)


def table_a1_markdown(table: pd.DataFrame) -> str:
    """Table A1 as markdown, cells ``mean ± SEM`` on the paper's ×100 scale."""
    rows = []
    for _, r in table.iterrows():
        cells = [format_cell(r[f"{m}_mean"], r[f"{m}_sem"], reason=r["undefined_reason"]) for m in METRIC_NAMES]
        rows.append([r["arch"], r["setting"], *cells])
    note = ("\nMean ± standard error over the cross-validation folds; AUC and G-mean on [0, 100], "
            "MCC on [-100, 100] (paper Table A1).\n")
    return _markdown(["Classifier", "Setting", "AUC", "G-mean", "MCC"], rows) + note


def headline_metrics(scores: pd.DataFrame) -> dict[str, dict[str, dict[str, float | None]]]:
    """reports/metrics.json: {arch: {setting: {auc, gmean, mcc, auc_sem, ...}}} on the natural scale.

    Undefined values are null (JSON has no nan), so `dvc metrics diff` and the gate see them as absent.
    """
    long = summarize_folds(scores, ["arch", "setting"])
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for _, r in long.iterrows():
        entry = out.setdefault(r["arch"], {}).setdefault(r["setting"], {})
        entry[r["metric"]] = None if math.isnan(r["mean"]) else round(float(r["mean"]), 6)
        entry[f"{r['metric']}_sem"] = None if math.isnan(r["sem"]) else round(float(r["sem"]), 6)
    return out


# --- Table 4: ACR breakdown ----------------------------------------------------------------------
ACR_COLUMNS = ("metric", "acr", "setting", "arch", "mean", "spread", "spread_kind", "n_folds", "n_lesions",
               "n_malignant", "defined", "reason")
ONE_CLASS = "one class"


def acr_scores(probabilities: pd.DataFrame) -> pd.DataFrame:
    """Metrics per arch, fold, setting (F, F+C, F+Ĉ) and ACR category present in that fold's test set.

    Columns: arch, fold, setting, acr, n_lesions, n_malignant, undefined_reason, auc, gmean, mcc
    (natural scale; nan with a reason where the group holds one class only). Lesions without a
    reported ACR category belong to no group and are left out.
    """
    subset = probabilities[probabilities["setting"].isin(ACR_SETTINGS) & probabilities["acr"].isin(ACR_GROUPS)]
    rows = [
        {"arch": arch, "fold": fold, "setting": setting, "acr": acr, **score(g["label"].to_numpy(), g["p"].to_numpy())}
        for (arch, fold, setting, acr), g in subset.groupby(["arch", "fold", "setting", "acr"], sort=True)
    ]
    return pd.DataFrame(rows, columns=["arch", "fold", "setting", "acr", "n_lesions", "n_malignant",
                                       "undefined_reason", *METRIC_NAMES])


def _acr_arch_row(group: pd.DataFrame, metric: str) -> dict[str, object]:
    """One architecture's cell of one metric/ACR/setting: mean ± SEM over the folds where it is defined."""
    values = group[metric].to_numpy(dtype=float)
    mean, sem = metrics.mean_and_sem(values)
    n_folds = int((~np.isnan(values)).sum())
    if n_folds:
        reason = ""
    elif group.empty or int(group["n_lesions"].sum()) == 0:
        reason = "no lesions"
    elif (group["undefined_reason"].fillna("").astype(str) != "").all():
        reason = ONE_CLASS
    else:
        reason = "undefined"
    return {"mean": mean, "spread": sem, "spread_kind": "sem_over_folds", "n_folds": n_folds,
            "n_lesions": int(group["n_lesions"].sum()), "n_malignant": int(group["n_malignant"].sum()),
            "defined": bool(n_folds), "reason": reason}


def _acr_average_row(cells: list[dict[str, object]]) -> dict[str, object]:
    """AVG of one metric/ACR/setting: mean of the architectures' defined means ± their SD (ddof=1).

    The lesion counts are the first architecture's: all architectures are scored on the same
    test lesions of each fold, so they share them.
    """
    means = np.array([c["mean"] for c in cells if c["defined"]], dtype=float)
    reasons = sorted({str(c["reason"]) for c in cells if c["reason"]})
    return {"mean": float(means.mean()) if means.size else math.nan,
            "spread": float(means.std(ddof=1)) if means.size > 1 else math.nan,
            "spread_kind": "sd_over_architectures", "n_folds": int(means.size),
            "n_lesions": int(cells[0]["n_lesions"]), "n_malignant": int(cells[0]["n_malignant"]),
            "defined": bool(means.size), "reason": "" if means.size else ("; ".join(reasons) or "no lesions")}


def acr_breakdown(scores: pd.DataFrame) -> pd.DataFrame:
    """Table 4 (tidy, the paper's layout): one row per metric, ACR category, setting and arch, plus ``AVG``.

    ``scores`` is ``acr_scores``' output. Columns: metric, acr, setting, arch, mean, spread,
    spread_kind, n_folds, n_lesions, n_malignant, defined, reason (mean and spread on the metric's
    natural scale). ACR categories are a, b, c, d (those present in ``scores``); settings F, F+C, F+Ĉ.

    For an architecture (spread_kind ``sem_over_folds``):
      mean, spread  mean and standard error of the mean (SD over folds, ddof=1, / sqrt(n_folds))
                    over the folds where the metric is defined for that group;
      n_folds       those folds;
      n_lesions     test lesions of the group summed over the folds (each lesion is a test lesion
                    in exactly one fold), n_malignant the malignant ones among them;
      defined       False when no fold defines the metric; reason then says why: ``one class``
                    when every fold's group held one class only (no ROC curve, G-mean 0/0, MCC 0
                    by convention; never reported as 0), ``no lesions`` when the group is empty
                    for that arch and setting; "" when defined.
    For ``AVG`` (spread_kind ``sd_over_architectures``), as the paper's AVG column:
      mean          the mean of the architectures' defined means (undefined ones left out);
      spread        the standard deviation (ddof=1) of those means across architectures (nan with
                    a single defined architecture), e.g. 68.33, 80.83, 88.34 -> 79.17 ± 10.11;
      n_folds       the number of architectures with a defined mean;
      n_lesions     the group's test lesions summed over folds, as for the architectures (they are
                    scored on the same lesions; the first architecture's count), n_malignant alike;
      defined       True when at least one architecture is defined, else reason as theirs.
    Rows are sorted by metric (AUC, G-mean, MCC), acr (a, b, c, d), setting (F, F+C, F+Ĉ), then
    the architectures in order of appearance in ``scores`` and AVG last, so the CSV is stable.
    """
    if scores.empty:
        return pd.DataFrame(columns=list(ACR_COLUMNS))
    archs = _ordered(scores["arch"], ())
    groups = _ordered(scores["acr"], ACR_GROUPS)
    settings = _ordered(scores["setting"], ACR_SETTINGS)
    rows = []
    for metric in METRIC_NAMES:
        for acr in groups:
            for setting in settings:
                of_group = scores[(scores["acr"] == acr) & (scores["setting"] == setting)]
                cells = [_acr_arch_row(of_group[of_group["arch"] == arch], metric) for arch in archs]
                key = {"metric": metric, "acr": acr, "setting": setting}
                rows += [{**key, "arch": arch, **c} for arch, c in zip(archs, cells)]
                rows.append({**key, "arch": AVERAGE, **_acr_average_row(cells)})
    return pd.DataFrame(rows, columns=list(ACR_COLUMNS))


def _acr_cell(row: pd.Series) -> str:
    """``79.2 ± 10.1 (n=37)`` on the paper's scale; ``n/a (one class, n=12)`` when undefined."""
    n = int(row["n_lesions"])
    if not row["defined"]:
        return f"n/a ({row['reason'] or 'undefined'}, n={n})"
    return f"{format_cell(row['mean'], row['spread'], PAPER_SCALE, digits=1)} (n={n})"


def acr_breakdown_markdown(table: pd.DataFrame) -> str:
    """Table 4 as markdown, one table as in the paper: rows metric × ACR × setting (``AUC | b | F+Ĉ``),
    a column per architecture then AVG; cells ``mean ± spread (n=N)`` ×100 with one decimal,
    undefined cells ``n/a (one class, n=N)``; a legend below.
    """
    archs = [a for a in _ordered(table["arch"], ()) if a != AVERAGE] + [AVERAGE]
    rows = []
    for metric in _ordered(table["metric"], METRIC_NAMES):
        of_metric = table[table["metric"] == metric]
        for acr in _ordered(of_metric["acr"], ACR_GROUPS):
            of_acr = of_metric[of_metric["acr"] == acr]
            for setting in _ordered(of_acr["setting"], ACR_SETTINGS):
                cells = of_acr[of_acr["setting"] == setting].set_index("arch")
                rows.append([METRIC_LABELS.get(metric, metric), acr, setting]
                            + [_acr_cell(cells.loc[a]) if a in cells.index else "" for a in archs])
    note = ("\nPer architecture: mean over the cross-validation folds where the metric is defined ± its standard "
            "error (SD over those folds / sqrt(their number)). AVG: mean of the architectures' means ± SD across "
            "architectures (as in the paper). n: test lesions of the group, summed over the folds. AUC and G-mean "
            "on [0, 100], MCC on [-100, 100]. n/a (one class): every fold's group held one class only, so AUC, "
            "G-mean and MCC are undefined; never shown as 0, and left out of AVG.\n")
    return _markdown(["Metric", "ACR", "Setting", *archs], rows) + note


# --- Table 3: generator quality ------------------------------------------------------------------
def table3(reports: dict[str, list[dict[str, float]]]) -> pd.DataFrame:
    """Table 3: per view, test MSE, PSNR, SSIM (and the LE-as-CESM baseline), mean and SEM over
    folds; with the lesion-aware metrics (TABLE3_LESION_METRICS) when every fold reports them."""
    rows = []
    for view, folds in reports.items():
        row: dict[str, object] = {"view": view, "n_folds": len(folds)}
        lesion = [m for m in TABLE3_LESION_METRICS if all(m in f for f in folds)]
        for name in (*GENERATOR_METRICS, *lesion):
            row[f"{name}_mean"], row[f"{name}_sem"] = metrics.mean_and_sem([f[name] for f in folds])
        if lesion:
            row["lesion_images"] = int(sum(f.get("lesion_images", 0) for f in folds))
        rows.append(row)
    return pd.DataFrame(rows)


# Where the table is honest about the lesion: breast-only quality and, inside the lesion mask, the
# enhancement error (synthetic minus real lesion-to-surround enhancement) and the contrast-ratio
# share (synthetic over real), for G(LE) and the LE baseline.
TABLE3_LESION_COLUMNS = (
    ("breast_psnr", "PSNR breast", 2), ("breast_ssim", "SSIM breast", 4),
    ("enhancement_error", "enh. error", 4), ("abs_enhancement_error", "abs. enh. error", 4),
    ("contrast_ratio_share", "CR syn/real", 3),
)
TABLE3_LESION_METRICS = tuple(f"{prefix}{name}" for prefix in ("", "baseline_") for name, _, _ in TABLE3_LESION_COLUMNS)


def table3_lesion_markdown(table: pd.DataFrame) -> str:
    """Table 3, lesion-aware: breast-only and lesion metrics of G(LE) and the LE baseline per view."""
    if table.empty or f"{TABLE3_LESION_COLUMNS[0][0]}_mean" not in table.columns:
        return "No lesion masks: no lesion-aware generator metrics.\n"
    header = ["View", "Estimate", *(title for _, title, _ in TABLE3_LESION_COLUMNS), "lesion images"]
    rows = []
    for _, r in table.iterrows():
        for prefix, estimate in (("", "generator G(LE)"), ("baseline_", "LE as CESM")):
            rows.append([r["view"], estimate] + [format_cell(r[f"{prefix}{m}_mean"], r[f"{prefix}{m}_sem"], digits=d)
                                                 for m, _, d in TABLE3_LESION_COLUMNS] + [str(int(r["lesion_images"]))])
    note = ("\nMean ± standard error over the folds' test sets. Breast: pixels where LE > 0 (no air, no padding). "
            "Enhancement: lesion mean minus the mean of a ring of breast tissue around it; error = synthetic minus "
            "real (0 is perfect). CR: lesion-to-ring contrast ratio, synthetic over real (1 is perfect).\n")
    return _markdown(header, rows) + note


def table3_markdown(table: pd.DataFrame) -> str:
    """Table 3 as markdown with the paper's four decimals."""
    header = ["View", "MSE", "PSNR", "SSIM", "PSNR (LE baseline)", "SSIM (LE baseline)"]
    rows = [[r["view"]] + [format_cell(r[f"{m}_mean"], r[f"{m}_sem"], digits=4) for m in GENERATOR_METRICS]
            for _, r in table.iterrows()]
    note = "\nMean ± standard error over the folds' test sets; baseline: the LE image taken as the CESM estimate.\n"
    return _markdown(header, rows) + note
