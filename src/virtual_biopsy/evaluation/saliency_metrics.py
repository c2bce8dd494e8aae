"""How well a saliency map points at the lesion: the pointing game and the saliency mass in the mask.

A saliency map ``s`` is a 2-D non-negative array (Grad-CAM of serving/saliency.py: [0, 1] per
image) over the same pixels as a binary lesion mask ``L`` (1 inside). Optionally a binary
``region`` R (the pixels that count, default the whole image) restricts both the map and the
chance level, e.g. to the breast.

Pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop", tolerance
0 px)
    hit = 1 if some pixel x with s(x) = max_R s lies in L, else 0.
    Ties: a map with several maximal pixels hits when *any* of them is in the lesion (Grad-CAM
    upsampled from a coarse grid can have a plateau; this is the generous reading, said so here
    and in the report). Chance (a maximum at a uniformly random pixel of R): |L ∩ R| / |R|.

Saliency mass in the lesion
    mass = Σ_{x ∈ L ∩ R} s(x) / Σ_{x ∈ R} s(x), in [0, 1]; chance (a flat map): |L ∩ R| / |R|.

Both are undefined for an all-zero map (no maximum, no mass): :func:`check_saliency` raises, and a
caller that meets such maps (Grad-CAM with a 1-cell grid, or no region raising the logit) counts
them apart rather than as misses. Aggregating over images (:func:`hit_rate_interval`): a
**patient-level percentile bootstrap** of the hit rate, because a patient contributes several
correlated images (two views, two modalities in F+C), which a Wilson interval would treat as
independent trials and so make too narrow. Pure numpy and pandas; nothing is read or written here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


class SaliencyMetricError(ValueError):
    """A map or mask cannot be scored; the message names which and why."""


def check_saliency(saliency: object, name: str = "saliency") -> np.ndarray:
    """A finite, non-negative, not all-zero 2-D map as float64 (SaliencyMetricError otherwise)."""
    arr = np.asarray(saliency, dtype=np.float64)
    if arr.ndim != 2:
        raise SaliencyMetricError(f"{name}: expected a 2-D map, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise SaliencyMetricError(f"{name}: map holds nan or inf")
    if (arr < 0).any():
        raise SaliencyMetricError(f"{name}: map has negative values (min {arr.min():.3g}); "
                                  "the pointing game and the mass share take a non-negative map")
    if not (arr > 0).any():
        raise SaliencyMetricError(f"{name}: map is all zero (no maximum and no mass to score)")
    return arr


def _binary(mask: object, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise SaliencyMetricError(f"{name}: shape {arr.shape} differs from the map's {shape}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise SaliencyMetricError(f"{name}: must be binary (0 outside, 1 inside), found values "
                                  f"{np.unique(arr[~np.isin(arr, (0, 1))])[:5].tolist()}")
    return arr.astype(bool)


def _inputs(saliency: object, mask: object, region: object | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(map, lesion ∩ region, region), checked: same shapes, non-empty lesion in the region, map > 0 there."""
    s = check_saliency(saliency)
    lesion = _binary(mask, "lesion mask", s.shape)
    area = np.ones(s.shape, bool) if region is None else _binary(region, "region", s.shape)
    lesion = lesion & area
    if not lesion.any():
        raise SaliencyMetricError("lesion mask is empty" + ("" if region is None else " inside the region")
                                  + " (no pixel set): nothing to point at")
    if not (s[area] > 0).any():
        raise SaliencyMetricError("saliency: map is all zero inside the region")
    return s, lesion, area


def pointing_game_hit(saliency: object, mask: object, region: object | None = None) -> bool:
    """True if a maximal pixel of the map (within ``region``) lies in the lesion (module docstring)."""
    s, lesion, area = _inputs(saliency, mask, region)
    peak = s[area].max()
    return bool((lesion & (s == peak)).any())


def saliency_mass_in_mask(saliency: object, mask: object, region: object | None = None) -> float:
    """Σ_{L∩R} s / Σ_R s: the share of the map's mass (within ``region``) that lies in the lesion."""
    s, lesion, area = _inputs(saliency, mask, region)
    return float(s[lesion].sum() / s[area].sum())


def chance_level(mask: object, region: object | None = None) -> float:
    """|L ∩ R| / |R|: the chance level of both the hit and the mass share (a random point, a flat map)."""
    lesion = np.asarray(mask)
    area = np.ones(lesion.shape, bool) if region is None else _binary(region, "region", lesion.shape)
    lesion = _binary(mask, "lesion mask", lesion.shape) & area
    if lesion.ndim != 2 or not lesion.any():
        raise SaliencyMetricError("lesion mask is empty or not 2-D: no chance level")
    return float(lesion.sum() / area.sum())


