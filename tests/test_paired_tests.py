"""Paired AUC tests: DeLong agrees with its definition and scikit-learn, the bootstrap resamples patients."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from virtual_biopsy.evaluation import paired_tests as pt
from virtual_biopsy.evaluation.paired_tests import (
    PAIRED_COLUMNS,
    PAIRS,
    bootstrap_auc_difference,
    delong_test,
    paired_comparisons,
    paired_comparisons_markdown,
)

SEEDS = range(8)
SETTINGS = ("F", "C", "Ĉ", "F+C", "F+Ĉ")


def _case(seed: int, n: int = 60, rho: float = 0.0, ties: bool = False):
    """Labels and two predictors whose noise has correlation rho; rounding creates ties."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = (0, 1)  # both classes always present
    noise = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], n)
    a = 1 / (1 + np.exp(-(1.2 * y + noise[:, 0])))
    b = 1 / (1 + np.exp(-(0.6 * y + noise[:, 1])))
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return y, a, b


def _reference_delong_variance(y, a, b) -> float:
    """var(AUC_a - AUC_b) from DeLong, DeLong & Clarke-Pearson (1988), O(m n) placement values.

    psi(X, Y) = 1, 1/2, 0 for X > Y, X = Y, X < Y; V10 and V01 are the means of psi over the other
    class; S10 and S01 their covariances (divisor m - 1 and n - 1) around the AUCs.
    """
    y = np.asarray(y)
    scores = np.vstack([a, b])
    x, z = scores[:, y == 1], scores[:, y == 0]
    m, n = x.shape[1], z.shape[1]
    psi = np.zeros((2, m, n))
    for r in range(2):
        for i in range(m):
            for j in range(n):
                psi[r, i, j] = 1.0 if x[r, i] > z[r, j] else 0.5 if x[r, i] == z[r, j] else 0.0
    theta = psi.sum(axis=(1, 2)) / (m * n)
    v10 = psi.sum(axis=2) / n
    v01 = psi.sum(axis=1) / m
    s10 = np.array([[sum((v10[r, i] - theta[r]) * (v10[s, i] - theta[s]) for i in range(m)) / (m - 1)
                     for s in range(2)] for r in range(2)])
    s01 = np.array([[sum((v01[r, j] - theta[r]) * (v01[s, j] - theta[s]) for j in range(n)) / (n - 1)
                     for s in range(2)] for r in range(2)])
    s = s10 / m + s01 / n
    return float(s[0, 0] + s[1, 1] - 2 * s[0, 1])


# --- DeLong --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_delong_aucs_equal_scikit_learn(seed: int, ties: bool) -> None:
    y, a, b = _case(seed, ties=ties)
    result = delong_test(y, a, b)
    assert result.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert result.difference == pytest.approx(result.auc_a - result.auc_b, abs=1e-15)
    assert (result.n_malignant, result.n_benign) == (int(y.sum()), int((y == 0).sum()))


@pytest.mark.parametrize(("rho", "ties"), [(0.0, False), (0.8, False), (0.95, True), (-0.5, True)])
@pytest.mark.parametrize("seed", SEEDS)
def test_delong_variance_equals_placement_value_definition(seed: int, rho: float, ties: bool) -> None:
    y, a, b = _case(seed, n=45, rho=rho, ties=ties)
    result = delong_test(y, a, b)
    reference = _reference_delong_variance(y, a, b)
    assert reference > 0
    assert result.se**2 == pytest.approx(reference, abs=1e-10)
    assert result.z == pytest.approx(result.difference / math.sqrt(reference), rel=1e-8)


def test_delong_identical_predictors_give_zero_difference_and_p_one() -> None:
    y, a, _ = _case(1, ties=True)
    result = delong_test(y, a, a.copy())
    assert result.difference == 0.0
    assert result.se == 0.0
    assert (result.z, result.p_value) == (0.0, 1.0)


def test_delong_same_ranks_count_as_identical_predictors() -> None:
    y, a, _ = _case(2)
    result = delong_test(y, a, a**3)  # a monotone transform: the same ROC curve
    assert (result.difference, result.z, result.p_value) == (0.0, 0.0, 1.0)


