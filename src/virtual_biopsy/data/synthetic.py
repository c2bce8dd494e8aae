"""The embedded simulated CESM dataset (``vbiopsy synth``): DICOM studies + metadata.csv.

``synthesize(out_dir, config, seed)`` writes, atomically, a folder in the raw layout of
:mod:`virtual_biopsy.data.layout`: one Digital Mammography "for presentation" DICOM per image
(LE and DES of each view, breast and phase), ``metadata.csv``, the lesion ground truth that a real
dataset never has (``lesions.csv`` and ``masks/``, below) and ``contact_sheet.png`` (LE above DES
for one breast per ACR category, like the paper's Figure 2). Same arguments, same bytes: all
randomness comes from ``seed``, dates and UIDs are derived from it, nothing reads the clock.

Lesion ground truth: every image of a breast with a mass has a row in ``lesions.csv``
(data.layout.LESION_COLUMNS, ``source`` ``simulator``) and a mask ``masks/<patient>/<study>/<image
stem>.png``: where the mass's flat footprint (phantom.Anatomy.footprint, the volume that takes up
contrast) exceeds :data:`LESION_FOOTPRINT_THRESHOLD`, in display orientation like the pixels. The
LE and DES images of a view and phase show the same compression, so they have the same mask. Its
latent values: ``uptake`` (phantom.lesion_uptake in that image's phase: late rows carry the late
uptake), ``le_density_excess`` (phantom.lesion_le_contrast) and ``glandular_around``, the mean of
the glandular map in a ring :data:`GLANDULAR_RING_WIDTH` wide around the mask, inside the breast
(how dense the tissue is that hides the mass in LE). Images of lesion-free breasts have neither
row nor mask. The truth is computed from the anatomy and draws no random numbers, so the images
are the same bytes with or without it.

Cohort (defaults from the paper's Table 1, see :class:`~virtual_biopsy.core.config.SynthConfig`):

* patients ``P0001``..., one study ``S01`` each, age ~ N(56.7, 11.2) clipped to [31, 90];
* each patient has both breasts imaged (one breast for ``1 - BILATERAL_SHARE`` of patients),
  CC and MLO, an LE and a DES image of each, early phase; ``late_phase_share`` of the breasts
  also have a late-phase acquisition (same compression, later contrast kinetics);
* ``lesion_share`` of the breasts carry a biopsied mass, ``malignant_share`` of those malignant;
  one ACR density per patient drawn from ``acr_mix``, of which ``acr_missing_share`` is not
  reported (the breast still has that density; metadata says nothing). Label and ACR are the same
  on every image of a breast. Counts are allotted by quota (largest remainder) and then shuffled,
  so even a 16-patient test set has malignant, benign and unlabelled breasts in the set ratios.

Physics knobs and their defaults (``params.yaml`` ``synth``; the model is in
:mod:`virtual_biopsy.data.phantom`). They are frozen: ``tests/test_synthetic.py`` pins them, the
README's table and this one. The simulation checks the pipeline; it is not evidence for the
paper's claims, and its knobs were once changed after results were seen (README, "Results"), so
they must never move again to make a result appear. Where the CESM literature gives a direction
the knob follows it; the magnitudes are simulation choices, not measurements.

=========================  =======  ==========================================================
knob                       default  effect, and why this value
=========================  =======  ==========================================================
le_lesion_contrast         0.06     mass attenuation above glandular tissue in LE: visible over
                                    fat, nearly hidden inside dense tissue (low-energy CESM
                                    images read like FFDM, whose sensitivity falls with density)
le_uptake_coupling         3.0      LE mass density grows by this times the mass's contrast uptake:
                                    malignant masses are denser, so DES enhancement is faintly
                                    predictable from LE (what makes imputation possible at all)
des_glandular_suppression  0.85     share of glandular/muscle contrast the dual-energy
                                    recombination removes (subtraction cancels most tissue
                                    contrast; residual texture remains on real DES images)
bpe_strength               0.25     background parenchymal enhancement on the glandular map, times
                                    a per-breast level (BI-RADS CEM lexicon: minimal .25 .. marked 1)
malignant_enhancement      0.55     mean DES uptake of malignant masses, rim-weighted (malignant
                                    lesions enhance more, often heterogeneously or at the rim)
benign_enhancement         0.30     mean DES uptake of benign masses, homogeneous (weak or no
                                    enhancement is typical of benign masses)
enhancement_spread         0.20     per-lesion relative sd of uptake (overlap between classes)
noise_sd                   0.015    quantum noise, fraction of full scale (DES x2: subtraction adds
                                    the noise of both exposures)
=========================  =======  ==========================================================

Pixel data are 12-bit (BitsStored 12) MONOCHROME2; LE windows span the breast's tissue range
(wide), DES windows a fixed narrow band above the unenhanced level, so enhancement keeps its
meaning after the window-based contrast stretching of preprocessing. Pixel spacing is
``285 mm / image_height`` so the breast keeps its physical size at any resolution.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from scipy import ndimage
from tqdm import tqdm

from virtual_biopsy.core.atomic import atomic_dir
from virtual_biopsy.core.config import ACR_CATEGORIES, ConfigError, SynthConfig, load_params
from virtual_biopsy.data import phantom
from virtual_biopsy.data.layout import (
    LESION_COLUMNS,
    LESIONS_FILE,
    METADATA_COLUMNS,
    image_relpath,
    lesion_mask_relpath,
)
from virtual_biopsy.data.lesions import write_mask_png
from virtual_biopsy.dicom.cesm import SIMULATED_MARK
from virtual_biopsy.dicom.write import (
    Patient,
    Series,
    Study,
    Window,
    build_mammogram_dataset,
    deterministic_uid,
    write_dataset,
)

BILATERAL_SHARE = 0.95          # paper: 1598 early images / 4 per breast / 204 patients ~ 1.96 breasts
AGE_MEAN, AGE_SD, AGE_RANGE = 56.7, 11.2, (31, 90)
DETECTOR_HEIGHT_MM = 285.0      # paper: 2850 rows at 0.1 mm
BITS_STORED = 12
MIN_IMAGE_HEIGHT = 48

# Stored value = offset + scale * simulated intensity (12-bit range).
LE_OFFSET, LE_SCALE = 150.0, 3600.0
DES_OFFSET, DES_SCALE = 1024.0, 1000.0
# DES display window: from 0.15 below to 0.85 above the unenhanced breast level (intensity units).
DES_WINDOW_BELOW, DES_WINDOW_ABOVE = 0.15, 0.85

FIRST_STUDY_DATE = date(2021, 1, 4)
STUDY_DATE_SPAN_DAYS = 1000
UID_ROOT_NAME = "virtual-biopsy-synth"
# ACR category -> view of the contact sheet (paper Figure 2: a and c in CC, b and d in MLO).
CONTACT_SHEET_VIEWS = {"a": "CC", "b": "MLO", "c": "CC", "d": "MLO"}
# Lesion ground truth (module docstring): the mask is the mass footprint above this value (its
# margin's midpoint: the footprint is a logistic step across the mass boundary) ...
LESION_FOOTPRINT_THRESHOLD = 0.5
# ... and glandular_around averages the glandular map over the pixels at most this far outside
# the mask (a share of the image height, so the ring covers the same tissue at every resolution;
# at least one pixel): the tissue right around the mass, against which LE must show it.
GLANDULAR_RING_WIDTH = 0.03


class SynthError(ValueError):
    """The synthetic dataset cannot be written as asked (bad size, occupied output folder...)."""


@dataclass(frozen=True)
class BreastRecord:
    """One imaged breast of the cohort and everything drawn for it."""

    patient_id: str
    patient_index: int
    laterality: str
    age: int
    acr_reported: str        # a-d or "" (not reported)
    late: bool               # also has a late-phase acquisition
    label: str               # malignant | benign | none
    breast: phantom.Breast


# --------------------------------------------------------------------------------------------
# cohort
# --------------------------------------------------------------------------------------------
def allot(n: int, shares: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Indices 0..len(shares)-1, ``n`` of them, in the given shares (largest remainder), shuffled."""
    shares = np.asarray(shares, dtype=float)
    exact = n * shares / shares.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))


