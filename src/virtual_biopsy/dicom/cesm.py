"""How a CESM system marks low-energy and recombined images, and how the project marks its own.

A GE Senographe Pristina / SenoBright exam (the paper's system) writes both images of a CESM
acquisition as Digital Mammography X-Ray objects; the fourth value of ImageType tells them apart:
``ORIGINAL\\PRIMARY\\\\LOW_ENERGY`` for the low-energy (LE, FFDM-equivalent) image and
``DERIVED\\PRIMARY\\\\RECOMBINED`` for the dual-energy subtracted (DES) image. Other vendors put
"LOW ENERGY" / "SUBTRACTED" / "RECOMBINED" in SeriesDescription only, so reading falls back to it.

Images imputed by a generator are written as ``DERIVED\\SECONDARY\\\\RECOMBINED\\SYNTHETIC`` (a
fifth value: ``SYNTHETIC_RECOMBINED`` would break the 16-character limit of a CS value, and the
third value of a mammogram's ImageType must stay empty) with
a SeriesDescription starting "SYNTHETIC CESM"; simulated images of the embedded dataset say
SIMULATED in ImageComments and SeriesDescription.
"""
from __future__ import annotations

from pydicom.dataset import Dataset

# SOP classes
DIGITAL_MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
DIGITAL_MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
MG_SOP_CLASSES = (DIGITAL_MG_FOR_PRESENTATION, DIGITAL_MG_FOR_PROCESSING)

IMAGE_TYPE_LE = ["ORIGINAL", "PRIMARY", "", "LOW_ENERGY"]
IMAGE_TYPE_DES = ["DERIVED", "PRIMARY", "", "RECOMBINED"]
IMAGE_TYPE_SYNTHETIC_DES = ["DERIVED", "SECONDARY", "", "RECOMBINED", "SYNTHETIC"]

SIMULATED_MARK = "SIMULATED"
SYNTHETIC_MARK = "SYNTHETIC"

_LE_WORDS = ("LOW_ENERGY", "LOW ENERGY", "LOW-ENERGY")
_DES_WORDS = ("RECOMBINED", "SUBTRACTED", "DUAL ENERGY SUBTRACTED", "DES")


class UnknownEnergyError(ValueError):
    """Neither ImageType nor SeriesDescription says whether an image is LE or DES."""


def energy_of(ds: Dataset) -> str:
    """Return ``"LE"`` or ``"DES"`` for a CESM image, from its own tags.

    ImageType's fourth value is authoritative; SeriesDescription is the fallback. Raises
    :class:`UnknownEnergyError` when neither says.
    """
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    flavour = image_type[3] if len(image_type) > 3 else ""
    if "SYNTHETIC" in flavour:
        return "DES"
    if flavour in _LE_WORDS:
        return "LE"
    if flavour in _DES_WORDS:
        return "DES"
    description = str(ds.get("SeriesDescription", "")).upper()
    if any(word in description for word in _LE_WORDS):
        return "LE"
    if any(word in description.split() or word in description for word in _DES_WORDS[:3]):
        return "DES"
    raise UnknownEnergyError(
        f"ImageType {list(ds.get('ImageType') or [])} and SeriesDescription {description!r} "
        "do not say low energy or recombined"
    )


def is_synthetic(ds: Dataset) -> bool:
    """True for an image a generator produced (imputed CESM)."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return any(SYNTHETIC_MARK in v for v in image_type) or str(ds.get("SeriesDescription", "")).upper().startswith(
        SYNTHETIC_MARK
    )


def is_simulated(ds: Dataset) -> bool:
    """True for an image of the embedded simulated dataset."""
    return SIMULATED_MARK in str(ds.get("ImageComments", "")).upper()
