"""The page a person opens: one self-contained HTML report per study (``vbiopsy predict --report DIR``).

What it shows, per breast
    the four views side by side (FFDM CC, CESM CC, FFDM MLO, CESM MLO) as the classifiers saw them,
    put back in each source image's orientation; a CESM view the generator made carries a red
    "SYNTHETIC -- imputed from FFDM by <generator>" banner; a second row lays each classifier's
    Grad-CAM over its image (serving/saliency.py) with that classifier's probability and share of
    the fused p (a share of 0: it contributed nothing); then the calibrated p (the mean over the
    serving folds, what the class is decided on) with the spread between folds (sd and
    min-max over the folds' calibrated p) and the conformal set at its level, the uncalibrated
    p, p_F, p_C, the class by maximum membership (malignant when p >= 1 - p), which inputs were
    imputed and the fusion weights of every fold. A value the model does not provide (a
    BreastReport built without it) is shown as "not available for this model", never made up.

What it shows about the model
    name, version and alias (as predict resolved the URI), a link to the registry version's page
    in the MLflow UI and the model card text (the version's description), and "research use only".

Offline and private by construction
    images are embedded as base64 PNG and the CSS is inline: no request leaves the page. The
    inputs are plain values (this module reads no DICOM): the study is named by a key hashed
    from its StudyInstanceUID (:func:`study_key`), and nothing here takes a patient's name or id
    or an original UID, so none can reach the page or its file name.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from virtual_biopsy.core.atomic import atomic_path

DISPLAY_MAX_ROWS = 384  # images are shown at most this tall (a paper-size source is 2850 rows)
NOT_AVAILABLE = "not available for this model"
RESEARCH_USE = ("Research use only. Not a medical device; not for diagnosis. Synthetic CESM is an image a "
                "generator made from the low-energy image, not an acquired image.")
STUDY_KEY_PREFIX = "study-"
BREAST_NAMES = {"L": "Left breast", "R": "Right breast"}


class ReportError(ValueError):
    """A report cannot be written; the message names the folder or value and why."""


@dataclass(frozen=True)
class ViewPanel:
    """One image of a breast as shown: ``image`` (rows, columns) in [0, 1] in its source's
    orientation, its classifier's ``saliency`` of the same shape (None: not computed), the
    classifier's probability ``p`` and ``fusion_share`` of the fused p, the Grad-CAM ``grid``
    (its true resolution) and, for an imputed CESM view, ``synthetic_by`` (the generator)."""

    modality: str
    view: str
    image: np.ndarray
    p: float
    fusion_share: float
    saliency: np.ndarray | None = None
    grid: tuple[int, int] | None = None
    synthetic_by: str | None = None

    @property
    def title(self) -> str:
        return f"{self.modality} {self.view}"


@dataclass(frozen=True)
class BreastReport:
    """What the page says about one breast. ``p`` is the probability the class is decided on (the
    calibrated ensemble p when the model is calibrated); ``calibrated_p``, ``fold_spread`` (the
    population sd of the folds' calibrated p), ``fold_range`` (their min, max), ``n_folds``,
    ``conformal_set`` with ``conformal_level``, ``p_uncalibrated`` and ``setting`` (the
    calibration entry, F+C or F+Ĉ) are None when the model does not provide them;
    ``fold_weights`` lists (fold, eq. 7 weights, eq. 8 weights) of every serving fold."""

    laterality: str
    p: float
    p_ffdm: float
    p_cesm: float
    label: str
    imputed: Sequence[str]
    panels: Sequence[ViewPanel]
    view_weights: dict[str, dict[str, float]]
    modality_weights: dict[str, float]
    calibrated_p: float | None = None
    fold_spread: float | None = None
    conformal_set: Sequence[str] | None = None
    p_uncalibrated: float | None = None
    fold_range: tuple[float, float] | None = None
    n_folds: int | None = None
    conformal_level: float | None = None
    setting: str | None = None
    fold_weights: Sequence[tuple[int, dict[str, dict[str, float]], dict[str, float]]] = ()


@dataclass(frozen=True)
class ModelIdentity:
    """The served model as predict resolved it: the URI asked for, registered name, version and the
    version's aliases (None when unknown, e.g. a ``runs:/`` URI), the MLflow UI page of the version
    (``card_url``, with ``card_url_note`` saying how to open it) and the model card text."""

    uri: str
    name: str | None = None
    version: str | None = None
    aliases: Sequence[str] = ()
    card_url: str | None = None
    card_url_note: str | None = None
    card_text: str | None = None


@dataclass(frozen=True)
class StudyReport:
    """One page: the study's key, the model, its breasts and notes (notes must name no file:
    file names of a raw layout carry patient ids)."""

    study: str
    model: ModelIdentity
    breasts: Sequence[BreastReport]
    notes: Sequence[str] = field(default_factory=tuple)


def study_key(study_uids: Iterable[str]) -> str:
    """``study-<12 hex>``: the first 48 bits of the SHA-256 of the study's StudyInstanceUID(s).

    The same study always gets the same key (a page can be found again), and the key does not
    reveal the UID. Several UIDs (one folder holding two studies of one patient) are sorted and
    joined, so the order the files were read in does not matter."""
    uids = sorted({str(u).strip() for u in study_uids if str(u).strip()})
    if not uids:
        raise ReportError("no StudyInstanceUID to name the study by: the images carry none")
    return STUDY_KEY_PREFIX + hashlib.sha256("\\".join(uids).encode("ascii", "replace")).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def _display_size(image: np.ndarray) -> np.ndarray:
    """``image`` no taller than DISPLAY_MAX_ROWS (aspect kept): the page stays a few hundred KB."""
    from PIL import Image

    rows, columns = image.shape[:2]
    if rows <= DISPLAY_MAX_ROWS:
        return image
    size = (max(1, round(columns * DISPLAY_MAX_ROWS / rows)), DISPLAY_MAX_ROWS)
    pixels = image.astype(np.float32) if image.ndim == 2 else image  # grey: Pillow's float mode "F"
    resized = Image.fromarray(np.ascontiguousarray(pixels)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized)


def png_data_uri(pixels: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI of a grey (float in [0, 1]) or RGB (uint8) image."""
    from PIL import Image

    if pixels.ndim == 2:
        pixels = np.round(np.clip(np.nan_to_num(pixels), 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay(image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """RGB uint8: the grey image under the saliency map in the jet colour map, half and half
    (pytorch-grad-cam's show_cam_on_image)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if image.shape != saliency.shape:
        raise ReportError(f"a saliency map of shape {saliency.shape} cannot lie over an image of shape {image.shape}")
    grey = np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0)
    return show_cam_on_image(np.repeat(grey[..., None], 3, axis=2), np.clip(saliency, 0.0, 1.0), use_rgb=True)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #111; background: #fff; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 2px solid #333; margin-top: 1.5em; }
.research { background: #fff3cd; border: 1px solid #b58900; padding: 0.5em 0.8em; font-weight: 600; }
.verdict { font-size: 1.25em; margin: 0.4em 0; }
.malignant { color: #b00020; } .benign { color: #1b5e20; }
table.facts { border-collapse: collapse; margin: 0.5em 0; }
table.facts th, table.facts td { text-align: left; padding: 0.15em 0.8em 0.15em 0; vertical-align: top; }
.na { color: #666; font-style: italic; }
.views { display: flex; gap: 0.6em; flex-wrap: wrap; margin: 0.5em 0; }
figure { margin: 0; width: 23%; min-width: 150px; }
figure img { width: 100%; display: block; background: #000; image-rendering: auto; }
figcaption { font-size: 0.85em; margin-top: 0.2em; }
.synthetic, .acquired { font-size: 0.8em; padding: 0.25em 0.4em; height: 2.6em; overflow: hidden; }
.synthetic { background: #b00020; color: #fff; font-weight: 700; }
.acquired { background: #1b5e20; color: #fff; }
.zero { color: #b00020; }
pre.card { white-space: pre-wrap; background: #f6f6f6; padding: 0.8em; font-size: 0.85em; max-height: 30em; overflow: auto; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _percent(share: float) -> str:
    return f"{100 * share:.0f} %"


def _row(name: str, value: str, *, raw: bool = False) -> str:
    return f"<tr><th>{_e(name)}</th><td>{value if raw else _e(value)}</td></tr>"


def _not_available() -> str:
    return f'<span class="na">{_e(NOT_AVAILABLE)}</span>'


def _source_badge(panel: ViewPanel) -> str:
    """Every image says where it comes from (one line each, so the rows of images stay aligned)."""
    if panel.modality != "CESM":
        return '<div class="acquired">acquired FFDM (low energy)</div>'
    if panel.synthetic_by:
        return f'<div class="synthetic">SYNTHETIC -- imputed from FFDM by {_e(panel.synthetic_by)}</div>'
    return '<div class="acquired">acquired CESM</div>'


def _saliency_caption(panel: ViewPanel) -> str:
    parts = [f"{panel.title}: p = {panel.p:.3f}, share of fused p {_percent(panel.fusion_share)}"]
    if panel.fusion_share == 0:
        parts.append('<span class="zero">weight 0: this classifier contributed nothing to p</span>')
    if panel.grid is not None:
        rows, columns = panel.grid
        note = "" if rows * columns > 1 else ": one cell, the map cannot localise at this image size"
        parts.append(f"Grad-CAM grid {rows} x {columns}{note}")
    if panel.saliency is not None and float(np.max(panel.saliency)) == 0.0:
        parts.append("flat map: no region raises the malignant score")
    return "<br>".join(p if p.startswith("<span") else _e(p) for p in parts)


def _figure(panel: ViewPanel, pixels: np.ndarray, caption: str, alt: str) -> str:
    return (f'<figure>{_source_badge(panel)}<img alt="{_e(alt)}" src="{png_data_uri(_display_size(pixels))}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _views(breast: BreastReport) -> str:
    images = "".join(_figure(p, p.image, _e(p.title), f"{p.title} image") for p in breast.panels)
    maps = "".join(
        _figure(p, overlay(p.image, p.saliency), _saliency_caption(p), f"{p.title} with Grad-CAM")
        if p.saliency is not None else f"<figure><figcaption>{_e(p.title)}: no saliency</figcaption></figure>"
        for p in breast.panels)
    return (f'<h3>Images</h3><div class="views">{images}</div>'
            f'<h3>Grad-CAM for the malignant class, per classifier</h3><div class="views">{maps}</div>')


def _weight_text(view_weights: dict[str, dict[str, float]], modality_weights: dict[str, float]) -> str:
    views = "; ".join(f"{m}: " + ", ".join(f"{v} {w:.3g}" for v, w in ws.items()) for m, ws in view_weights.items())
    modalities = ", ".join(f"{m} {w:.3g}" for m, w in modality_weights.items())
    return f"over views (eq. 7) {views}; over modalities (eq. 8) {modalities}"


def _weights(breast: BreastReport) -> str:
    if len(breast.fold_weights) > 1:
        return " | ".join(f"fold {fold}: {_weight_text(views, modalities)}"
                          for fold, views, modalities in breast.fold_weights)
    return _weight_text(breast.view_weights, breast.modality_weights)


def _spread(breast: BreastReport) -> str | None:
    if breast.fold_spread is None:
        return None
    text = f"sd {breast.fold_spread:.3f}"
    if breast.fold_range is not None:
        text += f", min-max {breast.fold_range[0]:.3f}-{breast.fold_range[1]:.3f}"
    if breast.n_folds is not None:
        text += f" over {breast.n_folds} fold{'s' if breast.n_folds != 1 else ''}"
    return text


def _value_or_na(text: str | None) -> str:
    return _e(text) if text is not None else _not_available()


def _breast_section(breast: BreastReport) -> str:
    label = breast.label.lower()
    imputed = ", ".join(f"CESM {v}" for v in breast.imputed) or "none (both CESM views acquired)"
    conformal = ("{" + ", ".join(breast.conformal_set) + "}") if breast.conformal_set is not None else None
    # The setting the page names is the one the numbers come from: Ĉ marks CESM that is imputed
    # (both views), "C with Ĉ" a study that acquired one CESM view and imputed the other.
    cesm = "Ĉ" if len(breast.imputed) == 2 else ("C with Ĉ " + "/".join(breast.imputed) if breast.imputed else "C")
    facts = "".join([
        _row(f"p (fused, F+{cesm})", f"{breast.p:.3f}"),
        _row("p_F (FFDM, eq. 7)", f"{breast.p_ffdm:.3f}"),
        _row(f"p_{cesm if cesm == 'Ĉ' else 'C'} ({'synthetic ' if breast.imputed else ''}CESM, eq. 7)",
             f"{breast.p_cesm:.3f}"),
        _row("class (maximum membership)",
             f"{label} (p(malignant) {breast.p:.3f} vs p(benign) {1 - breast.p:.3f})"),
        _row("calibrated p" + (f" ({breast.setting} calibration)" if breast.setting else ""),
             _value_or_na(f"{breast.calibrated_p:.3f}" if breast.calibrated_p is not None else None), raw=True),
        _row("fold spread", _value_or_na(_spread(breast)), raw=True),
        _row("conformal set" + (f" ({100 * breast.conformal_level:.0f} %)" if breast.conformal_level else ""),
             _value_or_na(conformal), raw=True),
        # an older model has no uncalibrated p beside its p: no row then (p is what it gave)
        *([_row("uncalibrated p (mean over folds)", f"{breast.p_uncalibrated:.3f}")]
          if breast.p_uncalibrated is not None else []),
        _row("imputed inputs", imputed),
        _row("fusion weights", _weights(breast)),
    ])
    name = BREAST_NAMES.get(breast.laterality, f"Breast {breast.laterality}")
    return (f'<section class="breast" id="breast-{_e(breast.laterality)}"><h2>{_e(name)}</h2>'
            f'<div class="verdict {label}">{_e(label.upper())}: p = {breast.p:.3f}</div>'
            f'<table class="facts">{facts}</table>{_views(breast)}</section>')


def _model_section(model: ModelIdentity) -> str:
    rows = [_row("model URI", model.uri), _row("registered name", model.name or "unknown"),
            _row("version", model.version or "unknown"),
            _row("aliases", ", ".join(model.aliases) or "none")]
    if model.card_url:
        note = f" ({_e(model.card_url_note)})" if model.card_url_note else ""
        rows.append(_row("model card", f'<a href="{_e(model.card_url)}">{_e(model.card_url)}</a>{note}', raw=True))
    else:
        rows.append(_row("model card", "no registry page known for this URI"))
    card = (f'<pre class="card">{_e(model.card_text)}</pre>' if model.card_text
            else '<p class="na">No model card text: the URI has no registry version, or the version has no '
               'description.</p>')
    return f'<h2>Model</h2><table class="facts">{"".join(rows)}</table><h3>Model card</h3>{card}'


def render_html(report: StudyReport) -> str:
    """The whole page as one string (UTF-8, no external resource)."""
    breasts = "".join(_breast_section(b) for b in report.breasts)
    notes = ("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>"
             if report.notes else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>Virtual biopsy {_e(report.study)}</title><style>{CSS}</style></head><body>"
            f"<h1>Virtual biopsy: {_e(report.study)}</h1>"
            f'<p class="research">{_e(RESEARCH_USE)}</p>'
            f"{breasts}{notes}{_model_section(report.model)}"
            f'<p class="research">{_e(RESEARCH_USE)}</p></body></html>\n')


def check_report_dir(folder: str | Path) -> Path:
    """``folder`` as a report folder: created when missing; ReportError when it is a file or cannot be made."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ReportError(f"--report {path}: is a file, not a folder; give a folder for the HTML reports")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"--report {path}: cannot create the folder ({exc.strerror or exc})") from exc
    return path


def write_report(report: StudyReport, folder: str | Path) -> Path:
    """Write ``<folder>/<study key>.html`` (atomically: never a half-written page); returns its path."""
    path = check_report_dir(folder) / f"{report.study}.html"
    with atomic_path(path) as tmp:
        tmp.write_text(render_html(report), encoding="utf-8")
    return path