@dataclass(frozen=True)
class HitRate:
    """Share of hits with its patient-bootstrap percentile interval (``level``, e.g. 0.95)."""

    rate: float
    low: float
    high: float
    images: int
    patients: int


def hit_rate_interval(hits: Sequence[bool], patients: Sequence[str], *, resamples: int = 2000,
                      level: float = 0.95, seed: int = 0) -> HitRate:
    """Hit rate = Σ hit / n over images; interval: percentiles (1-level)/2 and (1+level)/2 of the
    rate over ``resamples`` draws of the patients with replacement (each draw takes all images of
    the drawn patients). With one patient the interval is the rate itself."""
    hit = np.asarray(hits, dtype=bool)
    who = np.asarray(patients).astype(str)
    if hit.ndim != 1 or hit.shape != who.shape:
        raise SaliencyMetricError(f"{hit.shape} hits but {who.shape} patients: one patient per image")
    if hit.size == 0:
        raise SaliencyMetricError("no images: no hit rate")
    if resamples < 1 or not 0 < level < 1:
        raise SaliencyMetricError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    ids, of_image = np.unique(who, return_inverse=True)
    hits_of = np.bincount(of_image, weights=hit.astype(float), minlength=len(ids))
    count_of = np.bincount(of_image, minlength=len(ids)).astype(float)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
    rates = hits_of[draws].sum(axis=1) / count_of[draws].sum(axis=1)
    low, high = np.quantile(rates, [(1 - level) / 2, (1 + level) / 2])
    return HitRate(float(hit.mean()), float(low), float(high), int(hit.size), int(len(ids)))


# --- the test folds' lesion images and the per-setting table -------------------------------------
# Which images each setting's fused decision reads (evaluation/setting_inputs): its per-view maps
# are the per-image maps of those classifiers, so a fused setting's images are the union of its
# inputs' images (F+C: the FFDM and the real CESM images of its lesions).
SALIENCY_SETTINGS = ("F", "C", "Ĉ", "F+C", "F+Ĉ")
ALL = "all"
TABLE_COLUMNS = ("arch", "setting", "modality", "view", "images", "patients", "flat_maps", "hit_rate",
                 "ci_low", "ci_high", "mass_in_lesion", "chance_hit", "chance_mass")
IMAGE_COLUMNS = ("fold", "patient_id", "modality", "view", "source", "row", "mask_row", "breast_row")


def saliency_images(observer_images: pd.DataFrame, synthetic: pd.DataFrame, index: pd.DataFrame,
                    folds_of_patient: pd.Series) -> pd.DataFrame:
    """The test folds' lesion images to score, one row each (IMAGE_COLUMNS).

    ``observer_images``: real lesion images with a mask, their LE partner (``breast_row``) and the
    test fold of their patient (evaluation.ceilings.observer_frame). ``synthetic``: imputed CESM
    (data.cohorts.synthetic_images: ``row`` into the imputed array, ``image_id`` its LE source);
    each takes its LE source's lesion mask and breast (the generator maps LE pixels to CESM pixels
    in the same geometry). Synthetic images whose LE source has no mask are left out."""
    real = observer_images.assign(source="real", mask_row=observer_images["row"])
    le_row = index.set_index("image_id")["row"].astype(int)
    with_mask = set(real.loc[real["modality"] == "FFDM", "image_id"])
    synth = synthetic[synthetic["image_id"].isin(with_mask)]
    synth = synth.assign(mask_row=synth["image_id"].map(le_row).to_numpy(),
                         breast_row=synth["image_id"].map(le_row).to_numpy(),
                         fold=synth["patient_id"].astype(str).map(folds_of_patient).to_numpy())
    synth = synth.dropna(subset=["fold"])
    parts = [real[list(IMAGE_COLUMNS)]] + ([synth[list(IMAGE_COLUMNS)]] if len(synth) else [])
    frame = pd.concat(parts, ignore_index=True)
    return frame.astype({"fold": int, "row": int, "mask_row": int, "breast_row": int})


