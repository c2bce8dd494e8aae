"""Which images train, validate and test which model: the cohorts of the two tasks (paper Table 2).

Virtual biopsy (classifiers f_{m,v}, paper 5.1)
    Early-phase images with a biopsy result (malignant or benign) of exactly one modality and
    view. The unit of evaluation is the lesion, ``lesion_id = patient|study|laterality`` (one
    breast's early acquisition). Imputed CESM joins its LE image's lesion via ``source_image_id``.

CESM generation (CycleGANs, paper 5.2)
    Every LE/DES pair of a view (all phases, all labels), paired by ``pair_key``.

Both split by patient with data/splits/folds.csv; train, val and test patient sets are checked to
be disjoint, so no test patient ever reaches training, early stopping or the fusion weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from virtual_biopsy.core.atomic import restore_interrupted_swap
from virtual_biopsy.core.config import ARCHITECTURES, MODALITIES, VIEWS
from virtual_biopsy.core.paths import ProjectPaths

BIOPSY_LABELS = {"malignant": 1, "benign": 0}


VIRTUAL_BIOPSY_PHASE = "early"


SUBSETS = ("train", "val", "test")
SCORED_SUBSETS = ("val", "test")  # a classifier is scored on its val and test patients


# Columns an image table carries through this stage (besides the array row).
IMAGE_COLUMNS = ("image_id", "patient_id", "lesion_id", "acr", "y", "modality", "view", "source")


class CohortError(ValueError):
    """The inputs cannot make a cohort (no images for a subset, a patient in two subsets, no split)."""


def lesion_ids(frame: pd.DataFrame) -> pd.Series:
    """``patient|study|laterality``: one breast's early acquisition, the unit the paper evaluates."""
    return frame["patient_id"].astype(str) + "|" + frame["study_id"].astype(str) + "|" + frame["laterality"].astype(str)


def is_synthetic(frame: pd.DataFrame) -> pd.Series:
    if "synthetic" not in frame:
        return pd.Series(False, index=frame.index)
    return frame["synthetic"].astype(str).str.lower().isin(("true", "1"))


def biopsy_images(index: pd.DataFrame, modality: str, view: str) -> pd.DataFrame:
    """Real early-phase images with a malignant/benign label of exactly ``modality`` and ``view``.

    Returns IMAGE_COLUMNS plus ``row`` (into data/processed/images.npy), sorted by image id so
    the order, and with it training, does not depend on the order of the index file.
    """
    keep = (
        (index["modality"] == modality)
        & (index["view"] == view)
        & (index["phase"] == VIRTUAL_BIOPSY_PHASE)
        & index["label"].isin(tuple(BIOPSY_LABELS))
        & ~is_synthetic(index)
    )
    images = index[keep].copy()
    images["lesion_id"] = lesion_ids(images)
    images["y"] = images["label"].map(BIOPSY_LABELS).astype(int)
    images["source"] = "real"
    images = images.sort_values("image_id", kind="stable").reset_index(drop=True)
    check_single_input(images, modality, view)
    return images[[*IMAGE_COLUMNS, "row"]]


