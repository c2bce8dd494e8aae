"""Fitting the served calibration on validation lesions and scoring it on the test lesions.

Per architecture and setting (F, C, Ĉ, F+C, F+Ĉ): every fold's own fused pipeline (the weights
fitted on that fold's validation lesions, settings.py) gives its validation lesions a probability;
those are pooled over the folds (about 60 lesions instead of 12) and fit one temperature
(calibration.fit_temperature) and, on the calibrated pooled probabilities, the split-conformal
threshold qhat (conformal.conformal_quantile). Test lesions never reach either fit: they are
only scored, before and after (ECE, Brier, reliability curve, conformal coverage and set sizes).

Ĉ and F+Ĉ on validation use the validation lesions' imputed CESM (the classifiers score their
val patients on synthetic images too), so the temperature of Ĉ is fitted on what Ĉ serves.
Pure: the evaluate stage writes the tables and the serving artefact
(``outputs/calibration/<arch>.json``, schema in calibration.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from virtual_biopsy.evaluation import calibration, conformal
from virtual_biopsy.evaluation.settings import (
    META_COLUMNS,
    FoldData,
    _has_every_input,
    lesion_table,
    setting_probabilities,
)

CALIBRATION_COLUMNS = ("arch", "setting", "temperature", "qhat", "n_val", "n_test", "ece_before", "ece_after",
                       "brier_before", "brier_after", "coverage", "share_benign", "share_malignant", "share_both")
RELIABILITY_COLUMNS = ("arch", "setting", "calibration", "mean_p", "observed", "count")


def validation_probabilities(folds: list[FoldData], predictions: pd.DataFrame) -> pd.DataFrame:
    """Long table arch, fold, setting, lesion meta, p over every fold's validation lesions
    (real and imputed inputs), each fused by that fold's own weights."""
    frames = []
    for fold in folds:
        rows = predictions[(predictions["arch"] == fold.arch) & (predictions["fold"] == fold.fold)
                           & (predictions["subset"] == "val")]
        val = lesion_table(rows, f"validation predictions of {fold.arch} fold {fold.fold}")
        val = val[_has_every_input(val, fold.modalities, fold.views)].reset_index(drop=True)
        if val.empty:
            continue
        on_val = dataclasses.replace(fold, test=val)
        meta = val[list(META_COLUMNS)]
        for setting, p in setting_probabilities(on_val).items():
            frames.append(meta.assign(arch=fold.arch, fold=fold.fold, setting=setting, p=p))
    if not frames:
        raise ValueError("no validation lesion has a prediction for every input: nothing to fit the calibration on")
    return pd.concat(frames, ignore_index=True)[["arch", "fold", "setting", *META_COLUMNS, "p"]]


def fit_setting(val: pd.DataFrame, level: float) -> dict[str, float]:
    """{"temperature", "qhat", "n_val"} of one arch x setting from its pooled validation lesions."""
    p, y = val["p"].to_numpy(dtype=np.float64), val["label"].to_numpy(dtype=np.int64)
    temperature = calibration.fit_temperature(p, y)
    qhat = conformal.conformal_quantile(calibration.apply_temperature(p, temperature), y, level)
    return {"temperature": temperature, "qhat": qhat, "n_val": int(len(y))}


def fit_calibrations(val: pd.DataFrame, level: float) -> dict[str, dict[str, dict[str, float]]]:
    """arch -> setting -> fitted entry (the ``settings`` of the serving artefact)."""
    return {arch: {setting: fit_setting(group, level) for setting, group in by_arch.groupby("setting", sort=False)}
            for arch, by_arch in val.groupby("arch", sort=False)}


def serving_artefact(entries: dict[str, dict[str, float]], level: float) -> dict[str, object]:
    """The JSON of outputs/calibration/<arch>.json (schema in calibration.py)."""
    return {"method": calibration.CALIBRATION_METHOD, "fitted_on": calibration.FITTED_ON,
            "conformal_level": float(level), "settings": entries}


def score_calibration(test: pd.DataFrame, fitted: dict[str, dict[str, dict[str, float]]],
                      bins: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per arch x setting: ECE and Brier before/after, coverage, set-size shares;
    reliability points before/after) on the pooled out-of-fold test lesions."""
    rows, points = [], []
    for (arch, setting), group in test.groupby(["arch", "setting"], sort=False):
        entry = fitted[arch][setting]
        y = group["label"].to_numpy(dtype=np.int64)
        before = group["p"].to_numpy(dtype=np.float64)
        after = calibration.apply_temperature(before, entry["temperature"])
        sets = conformal.prediction_sets(after, entry["qhat"])
        shares = conformal.set_size_shares(sets)
        rows.append({"arch": arch, "setting": setting, **entry, "n_test": int(len(y)),
                     "ece_before": calibration.expected_calibration_error(y, before, bins),
                     "ece_after": calibration.expected_calibration_error(y, after, bins),
                     "brier_before": calibration.brier_score(y, before),
                     "brier_after": calibration.brier_score(y, after),
                     "coverage": conformal.coverage(sets, y), **{f"share_{k}": v for k, v in shares.items()}})
        for label, p in (("before", before), ("after", after)):
            mean_p, observed, count = calibration.reliability_curve(y, p, bins)
            points += [{"arch": arch, "setting": setting, "calibration": label, "mean_p": float(m),
                        "observed": float(o), "count": int(c)} for m, o, c in zip(mean_p, observed, count)]
    return (pd.DataFrame(rows, columns=list(CALIBRATION_COLUMNS)),
            pd.DataFrame(points, columns=list(RELIABILITY_COLUMNS)))


def calibration_markdown(table: pd.DataFrame, level: float) -> str:
    """The calibration table as markdown (test lesions, pooled over folds)."""
    lines = ["| arch | setting | T | ECE before → after | Brier before → after | coverage | "
             "sets {B} / {M} / {B,M} |", "|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['arch']} | {r['setting']} | {r['temperature']:.2f} | {r['ece_before']:.3f} → "
                     f"{r['ece_after']:.3f} | {r['brier_before']:.3f} → {r['brier_after']:.3f} | "
                     f"{r['coverage']:.2f} | {r['share_benign']:.2f} / {r['share_malignant']:.2f} / "
                     f"{r['share_both']:.2f} |")
    return ("\n".join(lines) + f"\n\nTemperature and conformal threshold fitted on the pooled validation lesions "
            f"of every fold; scored on the test lesions. Nominal coverage {level:.2f} (sets never empty: an empty "
            "split-conformal set gets the likelier class, which can only raise coverage).\n")
