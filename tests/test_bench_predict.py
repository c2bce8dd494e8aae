"""bench/predict.py: the pure helpers behind its table (what it times and how it sums it up); never the timing."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import predict as bench  # noqa: E402


def _stage_ms(**overrides):
    base = {"preprocess": [10, 30], "imputation": [100, 300], "classification": [40, 40],
            "saliency": [50, 50], "report": [200, 200], "dicom": [600, 400]}
    return {**base, **overrides}


def test_levels_add_the_stages_cumulatively_per_study_and_compare_p50_with_the_target():
    summary = bench.summarize(_stage_ms())
    # per study: prediction 150 / 370, + saliency 200 / 420, + report 400 / 620, + DICOM 1000 / 1020
    assert [lv.name for lv in summary.levels] == ["prediction", "+ saliency", "+ HTML report", "+ DICOM results"]
    assert [lv.p50_ms for lv in summary.levels] == [260, 310, 510, 1010]
    assert summary.levels[-1].ratio_to_target == pytest.approx(1010 / 1500)
    assert summary.levels[0].p95_ms == pytest.approx(150 + 0.95 * 220)
    assert summary.repeats == 2


def test_stage_shares_are_medians_over_the_sum_of_the_stage_medians():
    summary = bench.summarize(_stage_ms())
    medians = {st.name: st.p50_ms for st in summary.stages}
    assert medians == {"preprocess": 20, "imputation": 200, "classification": 40, "saliency": 50, "report": 200,
                       "dicom": 500}
    assert sum(st.share for st in summary.stages) == pytest.approx(1.0)
    assert {st.name: st.share for st in summary.stages}["dicom"] == pytest.approx(500 / 1010)


def test_timings_missing_a_stage_or_of_unequal_lengths_are_refused():
    timings = _stage_ms()
    del timings["saliency"]
    with pytest.raises(ValueError, match="lack \\['saliency'\\]"):
        bench.summarize(timings)
    with pytest.raises(ValueError, match="same number"):
        bench.summarize(_stage_ms(report=[200]))
    with pytest.raises(ValueError, match="same number"):
        bench.summarize({s: [] for s in bench.STAGES})


def test_tables_show_every_level_stage_and_the_full_study_against_the_target():
    summary = bench.summarize(_stage_ms())
    block = bench.format_summary("resnet18 256 px  CESM acquired", summary)
    assert all(lv.name in block for lv in summary.levels) and all(s in block for s in bench.STAGES)
    overview = bench.format_overview([("case A", summary)])
    assert "case A" in overview and "0.67" in overview and "dicom 50%" in overview


def test_acquired_cesm_is_timed_once_per_size_and_imputation_once_per_generator_size():
    cpu, paper = bench.GeneratorSize("cpu", 8, 2), bench.GeneratorSize("paper", 64, 9)
    assert bench.cases([64, 256], [cpu, paper]) == [
        (64, True, cpu), (64, False, cpu), (64, False, paper),
        (256, True, cpu), (256, False, cpu), (256, False, paper)]


def test_generator_sizes_come_from_params_and_the_paper_profile():
    assert bench.generator_size("paper") == bench.GeneratorSize("paper", 64, 9)
    assert bench.generator_size("cpu").ngf < 64
    with pytest.raises(ValueError, match="'gpu': expected one of"):
        bench.generator_size("gpu")


def test_a_profile_without_an_integer_generator_size_is_refused_naming_file_and_key(tmp_path):
    (tmp_path / "params.yaml").write_text("generator:\n  ngf: eight\n  n_residual_blocks: 2\n")
    with pytest.raises(ValueError, match="params.yaml: generator.ngf is 'eight'"):
        bench.generator_size("cpu", root=tmp_path)


def test_the_study_is_one_bilateral_patients_early_images(tiny_raw):
    files = bench.study_files(tiny_raw, breasts=2)
    meta = pd.read_csv(tiny_raw / "metadata.csv", dtype=str, keep_default_na=False).set_index("file")
    rows = meta.loc[[str(f.relative_to(tiny_raw)) for f in files]]
    assert rows["patient_id"].nunique() == 1 and set(rows["phase"]) == {"early"}
    assert set(rows["laterality"]) == {"L", "R"} and len(files) == 8  # 2 breasts x CC, MLO x LE, DES
    one = bench.study_files(tiny_raw, breasts=1)
    assert len(one) == 4 and set(one) < set(files)
    with pytest.raises(ValueError, match="1 or 2"):
        bench.study_files(tiny_raw, breasts=3)


def test_a_dataset_without_a_bilateral_patient_is_refused(tiny_raw, tmp_path):
    meta = pd.read_csv(tiny_raw / "metadata.csv", dtype=str, keep_default_na=False)
    meta[meta["laterality"] == "R"].to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.raises(ValueError, match="no patient with both breasts imaged"):
        bench.study_files(tmp_path, breasts=2)


def test_the_timed_pipeline_is_the_served_fold_ensemble_with_one_generator_per_view():
    import torch

    fused = bench.untrained_pipeline("resnet18", 32, bench.GeneratorSize("cpu", 4, 1), folds=5)
    assert [f.fold for f in fused.folds] == [0, 1, 2, 3, 4] and fused.serving == "ensemble"
    assert sorted(fused.generators) == ["CC", "MLO"]
    first, second = (next(f.classifiers["FFDM", "CC"].parameters()) for f in fused.folds[:2])
    assert not torch.equal(first, second)  # each fold its own networks
    assert bench.untrained_pipeline("resnet18", 32, bench.GeneratorSize("cpu", 4, 1), folds=1).serving == "best_fold"
    assert "5 folds" in bench.ensemble_note(5) and "best_fold" in bench.ensemble_note(1)