def draw_cohort(config: SynthConfig, seed: int) -> list[BreastRecord]:
    """Patients, their imaged breasts, labels, densities and phases."""
    rng = np.random.default_rng([seed, 0])
    n = config.patients
    ages = np.clip(np.rint(rng.normal(AGE_MEAN, AGE_SD, n)), *AGE_RANGE).astype(int)
    acr_true = allot(n, config.acr_mix, rng)
    reported = allot(n, (1 - config.acr_missing_share, config.acr_missing_share), rng) == 0
    bilateral = allot(n, (BILATERAL_SHARE, 1 - BILATERAL_SHARE), rng) == 0
    sides = [("R", "L") if both else (str(rng.choice(["R", "L"])),) for both in bilateral]
    slots = [(p, side) for p in range(n) for side in sides[p]]
    labels = _breast_labels(len(slots), config, rng)
    late = allot(len(slots), (config.late_phase_share, 1 - config.late_phase_share), rng) == 0
    records = []
    for k, (p, side) in enumerate(slots):
        acr = ACR_CATEGORIES[acr_true[p]]
        breast_rng = np.random.default_rng([seed, 1, p, 0 if side == "R" else 1])
        records.append(BreastRecord(
            patient_id=f"P{p + 1:04d}", patient_index=p, laterality=side, age=int(ages[p]),
            acr_reported=acr if reported[p] else "", late=bool(late[k]), label=labels[k],
            breast=phantom.draw_breast(acr, labels[k], config, breast_rng),
        ))
    return records


