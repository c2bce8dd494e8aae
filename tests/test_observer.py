"""The location-known observer: its features, lesion-level AUC per fold/modality/view, the ceiling."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from virtual_biopsy.core.config import SynthConfig
from virtual_biopsy.data import phantom
from virtual_biopsy.evaluation import lesion_metrics as lm
from virtual_biopsy.evaluation import metrics, observer

SIZE = 40


def _disc(centre: tuple[float, float], radius: float) -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def _image_stack() -> tuple[np.ndarray, np.ndarray]:
    """Rows 0/1: LE and DES of one breast (lesion near the skin line); row 2: LE without lesion."""
    rng = np.random.default_rng(0)
    breast = np.zeros((SIZE, SIZE), bool)
    breast[:, :24] = True
    lesion = _disc((20, 19), 4) & breast
    le = np.where(breast, 0.4 + 0.02 * rng.standard_normal((SIZE, SIZE)) + 0.1 * lesion, 0.0)
    des = np.where(breast, 0.3 + 0.02 * rng.standard_normal((SIZE, SIZE)) + 0.5 * lesion, 0.0)
    des[:, 24:27] = 0.2  # air noise a DES window lets through, right next to the lesion
    images = np.stack([le, des, le]).astype(np.float32)
    masks = np.stack([lesion, lesion, np.zeros_like(lesion)]).astype(np.uint8)
    return images, masks


# --- features ------------------------------------------------------------------------------------

def test_lesion_features_read_mean_and_contrast_with_the_ring_in_the_partners_breast() -> None:
    images, masks = _image_stack()
    features = observer.lesion_features(images, masks, rows=[0, 1], breast_from=[0, 0])
    assert list(features.columns) == ["row", "mean", "contrast"] and features["row"].tolist() == [0, 1]
    lesion = masks[1].astype(bool)
    ring = lm.surround_ring(lesion, lm.breast_region(images[0]))
    des = images[1].astype(np.float64)
    assert features["mean"].iloc[1] == pytest.approx(des[lesion].mean())
    assert features["contrast"].iloc[1] == pytest.approx(des[lesion].mean() - des[ring].mean())
    assert features["contrast"].iloc[1] == pytest.approx(0.5, abs=0.03)
    # DES > 0 would put the (darker) air columns into the ring and inflate the contrast
    own = observer.lesion_features(images, masks, rows=[1])
    assert own["contrast"].iloc[0] > features["contrast"].iloc[1] + 0.01


def test_lesion_features_default_region_is_each_images_own() -> None:
    images, masks = _image_stack()
    assert observer.lesion_features(images, masks, [0]).equals(observer.lesion_features(images, masks, [0], [0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": [0, 2]}, "row 2: has no lesion mask"),
        ({"rows": [5]}, r"rows \[5\] are outside the image array \(N = 3\)"),
        ({"rows": [0], "breast_from": [0, 1]}, "breast_from: 2 rows given for 1 images"),
        ({"rows": [1], "breast_from": [2]}, "row 1: .*"),
    ],
)
def test_lesion_features_bad_rows_raise_errors_that_name_them(kwargs, message: str) -> None:
    images, masks = _image_stack()
    if kwargs.get("breast_from") == [2]:  # a partner with no breast: the ring is empty
        images = images.copy()
        images[2] = 0
        message = "row 1: surround ring is empty"
    with pytest.raises(ValueError, match=message):
        observer.lesion_features(images, masks, **kwargs)


def test_lesion_features_reject_masks_that_do_not_fit() -> None:
    images, masks = _image_stack()
    with pytest.raises(ValueError, match="masks: shape"):
        observer.lesion_features(images, masks[:, :-1], [0])
    with pytest.raises(ValueError, match="row 0: masks: mask must be binary"):
        observer.lesion_features(images, masks * 3, [0])
    with pytest.raises(ValueError, match="images: expected a stack"):
        observer.lesion_features(images[0], masks[0], [0])


# --- scores --------------------------------------------------------------------------------------

def _frame(labels, cc, mlo, fold: int = 0, modality: str = "CESM", prefix: str = "L") -> pd.DataFrame:
    """Two images (CC, MLO) per lesion with feature values ``cc`` and ``mlo``."""
    rows = []
    for i, (y, a, b) in enumerate(zip(labels, cc, mlo)):
        for view, value in (("CC", a), ("MLO", b)):
            rows.append({"lesion_id": f"{prefix}{fold}-{i}", "view": view, "modality": modality, "label": y,
                         "fold": fold, "contrast": value})
    return pd.DataFrame(rows)


def _auc(scores: pd.DataFrame, view: str, fold: int = 0, modality: str = "CESM") -> float:
    row = scores[(scores["view"] == view) & (scores["fold"] == fold) & (scores["modality"] == modality)]
    assert len(row) == 1
    return float(row["auc"].iloc[0])


def test_rank_scores_keep_the_auc_of_the_raw_feature() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 60)
    raw = np.round(rng.normal(0, 3, 60) + 2 * y, 0)  # negative, unbounded, with ties
    q = observer.rank_scores(raw)
    assert q.min() > 0 and q.max() < 1
    assert metrics.auc(y, q) == pytest.approx(roc_auc_score(y, raw), abs=1e-12)
    assert np.array_equal(np.argsort(q, kind="stable"), np.argsort(raw, kind="stable"))


def test_observer_auc_is_one_on_perfectly_separated_lesions() -> None:
    frame = pd.concat([_frame([1, 1, 0, 0, 0], [5, 6, 1, 2, 3], [7, 8, 0, 1, 2], modality=m) for m in ("FFDM", "CESM")])
    scores = observer.observer_scores(frame, "contrast")
    assert list(scores.columns) == list(observer.SCORE_COLUMNS)
    assert len(scores) == 6 and (scores["auc"] == 1.0).all()
    assert set(scores["view"]) == {"CC", "MLO", "fused"}
    assert (scores["n_malignant"] == 2).all() and (scores["n_benign"] == 3).all()
    reversed_scores = observer.observer_scores(frame.assign(contrast=-frame["contrast"]), "contrast")
    assert (reversed_scores["auc"] == 0.0).all()  # the sign is fixed, never fitted


def test_observer_auc_is_half_in_expectation_under_random_labels() -> None:
    rng = np.random.default_rng(7)
    folds = [_frame(rng.permutation([1] * 10 + [0] * 10), rng.normal(size=20), rng.normal(size=20), fold=k)
             for k in range(200)]  # one fold per draw: one call scores them all, each on its own
    scores = observer.observer_scores(pd.concat(folds), "contrast")
    fused = scores.loc[scores["view"] == "fused", "auc"]
    assert len(fused) == 200
    assert fused.mean() == pytest.approx(0.5, abs=0.03)  # SE of the mean about 0.01


def test_fused_views_use_both_views() -> None:
    # each view alone misses one malignant lesion; their mean separates them all
    frame = _frame([1, 1, 0, 0], cc=[3.0, 0.0, 1.0, 1.2], mlo=[0.0, 3.0, 1.0, 1.2])
    scores = observer.observer_scores(frame, "contrast")
    assert _auc(scores, "CC") == 0.5 and _auc(scores, "MLO") == 0.5
    assert _auc(scores, "fused") == 1.0


def test_a_lesion_with_one_view_keeps_that_value_when_fused() -> None:
    frame = _frame([1, 0, 0], cc=[2.0, 1.0, 1.5], mlo=[0.0, 1.0, 1.5])
    frame = frame[~((frame["lesion_id"] == "L0-0") & (frame["view"] == "MLO"))]  # malignant: CC only
    scores = observer.observer_scores(frame, "contrast")
    assert _auc(scores, "fused") == 1.0  # 2.0 alone, not (2.0 + nothing) / 2
    mlo = scores[scores["view"] == "MLO"].iloc[0]
    assert (mlo["n_malignant"], mlo["n_benign"]) == (0, 2) and math.isnan(mlo["auc"])  # one class: undefined


def test_images_of_one_lesion_and_view_are_averaged() -> None:
    frame = _frame([1, 0], cc=[1.0, 1.6], mlo=[1.0, 1.6])
    repeat = frame.iloc[[-1]].assign(contrast=0.0)  # a second MLO image of the benign lesion
    scores = observer.observer_scores(pd.concat([frame, repeat]), "contrast")
    assert _auc(scores, "MLO") == 1.0  # mean 0.8 < 1.0; the first image alone (1.6) would give 0
    assert _auc(scores, "CC") == 0.0
    assert scores["n_benign"].tolist() == [1, 1, 1]


def test_folds_are_scored_apart() -> None:
    # each fold separates perfectly, but on another scale: pooled, they would not
    frame = pd.concat([_frame([1, 0], [2.0, 1.0], [2.0, 1.0], fold=0),
                       _frame([1, 0], [20.0, 10.0], [20.0, 10.0], fold=1),
                       _frame([1, 0], [0.0, 5.0], [0.0, 5.0], fold=2)])
    scores = observer.observer_scores(frame, "contrast")
    assert sorted(scores["fold"].unique().tolist()) == [0, 1, 2]
    assert _auc(scores, "fused", fold=0) == _auc(scores, "fused", fold=1) == 1.0
    assert _auc(scores, "fused", fold=2) == 0.0
    table = observer.ceiling_table(scores)
    fused = table[table["view"] == "fused"].iloc[0]
    mean, sem = metrics.mean_and_sem([1.0, 1.0, 0.0])
    assert fused["auc_mean"] == pytest.approx(mean) and fused["auc_sem"] == pytest.approx(sem)
    assert (fused["folds"], fused["n_malignant"], fused["n_benign"]) == (3, 3, 3)


def test_ceiling_table_has_one_row_per_modality_view_and_feature() -> None:
    rng = np.random.default_rng(2)
    parts = []
    for fold in range(3):
        for modality in ("FFDM", "CESM"):
            labels = [1, 1, 1, 0, 0, 0]
            frame = _frame(labels, rng.normal(size=6), rng.normal(size=6), fold, modality)
            parts.append(frame.assign(mean=frame["contrast"] + 1))
    frame = pd.concat(parts)
    scores = pd.concat([observer.observer_scores(frame, f) for f in observer.FEATURES])
    table = observer.ceiling_table(scores)
    assert list(table.columns) == list(observer.CEILING_COLUMNS)
    assert len(table) == 2 * 3 * 2 and (table["folds"] == 3).all()
    # mean = contrast + 1 ranks the lesions alike: same ceiling
    by_feature = table.set_index(["modality", "view", "feature"])["auc_mean"]
    assert by_feature.xs("mean", level="feature").equals(by_feature.xs("contrast", level="feature"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop(columns="fold"), r"missing column\(s\) \['fold'\]"),
        (lambda f: f.assign(view="ML"), r"view must be one of \['CC', 'MLO'\]"),
        (lambda f: f.assign(modality="MRI"), "modality must be one of"),
        (lambda f: f.assign(label=2), "label: labels must be 0"),
        (lambda f: f.assign(contrast=np.nan), "must be finite"),
        (lambda f: f.assign(label=[1, 0] + [0] * (len(f) - 2)), "have both labels"),
        (lambda f: f.assign(fold=[0, 1] + [0] * (len(f) - 2)), "are in several folds"),
        (lambda f: f.iloc[:0], "no images"),
    ],
)
def test_bad_frames_raise_errors_that_say_why(change, message: str) -> None:
    frame = _frame([1, 0, 0], [3, 1, 2], [3, 1, 2])
    with pytest.raises(ValueError, match=message):
        observer.observer_scores(change(frame), "contrast")


def test_ceiling_table_rejects_a_table_that_is_not_observer_scores() -> None:
    with pytest.raises(ValueError, match="missing column"):
        observer.ceiling_table(pd.DataFrame({"auc": [0.5]}))


# --- ceiling shares and the latent limit -----------------------------------------------------------

def test_share_of_ceiling_is_chance_corrected() -> None:
    assert observer.share_of_ceiling(0.9, 0.9) == pytest.approx(1.0)
    assert observer.share_of_ceiling(0.5, 0.9) == 0.0
    assert observer.share_of_ceiling(0.7, 0.9) == pytest.approx(0.5)
    assert observer.share_of_ceiling(0.95, 0.9) > 1  # morphology beyond intensity
    assert math.isnan(observer.share_of_ceiling(0.8, 0.5))
    assert math.isnan(observer.share_of_ceiling(float("nan"), 0.9))
    with pytest.raises(ValueError, match=r"ceiling_auc: an AUC must lie in \[0, 1\]"):
        observer.share_of_ceiling(0.8, 1.2)


def test_latent_auc_is_the_auc_of_the_true_uptake() -> None:
    config = SynthConfig()
    rng = np.random.default_rng(5)
    labels = np.array([1] * 80 + [0] * 80)
    uptake = np.array([phantom.draw_mass("malignant" if y else "benign", config, rng).uptake for y in labels])
    value = observer.latent_auc(labels, uptake)
    assert value == pytest.approx(roc_auc_score(labels, uptake), abs=1e-12)
    assert 0.85 < value <= 1.0  # malignant masses take up more contrast on average
    assert math.isnan(observer.latent_auc([1, 1], [0.3, 0.5]))
    with pytest.raises(ValueError, match="uptake: 3 values for 2 labels"):
        observer.latent_auc([1, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels: labels must be 0"):
        observer.latent_auc([1, 3], [0.1, 0.2])
