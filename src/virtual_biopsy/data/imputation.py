"""Which generator imputes which LE image: out of fold (paper Algorithm 1, step 1).

Each patient is in exactly one fold's *test* set (data/splits). That fold's generator was trained
on that fold's train patients only, so it never saw the patient: every LE image is imputed by the
generator of the fold that tests its patient, and the classifiers' Ĉ setting sees synthetic CESM
of the quality a new patient would get.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from virtual_biopsy.data.layout import MANIFEST_COLUMNS
from virtual_biopsy.dicom.write import deterministic_uid

IMPUTED_COLUMNS = (*MANIFEST_COLUMNS, "source_image_id", "generator_view", "generator_fold", "row")


class ImputeError(ValueError):
    """Imputation cannot run (a patient without a test fold, a missing generator, bad inputs)."""


def test_fold_of_patients(folds: pd.DataFrame) -> pd.Series:
    """patient_id -> the one fold whose test set holds the patient (raises if not exactly one)."""
    tests = folds[folds["subset"] == "test"]
    counts = tests.groupby("patient_id")["fold"].nunique()
    repeated = counts[counts > 1]
    if len(repeated):
        raise ImputeError(f"patient(s) {repeated.index[:3].tolist()} are in the test set of several folds")
    return tests.drop_duplicates("patient_id").set_index("patient_id")["fold"].astype(int)


def plan_imputation(index: pd.DataFrame, folds: pd.DataFrame, views: tuple[str, ...]) -> pd.DataFrame:
    """LE rows of ``views`` with the (view, fold) of the generator that never saw their patient."""
    le = index[(index["modality"] == "FFDM") & index["view"].isin(views)].copy()
    fold_of = test_fold_of_patients(folds)
    le["generator_fold"] = le["patient_id"].map(fold_of)
    untested = le[le["generator_fold"].isna()]
    if len(untested):
        raise ImputeError(
            f"patient(s) {sorted(set(untested['patient_id']))[:3]} are in no fold's test set; "
            "no generator is guaranteed not to have seen them (rerun split)"
        )
    le["generator_fold"] = le["generator_fold"].astype(int)
    le["generator_view"] = le["view"]
    return le.sort_values("row", kind="stable").reset_index(drop=True)


def synthetic_image_id(source_image_id: str, view: str, fold: int) -> str:
    """New, deterministic SOPInstanceUID of the synthetic image made from ``source_image_id``
    (a hash of the pseudonymous id: it reveals nothing of the source's original UID)."""
    return deterministic_uid("virtual-biopsy", "synthetic-cesm", source_image_id, view, fold)


def imputed_index(plan: pd.DataFrame) -> pd.DataFrame:
    """The LE rows restated as synthetic CESM rows (row = position in data/imputed/images.npy)."""
    index = plan.copy()
    index["source_image_id"] = index["image_id"]
    index["image_id"] = [synthetic_image_id(s, v, f) for s, v, f in
                         zip(index["source_image_id"], index["generator_view"], index["generator_fold"])]
    index["modality"] = "CESM"
    index["synthetic"] = True
    index["row"] = np.arange(len(index))
    return index[[c for c in IMPUTED_COLUMNS if c in index.columns]]