def _breast_labels(n_breasts: int, config: SynthConfig, rng: np.random.Generator) -> list[str]:
    n_lesion = int(round(config.lesion_share * n_breasts))
    lesion = allot(n_breasts, (n_lesion, n_breasts - n_lesion), rng) == 0 if n_breasts else np.zeros(0, bool)
    kinds = allot(n_lesion, (config.malignant_share, 1 - config.malignant_share), rng)
    labels = np.full(n_breasts, "none", dtype=object)
    labels[lesion] = np.where(kinds == 0, "malignant", "benign")
    return [str(v) for v in labels]


# --------------------------------------------------------------------------------------------
# pixels and windows
# --------------------------------------------------------------------------------------------
def encode(intensity: np.ndarray, energy: str) -> np.ndarray:
    """Simulated intensity -> 12-bit stored values (uint16)."""
    offset, scale = (LE_OFFSET, LE_SCALE) if energy == "LE" else (DES_OFFSET, DES_SCALE)
    return np.clip(np.rint(offset + scale * intensity), 0, (1 << BITS_STORED) - 1).astype(np.uint16)


def display_window(stored: np.ndarray, breast_mask: np.ndarray, energy: str) -> Window:
    """The window a CESM system writes: LE spans the breast's tissue range, DES a narrow band.

    LE: the 0.5-99.9 percentile range of breast pixels, widened by 10 %. DES: a fixed band from
    just below to well above the median (unenhanced) breast level, so uptake is not clipped and
    the same uptake looks the same in every image.
    """
    values = stored[breast_mask > 0.5].astype(float)
    if values.size == 0:
        values = stored.astype(float).ravel()
    if energy == "LE":
        low, high = np.percentile(values, [0.5, 99.9])
        centre, width = (low + high) / 2, 1.1 * (high - low)
        explanation = "LE TISSUE"
    else:
        base = float(np.median(values))
        low, high = base - DES_WINDOW_BELOW * DES_SCALE, base + DES_WINDOW_ABOVE * DES_SCALE
        centre, width = (low + high) / 2, high - low
        explanation = "DES ENHANCEMENT"
    return Window(round(float(centre)), max(1, round(float(width))), explanation)


