"""Lesion-aware quality of imputed CESM: image metrics inside the breast, enhancement of the lesion.

Why. Table 3 (metrics.mse/psnr/ssim over the whole image) is dominated by the air and padding
around the breast, which are exactly 0 in the processed LE image and in the generator's output
(cyclegan ``mask_background``), so even "LE as CESM" scores a high SSIM there. And a whole-image
score says nothing about whether the *lesion* enhances as it does in the real DES image, which is
what the imputation is for. This module scores

* the breast only: :func:`breast_mse`, :func:`breast_psnr` (eq. 10-11 over the breast's pixels),
  :func:`breast_ssim` (the SSIM map of metrics.ssim averaged over the breast);
* the lesion against its surround: :func:`lesion_enhancement` (mean in the lesion minus mean in a
  ring around it), :func:`enhancement_error`, :func:`contrast_ratio`, :func:`contrast_ratio_share`;
* a set of images at once: :func:`lesion_quality` (the numbers a report shows).

Pure numpy/scipy/skimage functions (layer 4 but no I/O): images are 2-D float arrays (processed
images are float32 in [0, 1]), masks are 2-D binary arrays (bool, or 0/1 of any dtype) of the same
shape. Undefined values are nan, and each function says when.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import distance_transform_edt
from skimage.metrics import structural_similarity

from virtual_biopsy.evaluation import metrics

MIN_RING_WIDTH_PX = 2.0

LESION_QUALITY_KEYS = (
    "breast_mse", "breast_psnr", "breast_ssim", "enhancement_error", "abs_enhancement_error",
    "contrast_ratio_real", "contrast_ratio_predicted", "contrast_ratio_share", "lesion_images",
)


# --- validation ----------------------------------------------------------------------------------

def _image(image: object, name: str) -> np.ndarray:
    """A finite 2-D image as float64."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D image, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: image holds nan or inf")
    return arr