def test_delong_zero_variance_with_a_difference_gives_nan_not_zero_p() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    perfect = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    result = delong_test(y, perfect, 1 - perfect)  # AUC 1 against AUC 0, every component constant
    assert result.difference == 1.0
    assert math.isnan(result.z) and math.isnan(result.p_value)


def test_delong_one_lesion_of_a_class_has_undefined_variance() -> None:
    y = np.array([0, 0, 0, 0, 1])
    result = delong_test(y, [0.1, 0.2, 0.3, 0.9, 0.8], [0.2, 0.1, 0.4, 0.3, 0.5])
    assert result.auc_a == pytest.approx(roc_auc_score(y, [0.1, 0.2, 0.3, 0.9, 0.8]))
    assert math.isnan(result.se) and math.isnan(result.z) and math.isnan(result.p_value)


@pytest.mark.parametrize("seed", SEEDS)
def test_delong_swapping_predictors_flips_z_and_keeps_p(seed: int) -> None:
    y, a, b = _case(seed, rho=0.5)
    ab, ba = delong_test(y, a, b), delong_test(y, b, a)
    assert ba.z == pytest.approx(-ab.z, rel=1e-12)
    assert ba.difference == pytest.approx(-ab.difference, abs=1e-15)
    assert ba.p_value == pytest.approx(ab.p_value, rel=1e-12)
    assert ba.se == pytest.approx(ab.se, rel=1e-12)


def test_delong_clearly_better_predictor_is_significant() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    good = 2.0 * y + rng.normal(0, 1, 300)
    noise = 0.2 * y + rng.normal(0, 1, 300)
    result = delong_test(y, good, noise)
    assert result.difference > 0.2
    assert result.p_value < 0.01


def test_delong_p_values_of_two_noise_predictors_are_roughly_uniform() -> None:
    rng = np.random.default_rng(11)
    p_values = []
    for _ in range(200):
        y = rng.integers(0, 2, 80)
        y[:2] = (0, 1)
        shared = rng.normal(0, 1, 80)  # correlated predictors, neither informative
        p_values.append(delong_test(y, shared + rng.normal(0, 1, 80), shared + rng.normal(0, 1, 80)).p_value)
    p_values = np.array(p_values)
    assert 0.01 <= (p_values < 0.05).mean() <= 0.12
    assert 0.35 <= (p_values < 0.5).mean() <= 0.65


@pytest.mark.parametrize(
    ("y", "a", "b", "message"),
    [
        ([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3], "p_b has 3 values, y_true 4"),
        ([0, 1, 0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3], "p_a has 4 values, y_true 3"),
        ([0, 1, 2, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], "y_true: labels must be 0"),
        ([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], "only malignant"),
        ([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], "only benign"),
        ([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], "p_a: probabilities must be finite"),
        ([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, np.inf, 0.4], "p_b: probabilities must be finite"),
        ([0, 1, 0, 1], [[0.1, 0.2], [0.3, 0.4]], [0.1, 0.2, 0.3, 0.4], "p_a: expected a 1-D array"),
        ([[0, 1], [0, 1]], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], "y_true: expected a 1-D array"),
    ],
)
def test_delong_bad_inputs_raise_naming_the_argument(y, a, b, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        delong_test(y, a, b)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        bootstrap_auc_difference(y, a, b, groups=np.arange(len(y)), n_boot=10)


def test_delong_accepts_boolean_labels() -> None:
    y, a, b = _case(3)
    assert delong_test(y.astype(bool), a, b) == delong_test(y, a, b)


# --- patient bootstrap ---------------------------------------------------------------------------
def _patients(seed: int, n_patients: int = 50, copies: int = 1):
    """One lesion per patient, each row repeated ``copies`` times (identical copies, same patient)."""
    y, a, b = _case(seed, n=n_patients, rho=0.3)
    patient = np.arange(n_patients)
    return tuple(np.repeat(v, copies) for v in (y, a, b, patient))


def _pairwise_auc(y, s) -> float:
    """AUC from its definition: share of (malignant, benign) pairs ordered right, ties one half."""
    x, z = s[y == 1][:, None], s[y == 0][None, :]
    return float(((x > z) + 0.5 * (x == z)).mean())


def _reference_bootstrap(y, a, b, groups, n_boot: int, seed: int, level: float):
    """Loop over resamples: draw patients as documented, concatenate their rows, pairwise AUC."""
    codes, uniques = pd.factorize(pd.Series(groups))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniques), size=(n_boot, len(uniques)))
    rows_of = [np.flatnonzero(codes == g) for g in range(len(uniques))]
    diffs = []
    for drawn in draws:
        rows = np.concatenate([rows_of[g] for g in drawn])
        if len(set(y[rows])) < 2:
            continue
        diffs.append(_pairwise_auc(y[rows], a[rows]) - _pairwise_auc(y[rows], b[rows]))
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return low, high, len(diffs)