# --------------------------------------------------------------------------------------------
# DICOM headers
# --------------------------------------------------------------------------------------------
def _study_datetime(seed: int, patient_index: int) -> datetime:
    rng = np.random.default_rng([seed, 2, patient_index])
    day = FIRST_STUDY_DATE + timedelta(days=int(rng.integers(0, STUDY_DATE_SPAN_DAYS)))
    return datetime(day.year, day.month, day.day, int(rng.integers(8, 17)), int(rng.integers(0, 60)), 0)


def _birth_date(study_day: date, age: int, seed: int, patient_index: int) -> str:
    """A birth date at which the patient is ``age`` years old on ``study_day``."""
    rng = np.random.default_rng([seed, 3, patient_index])
    anniversary = study_day.replace(year=study_day.year - age, day=min(study_day.day, 28))
    return (anniversary - timedelta(days=int(rng.integers(1, 365)))).strftime("%Y%m%d")


def _patient_and_study(record: BreastRecord, seed: int, study_id: str) -> tuple[Patient, Study, datetime]:
    when = _study_datetime(seed, record.patient_index)
    patient = Patient(
        patient_id=record.patient_id,
        name=f"SIMULATED^{record.patient_id}",
        birth_date=_birth_date(when.date(), record.age, seed, record.patient_index),
        age_years=record.age,
    )
    study = Study(
        instance_uid=deterministic_uid(UID_ROOT_NAME, seed, record.patient_id, study_id),
        study_id=study_id,
        accession_number=f"SIM{record.patient_index + 1:06d}",
        date=when.strftime("%Y%m%d"),
        time=when.strftime("%H%M%S"),
        description=f"CESM ({SIMULATED_MARK})",
    )
    return patient, study, when


def _series(seed: int, record: BreastRecord, study_id: str, energy: str, late: bool) -> Series:
    """One series per energy and phase of a study (both breasts, both views)."""
    number = (1 if energy == "LE" else 2) + (2 if late else 0)
    words = "LOW ENERGY" if energy == "LE" else "RECOMBINED"
    phase = " LATE" if late else ""
    return Series(
        instance_uid=deterministic_uid(UID_ROOT_NAME, seed, record.patient_id, study_id, "series", number),
        number=number,
        description=f"{SIMULATED_MARK} CESM {words}{phase}",
    )


# --------------------------------------------------------------------------------------------
# lesion ground truth
# --------------------------------------------------------------------------------------------
def lesion_mask(anatomy: phantom.Anatomy) -> np.ndarray:
    """Where the mass is in one view (canonical frame): footprint above the threshold.

    A mass so small that no pixel's footprint reaches the threshold (only conceivable at the
    smallest image sizes) keeps its most covered pixel: an image with a lesion always has a mask.
    """
    mask = anatomy.footprint > LESION_FOOTPRINT_THRESHOLD
    if not mask.any():
        mask = np.zeros_like(mask)
        mask[np.unravel_index(np.argmax(anatomy.footprint), mask.shape)] = True
    return mask


def glandular_around(anatomy: phantom.Anatomy, mask: np.ndarray) -> float:
    """Mean glandular map over the ring of :data:`GLANDULAR_RING_WIDTH` around ``mask``, outside
    the mask and inside the breast (NaN if that ring were empty)."""
    width = max(1.0, GLANDULAR_RING_WIDTH * mask.shape[0])
    distance_outside = ndimage.distance_transform_edt(~mask)  # 0 inside, pixels to the mask outside
    ring = (distance_outside > 0) & (distance_outside <= width) & (anatomy.breast > 0.5)
    return float(anatomy.glandular[ring].mean(dtype=np.float64)) if ring.any() else float("nan")