def synthetic_images(imputed: pd.DataFrame, index: pd.DataFrame, view: str) -> pd.DataFrame:
    """Imputed CESM of the virtual-biopsy LE images of ``view``, carrying their LE image's lesion.

    Joined on ``source_image_id`` -> the LE image; lesion, label, patient and ACR come from that
    LE image (the imputed index repeats them, and a disagreement is an error), and ``image_id``
    is the LE input's, as the predictions contract asks. ``row`` indexes data/imputed/images.npy.
    """
    le = biopsy_images(index, "FFDM", view).set_index("image_id")
    rows = imputed[imputed["source_image_id"].isin(le.index)].copy()
    if rows.empty:
        return pd.DataFrame(columns=[*IMAGE_COLUMNS, "row"])
    if not (is_synthetic(rows).all() and (rows["modality"] == "CESM").all() and (rows["view"] == view).all()):
        raise CohortError(f"imputed index: rows made from {view} LE images must be synthetic CESM of view {view}")
    source = le.loc[rows["source_image_id"]]
    disagree = rows["patient_id"].astype(str).to_numpy() != source["patient_id"].astype(str).to_numpy()
    if disagree.any():
        raise CohortError(
            f"imputed index: synthetic image(s) of {rows['source_image_id'][disagree].tolist()[:3]} name another "
            "patient than their LE source (rerun impute)"
        )
    out = pd.DataFrame({
        "image_id": rows["source_image_id"].to_numpy(),
        "patient_id": source["patient_id"].to_numpy(),
        "lesion_id": source["lesion_id"].to_numpy(),
        "acr": source["acr"].to_numpy(),
        "y": source["y"].to_numpy(),
        "modality": "CESM",
        "view": view,
        "source": "synthetic",
        "row": rows["row"].astype(int).to_numpy(),
    })
    return out.sort_values("image_id", kind="stable").reset_index(drop=True)


def check_single_input(images: pd.DataFrame, modality: str, view: str) -> None:
    """A classifier f_{m,v} sees images of modality m and view v only (paper 5.1): fail loudly otherwise."""
    for column, expected in (("modality", modality), ("view", view)):
        found = sorted(set(images[column].astype(str)) - {expected})
        if found:
            raise CohortError(f"classifier {modality}-{view} was given {column} {found}; it sees {expected} only")


def patient_subsets(folds: pd.DataFrame, fold: int) -> dict[str, set[str]]:
    """Patient ids of fold ``fold``'s train, val and test subsets, checked to be disjoint."""
    of_fold = folds[folds["fold"] == fold]
    subsets = {name: set(of_fold.loc[of_fold["subset"] == name, "patient_id"].astype(str)) for name in SUBSETS}
    check_disjoint_patients(subsets, fold)
    return subsets


def check_disjoint_patients(subsets: dict[str, set[str]], fold: int) -> None:
    """No patient in two subsets: test patients never train, early-stop or weight the fusion."""
    for i, a in enumerate(SUBSETS):
        for b in SUBSETS[i + 1:]:
            shared = subsets[a] & subsets[b]
            if shared:
                raise CohortError(f"fold {fold}: patient(s) {sorted(shared)[:3]} are in both {a} and {b}")


def split_images(images: pd.DataFrame, patients: dict[str, set[str]], fold: int, require: tuple[str, ...]
                 ) -> dict[str, pd.DataFrame]:
    """``images`` by subset; the subsets in ``require`` must not be empty."""
    unassigned = sorted(set(images["patient_id"].astype(str)) - set().union(*patients.values()))
    if unassigned:
        raise CohortError(f"fold {fold}: patient(s) {unassigned[:3]} have images but no split (rerun split)")
    out = {name: images[images["patient_id"].astype(str).isin(ids)].reset_index(drop=True)
           for name, ids in patients.items()}
    for name in require:
        if out[name].empty:
            raise CohortError(f"fold {fold}: no virtual-biopsy images in the {name} subset")
    return out


def view_pairs(index: pd.DataFrame, view: str) -> pd.DataFrame:
    """One row per LE/DES pair of ``view``: pair_key, patient_id, acr, label, phase, le_row, des_row.

    Every phase and label is kept. A pair key with other than exactly one LE and one DES image
    is an error naming the key (ingest's ``require_pairs`` should have rejected it).
    """
    rows = index[index["view"] == view]
    counts = rows.groupby(["pair_key", "modality"]).size().unstack(fill_value=0)
    for modality in ("FFDM", "CESM"):
        if modality not in counts:
            counts[modality] = 0
    bad = counts[(counts["FFDM"] != 1) | (counts["CESM"] != 1)]
    if len(bad):
        raise CohortError(
            f"view {view}: pair key(s) {bad.index[:3].tolist()} do not hold exactly one LE and one DES image"
        )
    le = rows[rows["modality"] == "FFDM"].set_index("pair_key")
    des = rows[rows["modality"] == "CESM"].set_index("pair_key")
    pairs = le[["patient_id", "acr", "label", "phase", "image_id"]].rename(columns={"image_id": "le_image_id"})
    pairs = pairs.assign(le_row=le["row"].astype(int), des_row=des.loc[le.index, "row"].astype(int))
    return pairs.reset_index().sort_values("pair_key", kind="stable").reset_index(drop=True)


