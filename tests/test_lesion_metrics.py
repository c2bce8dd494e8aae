"""Lesion-aware generator metrics: breast-only image quality and lesion enhancement."""
from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from virtual_biopsy.core.config import SynthConfig
from virtual_biopsy.data import phantom, synthetic
from virtual_biopsy.evaluation import lesion_metrics as lm
from virtual_biopsy.evaluation import metrics

SIZE = 48


def _disc(centre: tuple[float, float], radius: float, size: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def _flat_case(seed: int = 0, uptake: float = 0.4) -> dict[str, np.ndarray]:
    """A flat breast (left 30 columns) with a disc lesion; real DES enhances it by ``uptake``.

    Background: LE and the prediction are 0 there (as after preprocessing and mask_background);
    the real DES has sparse air noise, as a narrow DES window lets through.
    """
    rng = np.random.default_rng(seed)
    breast = np.zeros((SIZE, SIZE), bool)
    breast[:, :30] = True
    lesion = _disc((24, 15), 5)
    le = np.where(breast, 0.45 + 0.02 * rng.standard_normal((SIZE, SIZE)) + 0.05 * lesion, 0.0)
    des = np.where(breast, 0.30 + 0.03 * rng.standard_normal((SIZE, SIZE)) + uptake * lesion, 0.0)
    des = np.where(~breast & (rng.random((SIZE, SIZE)) < 0.05), 0.05, des)
    predicted = np.where(breast, des + 0.02 * rng.standard_normal((SIZE, SIZE)), 0.0)
    return {"breast": breast, "lesion": lesion, "le": le, "des": des, "predicted": predicted}


def _windowed(stored: np.ndarray, window) -> np.ndarray:
    """Preprocessing's contrast stretch: clip to the display window, then min-max to [0, 1]."""
    low, high = window.center - window.width / 2, window.center + window.width / 2
    clipped = np.clip(stored.astype(np.float64), low, high)
    return (clipped - clipped.min()) / (clipped.max() - clipped.min())


def _phantom_case(seed: int, label: str = "malignant", size: int = 96) -> dict[str, np.ndarray]:
    """A simulated breast's LE and early DES images, stretched as preprocess does, with the mass mask."""
    config = SynthConfig()
    rng = np.random.default_rng(seed)
    breast = phantom.draw_breast("b", label, config, rng)
    anatomy = phantom.render_anatomy(breast, "CC", size, size)
    images = {}
    for energy, image in (("LE", phantom.low_energy_image(anatomy, breast, config, rng)),
                          ("DES", phantom.recombined_image(anatomy, breast, config, False, rng))):
        stored = synthetic.encode(image, energy)
        images[energy] = _windowed(stored, synthetic.display_window(stored, anatomy.breast, energy))
    return {"le": images["LE"], "des": images["DES"], "lesion": (anatomy.footprint > 0.5).astype(np.uint8)}


# --- regions ---------------------------------------------------------------------------------------

def test_breast_region_is_where_le_is_above_zero() -> None:
    case = _flat_case()
    assert np.array_equal(lm.breast_region(case["le"]), case["breast"])
    stack = np.stack([case["le"], np.zeros_like(case["le"])])
    assert lm.breast_region(stack).shape == stack.shape and not lm.breast_region(stack)[1].any()


def test_surround_ring_lies_outside_the_lesion_inside_the_breast_within_the_width() -> None:
    case = _flat_case()
    ring = lm.surround_ring(case["lesion"], case["breast"], width_px=3)
    y, x = np.nonzero(ring)
    distance = np.hypot(y - 24, x - 15)
    assert not (ring & case["lesion"]).any() and not (ring & ~case["breast"]).any()
    assert distance.min() > 5 and distance.max() <= 5 + 3 + 1
    # every breast pixel within the width is in the ring
    near = (~case["lesion"]) & case["breast"] & _disc((24, 15), 5 + 2.5)
    assert (ring | ~near).all()


def test_default_ring_width_is_the_equivalent_radius_with_a_two_pixel_floor() -> None:
    lesion = _disc((24, 15), 5)
    assert lm.default_ring_width(lesion) == pytest.approx(math.sqrt(lesion.sum() / math.pi))
    tiny = np.zeros((SIZE, SIZE), np.uint8)
    tiny[10, 10] = 1
    assert lm.default_ring_width(tiny) == 2.0
    ring = lm.surround_ring(tiny, np.ones((SIZE, SIZE), bool))
    assert ring.sum() == 12  # pixels with 0 < distance <= 2 around one pixel


def test_surround_ring_leaves_out_air_next_to_a_lesion_at_the_skin_line() -> None:
    breast = np.zeros((SIZE, SIZE), bool)
    breast[:, :30] = True
    lesion = _disc((24, 26), 4)  # reaches the skin line at column 29
    ring = lm.surround_ring(lesion & breast, breast)
    assert ring.any() and not ring[:, 30:].any()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lm.surround_ring(np.zeros((8, 8)), np.ones((8, 8))), "mask: lesion mask is empty"),
        (lambda: lm.surround_ring(np.ones((8, 8)), np.ones((8, 8))), "surround ring is empty"),
        (lambda: lm.surround_ring(_disc((24, 15), 5), np.zeros((SIZE, SIZE))), "surround ring is empty"),
        (lambda: lm.surround_ring(_disc((24, 15), 5), np.ones((8, 8))), r"breast: mask has shape \(8, 8\)"),
        (lambda: lm.surround_ring(_disc((24, 15), 5), np.ones((SIZE, SIZE)), width_px=0), "width_px: must be a positive number"),
        (lambda: lm.surround_ring(np.full((8, 8), 0.5), np.ones((8, 8))), "mask: mask must be binary"),
        (lambda: lm.surround_ring(np.ones((2, 8, 8)), np.ones((8, 8))), "mask: expected a 2-D mask"),
        (lambda: lm.breast_region(np.ones(5)), "le: expected an image"),
    ],
)
def test_bad_regions_raise_errors_that_say_why(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- breast-only image quality -----------------------------------------------------------------------

def test_breast_metrics_ignore_pixels_away_from_the_breast() -> None:
    case = _flat_case()
    region, des, predicted = case["breast"], case["des"], case["predicted"]
    changed = predicted.copy()
    changed[:, 34:] = np.random.default_rng(1).random((SIZE, SIZE - 34))  # > 3 px from the breast
    assert metrics.ssim(des, changed) < metrics.ssim(des, predicted) - 0.05
    assert metrics.mse(des, changed) > metrics.mse(des, predicted)
    assert lm.breast_ssim(des, changed, region) == lm.breast_ssim(des, predicted, region)
    assert lm.breast_mse(des, changed, region) == lm.breast_mse(des, predicted, region)
    assert lm.breast_psnr(des, changed, region) == lm.breast_psnr(des, predicted, region)


def test_breast_metrics_over_every_pixel_are_the_whole_image_metrics() -> None:
    case = _flat_case()
    everything = np.ones((SIZE, SIZE), bool)
    des, predicted = case["des"], case["predicted"]
    assert lm.breast_ssim(des, predicted, everything) == pytest.approx(metrics.ssim(des, predicted), abs=1e-12)
    assert lm.breast_mse(des, predicted, everything) == pytest.approx(metrics.mse(des, predicted), abs=1e-15)
    assert lm.breast_psnr(des, predicted, everything) == pytest.approx(metrics.psnr(des, predicted), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_breast_ssim_and_psnr_agree_with_skimage(seed: int) -> None:
    case = _flat_case(seed)
    des, predicted, region = case["des"], case["predicted"], case["breast"]
    _, full_map = structural_similarity(des, predicted, data_range=1, full=True)  # skimage defaults
    interior = np.zeros_like(region)
    interior[3:-3, 3:-3] = True
    assert lm.breast_ssim(des, predicted, region) == pytest.approx(full_map[region & interior].mean(), abs=1e-9)
    expected_psnr = peak_signal_noise_ratio(des[region], predicted[region], data_range=1)
    assert lm.breast_psnr(des, predicted, region) == pytest.approx(expected_psnr, abs=1e-9)
    # float32 images (as stored) give the float64 result
    assert lm.breast_ssim(des.astype(np.float32), predicted.astype(np.float32), region) == pytest.approx(
        lm.breast_ssim(des.astype(np.float32).astype(np.float64), predicted.astype(np.float32).astype(np.float64),
                       region), abs=1e-12)


def test_identical_breasts_have_ssim_one_and_infinite_psnr() -> None:
    case = _flat_case()
    assert lm.breast_ssim(case["des"], case["des"], case["breast"]) == pytest.approx(1.0)
    assert lm.breast_psnr(case["des"], case["des"], case["breast"]) == math.inf
    assert lm.breast_mse(case["des"], case["des"], case["breast"]) == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lm.breast_mse(np.zeros((8, 8)), np.zeros((8, 9)), np.ones((8, 8))), "differ in shape"),
        (lambda: lm.breast_mse(np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8))), "region: region is empty"),
        (lambda: lm.breast_mse(np.zeros((8, 8)), np.zeros((8, 8)), np.ones((4, 4))), "region: mask has shape"),
        (lambda: lm.breast_mse(np.zeros((8, 8)), np.zeros((8, 8)), np.full((8, 8), 2)), "region: mask must be binary"),
        (lambda: lm.breast_mse(np.full((8, 8), np.nan), np.zeros((8, 8)), np.ones((8, 8))), "real: image holds nan"),
        (lambda: lm.breast_mse(np.zeros(8), np.zeros(8), np.ones(8)), "real: expected a 2-D image"),
        (lambda: lm.breast_psnr(np.zeros((8, 8)), np.ones((8, 8)), np.ones((8, 8)), data_range=0), "positive"),
        (lambda: lm.breast_ssim(np.zeros((5, 5)), np.zeros((5, 5)), np.ones((5, 5))), "at least 7x7"),
        (lambda: lm.breast_ssim(np.zeros((9, 9)), np.zeros((9, 9)), np.pad(np.zeros((7, 7)), 1, constant_values=1)),
         "no pixel lies at least 3 px from the image edge"),
    ],
)
def test_bad_image_inputs_raise_errors_that_say_why(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- lesion enhancement ------------------------------------------------------------------------------

def test_lesion_enhancement_is_lesion_mean_minus_ring_mean() -> None:
    case = _flat_case()
    ring = lm.surround_ring(case["lesion"], case["breast"])
    des = case["des"]
    expected = des[case["lesion"]].mean() - des[ring].mean()
    assert lm.lesion_enhancement(des, case["lesion"], ring) == pytest.approx(expected)
    assert 0.35 < expected < 0.45  # the 0.4 uptake of the case
    assert lm.contrast_ratio(des, case["lesion"], ring) == pytest.approx(des[case["lesion"]].mean() / des[ring].mean())


def test_enhancement_error_is_zero_for_a_perfect_prediction_and_signed() -> None:
    case = _flat_case()
    lesion, des = case["lesion"], case["des"]
    ring = lm.surround_ring(lesion, case["breast"])
    assert lm.enhancement_error(des, des, lesion, ring) == 0.0
    assert lm.contrast_ratio_share(des, des, lesion, ring) == 1.0
    brighter = des + 0.1 * lesion
    assert lm.enhancement_error(des, brighter, lesion, ring) == pytest.approx(0.1)
    assert lm.contrast_ratio_share(des, brighter, lesion, ring) > 1
    assert lm.enhancement_error(des, des - 0.1 * lesion, lesion, ring) == pytest.approx(-0.1)


def test_enhancement_error_ignores_a_constant_offset_of_the_whole_breast() -> None:
    case = _flat_case()
    lesion, breast, des, predicted = case["lesion"], case["breast"], case["des"], case["predicted"]
    ring = lm.surround_ring(lesion, breast)
    shifted = predicted + 0.07 * breast
    assert lm.enhancement_error(des, shifted, lesion, ring) == pytest.approx(
        lm.enhancement_error(des, predicted, lesion, ring), abs=1e-12)


def test_contrast_ratio_is_nan_when_the_surround_is_black() -> None:
    case = _flat_case()
    ring = lm.surround_ring(case["lesion"], case["breast"])
    black = np.where(case["lesion"], 0.5, 0.0)
    assert math.isnan(lm.contrast_ratio(black, case["lesion"], ring))
    assert math.isnan(lm.contrast_ratio_share(case["des"], black, case["lesion"], ring))
    assert math.isnan(lm.contrast_ratio_share(black, case["des"], case["lesion"], ring))


@pytest.mark.parametrize("seed", [3, 11])
def test_le_as_cesm_misses_the_enhancement_of_a_simulated_malignant_mass(seed: int) -> None:
    case = _phantom_case(seed)
    region = lm.breast_region(case["le"])
    lesion = case["lesion"].astype(bool) & region
    ring = lm.surround_ring(lesion, region)
    real_enhancement = lm.lesion_enhancement(case["des"], lesion, ring)
    error = lm.enhancement_error(case["des"], case["le"], lesion, ring)
    assert real_enhancement > 0.2
    # LE shows the dense mass (about half the DES contrast here) but carries no contrast uptake
    assert error < -0.1 and error < -0.25 * real_enhancement
    assert lm.enhancement_error(case["des"], case["des"], lesion, ring) == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lm.lesion_enhancement(np.zeros((8, 8)), np.zeros((8, 8)), np.ones((8, 8))), "mask: lesion mask is empty"),
        (lambda: lm.lesion_enhancement(np.zeros((8, 8)), np.eye(8), np.zeros((8, 8))), "ring: surround ring is empty"),
        (lambda: lm.lesion_enhancement(np.zeros((8, 8)), np.eye(8), np.ones((8, 8))), "overlaps the lesion"),
        (lambda: lm.lesion_enhancement(np.zeros((8, 8)), np.eye(8) * 3, 1 - np.eye(8)), "mask: mask must be binary"),
        (lambda: lm.lesion_enhancement(np.zeros((8, 8)), np.eye(4), 1 - np.eye(8)), r"mask: mask has shape \(4, 4\)"),
        (lambda: lm.contrast_ratio(np.zeros((8, 8)), np.eye(8), np.ones((8, 9))), r"ring: mask has shape"),
        (lambda: lm.enhancement_error(np.zeros((8, 8)), np.zeros((9, 9)), np.eye(8), 1 - np.eye(8)), "differ in shape"),
    ],
)
def test_bad_lesion_inputs_raise_errors_that_say_why(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- a set of images ---------------------------------------------------------------------------------

def _set_of_cases(n: int = 3) -> dict[str, np.ndarray]:
    cases = [_flat_case(seed) for seed in range(n)]
    stack = {k: np.stack([c[k] for c in cases]) for k in ("le", "des", "predicted")}
    stack["masks"] = np.stack([c["lesion"] for c in cases]).astype(np.uint8)
    stack["masks"][-1] = 0  # the last image has no outlined lesion
    return stack


def test_lesion_quality_averages_breast_metrics_over_all_images_and_lesion_metrics_over_lesion_images() -> None:
    s = _set_of_cases()
    quality = lm.lesion_quality(s["des"], s["predicted"], s["le"], s["masks"])
    assert tuple(quality) == lm.LESION_QUALITY_KEYS
    region = lm.breast_region(s["le"])
    assert quality["breast_ssim"] == pytest.approx(np.mean(
        [lm.breast_ssim(r, p, b) for r, p, b in zip(s["des"], s["predicted"], region)]))
    assert quality["breast_mse"] == pytest.approx(np.mean(
        [lm.breast_mse(r, p, b) for r, p, b in zip(s["des"], s["predicted"], region)]))
    assert quality["lesion_images"] == 2
    errors = []
    for i in range(2):
        ring = lm.surround_ring(s["masks"][i], region[i])
        errors.append(lm.enhancement_error(s["des"][i], s["predicted"][i], s["masks"][i], ring))
    assert quality["enhancement_error"] == pytest.approx(np.mean(errors))
    assert quality["abs_enhancement_error"] == pytest.approx(np.mean(np.abs(errors)))
    assert quality["contrast_ratio_real"] > 2 and quality["contrast_ratio_share"] == pytest.approx(1, abs=0.1)


def test_lesion_quality_of_a_perfect_prediction_and_of_the_le_baseline() -> None:
    s = _set_of_cases()
    perfect = lm.lesion_quality(s["des"], s["des"], s["le"], s["masks"])
    assert perfect["enhancement_error"] == 0 and perfect["contrast_ratio_share"] == 1
    assert perfect["breast_ssim"] == pytest.approx(1) and perfect["breast_psnr"] == math.inf
    baseline = lm.lesion_quality(s["des"], s["le"], s["le"], s["masks"])
    assert baseline["enhancement_error"] < -0.3 and baseline["contrast_ratio_share"] < 0.5


def test_lesion_quality_without_lesion_images_gives_nan_lesion_keys() -> None:
    s = _set_of_cases()
    quality = lm.lesion_quality(s["des"], s["predicted"], s["le"], np.zeros_like(s["masks"]))
    assert quality["lesion_images"] == 0
    assert all(math.isnan(quality[k]) for k in lm.LESION_QUALITY_KEYS[3:-1])
    assert not math.isnan(quality["breast_ssim"])


def test_lesion_quality_on_simulated_breasts_separates_the_baseline_from_a_good_prediction() -> None:
    cases = [_phantom_case(seed) for seed in (3, 11)]
    le, des = np.stack([c["le"] for c in cases]), np.stack([c["des"] for c in cases])
    masks = np.stack([c["lesion"] * lm.breast_region(c["le"]) for c in cases]).astype(np.uint8)
    # a near-perfect generator: the real DES with noise, masked like mask_background
    noisy = np.where(le > 0, des + 0.02 * np.random.default_rng(0).standard_normal(des.shape), 0.0)
    good = lm.lesion_quality(des, noisy, le, masks)
    baseline = lm.lesion_quality(des, le, le, masks)
    assert abs(good["enhancement_error"]) < 0.02 < abs(baseline["enhancement_error"])
    assert good["breast_ssim"] > baseline["breast_ssim"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {**s, "masks": s["masks"][:, :-1]}, "must have the same shape"),
        (lambda s: {**s, "le": s["le"][0]}, r"le: expected a stack of images \(N, S, S\)"),
        (lambda s: {**s, "masks": s["masks"] * 2}, "image 0: masks: mask must be binary"),
        (lambda s: {**s, "le": np.concatenate([np.zeros_like(s["le"][:1]), s["le"][1:]])},
         r"image 0: le: breast region \(LE > 0\) is empty"),
        (lambda s: {k: v[:0] for k, v in s.items()}, "no images to score"),
    ],
)
def test_lesion_quality_bad_inputs_raise_errors_that_name_the_image(change, message: str) -> None:
    s = change(_set_of_cases())
    with pytest.raises(ValueError, match=message):
        lm.lesion_quality(s["des"], s["predicted"], s["le"], s["masks"])