def _lesion_row(image: str, record: BreastRecord, config: SynthConfig, late: bool, around: float) -> dict:
    """The lesions.csv row of one image of a breast with a mass."""
    return {
        "file": image, "mask": lesion_mask_relpath(image), "source": "simulator",
        "uptake": phantom.lesion_uptake(record.breast, late),
        "le_density_excess": phantom.lesion_le_contrast(record.breast, config),
        "glandular_around": around,
    }


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _write_breast(record: BreastRecord, config: SynthConfig, seed: int, root: Path) -> tuple[list[dict], list[dict]]:
    """Render and write every image of one breast (and the masks of its mass, if any); return its
    metadata rows and its lesions.csv rows."""
    rows = config.image_height
    cols = max(1, int(round(rows * config.aspect_ratio)))
    study_id = "S01"
    patient, study, when = _patient_and_study(record, seed, study_id)
    side = 0 if record.laterality == "R" else 1
    out, lesions = [], []
    for v, view in enumerate(("CC", "MLO")):
        anatomy = phantom.render_anatomy(record.breast, view, rows, cols)
        if record.breast.mass is not None:
            canonical_mask = lesion_mask(anatomy)
            around = glandular_around(anatomy, canonical_mask)
            display_mask = phantom.to_display_orientation(canonical_mask, record.laterality)
        for late in ([False, True] if record.late else [False]):
            # seconds after study start: early views first, late ones ~8 minutes later
            acquired = when + timedelta(seconds=120 + 480 * late + 60 * (2 * side + v))
            noise_rng = np.random.default_rng([seed, 4, record.patient_index, side, v, int(late)])
            intensities = {
                "LE": phantom.low_energy_image(anatomy, record.breast, config, noise_rng),
                "DES": phantom.recombined_image(anatomy, record.breast, config, late, noise_rng),
            }
            frame_uid = deterministic_uid(UID_ROOT_NAME, seed, record.patient_id, study_id, "frame",
                                          record.laterality, view, int(late))
            for energy, intensity in intensities.items():
                stored = phantom.to_display_orientation(encode(intensity, energy), record.laterality)
                mask = phantom.to_display_orientation(anatomy.breast, record.laterality)
                relpath = image_relpath(record.patient_id, study_id, record.laterality, view, energy, late)
                ds = build_mammogram_dataset(
                    np.ascontiguousarray(stored),
                    patient=patient, study=study, series=_series(seed, record, study_id, energy, late),
                    laterality=record.laterality, view=view, energy=energy,
                    window=display_window(stored, mask, energy),
                    sop_instance_uid=deterministic_uid(UID_ROOT_NAME, seed, relpath),
                    frame_of_reference_uid=frame_uid,
                    instance_number=1 + 2 * side + v,
                    content_date=acquired.strftime("%Y%m%d"), content_time=acquired.strftime("%H%M%S"),
                    pixel_spacing_mm=DETECTOR_HEIGHT_MM / rows, bits_stored=BITS_STORED,
                    image_comments=f"{SIMULATED_MARK} image of the virtual-biopsy embedded dataset (vbiopsy synth)",
                )
                write_dataset(ds, root / relpath)
                if record.breast.mass is not None:  # LE and DES of this view and phase: one mask
                    lesions.append(_lesion_row(relpath, record, config, late, around))
                    write_mask_png(root / lesions[-1]["mask"], display_mask)
                out.append({
                    "file": relpath, "patient_id": record.patient_id, "study_id": study_id,
                    "laterality": record.laterality, "view": view, "energy": energy,
                    "phase": "late" if late else "early", "acr": record.acr_reported,
                    "age": record.age, "biopsy": record.label,
                })
    return out, lesions


