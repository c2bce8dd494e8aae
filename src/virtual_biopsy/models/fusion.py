"""MCC-weighted late fusion (paper 5.1.3): views within a modality (eq. 7), then modalities (eq. 8).

Both levels are the same weighted mean

    p = sum_k p_k * w_k / sum_k w_k                                  (eq. 7 over views k = CC, MLO;
                                                                      eq. 8 over modalities k = F, C)

with weights from the validation MCC of each input (paper: MCC_{m,v}, MCC_m). Pure functions:
they see probabilities and numbers, never files, test data or MLflow, so weights can only come
from whatever validation predictions the caller passes to :func:`fusion_weights`.

Weight policy (the paper leaves the degenerate cases open):

* ``w_k = max(MCC_k, 0)``; an undefined (nan) MCC counts as 0. A classifier with MCC <= 0 is no
  better than chance on validation, so it gets no say. A negative weight would be worse than
  useless: with weights of mixed sign the denominator can approach 0 or change sign and the
  "probability" leaves [0, 1]; clipping keeps every fused value a convex combination of its
  inputs, hence inside [0, 1].
* If every weight vanishes, every input is uninformative on validation; the fused output falls
  back to the unweighted mean (no input is preferred when none earns it) and
  :class:`FusionWeights` records ``fallback="unweighted_mean"`` so reports can say so.
* An input may be missing for a lesion (nan probability, e.g. a study without an MLO image):
  that lesion's weights are renormalised over the inputs it has; if all of those weigh 0, its
  output is the unweighted mean of what it has.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np

UNWEIGHTED_MEAN = "unweighted_mean"


@dataclass(frozen=True)
class FusionWeights:
    """Weights of one fusion level, with the validation MCCs they came from.

    ``fallback`` is None when the MCC weights were used, else the name of the fallback
    (``"unweighted_mean"``) and ``reason`` says why.
    """

    weights: dict[Hashable, float]
    mcc: dict[Hashable, float]
    fallback: str | None = None
    reason: str | None = None
    clipped: tuple[Hashable, ...] = field(default=())

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``CC=0.41 MLO=0.00 (MLO: MCC <= 0)``."""
        parts = " ".join(f"{k}={w:.2f}" for k, w in self.weights.items())
        notes = []
        if self.clipped:
            notes.append(", ".join(map(str, self.clipped)) + ": MCC <= 0 or undefined")
        if self.fallback:
            notes.append(f"{self.fallback}: {self.reason}")
        return parts + (f" ({'; '.join(notes)})" if notes else "")


def fusion_weights(validation_mcc: Mapping[Hashable, float]) -> FusionWeights:
    """Weights for eq. 7 or eq. 8 from each input's validation MCC (policy: module docstring)."""
    if not validation_mcc:
        raise ValueError("fusion needs at least one input, got no validation MCC")
    weights: dict[Hashable, float] = {}
    clipped = []
    for key, value in validation_mcc.items():
        value = float(value)
        if math.isnan(value) or value <= 0:
            clipped.append(key)
            weights[key] = 0.0
        else:
            weights[key] = value
    mccs = {k: float(v) for k, v in validation_mcc.items()}
    if sum(weights.values()) > 0:
        return FusionWeights(weights, mccs, clipped=tuple(clipped))
    uniform = {k: 1.0 for k in weights}
    return FusionWeights(
        uniform, mccs, fallback=UNWEIGHTED_MEAN,
        reason="no input has a positive validation MCC", clipped=tuple(clipped),
    )


def fuse(probabilities: Mapping[Hashable, object], weights: Mapping[Hashable, float] | FusionWeights) -> np.ndarray:
    """Weighted mean of aligned probability arrays (eq. 7 / eq. 8).

    ``probabilities[k][i]`` is input k's probability of malignancy for lesion i (nan: input k is
    missing for that lesion). ``weights`` maps every key to a weight >= 0 (as
    :func:`fusion_weights` makes them). Returns one probability per lesion, in [0, 1]; nan only
    for a lesion that has no input at all.
    """
    if isinstance(weights, FusionWeights):
        weights = weights.weights
    if not probabilities:
        raise ValueError("fuse needs at least one input")
    missing = [k for k in probabilities if k not in weights]
    if missing:
        raise ValueError(f"no fusion weight for input(s) {missing}; weights are given for {list(weights)}")
    keys = list(probabilities)
    arrays = [np.asarray(probabilities[k], dtype=np.float64).ravel() for k in keys]
    lengths = {k: a.size for k, a in zip(keys, arrays)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs to fuse must be aligned per lesion, got lengths {lengths}")
    stacked = np.vstack(arrays)
    present = ~np.isnan(stacked)
    if (stacked[present] < 0).any() or (stacked[present] > 1).any():
        raise ValueError("probabilities to fuse must lie in [0, 1]")
    w = np.array([float(weights[k]) for k in keys])
    if (w < 0).any() or np.isnan(w).any():
        raise ValueError(f"fusion weights must be >= 0, got {dict(zip(keys, w))}; use fusion_weights()")

    values = np.where(present, stacked, 0.0)
    lesion_w = np.where(present, w[:, None], 0.0)
    total = lesion_w.sum(axis=0)
    weighted = (lesion_w * values).sum(axis=0)
    count = present.sum(axis=0)
    unweighted = values.sum(axis=0) / np.maximum(count, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fused = np.where(total > 0, weighted / total, unweighted)
    fused[count == 0] = np.nan
    # Rounding can push a convex combination of values at the bounds a hair outside them.
    return np.clip(fused, 0.0, 1.0)
