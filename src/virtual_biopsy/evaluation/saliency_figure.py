"""A few test lesion images with their Grad-CAM map and the lesion outline (reports/saliency/examples.png).

Agg backend (no display); the caller passes the examples and a path, the PNG is written atomically.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: DVC stages and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from virtual_biopsy.core.atomic import atomic_path  # noqa: E402
from virtual_biopsy.evaluation.figures import LESION_OUTLINE  # noqa: E402


def saliency_examples_figure(path: Path, examples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """One column per example ``(title, image, map, lesion mask)``: the image, then the map over it
    (jet, alpha 0.45), the lesion outlined on both and the map's maximum marked with a cross."""
    n = max(len(examples), 1)
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 4.2), squeeze=False)
    for col, (title, image, saliency, mask) in enumerate(examples):
        peak = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
        for row in (0, 1):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            if row == 1:
                ax.imshow(saliency, cmap="jet", alpha=0.45, vmin=0, vmax=1)
                ax.plot(peak[1], peak[0], marker="x", color="white", markersize=6)
            if np.any(mask):
                ax.contour(np.asarray(mask, dtype=np.float32), levels=[0.5], **LESION_OUTLINE)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][col].set_title(title, fontsize=8)
    if not examples:
        axes[0][0].text(0.5, 0.5, "no test lesion image", ha="center", va="center")
    fig.suptitle("Grad-CAM of the malignant logit on test lesion images (outline: lesion, x: maximum)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