def _check_request(out_dir: Path, config: SynthConfig) -> None:
    if config.patients < 1:
        raise SynthError(f"patients must be at least 1, got {config.patients}")
    if config.image_height < MIN_IMAGE_HEIGHT:
        raise SynthError(f"image height must be at least {MIN_IMAGE_HEIGHT} pixels, got {config.image_height}")
    if not 0.3 <= config.aspect_ratio <= 2:
        raise SynthError(f"aspect_ratio must lie in [0.3, 2], got {config.aspect_ratio}")
    for name in ("lesion_share", "malignant_share", "late_phase_share", "acr_missing_share"):
        if not 0 <= getattr(config, name) <= 1:
            raise SynthError(f"{name} must lie in [0, 1], got {getattr(config, name)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise SynthError(f"{out_dir}: exists and is not a folder")


def synthesize(out_dir: Path, config: SynthConfig, seed: int, *, force: bool = False) -> dict:
    """Write the simulated dataset to ``out_dir`` (atomically) and return summary counts.

    Refuses a non-empty ``out_dir`` unless ``force``; raises :class:`SynthError` naming the
    folder or value otherwise at fault.
    """
    out_dir = Path(out_dir)
    _check_request(out_dir, config)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise SynthError(f"{out_dir}: folder is not empty; pass --force to replace it")
    records = draw_cohort(config, seed)
    with atomic_dir(out_dir) as tmp:
        rows: list[dict] = []
        lesion_rows: list[dict] = []
        for record in tqdm(records, desc="synth", unit="breast", disable=None):
            image_rows, breast_lesions = _write_breast(record, config, seed, tmp)
            rows.extend(image_rows)
            lesion_rows.extend(breast_lesions)
        table = pd.DataFrame(rows, columns=list(METADATA_COLUMNS)).sort_values("file", kind="stable")
        table.to_csv(tmp / "metadata.csv", index=False, lineterminator="\n")
        lesions = pd.DataFrame(lesion_rows, columns=list(LESION_COLUMNS)).sort_values("file", kind="stable")
        lesions.to_csv(tmp / LESIONS_FILE, index=False, lineterminator="\n")
        write_contact_sheet(tmp, table, tmp / "contact_sheet.png")
    return {**summarize(table), "lesion_masks": len(lesions)}


def summarize(table: pd.DataFrame) -> dict:
    """Counts of a metadata table: patients, breasts, images, and images per label/ACR/phase."""
    early_lesion = table[(table.phase == "early") & (table.biopsy != "none")]
    per_cell = early_lesion.groupby(["energy", "view", "biopsy"]).size()
    return {
        "patients": int(table.patient_id.nunique()),
        "breasts": int(table.groupby(["patient_id", "laterality"]).ngroups),
        "images": len(table),
        "phase": dict(Counter(table.phase)),
        "biopsy": dict(Counter(table.biopsy)),
        "acr": dict(Counter(a if a else "not reported" for a in table.acr)),
        "early_lesion_images_per_modality_view": {
            label: int(per_cell.xs(label, level="biopsy").iloc[0]) if label in per_cell.index.get_level_values("biopsy") else 0
            for label in ("malignant", "benign")
        },
    }


# --------------------------------------------------------------------------------------------
# contact sheet
# --------------------------------------------------------------------------------------------
def _windowed(path: Path) -> np.ndarray:
    """A DICOM's pixels clipped to its own display window, scaled to [0, 1]."""
    ds = pydicom.dcmread(path)
    low = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
    return np.clip((ds.pixel_array.astype(float) - low) / float(ds.WindowWidth), 0, 1)


def _contact_sheet_choice(table: pd.DataFrame) -> list[tuple[str, pd.Series, pd.Series]]:
    """(ACR, LE row, DES row) per reported ACR category: a lesion breast when there is one."""
    early = table[table.phase == "early"]
    chosen = []
    for acr, view in CONTACT_SHEET_VIEWS.items():
        candidates = early[(early.acr == acr) & (early.view == view)]
        if candidates.empty:
            continue
        lesion = candidates[candidates.biopsy != "none"]
        pick = (lesion if not lesion.empty else candidates).iloc[0]
        pair = candidates[(candidates.patient_id == pick.patient_id) & (candidates.laterality == pick.laterality)]
        chosen.append((acr, pair[pair.energy == "LE"].iloc[0], pair[pair.energy == "DES"].iloc[0]))
    return chosen


def write_contact_sheet(root: Path, table: pd.DataFrame, path: Path) -> None:
    """LE (top) and DES (bottom) of one breast per ACR category, labelled (paper Figure 2)."""
    # Figure + Agg canvas directly: no pyplot global state, no interactive backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = _contact_sheet_choice(table)
    columns = max(1, len(chosen))
    fig = Figure(figsize=(2.4 * columns, 5.9), facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for c, (acr, le, des) in enumerate(chosen):
        for r, row in enumerate((le, des)):
            axes[r, c].imshow(_windowed(root / row.file), cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
        axes[0, c].set_title(f"ACR {acr} | {le.laterality}{le.view} | {le.biopsy}", color="white", fontsize=9)
        axes[1, c].set_title("DES", color="white", fontsize=8)
    axes[0, 0].text(-0.04, 0.5, "LE", color="white", rotation=90, va="center", ha="right",
                    transform=axes[0, 0].transAxes, fontsize=8)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.94, bottom=0.01, wspace=0.04, hspace=0.08)
    fig.savefig(path, format="png", dpi=100, facecolor="black", metadata={"Software": None})


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` sub-command."""
    parser = subparsers.add_parser(
        "synth",
        help="write the embedded simulated CESM dataset (DICOM studies, metadata.csv, lesion masks)",
        description=(
            "Write the deterministic simulated CESM dataset in the raw-data layout: LE and DES "
            "mammograms (DICOM, CC and MLO, early and late phase), metadata.csv with age, ACR "
            "density and biopsy result, the lesion ground truth (lesions.csv: each lesion image's "
            "mask under masks/ and its latent contrast uptake, LE density excess and surrounding "
            "glandular density), and contact_sheet.png. Defaults come from the synth "
            "section of params.yaml; same arguments, same bytes."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("data/raw"), help="output folder (default: data/raw)")
    parser.add_argument("--params", type=Path, default=None,
                        help="params file (default: params.yaml when it exists, else built-in defaults)")
    parser.add_argument("--patients", type=int, default=None, help="number of patients (overrides synth.patients)")
    parser.add_argument("--image-size", type=int, default=None, dest="image_size",
                        help="image height in pixels; width follows synth.aspect_ratio (overrides synth.image_height)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (overrides the top-level seed)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> tuple[SynthConfig, int]:
    """SynthConfig and seed from params.yaml (or defaults) with the command-line overrides."""
    params_path = args.params if args.params is not None else Path("params.yaml")
    if args.params is not None or params_path.exists():
        params = load_params(params_path)
        config, seed = params.synth, params.seed
    else:
        config, seed = SynthConfig(), 20251125
    overrides = {"patients": args.patients, "image_height": args.image_size}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return config, seed if args.seed is None else args.seed


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vbiopsy synth``: one-line error and exit code 1 on bad input."""
    try:
        config, seed = resolve_config(args)
        started = time.perf_counter()
        summary = synthesize(args.out, config, seed, force=args.force)
    except (SynthError, ConfigError) as exc:
        print(f"vbiopsy synth: error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    print(f"wrote {summary['images']} images of {summary['patients']} patients "
          f"({summary['breasts']} breasts) and {summary['lesion_masks']} lesion masks to {args.out} in {elapsed:.1f} s")
    print(f"  biopsy: {summary['biopsy']}  phase: {summary['phase']}  acr: {summary['acr']}")
    print(f"  early-phase lesion images per modality and view: {summary['early_lesion_images_per_modality_view']}")
    return 0
