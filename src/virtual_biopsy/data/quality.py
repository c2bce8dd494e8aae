"""Data-quality suites (great-expectations 1.x) over the manifest and the processed image array.

Four tables are validated, each by its own expectation suite:

``manifest``       the ingest manifest, one row per image, plus a derived ``has_des_partner`` flag
``lesion_images``  early-phase LE images with a biopsy label (the virtual-biopsy cohort), with a
                   derived ``is_malignant`` (0/1) and ``has_both_views`` flag
``image_stats``    per-image statistics of ``data/processed/images.npy`` (:func:`image_stats`),
                   joined to the processed index so failures name the image id
``processed_index`` the processed index (its rows must be manifest images)

Every expectation carries a stable name (``meta.name``, shown in Data Docs) and GX's own
``severity``: ``critical`` stops the pipeline, ``warning`` is recorded and the pipeline goes on.
Cross-row facts (LE/DES partners, both views) are turned into per-row flags before validation
because GX expectations look at one table at a time.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from virtual_biopsy.core.config import (ACR_CATEGORIES, LABELS, LATERALITIES, MODALITIES, PHASES, VIEWS,
                                   ValidateDataConfig)
from virtual_biopsy.data.layout import MANIFEST_COLUMNS

CRITICAL = "critical"
WARNING = "warning"
LESION_LABELS = ("malignant", "benign")
# Columns that identify or classify an image: a null here makes the row unusable.
REQUIRED_NON_NULL = ("image_id", "patient_id", "study_id", "laterality", "view", "modality", "phase",
                     "label", "pair_key")
IMAGE_STATS_COLUMNS = ("row", "height", "width", "mean", "std", "min", "max", "finite", "background_edge_mean")
# Preprocessing pads the side away from the chest wall with background and flips every breast to
# one orientation, so one outer column strip of a processed image is air: dark after windowing
# (0.0 on the embedded data). An inverted image has it bright (>= 0.37 there) while its mean can
# stay inside image_mean_range, so the darker edge strip is what catches inversion.
BACKGROUND_EDGE_MAX = 0.2
EDGE_STRIP = 16        # the strip is 1/16 of the width
EXAMPLES = 5           # example failing values/ids kept per expectation
STATS_CHUNK = 256      # images read from the memmap at once


class QualityError(ValueError):
    """An input of the validation cannot be read as the contract says (wrong array rank, etc.)."""


# --------------------------------------------------------------------------------------------
# Per-image statistics
# --------------------------------------------------------------------------------------------
def image_stats(images: np.ndarray, chunk: int = STATS_CHUNK) -> pd.DataFrame:
    """One row per image of an (N, H, W) array: row, height, width, mean, std, min, max, finite,
    background_edge_mean (see BACKGROUND_EDGE_MAX).

    mean/std/min/max ignore non-finite pixels so one NaN does not hide a blank or saturated
    image; ``finite`` says whether every pixel is finite. Reads ``chunk`` images at a time so a
    memory-mapped array is never loaded whole.
    """
    if images.ndim != 3:
        raise QualityError(f"processed images must be an (N, H, W) array, got shape {images.shape}")
    n, height, width = images.shape
    parts = []
    for start in range(0, n, chunk):
        block = np.asarray(images[start:start + chunk], dtype=np.float64)
        finite = np.isfinite(block)
        masked = np.where(finite, block, np.nan)
        with np.errstate(all="ignore"), _all_nan_ok():
            parts.append(pd.DataFrame({
                "row": np.arange(start, start + len(block)),
                "mean": np.nanmean(masked, axis=(1, 2)),
                "std": np.nanstd(masked, axis=(1, 2)),
                "min": np.nanmin(masked, axis=(1, 2)),
                "max": np.nanmax(masked, axis=(1, 2)),
                "finite": finite.all(axis=(1, 2)),
                "background_edge_mean": _darker_edge_mean(masked),
            }))
    stats = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(IMAGE_STATS_COLUMNS))
    stats.insert(1, "height", height)
    stats.insert(2, "width", width)
    return stats[list(IMAGE_STATS_COLUMNS)]


def _darker_edge_mean(block: np.ndarray) -> np.ndarray:
    """Mean of the darker of the left and right outer column strips of each image."""
    strip = max(1, block.shape[2] // EDGE_STRIP)
    return np.minimum(np.nanmean(block[:, :, :strip], axis=(1, 2)), np.nanmean(block[:, :, -strip:], axis=(1, 2)))


@contextlib.contextmanager
def _all_nan_ok() -> Iterator[None]:
    """numpy warns on all-NaN slices; such an image is reported by the ``finite`` expectation."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield


# --------------------------------------------------------------------------------------------
# Derived tables
# --------------------------------------------------------------------------------------------
def _with_partner_flag(manifest: pd.DataFrame) -> pd.DataFrame:
    """Manifest plus ``has_des_partner``: an FFDM row whose pair_key also has a CESM row."""
    table = manifest.copy()
    if {"pair_key", "modality"} <= set(table.columns):
        des_keys = set(table.loc[table["modality"] == "CESM", "pair_key"].dropna())
        table["has_des_partner"] = table["pair_key"].isin(des_keys)
    return table


def _lesion_images(manifest: pd.DataFrame) -> pd.DataFrame:
    """Early-phase LE images with a biopsy label, plus ``is_malignant`` and ``has_both_views``."""
    needed = {"image_id", "patient_id", "study_id", "laterality", "view", "modality", "phase", "label"}
    if not needed <= set(manifest.columns):
        return pd.DataFrame(columns=["image_id", "is_malignant", "has_both_views"])
    lesions = manifest[(manifest["phase"] == "early") & (manifest["modality"] == "FFDM")
                       & manifest["label"].isin(LESION_LABELS)].copy()
    breast = ["patient_id", "study_id", "laterality"]
    views = lesions.groupby(breast)["view"].transform(lambda v: set(VIEWS) <= set(v))
    lesions["has_both_views"] = views.astype(bool)
    lesions["is_malignant"] = (lesions["label"] == "malignant").astype(float)
    return lesions[["image_id", "patient_id", "label", "is_malignant", "has_both_views"]].reset_index(drop=True)