def test_bootstrap_equals_a_loop_over_drawn_patients() -> None:
    rng = np.random.default_rng(5)
    groups = rng.integers(0, 25, 60)  # several lesions per patient, in no particular order
    y, a, b = _case(5, n=60, ties=True)
    result = bootstrap_auc_difference(y, a, b, groups, n_boot=300, seed=3, level=0.9)
    low, high, n_used = _reference_bootstrap(y, a, b, groups, n_boot=300, seed=3, level=0.9)
    assert result.n_used == n_used
    assert (result.low, result.high) == pytest.approx((low, high), abs=1e-12)
    assert result.difference == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert (result.level, result.n_boot) == (0.9, 300)


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    y, a, b, g = _patients(0)
    first = bootstrap_auc_difference(y, a, b, g, n_boot=500, seed=42)
    assert bootstrap_auc_difference(y, a, b, g, n_boot=500, seed=42) == first
    other = bootstrap_auc_difference(y, a, b, g, n_boot=500, seed=43)
    assert (other.low, other.high) != (first.low, first.high)


@pytest.mark.parametrize("seed", SEEDS)
def test_bootstrap_interval_contains_the_full_data_difference(seed: int) -> None:
    y, a, b, g = _patients(seed, n_patients=80)
    result = bootstrap_auc_difference(y, a, b, g, n_boot=1000, seed=seed)
    assert result.difference == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert result.low < result.difference < result.high
    assert result.n_used == result.n_boot == 1000 and result.n_skipped == 0


def test_bootstrap_resamples_patients_not_rows() -> None:
    # Every patient's lesion is copied into 4 identical rows: that adds no information about the
    # patients, so a patient bootstrap must give exactly the interval of one row per patient, and
    # treating each row as its own patient (4x the apparent sample) a clearly narrower one.
    single = _patients(1, n_patients=60, copies=1)
    copied = _patients(1, n_patients=60, copies=4)
    by_patient = bootstrap_auc_difference(*copied, n_boot=1000, seed=0)
    assert by_patient == bootstrap_auc_difference(*single, n_boot=1000, seed=0)
    y, a, b, _ = copied
    by_row = bootstrap_auc_difference(y, a, b, np.arange(y.size), n_boot=1000, seed=0)
    assert by_row.difference == by_patient.difference
    assert (by_patient.high - by_patient.low) > 1.5 * (by_row.high - by_row.low)


def test_bootstrap_skips_and_counts_resamples_with_one_class() -> None:
    # One malignant patient among 5: a resample misses it with probability (4/5)^5 = 0.328.
    y = np.array([1, 0, 0, 0, 0, 0, 0])
    groups = np.array(["p1", "p2", "p2", "p3", "p4", "p5", "p5"])
    a = np.array([0.9, 0.1, 0.5, 0.95, 0.3, 0.2, 0.4])
    b = np.array([0.6, 0.7, 0.1, 0.2, 0.3, 0.8, 0.5])
    result = bootstrap_auc_difference(y, a, b, groups, n_boot=2000, seed=1)
    expected_used = 2000 * (1 - 0.8**5)
    assert abs(result.n_used - expected_used) < 4 * math.sqrt(2000 * 0.8**5 * (1 - 0.8**5))
    assert result.n_skipped == 2000 - result.n_used > 0
    assert math.isfinite(result.low) and math.isfinite(result.high)


