"""Stratified, patient-grouped cross-validation folds shared by the generator and classifier stages.

Paper 4.2: stratified 5-fold cross-validation, train/val/test, "all images from the same patient
to the same set". The unit of every split is therefore the *patient*, never the image.

How the folds are drawn (deterministic for a seed)
    1. Each patient gets a stratum from their early-phase lesion labels (:func:`patient_strata`):
       ``malignant`` if any early-phase lesion is malignant, ``benign`` if one is benign and none
       malignant, ``none`` if the patient has no biopsied lesion. ``none`` patients still get a
       fold so the generators can train on every LE/DES pair.
    2. Test groups: the patients of each stratum are shuffled and dealt round-robin into K groups,
       the deal continuing across strata, so per-stratum counts in any two groups differ by at most
       one and group sizes by at most one. Fold k tests on group k: every patient is in exactly one
       test set. (This is what sklearn's StratifiedKFold does for one-row-per-group data, written
       out so the both-classes guarantee below can be enforced and explained.)
    3. Validation: from the patients outside group k, ``round(val_share * n_patients)`` are drawn,
       allocated to strata in proportion (largest remainder), with at least one malignant and one
       benign patient; the draw uses a generator seeded by ``(seed, k)``.
    4. Train: everyone else.

The realised test share is 1/K (0.20 for K = 5), the only test share with which every patient is
tested exactly once; ``SplitConfig.test_share`` defaults to it and params validation refuses any
other value (core/config.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from virtual_biopsy.core.config import SplitConfig

SUBSETS = ("train", "val", "test")
STRATA = ("malignant", "benign", "none")
LESION_CLASSES = ("malignant", "benign")
FOLD_COLUMNS = ("patient_id", "fold", "subset")


class SplitError(ValueError):
    """The data cannot be split as asked (too few patients of a class) or a split is invalid."""


def patient_strata(manifest: pd.DataFrame) -> pd.Series:
    """Stratum of every patient (index: patient_id, sorted): malignant, benign or none.

    Only early-phase lesion labels count (the virtual-biopsy task, paper Table 2); a patient with a
    malignant lesion in one breast and a benign one in the other is ``malignant``.
    """
    missing = {"patient_id", "phase", "label"} - set(manifest.columns)
    if missing:
        raise SplitError(f"manifest lacks column(s) {sorted(missing)} needed to stratify patients")
    if manifest["patient_id"].isna().any():
        raise SplitError(f"manifest has {int(manifest['patient_id'].isna().sum())} row(s) without a patient_id")
    early = manifest[manifest["phase"] == "early"]
    has = {label: set(early.loc[early["label"] == label, "patient_id"]) for label in LESION_CLASSES}
    patients = sorted(set(manifest["patient_id"]))
    strata = [
        "malignant" if p in has["malignant"] else "benign" if p in has["benign"] else "none" for p in patients
    ]
    return pd.Series(strata, index=pd.Index(patients, name="patient_id"), name="stratum")


def _deal_test_groups(strata: pd.Series, folds: int, rng: np.random.Generator) -> dict[str, int]:
    """Patient -> test group, stratified round-robin (see module docstring, step 2)."""
    group_of: dict[str, int] = {}
    position = 0
    for stratum in STRATA:
        members = strata.index[strata == stratum].to_numpy()
        for patient in rng.permutation(members):
            group_of[patient] = position % folds
            position += 1
    return group_of


def _allocate(counts: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over strata in proportion to ``counts`` (largest remainder), one of each class.

    The lesion classes get at least one slot each when the pool has one, so every validation set
    can be scored with AUC/MCC.
    """
    pool = sum(counts.values())
    total = min(total, pool)
    exact = {s: total * counts[s] / pool if pool else 0.0 for s in counts}
    alloc = {s: int(np.floor(v)) for s, v in exact.items()}
    for s in sorted(counts, key=lambda s: (alloc[s] - exact[s], STRATA.index(s)))[: total - sum(alloc.values())]:
        alloc[s] += 1
    for needed in LESION_CLASSES:
        if alloc[needed] == 0 and counts[needed] > 0:
            donor = max((s for s in counts if alloc[s] > 1 or (s == "none" and alloc[s] > 0)),
                        key=lambda s: alloc[s], default=None)
            if donor is not None:
                alloc[donor] -= 1
            alloc[needed] += 1
    return alloc


def _draw_validation(pool: pd.Series, n_val: int, rng: np.random.Generator) -> set[str]:
    """A stratified sample of ``n_val`` patients from ``pool`` (patient -> stratum)."""
    counts = {s: int((pool == s).sum()) for s in STRATA}
    chosen: set[str] = set()
    for stratum, k in _allocate(counts, n_val).items():
        members = np.sort(pool.index[pool == stratum].to_numpy())
        chosen.update(rng.choice(members, size=k, replace=False).tolist())
    return chosen