def _stats_with_ids(stats: pd.DataFrame, index: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Image statistics joined to the processed index (image ids) and marked ``in_manifest``."""
    table = stats.copy()
    ids = index.set_index("row")["image_id"] if {"row", "image_id"} <= set(index.columns) else pd.Series(dtype=str)
    table.insert(0, "image_id", table["row"].map(ids))
    known = set(manifest["image_id"].dropna()) if "image_id" in manifest.columns else set()
    table["in_manifest"] = table["image_id"].isin(known)
    return table


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One expectation with its stable name, table and severity (see :func:`build_checks`)."""

    name: str
    table: str
    severity: str
    expectation_type: str
    kwargs: dict[str, Any]
    columns: tuple[str, ...]   # columns it reads: skipped (schema check fails instead) when absent
    description: str


def build_checks(cfg: ValidateDataConfig, image_size: int, n_index_rows: int) -> list[Check]:
    """Every expectation of the four suites, built from the config and the configured image size."""
    gx_exp = _gx_expectations()
    checks: list[Check] = []

    def add(name, table, severity, expectation, columns, description, **kwargs):
        checks.append(Check(name, table, severity, getattr(gx_exp, expectation).__name__, kwargs,
                            tuple(columns), description))

    # ---- manifest --------------------------------------------------------------------------
    add("manifest_has_required_columns", "manifest", CRITICAL, "ExpectTableColumnsToMatchSet", (),
        "every manifest column of the contract (data/layout.py) is present",
        column_set=list(MANIFEST_COLUMNS), exact_match=False)
    for column in REQUIRED_NON_NULL:
        add(f"{column}_not_null", "manifest", CRITICAL, "ExpectColumnValuesToNotBeNull", (column,),
            f"every image has a {column}", column=column)
    domains = {"view": VIEWS, "laterality": LATERALITIES, "modality": MODALITIES, "phase": PHASES,
               "label": LABELS, "acr": ACR_CATEGORIES}
    for column, domain in domains.items():
        add(f"{column}_in_domain", "manifest", CRITICAL, "ExpectColumnValuesToBeInSet", (column,),
            f"{column} is one of {list(domain)}" + (" (or not reported)" if column == "acr" else ""),
            column=column, value_set=list(domain))
    add("image_id_unique", "manifest", CRITICAL, "ExpectColumnValuesToBeUnique", ("image_id",),
        "image ids (pseudonymous SOPInstanceUIDs) are unique", column="image_id")
    add("lesion_le_has_des_partner", "manifest", CRITICAL, "ExpectColumnValuesToBeInSet",
        ("has_des_partner", "label", "modality"),
        "every lesion-labelled LE image has its DES partner (same pair_key)",
        column="has_des_partner", value_set=[True],
        row_condition=_lesion_le_condition())
    add("age_in_range", "manifest", CRITICAL, "ExpectColumnValuesToBeBetween", ("age",),
        f"ages lie in {list(cfg.age_range)} years", column="age",
        min_value=cfg.age_range[0], max_value=cfg.age_range[1])
    add("age_reported", "manifest", WARNING, "ExpectColumnValuesToNotBeNull", ("age",),
        "every image has the patient's age", column="age")
    add("acr_mostly_reported", "manifest", WARNING, "ExpectColumnValuesToNotBeNull", ("acr",),
        "ACR density is reported for at least half of the images (paper: 80%)", column="acr", mostly=0.5)
    add("patient_count_in_range", "manifest", CRITICAL, "ExpectColumnUniqueValueCountToBeBetween",
        ("patient_id",), f"between {cfg.min_patients} and {cfg.max_patients} patients",
        column="patient_id", min_value=cfg.min_patients, max_value=cfg.max_patients)

    # ---- lesion images (virtual-biopsy cohort) ----------------------------------------------
    add("malignant_share_in_range", "lesion_images", CRITICAL, "ExpectColumnMeanToBeBetween",
        ("is_malignant",), f"malignant share of early-phase lesion LE images lies in {list(cfg.malignant_share_range)}",
        column="is_malignant", min_value=cfg.malignant_share_range[0], max_value=cfg.malignant_share_range[1])
    add("lesion_breast_has_both_views", "lesion_images", WARNING, "ExpectColumnValuesToBeInSet",
        ("has_both_views",), "every lesion breast has a CC and an MLO image (fusion over views works "
        "without one, but the patient counts less)", column="has_both_views", value_set=[True])

    # ---- processed images -------------------------------------------------------------------
    add("index_rows_match_array", "image_stats", CRITICAL, "ExpectTableRowCountToEqual", (),
        f"the processed array holds one image per index row ({n_index_rows})", value=n_index_rows)
    add("processed_images_in_manifest", "image_stats", CRITICAL, "ExpectColumnValuesToBeInSet",
        ("in_manifest",), "every processed image is a manifest image", column="in_manifest", value_set=[True])
    for column in ("height", "width"):
        add(f"processed_{column}_is_configured_size", "image_stats", CRITICAL, "ExpectColumnValuesToBeInSet",
            (column,), f"processed {column} equals preprocess.image_size ({image_size})",
            column=column, value_set=[image_size])
    add("pixels_finite", "image_stats", CRITICAL, "ExpectColumnValuesToBeInSet", ("finite",),
        "every pixel is finite (no NaN or inf)", column="finite", value_set=[True])
    for column in ("min", "max"):
        add(f"pixel_{column}_in_unit_range", "image_stats", CRITICAL, "ExpectColumnValuesToBeBetween", (column,),
            f"per-image {column} pixel value lies in [0, 1]", column=column, min_value=0.0, max_value=1.0)
    add("image_mean_plausible", "image_stats", CRITICAL, "ExpectColumnValuesToBeBetween", ("mean",),
        f"per-image mean lies in {list(cfg.image_mean_range)} (catches blank, saturated, inverted images)",
        column="mean", min_value=cfg.image_mean_range[0], max_value=cfg.image_mean_range[1])
    add("image_std_plausible", "image_stats", CRITICAL, "ExpectColumnValuesToBeBetween", ("std",),
        f"per-image std lies in {list(cfg.image_std_range)} (catches flat and binary-like images)",
        column="std", min_value=cfg.image_std_range[0], max_value=cfg.image_std_range[1])
    add("image_background_dark", "image_stats", CRITICAL, "ExpectColumnValuesToBeBetween",
        ("background_edge_mean",), f"the darker outer column strip (background) has mean <= {BACKGROUND_EDGE_MAX} "
        "(catches inverted images)", column="background_edge_mean", max_value=BACKGROUND_EDGE_MAX)
    return checks


def _gx_expectations():
    """great_expectations.expectations, imported lazily (the package takes seconds to import)."""
    import great_expectations as gx

    return gx.expectations


def _lesion_le_condition():
    from great_expectations.expectations.row_conditions import Column

    return Column("label").is_in(list(LESION_LABELS)) & (Column("modality") == "FFDM")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """The result of one expectation, in the shape written to reports/validation/results.json."""

    name: str
    suite: str
    severity: str
    success: bool
    expectation: str
    description: str
    observed: Any = None
    unexpected_count: int | None = None
    examples: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class QualityReport:
    outcomes: list[Outcome]

    @property
    def critical_failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.success and o.severity == CRITICAL]

    @property
    def warning_failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.success and o.severity == WARNING]

    @property
    def passed(self) -> bool:
        """True when no critical expectation failed (warnings do not stop the pipeline)."""
        return not self.critical_failures

    def metrics(self) -> dict[str, int]:
        return {"evaluated": len(self.outcomes), "passed": sum(o.success for o in self.outcomes),
                "critical_failed": len(self.critical_failures), "warning_failed": len(self.warning_failures)}

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, **self.metrics(), "expectations": [asdict(o) for o in self.outcomes]}

    def failure_message(self) -> str:
        """One line per failed critical expectation: name, what it expects, observed, examples."""
        lines = [f"{len(self.critical_failures)} critical data-quality expectation(s) failed:"]
        for o in self.critical_failures:
            detail = f"observed {o.observed}" if o.observed is not None else f"{o.unexpected_count} row(s)"
            lines.append(f"  {o.suite}.{o.name}: expected {o.description}; {detail}; examples {o.examples}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running the suites
# --------------------------------------------------------------------------------------------
def validate(manifest: pd.DataFrame, image_stats_df: pd.DataFrame, cfg: ValidateDataConfig, image_size: int,
             processed_index: pd.DataFrame | None = None, docs_dir: str | Path | None = None) -> QualityReport:
    """Run every suite; return the report. With ``docs_dir``, also write GX Data Docs (static HTML) there.

    ``processed_index`` maps array rows to image ids (data/processed/index.csv); without it the
    manifest's row order is assumed.
    """
    if processed_index is None:
        processed_index = manifest.reset_index(drop=True).assign(row=lambda f: np.arange(len(f)))
    tables = {
        "manifest": _with_partner_flag(manifest),
        "lesion_images": _lesion_images(manifest),
        "image_stats": _stats_with_ids(image_stats_df, processed_index, manifest),
    }
    checks = build_checks(cfg, image_size, n_index_rows=len(processed_index))
    runnable = [c for c in checks if set(c.columns) <= set(tables[c.table].columns)]
    with _gx_workspace(docs_dir) as workspace:
        results = _run_suites(workspace, tables, runnable)
        report = QualityReport([_outcome(check, results[check.name]) for check in runnable])
        if docs_dir is not None:
            _publish_docs(workspace, Path(docs_dir), report)
    return report


@contextlib.contextmanager
def _gx_workspace(docs_dir: str | Path | None) -> Iterator[Path]:
    """A throw-away GX project folder (beside the docs when given, so the copy is a rename-cheap move)."""
    parent = Path(docs_dir).parent if docs_dir is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".gx-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_suites(workspace: Path, tables: dict[str, pd.DataFrame], checks: list[Check]) -> dict[str, dict]:
    """Validate each table with its suite through one Checkpoint; results keyed by check name."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(workspace))
    context.enable_analytics(False)
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("virtual_biopsy")
    results: dict[str, dict] = {}
    for table, frame in tables.items():
        suite = gx.ExpectationSuite(name=table)
        for check in (c for c in checks if c.table == table):
            cls = getattr(gx.expectations, check.expectation_type)
            suite.add_expectation(cls(**check.kwargs, severity=check.severity, description=check.description,
                                      meta={"name": check.name, "severity": check.severity}))
        suite = context.suites.add(suite)
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{table}_checkpoint", validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE", "partial_unexpected_count": EXAMPLES,
                           **({"unexpected_index_column_names": ["image_id"]} if "image_id" in frame else {})},
        ))
        run = checkpoint.run(batch_parameters={"dataframe": _gx_friendly(frame)})
        for suite_result in run.run_results.values():
            for result in suite_result.results:
                payload = result.to_json_dict()
                results[payload["expectation_config"]["meta"]["name"]] = payload
    return results


def _gx_friendly(frame: pd.DataFrame) -> pd.DataFrame:
    """Plain object/number columns: GX's pandas engine predates pandas 3's default string dtype."""
    return frame.astype({c: object for c in frame.columns if pd.api.types.is_string_dtype(frame[c])})


def _outcome(check: Check, payload: dict) -> Outcome:
    result = payload.get("result") or {}
    if payload.get("exception_info", {}).get("raised_exception"):
        observed: Any = f"error: {payload['exception_info'].get('exception_message')}"
    else:
        observed = result.get("observed_value")
    examples = [_plain(e) for e in (result.get("partial_unexpected_index_list") or
                                    result.get("partial_unexpected_list") or [])][:EXAMPLES]
    return Outcome(name=check.name, suite=check.table, severity=check.severity, success=bool(payload["success"]),
                   expectation=check.expectation_type, description=check.description, observed=_plain(observed),
                   unexpected_count=result.get("unexpected_count"), examples=examples)


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a GX result value (numpy scalars, dicts of them)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _publish_docs(workspace: Path, docs_dir: Path, report: QualityReport) -> None:
    """Copy GX's Data Docs site to ``docs_dir`` with an offline ``index.html`` in front of it.

    GX's own index draws its list with JavaScript from CDNs, so it is blank without network (as
    on a hospital workstation or in CI). It is kept as ``gx_index.html``; the ``index.html`` put
    in its place is plain HTML: the verdict, every expectation, and links to GX's per-suite pages
    (which render server-side and read fine offline).
    """
    from virtual_biopsy.core.atomic import atomic_dir

    site = workspace / "gx" / "uncommitted" / "data_docs" / "local_site"
    if not (site / "index.html").exists():
        raise QualityError(f"great-expectations built no Data Docs under {site}")
    with atomic_dir(docs_dir) as tmp:
        shutil.copytree(site, tmp, dirs_exist_ok=True)
        (tmp / "index.html").rename(tmp / "gx_index.html")
        suite_pages = {page.relative_to(tmp).parts[1]: page.relative_to(tmp).as_posix()
                       for page in sorted((tmp / "validations").rglob("*.html"))}
        (tmp / "index.html").write_text(overview_html(report, suite_pages))


def overview_html(report: QualityReport, suite_pages: dict[str, str]) -> str:
    """Self-contained HTML summary of a report (no scripts, no external assets)."""
    from html import escape

    metrics = report.metrics()
    verdict = "PASSED" if report.passed else "FAILED"
    links = " · ".join(f'<a href="{escape(href)}">{escape(suite)}</a>' for suite, href in suite_pages.items())
    rows = []
    for o in sorted(report.outcomes, key=lambda o: (o.success, o.severity != CRITICAL, o.suite, o.name)):
        status = "pass" if o.success else f"FAIL ({o.severity})"
        css = "ok" if o.success else o.severity
        shown = o.observed if o.observed is not None else o.unexpected_count
        rows.append(f'<tr class="{css}"><td>{status}</td><td>{escape(o.suite)}</td><td><b>{escape(o.name)}</b>'
                    f"<br><small>{escape(o.description)}</small></td><td>{escape(o.severity)}</td>"
                    f"<td>{escape(str(shown))}</td><td><small>{escape(json.dumps(o.examples, default=str))}"
                    "</small></td></tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Data quality: {verdict}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
h1 span {{ padding: .1em .4em; border-radius: .2em; color: white; background: {"#2e7d32" if report.passed else "#c62828"}; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border-bottom: 1px solid #ddd; padding: .35em .6em; text-align: left; vertical-align: top; }}
tr.critical td:first-child {{ color: #c62828; font-weight: bold; }} tr.warning td:first-child {{ color: #b26a00; font-weight: bold; }}
tr.ok td:first-child {{ color: #2e7d32; }} small {{ color: #555; }}
</style></head><body>
<h1>Data quality <span>{verdict}</span></h1>
<p>{metrics['passed']} of {metrics['evaluated']} expectations passed; {metrics['critical_failed']} critical and
{metrics['warning_failed']} warning failure(s). A critical failure stops the pipeline; a warning is recorded.</p>
<p>Great Expectations validation pages per suite: {links} (<a href="gx_index.html">GX index</a>, needs network)</p>
<table><tr><th>result</th><th>suite</th><th>expectation</th><th>severity</th><th>observed / unexpected</th><th>examples</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
