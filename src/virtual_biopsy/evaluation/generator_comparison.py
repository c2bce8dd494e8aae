"""Two runs of one view's generator cross-validation compared fold by fold (Table 3 side by side).

Both reports are ``reports/generator/<VIEW>.json`` files of train_generator (``folds``: one entry
per fold with its test metrics). The runs being compared must share the split, so fold k of both
scored the same test patients; the comparison is then **paired** over folds:

    d_k = m_k(A) - m_k(B),   mean difference d̄ = (1/K) sum_k d_k,
    t = d̄ / (s_d / sqrt(K))  with s_d the sample standard deviation of the d_k (K - 1 dof),

and the two-sided p of that paired t-test (scipy.stats.ttest_rel). With K = 5 folds only a large,
consistent difference reaches significance; a p above 0.05 says the folds cannot tell the runs
apart, not that they are equal. Pure functions: dicts in, a table out.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

# Whole image as the paper reports it (Table 3), then the lesion-aware figures of table3.md.
COMPARED_METRICS: tuple[str, ...] = ("mse", "psnr", "ssim", "breast_psnr", "breast_ssim",
                                     "enhancement_error", "contrast_ratio_share")


class ComparisonError(ValueError):
    """Two generator reports cannot be compared; the message names the file or key and why."""


def read_generator_report(path: str | Path) -> dict:
    """A train_generator report, checked to hold per-fold metrics."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ComparisonError(f"{path}: no such file (a reports/generator/<VIEW>.json of train_generator)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ComparisonError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("folds"), list) or not report["folds"]:
        raise ComparisonError(f"{path}: no 'folds' list; expected a train_generator report "
                              "(reports/generator/<VIEW>.json)")
    return report


def _fold_values(report: Mapping, metric: str, name: str) -> dict[int, float]:
    values = {}
    for entry in report["folds"]:
        if "fold" not in entry or metric not in entry:
            raise ComparisonError(f"{name}: a fold entry lacks 'fold' or {metric!r}")
        values[int(entry["fold"])] = float(entry[metric])
    return values


def _check_same_split(a: Mapping, b: Mapping, names: Sequence[str]) -> None:
    if a.get("view") != b.get("view"):
        raise ComparisonError(f"{names[0]} is view {a.get('view')!r}, {names[1]} is view {b.get('view')!r}")
    tests = [{int(f["fold"]): f.get("test_pairs") for f in r["folds"]} for r in (a, b)]
    if tests[0] != tests[1]:
        raise ComparisonError(f"{names[0]} and {names[1]} have different folds or test pairs per fold "
                              f"({tests[0]} vs {tests[1]}): not runs on the same split, a paired test does not apply")


def compare_generator_reports(a: Mapping, b: Mapping, metrics: Sequence[str] = COMPARED_METRICS,
                              names: Sequence[str] = ("A", "B")) -> pd.DataFrame:
    """One row per metric: mean ± SE over folds of each run, the mean paired difference A - B,
    its SE and the paired t-test's two-sided p (module docstring)."""
    _check_same_split(a, b, names)
    rows = []
    for metric in metrics:
        va, vb = _fold_values(a, metric, names[0]), _fold_values(b, metric, names[1])
        folds = sorted(va)
        xa, xb = np.array([va[k] for k in folds]), np.array([vb[k] for k in folds])
        d = xa - xb
        k = len(folds)
        p = float(stats.ttest_rel(xa, xb).pvalue) if k > 1 and np.ptp(d) > 0 else float("nan")
        rows.append({"metric": metric, "folds": k,
                     "mean_a": xa.mean(), "se_a": xa.std(ddof=1) / np.sqrt(k) if k > 1 else float("nan"),
                     "mean_b": xb.mean(), "se_b": xb.std(ddof=1) / np.sqrt(k) if k > 1 else float("nan"),
                     "difference": d.mean(), "se_difference": d.std(ddof=1) / np.sqrt(k) if k > 1 else float("nan"),
                     "paired_t_p": p})
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame, view: str, names: Sequence[str]) -> str:
    """The comparison as a Markdown table (mean ± SE; difference A - B; paired t p)."""
    lines = [f"| {view} | {names[0]} | {names[1]} | difference ({names[0]} - {names[1]}) | paired t p (folds) |",
             "| --- | --- | --- | --- | --- |"]
    for r in table.itertuples():
        lines.append(f"| {r.metric} | {r.mean_a:.4f} ± {r.se_a:.4f} | {r.mean_b:.4f} ± {r.se_b:.4f} | "
                     f"{r.difference:+.4f} ± {r.se_difference:.4f} | {r.paired_t_p:.3f} ({r.folds}) |")
    return "\n".join(lines) + "\n"