def make_folds(manifest: pd.DataFrame, cfg: SplitConfig, seed: int) -> pd.DataFrame:
    """Patient-grouped, stratified K-fold train/val/test assignment.

    Returns one row per patient and fold, columns ``patient_id, fold, subset`` (fold 0..K-1,
    subset train|val|test), sorted by fold then patient. Raises :class:`SplitError` naming the fold
    and subset when a validation or test set cannot hold both lesion classes.
    """
    strata = patient_strata(manifest)
    for label in LESION_CLASSES:
        n = int((strata == label).sum())
        if n < cfg.folds:
            raise SplitError(
                f"only {n} {label} patient(s) for {cfg.folds} folds: every fold's test set needs one "
                f"(fold {n}, subset test would have none); lower split.folds or add {label} cases"
            )
    group_of = _deal_test_groups(strata, cfg.folds, np.random.default_rng(seed))
    n_val = max(2, round(cfg.val_share * len(strata)))
    rows = []
    for fold in range(cfg.folds):
        test = {p for p, g in group_of.items() if g == fold}
        pool = strata.drop(index=sorted(test))
        val = _draw_validation(pool, n_val, np.random.default_rng([seed, fold]))
        for patient in strata.index:
            subset = "test" if patient in test else "val" if patient in val else "train"
            rows.append((patient, fold, subset))
    folds = pd.DataFrame(rows, columns=list(FOLD_COLUMNS)).sort_values(["fold", "patient_id"], ignore_index=True)
    report = check_folds(folds, manifest, cfg.folds)
    report.raise_if_invalid()
    return folds


@dataclass
class FoldCheck:
    """Outcome of :func:`check_folds`: leakage count, per fold/subset counts, problems found."""

    leakage: int
    counts: pd.DataFrame
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.leakage == 0 and not self.problems

    def raise_if_invalid(self) -> None:
        if not self.valid:
            raise SplitError("invalid folds: " + "; ".join(self.problems))


def fold_counts(folds: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Per fold and subset: patients per stratum and early-phase lesion images per class.

    Lesion images are counted on FFDM rows (one per lesion breast and view), the unit each
    per-view classifier sees; CESM counts equal them when every LE has its DES partner.
    """
    strata = patient_strata(manifest)
    with_strata = folds.join(strata, on="patient_id")
    patients = (
        with_strata.pivot_table(index=["fold", "subset"], columns="stratum", values="patient_id",
                                aggfunc="count", fill_value=0)
        .reindex(columns=list(STRATA), fill_value=0)
        .add_suffix("_patients")
    )
    patients["patients"] = patients.sum(axis=1)
    lesion_rows = manifest[(manifest["phase"] == "early") & (manifest["modality"] == "FFDM")
                           & manifest["label"].isin(LESION_CLASSES)]
    images = (
        folds.merge(lesion_rows[["patient_id", "label"]], on="patient_id")
        .pivot_table(index=["fold", "subset"], columns="label", values="patient_id", aggfunc="count", fill_value=0)
        .reindex(columns=list(LESION_CLASSES), fill_value=0)
        .add_suffix("_images")
    )
    table = patients.join(images, how="left").fillna(0).astype(int).reset_index()
    table["subset"] = pd.Categorical(table["subset"], categories=list(SUBSETS), ordered=True)
    table = table.sort_values(["fold", "subset"], ignore_index=True)
    table["subset"] = table["subset"].astype(str)
    return table


def check_folds(folds: pd.DataFrame, manifest: pd.DataFrame, n_folds: int) -> FoldCheck:
    """Validate a fold table against the manifest.

    Checks: columns and subset names; folds 0..K-1; every manifest patient present once in every
    fold (a patient in two subsets of one fold is *leakage*, counted per patient and fold); every
    patient in exactly one test set; every subset non-empty in every fold; both lesion classes in
    every val and test set (and train).
    """
    missing = set(FOLD_COLUMNS) - set(folds.columns)
    if missing:
        raise SplitError(f"fold table lacks column(s) {sorted(missing)}")
    problems: list[str] = []
    bad_subsets = sorted(set(folds["subset"]) - set(SUBSETS))
    if bad_subsets:
        problems.append(f"unknown subset(s) {bad_subsets}; expected {list(SUBSETS)}")
    if sorted(set(folds["fold"])) != list(range(n_folds)):
        problems.append(f"folds are {sorted(set(folds['fold']))}, expected 0..{n_folds - 1}")

    per_fold = folds.groupby(["fold", "patient_id"])["subset"].nunique()
    leakage = int((per_fold > 1).sum())
    if leakage:
        examples = per_fold[per_fold > 1].index[:5].tolist()
        problems.append(f"{leakage} patient(s) in more than one subset of a fold, e.g. (fold, patient) {examples}")

    patients = set(manifest["patient_id"].dropna())
    for fold, part in folds.groupby("fold"):
        absent = patients - set(part["patient_id"])
        if absent:
            problems.append(f"fold {fold}: {len(absent)} patient(s) without a subset, e.g. {sorted(absent)[:3]}")

    test_folds = folds[folds["subset"] == "test"].groupby("patient_id")["fold"].nunique()
    tested = test_folds.reindex(sorted(patients), fill_value=0)
    if (tested != 1).any():
        wrong = tested[tested != 1]
        problems.append(f"{len(wrong)} patient(s) not in exactly one test fold, e.g. {wrong.head(3).to_dict()}")

    counts = fold_counts(folds, manifest)
    present = set(zip(counts["fold"], counts["subset"]))
    for fold in sorted(set(folds["fold"])):
        # a subset with no patient at all has no row in counts (e.g. a val_share so large that it
        # takes every non-test patient): name it, or the per-class check below never sees it
        problems += [f"fold {fold}, subset {subset}: no patient" for subset in SUBSETS if (fold, subset) not in present]
    for row in counts.itertuples(index=False):
        for label in LESION_CLASSES:
            if getattr(row, f"{label}_patients") == 0:
                problems.append(f"fold {row.fold}, subset {row.subset}: no {label} patient")
    return FoldCheck(leakage=leakage, counts=counts, problems=problems)
