"""Two generator runs compared fold by fold: the paired t-test of the formula, refusals, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from virtual_biopsy.cli.main import main
from virtual_biopsy.evaluation.generator_comparison import ComparisonError, compare_generator_reports


def report(view: str, psnr: list[float], test_pairs: int = 70) -> dict:
    return {"view": view, "folds": [{"fold": k, "psnr": v, "ssim": v / 30, "test_pairs": test_pairs}
                                    for k, v in enumerate(psnr)]}


def test_the_paired_difference_and_its_t_test_follow_the_formula():
    a, b = [25.1, 24.8, 25.6, 24.9, 25.3], [24.2, 24.9, 24.6, 24.1, 24.8]
    row = compare_generator_reports(report("CC", a), report("CC", b), ["psnr"]).iloc[0]
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(5))
    assert row.difference == pytest.approx(d.mean())
    assert row.se_difference == pytest.approx(d.std(ddof=1) / np.sqrt(5))
    assert row.paired_t_p == pytest.approx(2 * stats.t.sf(abs(t), df=4))
    assert row.mean_a == pytest.approx(np.mean(a)) and row.se_b == pytest.approx(np.std(b, ddof=1) / np.sqrt(5))


def test_folds_are_paired_by_their_number_not_their_order():
    a = report("CC", [25.0, 24.0, 26.0])
    b = report("CC", [24.0, 23.5, 25.0])
    b["folds"].reverse()
    row = compare_generator_reports(a, b, ["psnr"]).iloc[0]
    assert row.difference == pytest.approx(np.mean([1.0, 0.5, 1.0]))


def test_runs_of_other_views_or_splits_are_refused():
    with pytest.raises(ComparisonError, match="view 'CC'.*view 'MLO'"):
        compare_generator_reports(report("CC", [1, 2]), report("MLO", [1, 2]))
    with pytest.raises(ComparisonError, match="different folds or test pairs"):
        compare_generator_reports(report("CC", [1, 2], 70), report("CC", [1, 2], 71))


def test_cli_prints_the_table_and_names_a_bad_file(tmp_path, capsys):
    a, b, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
    a.write_text(json.dumps(report("MLO", [22.3, 22.1, 22.6])))
    b.write_text(json.dumps(report("MLO", [22.7, 22.5, 22.6])))
    bad.write_text('{"mean": {}}')
    assert main(["compare-generators", str(a), str(b), "--name-a", "pre-trained", "--name-b", "scratch",
                 "--metrics", "psnr"]) == 0
    out = capsys.readouterr().out
    assert "| MLO | pre-trained | scratch |" in out and "| psnr | 22.3333 ± 0.1453 |" in out
    assert main(["compare-generators", str(a), str(bad)]) == 1
    assert f"{bad}: no 'folds' list" in capsys.readouterr().err


def test_the_cli_default_metrics_are_the_comparisons():
    from virtual_biopsy.cli import compare
    from virtual_biopsy.evaluation.generator_comparison import COMPARED_METRICS
    assert compare.COMPARED_METRICS == COMPARED_METRICS
