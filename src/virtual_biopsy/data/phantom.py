"""Anatomy and physics of the simulated breast: one compressed breast -> its LE and DES images.

The simulation works in a canonical frame, chest wall on the left edge (column 0) and nipple to
the right, with lengths in units of the image height; :func:`to_display_orientation` flips right
breasts so that their chest wall lies on the right, as a mammography system displays them.

Anatomy of one view (:func:`render_anatomy`), shared by the LE and the DES image of that view:

* breast outline against the chest wall (a super-ellipse; on MLO it reaches up into the axilla),
  compressed-thickness fall-off towards the skin, and a thin skin line;
* on MLO, the pectoral muscle triangle in the upper chest-wall corner;
* fibroglandular tissue: a smooth random field (Gaussian-filtered noise at two scales, elongated
  along the nipple axis like ducts) concentrated behind the nipple, soft-thresholded so that the
  dense share of the breast follows its ACR category;
* an optional mass: benign round or oval and circumscribed (sharp smooth edge), malignant
  irregular with a blurred margin and, for most, spicules.

Physics (every knob is a :class:`~virtual_biopsy.core.config.SynthConfig` field):

* LE ("low energy", FFDM-like): attenuation of fat, glandular tissue and muscle. A mass is at
  least as dense as glandular tissue plus ``le_lesion_contrast * (1 + le_uptake_coupling *
  uptake)`` (faint), so it stands out over fat but nearly vanishes inside dense tissue -- the
  reason FFDM misses lesions in dense breasts; the more a mass takes up contrast, the denser it is.
* DES (dual-energy subtracted): the recombination removes ``des_glandular_suppression`` of the
  glandular (and muscle) contrast; what remains is iodine. Background parenchymal enhancement
  (BPE) follows the glandular map (``bpe_strength`` times a per-breast level, minimal to marked);
  lesions take up contrast: malignant strongly (``malignant_enhancement``, rim-weighted and
  heterogeneous), benign weakly and homogeneously (``benign_enhancement``), each lesion's uptake
  scaled by ``1 + enhancement_spread * z``. Late-phase images show malignant wash-out and benign
  persistence, and more BPE.
* Quantum noise (``noise_sd``; DES twice as noisy, as subtraction amplifies noise) is drawn
  independently per image, so a DES image is a deterministic function of LE-visible anatomy and
  the enhancement only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage
from scipy.special import expit

from virtual_biopsy.core.config import SynthConfig

# Dense (fibroglandular) share of the breast area per ACR category (BI-RADS 5th ed.: a < 25 %,
# b 25-50 %, c 50-75 %, d > 75 % -- centred inside each band).
DENSE_SHARE = {"a": 0.10, "b": 0.32, "c": 0.58, "d": 0.82}
DENSE_SHARE_JITTER = 0.06

# BPE levels (minimal, mild, moderate, marked) and how often each occurs.
BPE_LEVELS = (0.25, 0.5, 0.75, 1.0)
BPE_LEVEL_PROBABILITIES = (0.40, 0.30, 0.20, 0.10)

# LE attenuation model (fractions of full scale).
FAT_LEVEL = 0.30
GLANDULAR_CONTRAST = 0.38   # glandular over fat
MUSCLE_CONTRAST = 0.30      # pectoral muscle over fat
SKIN_CONTRAST = 0.10
MASS_GLANDULAR_EQUIVALENT = 0.6  # a mass attenuates like glandular tissue at least this much

# DES model.
DES_BREAST_LEVEL = 0.30     # recombined signal of unenhanced tissue
DES_AIR_LEVEL = 0.12
DES_EDGE_HALO = 0.08        # brighter rim where thickness falls (uncorrected scatter)
DES_NOISE_FACTOR = 2.0      # subtraction amplifies quantum noise
LATE_MALIGNANT_UPTAKE = 0.80  # wash-out
LATE_BENIGN_UPTAKE = 1.15     # persistent / progressive
LATE_BPE_FACTOR = 1.30

# Gaussian filtering (gaussian_blur): ndimage's truncation, and the kernel radius (pixels) from
# which an FFT convolution beats the direct one. The widest kernel of the default 320-row dataset
# has radius 64 (coarse glandular texture), so that dataset is filtered directly, bit for bit as
# before; at 2850 rows radii reach 570 and the FFT is 3-4x faster.
GAUSSIAN_TRUNCATE = 4.0
FFT_MIN_RADIUS = 80

# Mass geometry (units of image height).
MASS_RADIUS_RANGE = (0.035, 0.085)
SPICULATED_SHARE = 0.7      # share of malignant masses with spicules


@dataclass(frozen=True)
class Mass:
    """One biopsied mass of a breast; geometry shared by both views, position per view."""

    label: str                       # malignant | benign
    radius: float                    # image heights
    elongation: float                # >= 1: oval
    angle: float                     # radians
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) of boundary harmonics k = 2..
    spicules: tuple[tuple[float, float], ...]   # (angle, length in radii)
    depth: float                     # along chest wall -> nipple, share of breast depth
    offsets: tuple[float, float]     # CC, MLO position across the breast, share of half-height
    uptake: float                    # early-phase DES enhancement (already includes spread)


@dataclass(frozen=True)
class Breast:
    """Everything drawn once per breast: density, BPE level, mass, and a seed for its anatomy."""

    dense_share: float
    bpe_level: float
    mass: Mass | None
    anatomy_seed: int


@dataclass(frozen=True)
class Anatomy:
    """Maps of one view in the canonical frame (chest wall left), all float32 in [0, 1]."""

    breast: np.ndarray      # inside the skin
    thickness: np.ndarray   # compressed thickness, 1 away from the skin line
    skin: np.ndarray
    glandular: np.ndarray
    muscle: np.ndarray
    mass: np.ndarray        # mass body as LE sees it (projected thickness: dome-shaped)
    footprint: np.ndarray   # where the mass is (flat top): the volume that takes up contrast
    spicules: np.ndarray
    rim: np.ndarray         # mass rim weight (malignant rim enhancement)


def draw_mass(label: str, config: SynthConfig, rng: np.random.Generator) -> Mass:
    """Draw the shape, position and contrast uptake of a malignant or benign mass."""
    malignant = label == "malignant"
    radius = float(rng.uniform(*MASS_RADIUS_RANGE))
    if malignant:
        harmonics = tuple((float(rng.uniform(0.02, 0.09)), float(rng.uniform(0, 2 * np.pi))) for _ in range(7))
        n_spicules = int(rng.integers(6, 13)) if rng.random() < SPICULATED_SHARE else 0
        spicules = tuple((float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(1.6, 2.8))) for _ in range(n_spicules))
        elongation = float(rng.uniform(1.0, 1.3))
    else:
        harmonics = tuple((float(rng.uniform(0.0, 0.02)), float(rng.uniform(0, 2 * np.pi))) for _ in range(2))
        spicules = ()
        elongation = float(rng.uniform(1.0, 1.7))
    mean = config.malignant_enhancement if malignant else config.benign_enhancement
    uptake = max(0.0, mean * (1.0 + config.enhancement_spread * float(rng.standard_normal())))
    return Mass(
        label=label,
        radius=radius,
        elongation=elongation,
        angle=float(rng.uniform(0, np.pi)),
        harmonics=harmonics,
        spicules=spicules,
        depth=float(rng.uniform(0.3, 0.75)),
        offsets=(float(rng.uniform(-0.45, 0.45)), float(rng.uniform(-0.45, 0.45))),
        uptake=uptake,
    )


def draw_breast(acr: str, label: str, config: SynthConfig, rng: np.random.Generator) -> Breast:
    """Draw one breast of true density ``acr`` (a-d) and biopsy ``label`` (malignant/benign/none)."""
    if acr not in DENSE_SHARE:
        raise ValueError(f"ACR category must be one of {sorted(DENSE_SHARE)}, got {acr!r}")
    dense_share = float(np.clip(DENSE_SHARE[acr] + rng.uniform(-1, 1) * DENSE_SHARE_JITTER, 0.03, 0.95))
    bpe_level = float(rng.choice(BPE_LEVELS, p=BPE_LEVEL_PROBABILITIES))
    mass = draw_mass(label, config, rng) if label in ("malignant", "benign") else None
    return Breast(dense_share, bpe_level, mass, int(rng.integers(0, 2**31 - 1)))


def _outline(view: str, rows: int, cols: int, rng: np.random.Generator):
    """Breast mask, the breast's edge depth per row and its vertical centre/half-height."""
    y = (np.arange(rows, dtype=np.float32) + 0.5) / rows
    depth = rng.uniform(0.62, 0.80) * cols / rows
    power = rng.uniform(1.8, 2.5)
    if view == "CC":
        centre, upper, lower = rng.uniform(0.46, 0.54), rng.uniform(0.36, 0.44), None
        lower = upper
    else:  # MLO: the breast hangs lower and runs up into the axilla along the chest wall
        centre = rng.uniform(0.55, 0.62)
        upper, lower = centre * rng.uniform(1.05, 1.15), rng.uniform(0.33, 0.38)
    half = np.where(y < centre, upper, lower)
    u = np.clip(np.abs(y - centre) / half, 0, 1)
    wobble = 1 + 0.03 * _smooth_1d(rows, rows * 0.08, rng)
    edge = depth * (1 - u**power) ** (1 / power) * wobble  # image heights from the chest wall
    x = (np.arange(cols, dtype=np.float32) + 0.5) / rows
    mask = x[None, :] < edge[:, None]
    return mask, edge, float(centre), half