def test_bootstrap_counts_resamples_that_draw_one_patient_twice() -> None:
    # A malignant and a benign patient: a resample of two draws holds both classes half the time.
    y = np.array([1, 0])
    result = bootstrap_auc_difference(y, [0.9, 0.1], [0.2, 0.8], ["p1", "p2"], n_boot=400, seed=0)
    assert abs(result.n_used - 200) < 4 * math.sqrt(400 * 0.25)
    assert result.n_used + result.n_skipped == 400
    assert result.low == result.high == 1.0  # AUC 1 - AUC 0 in every usable resample


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": [1, 2, 3]}, "groups has 3 values, y_true 4"),
        ({"groups": [1, 2, None, 3]}, "groups: 1 missing patient id"),
        ({"groups": [1, 2, 3, 4], "n_boot": 0}, "n_boot must be a positive integer"),
        ({"groups": [1, 2, 3, 4], "n_boot": 10.5}, "n_boot must be a positive integer"),
        ({"groups": [1, 2, 3, 4], "level": 1.0}, "level must lie strictly between 0 and 1"),
        ({"groups": [1, 2, 3, 4], "level": -0.1}, "level must lie strictly between 0 and 1"),
    ],
)
def test_bootstrap_bad_arguments_raise_naming_the_argument(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_auc_difference([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], **kwargs)


# --- the long table ------------------------------------------------------------------------------
def _long_table(seed: int = 0, n_patients: int = 60, archs=("resnet", "vgg"), folds: int = 3) -> pd.DataFrame:
    """Long probability table: each patient (1-3 lesions) tests in one fold; p per arch and setting."""
    rng = np.random.default_rng(seed)
    rows = []
    lesion = 0
    for patient in range(n_patients):
        fold = patient % folds
        for _ in range(rng.integers(1, 4)):
            rows.append({"fold": fold, "lesion_id": f"L{lesion:03d}", "patient_id": f"P{patient:03d}",
                         "acr": "abcd"[lesion % 4], "label": int(rng.integers(0, 2))})
            lesion += 1
    lesions = pd.DataFrame(rows)
    frames = []
    for k, arch in enumerate(archs):
        for j, setting in enumerate(SETTINGS):
            signal = 0.4 + 0.3 * j + 0.2 * k
            logit = signal * (2 * lesions["label"] - 1) + rng.normal(0, 1, len(lesions))
            frames.append(lesions.assign(arch=arch, setting=setting, p=1 / (1 + np.exp(-logit))))
    table = pd.concat(frames, ignore_index=True)
    return table[["arch", "fold", "setting", "lesion_id", "patient_id", "acr", "label", "p"]]


def test_paired_comparisons_returns_the_four_pairs_per_arch_with_pooled_aucs() -> None:
    table = _long_table()
    result = paired_comparisons(table.sample(frac=1, random_state=0), n_boot=200, seed=1)
    assert list(result.columns) == list(PAIRED_COLUMNS)
    assert list(zip(result["arch"], result["setting_a"], result["setting_b"])) == [
        (arch, a, b) for arch in pd.unique(table.sample(frac=1, random_state=0)["arch"]) for a, b in PAIRS]
    n_lesions = table["lesion_id"].nunique()
    for _, r in result.iterrows():
        rows_a = table[(table["arch"] == r["arch"]) & (table["setting"] == r["setting_a"])]
        rows_b = table[(table["arch"] == r["arch"]) & (table["setting"] == r["setting_b"])]
        assert r["auc_a"] == pytest.approx(roc_auc_score(rows_a["label"], rows_a["p"]), abs=1e-12)
        assert r["auc_b"] == pytest.approx(roc_auc_score(rows_b["label"], rows_b["p"]), abs=1e-12)
        assert r["auc_difference"] == pytest.approx(r["auc_a"] - r["auc_b"], abs=1e-15)
        assert r["n_lesions"] == n_lesions and r["n_patients"] == 60
        assert r["boot_low"] <= r["auc_difference"] <= r["boot_high"]
        assert 0 <= r["delong_p"] <= 1 and r["boot_level"] == 0.95 and r["boot_n_used"] == 200
        merged = rows_a.merge(rows_b, on=["fold", "lesion_id"], suffixes=("_a", "_b"))
        direct = delong_test(merged["label_a"], merged["p_a"], merged["p_b"])
        assert r["delong_p"] == pytest.approx(direct.p_value, rel=1e-12)


def test_paired_comparisons_skips_pairs_whose_settings_are_missing() -> None:
    table = _long_table()
    table = table[~((table["arch"] == "vgg") & (table["setting"] == "C"))]
    result = paired_comparisons(table, n_boot=50)
    pairs_of = {arch: list(zip(g["setting_a"], g["setting_b"])) for arch, g in result.groupby("arch")}
    assert pairs_of["resnet"] == list(PAIRS)
    assert pairs_of["vgg"] == [("F+Ĉ", "F"), ("Ĉ", "F")]
    assert paired_comparisons(table, pairs=[("X", "F")], n_boot=50).empty


def test_paired_comparisons_mismatched_lesions_raise_naming_arch_and_settings() -> None:
    table = _long_table()
    dropped = table.drop(index=table[(table["arch"] == "vgg") & (table["setting"] == "F+Ĉ")].index[:2])
    with pytest.raises(ValueError, match="arch vgg: settings F\\+Ĉ and F score different lesions"):
        paired_comparisons(dropped, n_boot=20)


def test_paired_comparisons_lesion_in_two_folds_or_disagreeing_labels_raise() -> None:
    table = _long_table()
    twice = table[(table["arch"] == "resnet") & (table["setting"] == "F") & (table["lesion_id"] == "L000")]
    with pytest.raises(ValueError, match="arch resnet, setting F: 1 lesion\\(s\\) are test lesions in several folds"):
        paired_comparisons(pd.concat([table, twice.assign(fold=twice["fold"] + 1)]), n_boot=20)
    relabelled = table.copy()
    hit = (relabelled["arch"] == "resnet") & (relabelled["setting"] == "C") & (relabelled["lesion_id"] == "L001")
    relabelled.loc[hit, "label"] = 1 - relabelled.loc[hit, "label"]
    with pytest.raises(ValueError, match="arch resnet: settings F\\+C and C disagree on label"):
        paired_comparisons(relabelled, n_boot=20)


def test_paired_comparisons_missing_column_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"probabilities: missing column\(s\) \['patient_id'\]"):
        paired_comparisons(_long_table().drop(columns="patient_id"), n_boot=20)
    with pytest.raises(ValueError, match="pairs: each entry must be a"):
        paired_comparisons(_long_table(), pairs=["F"], n_boot=20)


