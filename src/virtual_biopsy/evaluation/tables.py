"""The paper's tables from per-fold scores: Table A1, Table 3, Table 4 (ACR), headline metrics.

Conventions (paper): each cell is the mean over the cross-validation folds ± the standard error
over folds; Table A1 and Table 4 show AUC and G-mean on [0, 100] and MCC on [-100, 100]. Table 4's
AVG column is the mean of the architectures' means ± their standard deviation across
architectures (this reproduces the paper's AVG numbers, e.g. 68.33, 80.83, 88.34 -> 79.17 ± 10.11).

A metric undefined for a group (one class only: no ROC curve, G-mean 0/0, MCC 0 by convention)
is never reported as 0: the cell says ``undefined`` and the CSV carries the reason. Folds where
it is undefined are left out of the mean; ``n_folds`` says over how many folds a cell averages.
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
def acr_scores(probabilities: pd.DataFrame) -> pd.DataFrame:
    """Metrics per arch, fold, setting (F, F+C, F+Ĉ) and ACR category present in that fold's test set."""
    subset = probabilities[probabilities["setting"].isin(ACR_SETTINGS) & probabilities["acr"].isin(ACR_GROUPS)]
    rows = [
        {"arch": arch, "fold": fold, "setting": setting, "acr": acr, **score(g["label"].to_numpy(), g["p"].to_numpy())}
        for (arch, fold, setting, acr), g in subset.groupby(["arch", "fold", "setting", "acr"], sort=True)
    ]
    return pd.DataFrame(rows, columns=["arch", "fold", "setting", "acr", "n_lesions", "n_malignant",
                                       "undefined_reason", *METRIC_NAMES])


def acr_breakdown(scores: pd.DataFrame) -> pd.DataFrame:
    """Table 4 (long): metric, acr, setting, arch (incl. AVG), mean, spread, spread_kind, n, reason.

    For an architecture, spread is the SEM over folds and n the folds where the metric is defined;
    for AVG, spread is the SD across architectures and n the architectures with a defined mean.
    """
    if scores.empty:
        return pd.DataFrame(columns=["metric", "acr", "setting", "arch", "mean", "spread", "spread_kind", "n", "reason"])
    per_arch = summarize_folds(scores, ["acr", "setting", "arch"])
    rows = [{"metric": r["metric"], "acr": r["acr"], "setting": r["setting"], "arch": r["arch"],
             "mean": r["mean"], "spread": r["sem"], "spread_kind": "sem_over_folds", "n": r["n_folds"],
             "reason": r["reason"]} for _, r in per_arch.iterrows()]
    for (metric, acr, setting), group in per_arch.groupby(["metric", "acr", "setting"], sort=False):
        means = group["mean"].to_numpy(dtype=float)
        defined = means[~np.isnan(means)]
        rows.append({
            "metric": metric, "acr": acr, "setting": setting, "arch": AVERAGE,
            "mean": float(defined.mean()) if defined.size else math.nan,
            "spread": float(defined.std(ddof=1)) if defined.size > 1 else math.nan,
            "spread_kind": "sd_over_architectures", "n": int(defined.size),
            "reason": "" if defined.size else "; ".join(sorted({r for r in group["reason"] if r})),
        })
    table = pd.DataFrame(rows)
    table["_m"] = table["metric"].map({m: i for i, m in enumerate(METRIC_NAMES)})
    table["_s"] = table["setting"].map({s: i for i, s in enumerate(ACR_SETTINGS)})
    table = table.sort_values(["_m", "acr", "_s"], kind="stable").drop(columns=["_m", "_s"])
    return table.reset_index(drop=True)


def acr_breakdown_markdown(table: pd.DataFrame) -> str:
    """Table 4 as markdown: rows metric × ACR × setting, columns architectures and AVG (×100)."""
    archs = _ordered(table["arch"], ())
    archs = [a for a in archs if a != AVERAGE] + [AVERAGE]
    rows = []
    for (metric, acr, setting), group in table.groupby(["metric", "acr", "setting"], sort=False):
        cells = group.set_index("arch")
        rows.append([METRIC_LABELS[metric], acr, setting] + [
            format_cell(cells.at[a, "mean"], cells.at[a, "spread"], PAPER_SCALE, reason=cells.at[a, "reason"])
            if a in cells.index else "" for a in archs])
    note = ("\nPer architecture: mean ± SEM over folds; AVG: mean of the architectures' means ± SD across "
            "architectures. A group holding one class only has no defined AUC, G-mean or MCC.\n")
    return _markdown(["Metric", "ACR", "Setting", *archs], rows) + note


# --- Table 3: generator quality ------------------------------------------------------------------
def table3(reports: dict[str, list[dict[str, float]]]) -> pd.DataFrame:
    """Table 3: per view, test MSE, PSNR, SSIM (and the LE-as-CESM baseline), mean and SEM over folds."""
    rows = []
    for view, folds in reports.items():
        row: dict[str, object] = {"view": view, "n_folds": len(folds)}
        for name in GENERATOR_METRICS:
            row[f"{name}_mean"], row[f"{name}_sem"] = metrics.mean_and_sem([f[name] for f in folds])
        rows.append(row)
    return pd.DataFrame(rows)


def table3_markdown(table: pd.DataFrame) -> str:
    """Table 3 as markdown with the paper's four decimals."""
    header = ["View", "MSE", "PSNR", "SSIM", "PSNR (LE baseline)", "SSIM (LE baseline)"]
    rows = [[r["view"]] + [format_cell(r[f"{m}_mean"], r[f"{m}_sem"], digits=4) for m in GENERATOR_METRICS]
            for _, r in table.iterrows()]
    note = "\nMean ± standard error over the folds' test sets; baseline: the LE image taken as the CESM estimate.\n"
    return _markdown(header, rows) + note