def _smooth_1d(n: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter1d(rng.standard_normal(n), sigma, mode="reflect")
    return (field / (field.std() + 1e-9)).astype(np.float32)


def _gaussian_kernel(sigma: float, radius: int) -> np.ndarray:
    """scipy.ndimage's Gaussian weights (float64, ``2 * radius + 1`` taps, sum 1)."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 / (sigma * sigma) * x * x)
    return weights / weights.sum()


def gaussian_blur(image: np.ndarray, sigma: float | tuple[float, ...]) -> np.ndarray:
    """``ndimage.gaussian_filter(image, sigma, mode="reflect")`` (truncated at 4 sigma), fast for
    wide kernels.

    Axis by axis, as ndimage does. A direct correlation costs ``2 * radius + 1`` multiply-adds per
    pixel, so at the paper's 2850 rows (radius up to 570 px) it was most of the time synthesis
    took; from :data:`FFT_MIN_RADIUS` on, an axis is filtered by FFT convolution with the same
    weights on the same reflected extension (numpy's ``symmetric`` pad is ndimage's ``reflect``),
    which agrees with the direct filter to float32 rounding (about 1e-7 relative) and is clipped
    to the input's range as the direct filter's convex weights keep it. Kernels below
    that radius, which include every kernel of the default 320-row dataset, take ndimage's
    direct filter: same bytes as before.
    """
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (image.ndim,))
    out = image
    for axis, axis_sigma in enumerate(sigmas):
        if axis_sigma <= 0:
            continue
        radius = int(GAUSSIAN_TRUNCATE * float(axis_sigma) + 0.5)  # ndimage's radius
        if radius < FFT_MIN_RADIUS:
            out = ndimage.gaussian_filter1d(out, float(axis_sigma), axis=axis, mode="reflect",
                                            truncate=GAUSSIAN_TRUNCATE)
            continue
        filtered = _fft_correlate(out, _gaussian_kernel(float(axis_sigma), radius), axis)
        # Convex weights keep the direct filter inside the input's range; FFT rounding does not
        # (a non-negative map would get values of -1e-12, and NaN from a power of them).
        out = np.clip(filtered, out.min(), out.max()).astype(image.dtype, copy=False)
    return out if out is not image else image.copy()


def _fft_correlate(image: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """``image`` filtered along ``axis`` by the symmetric ``kernel`` (``2 * radius + 1`` taps) on a
    reflected extension (ndimage's ``reflect``, numpy's ``symmetric``), by FFT in float64: the
    ``valid`` part of the linear convolution of the padded image, as long as ``image``.

    scipy.fft rather than scipy.signal.fftconvolve: importing scipy.signal adds 45 MiB to every
    process that imports the phantom, and the worker processes forked from it.
    """
    radius = (kernel.size - 1) // 2
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(image.astype(np.float64), pad, mode="symmetric")
    length = padded.shape[axis] + kernel.size - 1
    n = fft.next_fast_len(length, real=True)
    shape = [1] * image.ndim
    shape[axis] = -1
    spectrum = fft.rfft(padded, n, axis=axis) * fft.rfft(kernel, n).reshape(shape)
    full = fft.irfft(spectrum, n, axis=axis)
    return np.take(full, np.arange(kernel.size - 1, kernel.size - 1 + image.shape[axis]), axis=axis)


def _smooth_field(shape: tuple[int, int], sigma: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian-filtered white noise (anisotropic ``sigma`` in pixels)."""
    field = gaussian_blur(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-9)


def _glandular(mask: np.ndarray, edge: np.ndarray, centre: float, half: np.ndarray, thickness: np.ndarray,
               dense_share: float, rng: np.random.Generator) -> np.ndarray:
    """Fibroglandular map: ducts-like texture behind the nipple, dense share ~ ``dense_share``."""
    rows, cols = mask.shape
    y = ((np.arange(rows, dtype=np.float32) + 0.5) / rows)[:, None]
    x = ((np.arange(cols, dtype=np.float32) + 0.5) / rows)[None, :]
    rho = x / np.maximum(edge[:, None], 1e-3)             # 0 chest wall .. 1 skin
    across = (y - centre) / half[:, None]
    prior = np.exp(-(((rho - 0.45) / 0.4) ** 2)) * np.exp(-((across / 0.8) ** 2))
    coarse = _smooth_field((rows, cols), (0.02 * rows, 0.05 * rows), rng)
    fine = _smooth_field((rows, cols), (0.006 * rows, 0.015 * rows), rng)
    score = 0.8 * coarse + 0.35 * fine + 2.0 * prior
    inside = mask & (thickness > 0.3)
    threshold = np.quantile(score[inside], 1 - dense_share) if inside.any() else 0.0
    # a soft threshold keeps graded, wispy borders instead of plateaus; thin strands along the
    # nipple axis (ducts, Cooper's ligaments) modulate the tissue from inside
    glandular = expit((score - threshold) / 0.35)
    strands = _smooth_field((rows, cols), (0.004 * rows, 0.02 * rows), rng)
    glandular = np.clip(glandular * (0.88 + 0.12 * strands) + 0.02 * strands, 0, 1)
    return (glandular * thickness * mask).astype(np.float32)


def _pectoral(view: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if view != "MLO":
        return np.zeros((rows, cols), np.float32)
    y = ((np.arange(rows, dtype=np.float32) + 0.5) / rows)[:, None]
    x = ((np.arange(cols, dtype=np.float32) + 0.5) / rows)[None, :]
    width, height = rng.uniform(0.18, 0.30), rng.uniform(0.45, 0.70)
    # slightly convex anterior border, soft by a pixel or two
    reach = x / width + (y / height) ** 1.3
    return expit((1 - reach) * rows * 0.04).astype(np.float32)


def _mass_maps(mass: Mass, view: str, edge: np.ndarray, centre: float, half: np.ndarray,
               shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mass body (dome-shaped), footprint (flat), spicules and rim weight of ``mass`` in this view."""
    rows, cols = shape
    offset = mass.offsets[0 if view == "CC" else 1]
    cy = float(np.clip(centre + offset * 0.8 * (half.min()), 0.1, 0.9))
    row = int(np.clip(cy * rows, 0, rows - 1))
    cx = mass.depth * float(edge[row])
    y = ((np.arange(rows, dtype=np.float32) + 0.5) / rows)[:, None] - cy
    x = ((np.arange(cols, dtype=np.float32) + 0.5) / rows)[None, :] - cx
    c, s = np.cos(mass.angle), np.sin(mass.angle)
    along, across = x * c + y * s, (-x * s + y * c) * mass.elongation
    dist = np.hypot(along, across)
    theta = np.arctan2(across, along)
    boundary = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(mass.harmonics, start=2):
        boundary += amplitude * np.cos(k * theta + phase)
    boundary *= mass.radius
    pixel = 1.0 / rows
    # margin width relative to the mass: blurred (malignant) vs circumscribed (benign)
    margin = max(0.5 * pixel, (0.10 if mass.label == "malignant" else 0.03) * mass.radius)
    footprint = expit((boundary - dist) / margin)
    dome = np.sqrt(np.clip(1 - (dist / np.maximum(boundary, 1e-6)) ** 2, 0, 1))
    body = footprint * (0.6 + 0.4 * dome)
    rim = np.clip(dist / np.maximum(boundary, 1e-6), 0, 1) ** 2
    spicules = np.zeros(shape, np.float32)
    width = max(0.6 * pixel, 0.004)
    for angle, length in mass.spicules:
        ux, uy = np.cos(angle), np.sin(angle)
        t = x * ux + y * uy                                   # along the spicule
        d = np.abs(-x * uy + y * ux)                          # across it
        reach = length * mass.radius
        taper = np.clip(1 - t / reach, 0, 1) * (t > 0.5 * mass.radius)
        spicules = np.maximum(spicules, taper * np.exp(-0.5 * (d / width) ** 2))
    return body.astype(np.float32), footprint.astype(np.float32), spicules.astype(np.float32), rim.astype(np.float32)


def render_anatomy(breast: Breast, view: str, rows: int, cols: int) -> Anatomy:
    """Anatomy maps of ``breast`` in ``view`` (CC/MLO), canonical frame, ``rows`` x ``cols``."""
    rng = np.random.default_rng([breast.anatomy_seed, 0 if view == "CC" else 1])
    mask, edge, centre, half = _outline(view, rows, cols, rng)
    inside_px = ndimage.distance_transform_edt(mask).astype(np.float32)
    falloff = 0.07 * rows
    thickness = np.sqrt(1 - (1 - np.clip(inside_px / falloff, 0, 1)) ** 2) * mask
    skin_px = max(1.0, 0.006 * rows)
    skin = (mask & (inside_px <= skin_px)).astype(np.float32)
    glandular = _glandular(mask, edge, centre, half, thickness, breast.dense_share, rng)
    muscle = _pectoral(view, rows, cols, rng) * mask
    if breast.mass is None:
        zero = np.zeros((rows, cols), np.float32)
        body, footprint, spicules, rim = zero, zero, zero, zero
    else:
        body, footprint, spicules, rim = _mass_maps(breast.mass, view, edge, centre, half, (rows, cols))
        body, footprint, spicules = body * mask, footprint * mask, spicules * mask * (1 - muscle)
    return Anatomy(mask.astype(np.float32), thickness.astype(np.float32), skin, glandular,
                   muscle.astype(np.float32), body, footprint, spicules, rim)


def lesion_le_contrast(breast: Breast, config: SynthConfig) -> float:
    """Excess LE attenuation of the breast's mass over glandular tissue (0 without a mass).

    Grows with the lesion's contrast uptake (``le_uptake_coupling``): cellular, vascular masses
    are also the denser ones on the mammogram ("high density" is a suspicious BI-RADS feature).
    This is what makes DES enhancement partly predictable from LE, faintly.
    """
    if breast.mass is None:
        return 0.0
    return config.le_lesion_contrast * (1.0 + config.le_uptake_coupling * breast.mass.uptake)


def low_energy_image(anatomy: Anatomy, breast: Breast, config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """LE intensity (0 = air, ~1 = densest tissue) with its own quantum noise."""
    a = anatomy
    dense = np.maximum(a.glandular, MASS_GLANDULAR_EQUIVALENT * a.mass)
    tissue = a.thickness * (FAT_LEVEL + GLANDULAR_CONTRAST * dense + MUSCLE_CONTRAST * a.muscle)
    lesion = lesion_le_contrast(breast, config) * (a.mass + 0.6 * a.spicules)
    signal = tissue + lesion + SKIN_CONTRAST * a.skin
    noise = config.noise_sd * rng.standard_normal(signal.shape, dtype=np.float32)
    return (signal + noise).astype(np.float32)


def lesion_uptake(breast: Breast, late: bool) -> float:
    """DES enhancement of the breast's mass in this phase (0 without a mass)."""
    if breast.mass is None:
        return 0.0
    factor = (LATE_MALIGNANT_UPTAKE if breast.mass.label == "malignant" else LATE_BENIGN_UPTAKE) if late else 1.0
    return breast.mass.uptake * factor


def recombined_image(anatomy: Anatomy, breast: Breast, config: SynthConfig, late: bool,
                     rng: np.random.Generator) -> np.ndarray:
    """DES intensity: suppressed anatomy + BPE + lesion uptake, with its own quantum noise.

    Deterministic in the LE-visible anatomy and the enhancement parameters; only the noise is
    drawn here.
    """
    a = anatomy
    residual = (1 - config.des_glandular_suppression) * (GLANDULAR_CONTRAST * a.glandular + MUSCLE_CONTRAST * a.muscle)
    bpe_scale = config.bpe_strength * breast.bpe_level * (LATE_BPE_FACTOR if late else 1.0)
    # contrast reaches glandular tissue through its vessels: a blurred copy of the glandular
    # map, raised to a power so the densest parts enhance most (patchy, not a tissue outline)
    spread_px = max(1.0, 0.008 * a.glandular.shape[0])
    bpe = bpe_scale * gaussian_blur(a.glandular * (1 - a.muscle), spread_px) ** 1.5
    uptake = lesion_uptake(breast, late)
    if breast.mass is not None and breast.mass.label == "malignant":
        # rim enhancement (periphery brighter than the core), mean factor 1 over the mass
        mass_signal = a.footprint * (0.8 + 0.4 * a.rim)
    else:
        mass_signal = a.footprint
    halo = DES_EDGE_HALO * (1 - a.thickness) * a.breast
    level = DES_AIR_LEVEL + (DES_BREAST_LEVEL - DES_AIR_LEVEL) * a.breast
    signal = level + halo + residual + bpe + uptake * mass_signal
    noise = DES_NOISE_FACTOR * config.noise_sd * rng.standard_normal(signal.shape, dtype=np.float32)
    return (signal + noise).astype(np.float32)


def to_display_orientation(image: np.ndarray, laterality: str) -> np.ndarray:
    """Flip a canonical-frame image so a right breast's chest wall lies on the right edge."""
    return image[:, ::-1] if laterality == "R" else image