def test_markdown_has_one_row_per_comparison_with_percent_aucs_and_p_values() -> None:
    result = paired_comparisons(_long_table(), n_boot=100)
    text = paired_comparisons_markdown(result)
    lines = text.splitlines()
    assert lines[0] == ("| arch | comparison | AUC a | AUC b | difference (95 % CI, patient bootstrap) "
                        "| DeLong p |")
    body = [line for line in lines[2:] if line.startswith("| ")]
    assert len(body) == len(result) == 8
    first = result.iloc[0]
    assert body[0].startswith(f"| {first['arch']} | F+Ĉ vs F | {100 * first['auc_a']:.1f} | "
                              f"{100 * first['auc_b']:.1f} | {100 * first['auc_difference']:+.1f} (")
    assert "DeLong" in lines[-1] and "patients" in lines[-1]


def test_markdown_formats_p_to_three_significant_digits_and_undefined_as_na() -> None:
    row = dict.fromkeys(PAIRED_COLUMNS, 0.5)
    rows = [dict(row, arch="a", setting_a="F+Ĉ", setting_b="F", delong_p=p) for p in (0.0004, 0.01234, 1.0, math.nan)]
    body = paired_comparisons_markdown(pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))).splitlines()[2:6]
    assert [line.rsplit("| ", 1)[1].rstrip(" |") for line in body] == ["< 0.001", "0.0123", "1.00", "n/a"]


def test_pairs_are_the_claimed_differences_in_order() -> None:
    assert pt.PAIRS == (("F+Ĉ", "F"), ("F+C", "C"), ("Ĉ", "F"), ("C", "F"))