def score_images(maps: np.ndarray, masks: np.ndarray, breasts: np.ndarray) -> pd.DataFrame:
    """Per image i: ``hit``, ``mass`` (nan for a map all zero in the breast: ``flat`` True) and
    ``chance`` = |lesion ∩ breast| / |breast|, each within the breast region ``breasts[i]``."""
    rows = []
    for saliency, mask, breast in zip(maps, masks, breasts):
        chance = chance_level(mask, breast)
        flat = not (np.asarray(saliency)[breast] > 0).any()
        rows.append({"hit": np.nan if flat else float(pointing_game_hit(saliency, mask, breast)),
                     "mass": np.nan if flat else saliency_mass_in_mask(saliency, mask, breast),
                     "chance": chance, "flat": flat})
    return pd.DataFrame(rows, columns=["hit", "mass", "chance", "flat"])


def _summary_row(scored: pd.DataFrame, resamples: int, seed: int) -> dict[str, object]:
    maps = scored[~scored["flat"]]
    out: dict[str, object] = {"images": int(len(scored)), "patients": int(scored["patient_id"].nunique()),
                              "flat_maps": int(scored["flat"].sum()),
                              "chance_hit": float(scored["chance"].mean()), "chance_mass": float(scored["chance"].mean())}
    if maps.empty:
        return out | {"hit_rate": np.nan, "ci_low": np.nan, "ci_high": np.nan, "mass_in_lesion": np.nan}
    rate = hit_rate_interval(maps["hit"].astype(bool).to_numpy(), maps["patient_id"].to_numpy(),
                             resamples=resamples, seed=seed)
    # chance over the scored maps, so it compares like with like (flat maps are left out of both)
    chance = float(maps["chance"].mean())
    return out | {"hit_rate": rate.rate, "ci_low": rate.low, "ci_high": rate.high,
                  "mass_in_lesion": float(maps["mass"].mean()), "chance_hit": chance, "chance_mass": chance}


def pointing_game_table(scored: pd.DataFrame, inputs: dict[str, tuple[tuple[str, str], ...]], *,
                        resamples: int, seed: int) -> pd.DataFrame:
    """TABLE_COLUMNS per arch, setting and (modality, view), plus one ``all``/``all`` row per setting.

    ``scored``: one row per image and arch (IMAGE_COLUMNS, arch, and :func:`score_images`'s columns);
    ``inputs``: setting -> its (modality, source) inputs. hit_rate: share of hits among non-flat maps
    with its patient-bootstrap 95 % interval; mass_in_lesion: mean mass share; chance_*: mean
    lesion share of the breast over the same images."""
    rows = []
    for arch, of_arch in scored.groupby("arch", sort=True):
        for setting in (s for s in SALIENCY_SETTINGS if s in inputs):
            wanted = {f"{m}|{s}" for m, s in inputs[setting]}
            part = of_arch[(of_arch["modality"] + "|" + of_arch["source"]).isin(wanted)]
            if part.empty:
                continue
            groups = [((m, v), g) for (m, v), g in part.groupby(["modality", "view"], sort=True)]
            for (modality, view), group in [*groups, ((ALL, ALL), part)]:
                rows.append({"arch": arch, "setting": setting, "modality": modality, "view": view,
                             **_summary_row(group, resamples, seed)})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def saliency_summary(table: pd.DataFrame) -> dict[str, float]:
    """Metrics ``saliency.<arch>.<setting slug>.<hit_rate|ci_low|ci_high|mass_in_lesion|chance>`` of the ``all`` rows."""
    from virtual_biopsy.evaluation.settings import SETTING_SLUGS

    out: dict[str, float] = {}
    for _, r in table[(table["modality"] == ALL) & (table["view"] == ALL)].iterrows():
        key = f"saliency.{r['arch']}.{SETTING_SLUGS[r['setting']]}"
        for name, column in (("hit_rate", "hit_rate"), ("ci_low", "ci_low"), ("ci_high", "ci_high"),
                             ("mass_in_lesion", "mass_in_lesion"), ("chance", "chance_hit"), ("images", "images")):
            value = float(r[column])
            if not np.isnan(value):
                out[f"{key}.{name}"] = value
    return out


def breast_regions(le_images: np.ndarray) -> np.ndarray:
    """The breast of each image as bool (N, S, S): its LE image > 0 (air and padding are exactly 0
    after preprocessing; a DES or synthetic image's own zeros are not the breast's edge)."""
    return np.asarray(le_images) > 0


def lesions_in_breast(masks: np.ndarray, breasts: np.ndarray) -> np.ndarray:
    """bool (N,): images whose lesion mask has a pixel inside the breast (the rest cannot be scored)."""
    return (np.asarray(masks).astype(bool) & breasts).reshape(len(breasts), -1).any(axis=1)