def binary_mask(mask: object, name: str = "mask", shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A 2-D binary mask (bool, or only the values 0 and 1) as bool, optionally of ``shape``.

    ValueError naming ``name`` for another rank or shape, or any value other than 0 and 1 (a
    soft or label-valued mask would silently change which pixels count).
    """
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D mask, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name}: mask has shape {arr.shape}, expected {shape} (the image's)")
    if arr.dtype == bool:
        return arr
    binary = (arr == 0) | (arr == 1)
    if not binary.all():
        bad = np.unique(arr[~binary])[:5]
        raise ValueError(f"{name}: mask must be binary (0 outside, 1 inside), found values {bad.tolist()}")
    return arr == 1


def _non_empty(mask: np.ndarray, name: str, what: str) -> np.ndarray:
    if not mask.any():
        raise ValueError(f"{name}: {what} is empty (no pixel set)")
    return mask


def _pair(real: object, predicted: object) -> tuple[np.ndarray, np.ndarray]:
    a, b = _image(real, "real"), _image(predicted, "predicted")
    if a.shape != b.shape:
        raise ValueError(f"real and predicted differ in shape: {a.shape} vs {b.shape}")
    return a, b


# --- regions -------------------------------------------------------------------------------------

def breast_region(le: object) -> np.ndarray:
    """The breast of a processed LE image: the pixels where LE > 0 (bool, same shape as ``le``).

    This is the generator's own rule (cyclegan ``mask_background`` zeroes its output where its LE
    input is exactly 0): the LE display window starts above the air level, so after contrast
    stretching air and padding are exactly 0 and breast tissue is above 0. The DES image cannot
    give the region: its narrow window lets air noise through (simulated DES before resizing:
    up to 7 % of the air pixels are above 0, and up to 2.5 % of the breast pixels are 0), so the
    region of a DES image is taken from its LE partner. Works on one image or an (N, S, S) stack.
    """
    arr = np.asarray(le, dtype=np.float64)
    if arr.ndim not in (2, 3):
        raise ValueError(f"le: expected an image (S, S) or a stack (N, S, S), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("le: image holds nan or inf")
    return arr > 0


def default_ring_width(mask: object) -> float:
    """Default surround width in pixels: the lesion's equivalent radius, at least 2 px.

        width = max(2, sqrt(A / pi)),   A = number of lesion pixels.

    Why: the surround should scale with the lesion. A ring as wide as the equivalent radius of
    a disc of radius r covers pi ((2r)^2 - r^2) = 3 A pixels, so its mean is less noisy than the
    lesion's, yet it stays local tissue (about one lesion diameter across) instead of reaching
    over the breast for small lesions. The 2 px floor keeps a ring of tiny lesions (a few pixels
    in small test images) from being one pixel thin, i.e. all blurred lesion margin.
    """
    m = _non_empty(binary_mask(mask, "mask"), "mask", "lesion mask")
    return max(MIN_RING_WIDTH_PX, math.sqrt(float(m.sum()) / math.pi))


def surround_ring(mask: object, breast: object, width_px: float | None = None) -> np.ndarray:
    """The lesion's surround: pixels outside the lesion, inside the breast, within ``width_px`` of it.

        ring = {x : x not in lesion, x in breast, 0 < d(x, lesion) <= width_px}

    with d the Euclidean distance in pixels to the nearest lesion pixel (distance_transform_edt
    of the lesion's complement). ``width_px`` defaults to :func:`default_ring_width`. Restricting
    to the breast keeps air (0 in LE and in the generator's output) out of the surround mean of a
    lesion near the skin line. Raises ValueError for an empty lesion mask or an empty ring (a
    lesion covering the whole breast, or a breast mask that misses it).
    """
    lesion = _non_empty(binary_mask(mask, "mask"), "mask", "lesion mask")
    inside = binary_mask(breast, "breast", lesion.shape)
    width = default_ring_width(lesion) if width_px is None else float(width_px)
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"width_px: must be a positive number of pixels, got {width_px}")
    distance = distance_transform_edt(~lesion)
    ring = (~lesion) & inside & (distance <= width)
    if not ring.any():
        raise ValueError(f"surround ring is empty: no breast pixel outside the lesion within {width:g} px of it")
    return ring


# --- image quality inside the breast -------------------------------------------------------------

def breast_mse(real: object, predicted: object, region: object) -> float:
    """MSE over the breast only (paper eq. 10 restricted to ``region``):

        MSE_B = 1/|B| * sum_{ij in B} (y_ij - y_hat_ij)^2.
    """
    a, b = _pair(real, predicted)
    inside = _non_empty(binary_mask(region, "region", a.shape), "region", "region")
    return float(np.mean((a[inside] - b[inside]) ** 2))


def breast_psnr(real: object, predicted: object, region: object, data_range: float = 1.0) -> float:
    """PSNR over the breast only (paper eq. 11 with the MSE of :func:`breast_mse`):

        PSNR_B = 10 log10(R^2 / MSE_B),   R = ``data_range`` (1 for [0, 1] images, as metrics.psnr).

    Identical breasts give inf.
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    error = breast_mse(real, predicted, region)
    if error == 0:
        return math.inf
    return float(10.0 * np.log10(data_range**2 / error))


def ssim_map(real: object, predicted: object, data_range: float = 1.0) -> np.ndarray:
    """The local SSIM index at every pixel, with metrics.ssim's definition (paper eq. 12).

    skimage.metrics.structural_similarity(full=True) with win_size=7, gaussian_weights=False
    (uniform box window), use_sample_covariance=True, K1=0.01, K2=0.03, data_range=R, on float64
    copies (skimage would compute float32 inputs in float32): exactly the constants and
    conventions metrics.ssim uses, so the map's mean over the interior is metrics.ssim.
    """
    a, b = _pair(real, predicted)
    if min(a.shape) < metrics.SSIM_WINDOW:
        w = metrics.SSIM_WINDOW
        raise ValueError(f"SSIM needs images of at least {w}x{w} pixels, got {a.shape}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    _, full = structural_similarity(
        a, b, win_size=metrics.SSIM_WINDOW, gaussian_weights=False, use_sample_covariance=True,
        K1=metrics.SSIM_K1, K2=metrics.SSIM_K2, data_range=data_range, full=True,
    )
    return full


def breast_ssim(real: object, predicted: object, region: object, data_range: float = 1.0) -> float:
    """SSIM over the breast only: the mean of :func:`ssim_map` over the pixels of ``region``.

        SSIM_B = 1/|B'| * sum_{x in B'} SSIM(x),   B' = region minus a 3-px strip at the image edge.

    The strip is left out as metrics.ssim leaves it out (windows there reach past the image into
    reflected pixels), so with ``region`` = every pixel this is metrics.ssim exactly. The index
    at a breast pixel within 3 px of the skin line still sees the background pixels of its 7x7
    window: background farther than that from the breast does not count.
    """
    index = ssim_map(real, predicted, data_range)
    inside = _non_empty(binary_mask(region, "region", index.shape), "region", "region")
    pad = (metrics.SSIM_WINDOW - 1) // 2
    interior = np.zeros_like(inside)
    interior[pad:-pad, pad:-pad] = True
    counted = inside & interior
    if not counted.any():
        raise ValueError(f"region: no pixel lies at least {pad} px from the image edge, where SSIM is defined")
    return float(index[counted].mean(dtype=np.float64))


# --- lesion enhancement --------------------------------------------------------------------------

def _lesion_and_ring(image: object, mask: object, ring: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = _image(image, "image")
    lesion = _non_empty(binary_mask(mask, "mask", img.shape), "mask", "lesion mask")
    surround = _non_empty(binary_mask(ring, "ring", img.shape), "ring", "surround ring")
    if (lesion & surround).any():
        raise ValueError("ring: the surround ring overlaps the lesion mask (make it with surround_ring)")
    return img, lesion, surround


def lesion_enhancement(image: object, mask: object, ring: object) -> float:
    """Lesion-to-surround contrast of one image:

        E = mean(image over lesion) - mean(image over ring).

    In DES this is the lesion's enhancement over the tissue around it (what a radiologist reads);
    in LE its excess density. A difference, so a constant offset of the image cancels.
    """
    img, lesion, surround = _lesion_and_ring(image, mask, ring)
    return float(img[lesion].mean() - img[surround].mean())


def enhancement_error(real: object, predicted: object, mask: object, ring: object) -> float:
    """Signed error of the imputed enhancement:

        dE = E(predicted) - E(real),   E = :func:`lesion_enhancement` with the same lesion and ring.

    Positive: the synthetic lesion enhances more than the real one; negative: it is washed out
    (the "LE as CESM" baseline, which carries no contrast uptake, is clearly negative on an
    enhancing lesion). Reports give its absolute value too.
    """
    a, b = _pair(real, predicted)
    return lesion_enhancement(b, mask, ring) - lesion_enhancement(a, mask, ring)


def contrast_ratio(image: object, mask: object, ring: object) -> float:
    """Lesion-to-surround intensity ratio of one image:

        CR = mean(image over lesion) / mean(image over ring).

    Returns nan when the ring mean is <= 0: processed images are >= 0, so a zero ring mean means
    the whole surround is black (clipped by the display window, or a generator that output
    nothing there) and no ratio is meaningful. nan, not an error, so one such image marks the
    summary of a set as undefined instead of stopping it (metrics' rule: never a silent 0).
    """
    img, lesion, surround = _lesion_and_ring(image, mask, ring)
    surround_mean = float(img[surround].mean())
    if surround_mean <= 0:
        return math.nan
    return float(img[lesion].mean()) / surround_mean


def contrast_ratio_share(real: object, predicted: object, mask: object, ring: object) -> float:
    """How much of the real lesion contrast the synthetic image reproduces:

        share = CR(predicted) / CR(real),   CR = :func:`contrast_ratio`.

    1 when the synthetic lesion stands out from its surround as much as the real one. nan when
    either ratio is undefined or the real ratio is 0 (a black lesion in the real image).
    """
    a, b = _pair(real, predicted)
    cr_real, cr_pred = contrast_ratio(a, mask, ring), contrast_ratio(b, mask, ring)
    if math.isnan(cr_real) or math.isnan(cr_pred) or cr_real == 0:
        return math.nan
    return cr_pred / cr_real


# --- a set of images -----------------------------------------------------------------------------

def _stack(arr: object, name: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 3:
        raise ValueError(f"{name}: expected a stack of images (N, S, S), got shape {a.shape}")
    return a


def lesion_quality(real: object, predicted: object, le: object, masks: object) -> dict[str, float]:
    """Breast and lesion quality of ``predicted`` against ``real`` over a set of images.

    All four are (N, S, S) and row-aligned: ``real`` the real DES images, ``predicted`` the images
    to score (G(LE), or LE itself for the "LE as CESM" baseline), ``le`` the LE partners whose
    :func:`breast_region` is each image's breast, ``masks`` the lesion masks (all 0: no lesion).

    * ``breast_mse``, ``breast_psnr``, ``breast_ssim``: means over every image of
      :func:`breast_mse`, :func:`breast_psnr`, :func:`breast_ssim` (a mean PSNR of inf means some
      breast was reproduced exactly, as metrics.psnr);
    * over the images with a non-empty mask (ring from :func:`surround_ring`, default width):
      ``enhancement_error`` and ``abs_enhancement_error`` (means of dE and |dE|,
      :func:`enhancement_error`), ``contrast_ratio_real`` and ``contrast_ratio_predicted`` (means
      of :func:`contrast_ratio`), ``contrast_ratio_share`` (mean of :func:`contrast_ratio_share`);
      an image whose ratio is undefined makes that mean nan;
    * ``lesion_images``: how many images had a lesion.

    Images without a lesion count for the breast metrics only. With no lesion image at all the
    lesion keys are nan (nothing to measure is not an error: a generator test fold may hold
    lesion-free pairs only).
    """
    real_s, pred_s, le_s = _stack(real, "real"), _stack(predicted, "predicted"), _stack(le, "le")
    mask_s = _stack(masks, "masks")
    shapes = {"real": real_s.shape, "predicted": pred_s.shape, "le": le_s.shape, "masks": mask_s.shape}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"real, predicted, le and masks must have the same shape (N, S, S), got {shapes}")
    if real_s.shape[0] == 0:
        raise ValueError("real: no images to score (N = 0)")
    breast_scores: dict[str, list[float]] = {"breast_mse": [], "breast_psnr": [], "breast_ssim": []}
    lesion_scores: dict[str, list[float]] = {k: [] for k in (
        "enhancement_error", "contrast_ratio_real", "contrast_ratio_predicted", "contrast_ratio_share")}
    for i in range(real_s.shape[0]):
        r, p = real_s[i], pred_s[i]
        try:
            region = _non_empty(breast_region(le_s[i]), "le", "breast region (LE > 0)")
            breast_scores["breast_mse"].append(breast_mse(r, p, region))
            breast_scores["breast_psnr"].append(breast_psnr(r, p, region))
            breast_scores["breast_ssim"].append(breast_ssim(r, p, region))
            lesion = binary_mask(mask_s[i], "masks", r.shape)
            if not lesion.any():
                continue
            ring = surround_ring(lesion, region)
            lesion_scores["enhancement_error"].append(enhancement_error(r, p, lesion, ring))
            lesion_scores["contrast_ratio_real"].append(contrast_ratio(r, lesion, ring))
            lesion_scores["contrast_ratio_predicted"].append(contrast_ratio(p, lesion, ring))
            lesion_scores["contrast_ratio_share"].append(contrast_ratio_share(r, p, lesion, ring))
        except ValueError as error:
            raise ValueError(f"image {i}: {error}") from error
    out = {k: float(np.mean(v)) for k, v in breast_scores.items()}
    n_lesions = len(lesion_scores["enhancement_error"])

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else math.nan

    errors = lesion_scores["enhancement_error"]
    out.update({
        "enhancement_error": mean(errors),
        "abs_enhancement_error": mean([abs(e) for e in errors]),
        "contrast_ratio_real": mean(lesion_scores["contrast_ratio_real"]),
        "contrast_ratio_predicted": mean(lesion_scores["contrast_ratio_predicted"]),
        "contrast_ratio_share": mean(lesion_scores["contrast_ratio_share"]),
        "lesion_images": n_lesions,
    })
    return {k: out[k] for k in LESION_QUALITY_KEYS}