def fold_subsets(pairs: pd.DataFrame, folds: pd.DataFrame, fold: int) -> dict[str, pd.DataFrame]:
    """The pairs of fold ``fold`` split into train/val/test by patient (folds.csv)."""
    subset_of = folds[folds["fold"] == fold].set_index("patient_id")["subset"]
    missing = sorted(set(pairs["patient_id"]) - set(subset_of.index))
    if missing:
        raise CohortError(f"fold {fold}: patient(s) {missing[:3]} have pairs but no split (rerun split)")
    subset = pairs["patient_id"].map(subset_of)
    out = {name: pairs[subset == name].reset_index(drop=True) for name in ("train", "val", "test")}
    for name, part in out.items():
        if part.empty:
            raise CohortError(f"fold {fold}: no LE/DES pairs in the {name} subset")
    return out


def refit_subsets(pairs: pd.DataFrame, folds: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Refit policy: train on every patient except fold 0's validation patients (early stopping)."""
    val_patients = set(folds[(folds["fold"] == 0) & (folds["subset"] == "val")]["patient_id"])
    is_val = pairs["patient_id"].isin(val_patients)
    return {"train": pairs[~is_val].reset_index(drop=True), "val": pairs[is_val].reset_index(drop=True)}


# ---------------------------------------------------------------------------------------------
# Reading the tables a cohort is made from
# ---------------------------------------------------------------------------------------------
TEXT_COLUMNS = {"image_id": str, "patient_id": str, "study_id": str, "source_image_id": str}


def require_inputs(paths_and_stages: list[tuple[Path, str]]) -> None:
    """Raise FileNotFoundError naming the first missing input and the stage that writes it.

    An input missing because its set's swap was interrupted (core.atomic) is put back first.
    """
    for path, stage in paths_and_stages:
        if not path.exists() and not restore_interrupted_swap(path):
            raise FileNotFoundError(f"{path}: missing (run the {stage} stage first)")


def read_processed_index(paths: ProjectPaths) -> pd.DataFrame:
    """data/processed/index.csv with ids kept as text (a numeric-looking id must not become a float)."""
    require_inputs([(paths.processed_images, "preprocess"), (paths.processed_index, "preprocess")])
    return pd.read_csv(paths.processed_index, dtype=TEXT_COLUMNS, keep_default_na=False)


def read_folds(paths: ProjectPaths) -> pd.DataFrame:
    require_inputs([(paths.splits, "split")])
    return pd.read_csv(paths.splits, dtype={"patient_id": str})


def read_imputed_index(paths: ProjectPaths) -> pd.DataFrame:
    require_inputs([(paths.imputed_images, "impute"), (paths.imputed_index, "impute")])
    return pd.read_csv(paths.imputed_index, dtype=TEXT_COLUMNS, keep_default_na=False)


@dataclass(frozen=True)
class Classifier:
    """Which f_{m,v}: architecture, modality and view (checked against the known ones)."""

    arch: str
    modality: str
    view: str

    def __post_init__(self) -> None:
        for value, allowed, name in ((self.arch, ARCHITECTURES, "architecture"),
                                     (self.modality, MODALITIES, "modality"), (self.view, VIEWS, "view")):
            if value not in allowed:
                raise CohortError(f"unknown {name} {value!r}; choose from {allowed}")

    @property
    def label(self) -> str:
        return f"{self.arch} {self.modality}-{self.view}"

    @property
    def tags(self) -> dict[str, str]:
        return {"arch": self.arch, "modality": self.modality, "view": self.view}
