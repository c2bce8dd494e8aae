"""Figures 4 and 5 of the paper and ROC curves, as PNG (matplotlib, Agg backend: no display).

Each function takes a tidy table and returns a matplotlib Figure; the caller saves it (atomically)
and closes it, so figures can also be logged to MLflow or shown in a notebook.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: DVC stages and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from virtual_biopsy.core.atomic import atomic_path  # noqa: E402
from virtual_biopsy.core.config import ACR_CATEGORIES  # noqa: E402
from virtual_biopsy.evaluation.settings import SETTINGS  # noqa: E402
from virtual_biopsy.evaluation.tables import METRIC_LABELS, METRIC_NAMES  # noqa: E402

ROBUSTNESS_STYLE = {"F": ("tab:grey", "--"), "C*": ("tab:orange", "-"), "F+C*": ("tab:blue", "-")}


def figure4(table_a1: pd.DataFrame) -> Figure:
    """Figure 4: per metric, bars per architecture and setting with SEM error bars (×100 scale)."""
    archs = list(dict.fromkeys(table_a1["arch"]))
    settings = [s for s in SETTINGS if s in set(table_a1["setting"])]
    fig, axes = plt.subplots(1, len(METRIC_NAMES), figsize=(4.5 * len(METRIC_NAMES), 3.8), squeeze=False)
    width = 0.8 / max(len(settings), 1)
    x = np.arange(len(archs))
    for ax, metric in zip(axes[0], METRIC_NAMES):
        for i, setting in enumerate(settings):
            rows = table_a1[table_a1["setting"] == setting].set_index("arch").reindex(archs)
            ax.bar(x + (i - (len(settings) - 1) / 2) * width, rows[f"{metric}_mean"], width,
                   yerr=rows[f"{metric}_sem"].fillna(0), capsize=2, label=setting)
        ax.set_xticks(x, archs)
        ax.set_title(METRIC_LABELS[metric])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylim(min(0, ax.get_ylim()[0]), 105)  # headroom for the SEM bars of a perfect score
    axes[0][0].legend(title="setting", fontsize="small")
    fig.suptitle("Test metrics per setting (mean ± SEM over folds)")
    fig.tight_layout()
    return fig


def figure5(robustness: pd.DataFrame) -> Figure:
    """Figure 5: metric vs % synthetic CESM for C*, F+C* and the F reference, per architecture."""
    archs = list(dict.fromkeys(robustness["arch"]))
    fig, axes = plt.subplots(len(archs), len(METRIC_NAMES), figsize=(4.5 * len(METRIC_NAMES), 3.2 * len(archs)),
                             squeeze=False)
    for row, arch in enumerate(archs):
        for col, metric in enumerate(METRIC_NAMES):
            ax = axes[row][col]
            for setting, (color, style) in ROBUSTNESS_STYLE.items():
                line = robustness[(robustness["arch"] == arch) & (robustness["setting"] == setting)
                                  & (robustness["metric"] == metric)].sort_values("share")
                if line.empty:
                    continue
                mean, sem = line["mean"].to_numpy() * 100, line["sem"].fillna(0).to_numpy() * 100
                ax.plot(line["share"], mean, style, color=color, marker="o", markersize=3, label=setting)
                ax.fill_between(line["share"], mean - sem, mean + sem, color=color, alpha=0.15)
            ax.set_title(f"{arch}: {METRIC_LABELS[metric]}")
            ax.set_xlabel("synthetic CESM (% of test patients)")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def roc_points(probabilities: pd.DataFrame) -> pd.DataFrame:
    """ROC curves per arch and setting, test lesions of all folds pooled: columns arch, setting, fpr, tpr.

    Each lesion is in exactly one fold's test set, so pooling gives one fused probability per
    lesion. A group with one class only has no curve and is left out.
    """
    frames = []
    for (arch, setting), group in probabilities.groupby(["arch", "setting"], sort=False):
        labels = group["label"].to_numpy()
        if labels.min() == labels.max():
            continue
        fpr, tpr, _ = roc_curve(labels, group["p"].to_numpy())
        frames.append(pd.DataFrame({"arch": arch, "setting": setting, "fpr": fpr, "tpr": tpr}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["arch", "setting", "fpr", "tpr"])


def roc_figure(points: pd.DataFrame) -> Figure:
    """One panel per architecture, one ROC curve per setting (pooled over folds)."""
    archs = list(dict.fromkeys(points["arch"])) or ["(none)"]
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for setting, curve in points[points["arch"] == arch].groupby("setting", sort=False):
            ax.plot(curve["fpr"], curve["tpr"], label=setting)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle=":")
        ax.set(title=f"{arch}: ROC (test, folds pooled)", xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return fig


def reliability_figure(points: pd.DataFrame) -> Figure:
    """Reliability diagrams: one panel per architecture x setting, before and after calibration
    (observed malignant fraction against mean p per bin; the diagonal is perfect calibration)."""
    panels = list(dict.fromkeys(zip(points["arch"], points["setting"]))) or [("(none)", "")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2), squeeze=False)
    for ax, (arch, setting) in zip(axes[0], panels):
        panel = points[(points["arch"] == arch) & (points["setting"] == setting)]
        for label, curve in panel.groupby("calibration", sort=False):
            ax.plot(curve["mean_p"], curve["observed"], marker="o", markersize=3, label=label)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle=":")
        ax.set(title=f"{arch} {setting}", xlabel="mean p (bin)", ylabel="observed malignant", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize="x-small", loc="upper left")
    fig.suptitle("Reliability on the test lesions, before and after temperature scaling", fontsize="small")
    fig.tight_layout()
    return fig


def sample_grid(le: np.ndarray, des: np.ndarray, synthetic: np.ndarray) -> np.ndarray:
    """uint8 image: one row per pair, columns LE | real DES | synthetic DES, 2 px gaps."""
    rows = []
    for a, b, c in zip(le, des, synthetic):
        gap = np.ones((a.shape[0], 2), dtype=np.float32)
        rows.append(np.concatenate([a, gap, b, gap, c], axis=1))
        rows.append(np.ones((2, rows[-1].shape[1]), dtype=np.float32))
    grid = np.concatenate(rows[:-1], axis=0)
    return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


LESION_OUTLINE = {"colors": "#ff5a36", "linewidths": 0.7}  # drawn over every panel of a lesion example


def figure3(path: Path, view: str, examples: list[tuple]) -> None:
    """Paper Figure 3 for one view: FFDM input | real CESM | synthetic CESM, one row per ACR category.

    ``examples``: (ACR, LE, DES, synthetic[, lesion mask]); a non-empty mask is outlined on all
    three panels, so the reader sees whether the synthetic image enhances where the lesion is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 3, figsize=(6.6, 2.2 * len(examples)), squeeze=False)
    for row, (acr, le, des, synthetic, *rest) in enumerate(examples):
        mask = rest[0] if rest else None
        for col, (title, image) in enumerate((("FFDM (input)", le), ("real CESM", des), ("synthetic CESM", synthetic))):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            if mask is not None and np.any(mask):
                ax.contour(np.asarray(mask, dtype=np.float32), levels=[0.5], **LESION_OUTLINE)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"ACR {acr}", fontsize=9)
    fig.suptitle(f"{view}: out-of-fold synthetic CESM (test patients)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def figure3_examples(test_sets: list[tuple[pd.DataFrame, np.ndarray]], images: np.ndarray,
                     masks: np.ndarray | None = None) -> list[tuple]:
    """One test pair per ACR category (early-phase lesion pairs preferred), with its out-of-fold G(LE)
    and, with ``masks``, the DES image's lesion mask."""
    candidates = []
    for pairs, synthetic in test_sets:
        for i, pair in pairs.iterrows():
            candidates.append((pair, synthetic[i]))
    examples = []
    for acr in (*ACR_CATEGORIES, ""):
        matching = [(p, s) for p, s in candidates if _acr(p["acr"]) == acr]
        if not matching:
            continue
        matching.sort(key=lambda ps: (ps[0]["phase"] != "early", ps[0]["label"] not in ("malignant", "benign"),
                                      ps[0]["pair_key"]))
        pair, synthetic = matching[0]
        mask = () if masks is None else (np.asarray(masks[pair["des_row"]]),)
        examples.append((acr or "n/r", images[pair["le_row"]], images[pair["des_row"]], synthetic, *mask))
    return examples


def _acr(value: Any) -> str:
    return "" if pd.isna(value) else str(value)
