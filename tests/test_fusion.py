"""MCC-weighted late fusion (paper eq. 7-8) and its policy for uninformative inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from virtual_biopsy.models.fusion import UNWEIGHTED_MEAN, fuse, fusion_weights


def test_views_then_modalities_match_a_hand_computed_example_with_negative_mcc() -> None:
    # Eq. 7, FFDM: MCC_CC = 0.2, MCC_MLO = 0.6 -> p_F = (0.2*p_CC + 0.6*p_MLO) / 0.8
    p_f = fuse({"CC": [0.9, 0.1], "MLO": [0.5, 0.3]}, fusion_weights({"CC": 0.2, "MLO": 0.6}))
    assert p_f == pytest.approx([(0.2 * 0.9 + 0.6 * 0.5) / 0.8, (0.2 * 0.1 + 0.6 * 0.3) / 0.8])  # [0.6, 0.25]
    # Eq. 7, CESM: MCC_MLO = -0.4 is worse than chance and gets weight 0 -> p_C = p_CC.
    w_c = fusion_weights({"CC": 0.5, "MLO": -0.4})
    assert w_c.weights == {"CC": 0.5, "MLO": 0.0} and w_c.clipped == ("MLO",) and w_c.fallback is None
    p_c = fuse({"CC": [0.8, 0.4], "MLO": [0.0, 1.0]}, w_c)
    assert p_c == pytest.approx([0.8, 0.4])
    # Eq. 8: MCC_F = 0.25, MCC_C = 0.75 -> p = 0.25*p_F + 0.75*p_C
    p = fuse({"F": p_f, "C": p_c}, fusion_weights({"F": 0.25, "C": 0.75}))
    assert p == pytest.approx([0.25 * 0.6 + 0.75 * 0.8, 0.25 * 0.25 + 0.75 * 0.4])  # [0.75, 0.3625]


def test_fused_probabilities_stay_in_unit_interval_for_any_mcc() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        probs = {k: rng.random(20) for k in ("a", "b", "c")}
        mccs = dict(zip(probs, rng.uniform(-1, 1, 3)))
        fused = fuse(probs, fusion_weights(mccs))
        assert ((fused >= 0) & (fused <= 1)).all()
        lo = np.min(np.vstack(list(probs.values())), axis=0)
        hi = np.max(np.vstack(list(probs.values())), axis=0)
        assert ((fused >= lo - 1e-12) & (fused <= hi + 1e-12)).all()


def test_all_vanishing_weights_fall_back_to_unweighted_mean_and_say_so() -> None:
    w = fusion_weights({"CC": 0.0, "MLO": float("nan")})
    assert w.fallback == UNWEIGHTED_MEAN and "positive validation MCC" in w.reason
    assert "unweighted_mean" in w.describe()
    assert fuse({"CC": [0.2, 1.0], "MLO": [0.6, 0.0]}, w) == pytest.approx([0.4, 0.5])


def test_missing_view_renormalises_over_the_views_a_lesion_has() -> None:
    w = fusion_weights({"CC": 0.3, "MLO": 0.0001})
    fused = fuse({"CC": [0.9, np.nan, np.nan], "MLO": [0.1, 0.4, np.nan]}, w)
    assert fused[0] == pytest.approx((0.3 * 0.9 + 0.0001 * 0.1) / 0.3001)
    assert fused[1] == pytest.approx(0.4)
    assert math.isnan(fused[2])


def test_lesion_whose_present_inputs_all_weigh_zero_gets_their_plain_mean() -> None:
    w = fusion_weights({"CC": 0.4, "MLO": -0.1})
    assert fuse({"CC": [np.nan], "MLO": [0.7]}, w) == pytest.approx([0.7])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fusion_weights({}), "at least one input"),
        (lambda: fuse({"CC": [0.1]}, {"MLO": 1.0}), "no fusion weight"),
        (lambda: fuse({"CC": [0.1], "MLO": [0.2, 0.3]}, {"CC": 1, "MLO": 1}), "aligned"),
        (lambda: fuse({"CC": [1.5]}, {"CC": 1.0}), r"\[0, 1\]"),
        (lambda: fuse({"CC": [0.5], "MLO": [0.5]}, {"CC": 1.0, "MLO": -1.0}), ">= 0"),
    ],
)
def test_bad_fusion_inputs_raise_errors_that_say_why(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
