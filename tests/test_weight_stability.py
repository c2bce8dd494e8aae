"""Fusion-weight stability: each weight with its validation lesions, a patient-bootstrap interval
of its validation MCC, and a warning when it rests on too few lesions."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from virtual_biopsy.evaluation import metrics
from virtual_biopsy.evaluation.predictions import PREDICTION_COLUMNS
from virtual_biopsy.evaluation.settings import prepare_folds, weights_table
from virtual_biopsy.evaluation.weight_stability import (
    bootstrap_mcc_interval,
    weight_stability,
    weight_stability_markdown,
    weight_warnings,
)


def _predictions(n_patients: int, seed: int = 3) -> pd.DataFrame:
    """One arch, two folds (val/test swap), FFDM and CESM (real + synthetic), CC and MLO."""
    rng = np.random.default_rng(seed)
    patients = [f"P{i:03d}" for i in range(n_patients)]
    labels = {p: int(rng.random() < 0.6) for p in patients}
    frames = []
    for fold in (0, 1):
        for subset, half in (("val", fold), ("test", 1 - fold)):
            part = [p for i, p in enumerate(patients) if i % 2 == half]
            for modality, signal in (("FFDM", 0.5), ("CESM", 2.5)):
                for view in ("CC", "MLO"):
                    for source in ("real", "synthetic") if modality == "CESM" else ("real",):
                        y = np.array([labels[p] for p in part])
                        logit = signal * (y - 0.5) + rng.normal(0, 1, len(part))
                        frames.append(pd.DataFrame({
                            "arch": "resnet18", "modality": modality, "view": view, "fold": fold, "subset": subset,
                            "lesion_id": [f"{p}|S1|L" for p in part], "patient_id": part, "acr": "b", "label": y,
                            "source": source, "image_id": [f"{p}-{modality}-{view}-{source}" for p in part],
                            "p_malignant": 1 / (1 + np.exp(-logit))}))
    return pd.concat(frames, ignore_index=True)[list(PREDICTION_COLUMNS)]


def _loop_interval(labels, p, groups, draws, seed, level):
    """The same resamples, one at a time through metrics.mcc (the reference for the vectorised one)."""
    codes, _ = pd.factorize(pd.Series(groups))
    n = codes.max() + 1
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        drawn = rng.integers(0, n, n)
        rows = np.concatenate([np.flatnonzero(codes == g) for g in drawn])
        if len(set(labels[rows])) == 2:
            values.append(metrics.mcc(labels[rows], metrics.classify(p[rows])))
    tail = (1 - level) / 2 * 100
    return (*np.percentile(values, [tail, 100 - tail]), len(values))


def test_bootstrap_mcc_interval_equals_a_resample_by_resample_computation():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"P{i}" for i in range(15)], rng.integers(1, 4, 15))
    labels = (rng.random(groups.size) < 0.5).astype(int)
    p = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, groups.size), 0, 1)
    fast = bootstrap_mcc_interval(labels, p, groups, draws=300, seed=5)
    slow = _loop_interval(labels, p, groups, 300, 5, 0.95)
    assert fast[2] == slow[2] and fast[0] == pytest.approx(slow[0], abs=1e-12)
    assert fast[1] == pytest.approx(slow[1], abs=1e-12)
    assert fast[0] <= metrics.mcc(labels, metrics.classify(p)) <= fast[1]


def test_resampling_by_patient_widens_the_interval_when_a_patient_has_copies_of_one_lesion():
    rng = np.random.default_rng(1)
    labels = (rng.random(20) < 0.5).astype(int)
    p = np.clip(0.5 + 0.2 * (labels - 0.5) + rng.normal(0, 0.3, 20), 0, 1)
    copies = 6
    by_patient = bootstrap_mcc_interval(np.repeat(labels, copies), np.repeat(p, copies),
                                        np.repeat(np.arange(20), copies), draws=500, seed=2)
    by_lesion = bootstrap_mcc_interval(np.repeat(labels, copies), np.repeat(p, copies),
                                       np.arange(20 * copies), draws=500, seed=2)
    assert by_patient[1] - by_patient[0] > 1.5 * (by_lesion[1] - by_lesion[0])


def test_one_class_resamples_are_not_used_and_one_class_data_has_no_interval():
    low, high, used = bootstrap_mcc_interval(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.7]),
                                             np.array(["a", "b", "c"]), draws=50)
    assert math.isnan(low) and math.isnan(high) and used == 0
    labels, p = np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.3])
    assert bootstrap_mcc_interval(labels, p, np.array(list("abcd")), draws=200, seed=0)[2] < 200


def test_every_weight_is_reported_with_the_validation_lesions_behind_it():
    predictions = _predictions(40)
    folds = prepare_folds(predictions, ("FFDM", "CESM"), ("CC", "MLO"))
    table = weight_stability(folds, draws=200)
    plain = weights_table(folds)
    assert table[["arch", "fold", "level", "input", "validation_mcc", "weight"]].equals(
        plain[["arch", "fold", "level", "input", "validation_mcc", "weight"]])
    for fold in folds:
        rows = table[table["fold"] == fold.fold]
        assert set(rows["n_val_malignant"]) == {int(fold.val["label"].sum())}
        assert set(rows["n_val_benign"]) == {int((fold.val["label"] == 0).sum())}
    defined = table.dropna(subset=["mcc_low"])
    assert ((defined["mcc_low"] <= defined["validation_mcc"] + 1e-12)
            & (defined["validation_mcc"] <= defined["mcc_high"] + 1e-12)).all()


def test_a_weight_on_few_lesions_is_warned_about_and_a_well_supported_one_is_not():
    few = weight_stability(prepare_folds(_predictions(24), ("FFDM", "CESM"), ("CC", "MLO")), draws=100)
    assert (few["warning"] != "").all() and "fewer than 10" in few["warning"].iloc[0]
    lines = weight_warnings(few)
    assert len(lines) == len(few) and lines[0].startswith("resnet18 fold 0 views:FFDM CC: rests on")
    many = weight_stability(prepare_folds(_predictions(80), ("FFDM", "CESM"), ("CC", "MLO")), draws=100,
                            min_per_class=5)
    assert (many["warning"] == "").all() and weight_warnings(many) == []
    markdown = weight_stability_markdown(few)
    assert markdown.count("\n| resnet18 |") == len(few) and "fewer than 10" in markdown
