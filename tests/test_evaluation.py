"""The evaluation: settings, robustness sweep, ACR breakdown, tables and the evaluate stage end to end.

Predictions are made here with a known signal: real CESM separates the classes best, imputed
CESM less, FFDM least (the paper's ordering), so the tables have something true to show.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from virtual_biopsy import evaluation as ev
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.evaluation.predictions import PREDICTION_COLUMNS, PredictionsError
from virtual_biopsy.stages import evaluate as stage

ARCHS = ("resnet18", "vgg16")
FOLDS = 3
PATIENTS = 60
SIGNAL = {("FFDM", "real"): 0.6, ("CESM", "real"): 2.5, ("CESM", "synthetic"): 1.4}


def _lesions(rng: np.random.Generator) -> pd.DataFrame:
    """Patients with one or two lesions; ACR a holds only malignant lesions (as in the paper)."""
    rows = []
    for i in range(PATIENTS):
        patient = f"P{i:03d}"
        for laterality in ("L", "R")[: 1 + (i % 4 == 0)]:
            acr = rng.choice(["a", "b", "c", "d", ""])
            label = 1 if acr == "a" else int(rng.random() < 0.7)
            rows.append({"lesion_id": f"{patient}|S1|{laterality}", "patient_id": patient, "acr": acr,
                         "label": label, "slot": i % FOLDS})
    return pd.DataFrame(rows)


def _predictions(lesions: pd.DataFrame, arch: str, modality: str, view: str, rng: np.random.Generator) -> pd.DataFrame:
    """Val and test predictions of every fold: test = slot k, val = slot k+1 (patient-grouped)."""
    frames = []
    for fold in range(FOLDS):
        for subset, slot in (("test", fold), ("val", (fold + 1) % FOLDS)):
            part = lesions[lesions["slot"] == slot]
            for source in ("real", "synthetic") if modality == "CESM" else ("real",):
                logit = SIGNAL[(modality, source)] * (part["label"].to_numpy() - 0.5) + rng.normal(0, 1, len(part))
                frames.append(pd.DataFrame({
                    "arch": arch, "modality": modality, "view": view, "fold": fold, "subset": subset,
                    "lesion_id": part["lesion_id"], "patient_id": part["patient_id"], "acr": part["acr"],
                    "label": part["label"], "source": source,
                    "image_id": [f"1.2.{fold}.{n}" for n in range(len(part))],
                    "p_malignant": 1 / (1 + np.exp(-logit)),
                }))
    return pd.concat(frames, ignore_index=True)[list(PREDICTION_COLUMNS)]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder holding predictions of two architectures and the generator reports."""
    root = tmp_path_factory.mktemp("project")
    paths = ProjectPaths(root)
    rng = np.random.default_rng(11)
    lesions = _lesions(rng)
    for arch in ARCHS:
        for modality in ("FFDM", "CESM"):
            for view in ("CC", "MLO"):
                path = ev.predictions_path(paths, arch, modality, view)
                path.parent.mkdir(parents=True, exist_ok=True)
                _predictions(lesions, arch, modality, view, rng).to_csv(path, index=False)
    for view, ssim in (("CC", 0.8), ("MLO", 0.7)):
        path = ev.generator_report_path(paths, view)
        path.parent.mkdir(parents=True, exist_ok=True)
        folds = [{"fold": k, "mse": 0.003 + k * 1e-4, "psnr": 27.0 + k, "ssim": ssim + 0.01 * k,
                  "baseline_ssim": 0.5, "baseline_psnr": 18.0} for k in range(FOLDS)]
        path.write_text(json.dumps({"view": view, "folds": folds}))
    (root / "params.yaml").write_text(json.dumps({
        "classifier": {"architectures": list(ARCHS)},
        "evaluate": {"robustness_shares": [0, 50, 100], "robustness_draws": 3},
    }))
    return root


@pytest.fixture(scope="module")
def folds(project: Path) -> list[ev.FoldData]:
    predictions = ev.load_predictions(ProjectPaths(project), ARCHS, ("FFDM", "CESM"), ("CC", "MLO"))
    return ev.prepare_folds(predictions, ("FFDM", "CESM"), ("CC", "MLO"))


def test_robustness_sweep_equals_c_at_zero_and_c_hat_at_full_share(folds) -> None:
    scores = ev.fold_scores(ev.lesion_probabilities(folds))
    sweep = ev.robustness_scores(folds, shares=(0, 100), draws=2, seed=5)
    for share, settings in ((0, {"C*": "C", "F+C*": "F+C"}), (100, {"C*": "Ĉ", "F+C*": "F+Ĉ"})):
        for swept, fixed in settings.items():
            got = sweep[(sweep["share"] == share) & (sweep["setting"] == swept)].groupby(["arch", "fold"])[["auc", "mcc"]].mean()
            want = scores[scores["setting"] == fixed].set_index(["arch", "fold"])[["auc", "mcc"]]
            pd.testing.assert_frame_equal(got.sort_index(), want.sort_index(), check_exact=False, atol=1e-12)


def test_robustness_draws_pick_the_share_of_patients_reproducibly() -> None:
    patients = [f"P{i}" for i in range(20)]
    first = ev.synthetic_patients(patients, 30, seed=1, fold=0, draw=0)
    assert len(first) == 6 and first == ev.synthetic_patients(patients, 30, seed=1, fold=0, draw=0)
    assert first != ev.synthetic_patients(patients, 30, seed=1, fold=0, draw=1)
    assert ev.synthetic_patients(patients, 100, seed=1, fold=0, draw=0) == set(patients)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        ev.synthetic_patients(patients, 120, seed=1, fold=0, draw=0)


def test_fusion_weights_ignore_test_predictions(project: Path, folds) -> None:
    predictions = ev.load_predictions(ProjectPaths(project), ARCHS, ("FFDM", "CESM"), ("CC", "MLO"))
    scrambled = predictions.copy()
    test = scrambled["subset"] == "test"
    scrambled.loc[test, "p_malignant"] = np.random.default_rng(0).random(int(test.sum()))
    again = ev.prepare_folds(scrambled, ("FFDM", "CESM"), ("CC", "MLO"))
    pd.testing.assert_frame_equal(ev.weights_table(folds), ev.weights_table(again))


@pytest.fixture(scope="module")
def acr_table(folds) -> pd.DataFrame:
    return ev.acr_breakdown(ev.acr_scores(ev.lesion_probabilities(folds)))


def test_acr_cell_equals_per_fold_auc_mean_and_sem_and_counts_the_groups_lesions(project: Path, folds, acr_table) -> None:
    from sklearn.metrics import roc_auc_score

    probabilities = ev.lesion_probabilities(folds)
    group = probabilities[(probabilities["arch"] == "vgg16") & (probabilities["setting"] == "F+Ĉ")
                          & (probabilities["acr"] == "c")]
    aucs = np.array([roc_auc_score(g["label"], g["p"]) for _, g in group.groupby("fold")])
    row = acr_table[(acr_table["arch"] == "vgg16") & (acr_table["metric"] == "auc")
                    & (acr_table["setting"] == "F+Ĉ") & (acr_table["acr"] == "c")].iloc[0]
    assert row["mean"] == pytest.approx(aucs.mean())
    assert row["spread"] == pytest.approx(aucs.std(ddof=1) / math.sqrt(aucs.size))
    assert row["spread_kind"] == "sem_over_folds"
    assert row["defined"] and row["reason"] == "" and row["n_folds"] == FOLDS
    predictions = ev.load_predictions(ProjectPaths(project), ARCHS, ("FFDM", "CESM"), ("CC", "MLO"))
    test_c = predictions[(predictions["subset"] == "test") & (predictions["acr"] == "c")].drop_duplicates("lesion_id")
    assert row["n_lesions"] == len(test_c) == len(group)
    assert row["n_malignant"] == int(test_c["label"].sum())
    markdown = ev.acr_breakdown_markdown(acr_table)
    assert f"{100 * aucs.mean():.1f} ± {100 * aucs.std(ddof=1) / math.sqrt(aucs.size):.1f} (n={len(test_c)})" in markdown


def test_acr_one_class_group_is_na_and_avg_is_mean_and_sd_across_architectures(folds, acr_table) -> None:
    acr_a = acr_table[acr_table["acr"] == "a"]
    assert len(acr_a) == 3 * 3 * (len(ARCHS) + 1)  # metrics × settings × (archs + AVG)
    assert acr_a["mean"].isna().all() and not acr_a["defined"].any()
    assert (acr_a["reason"] == "one class").all() and (acr_a["n_folds"] == 0).all()
    n_a = int(acr_a["n_lesions"].iloc[0])
    assert n_a > 0 and (acr_a["n_lesions"] == n_a).all() and (acr_a["n_malignant"] == n_a).all()
    assert f"n/a (one class, n={n_a})" in ev.acr_breakdown_markdown(acr_table)
    # AVG = mean of the architectures' defined means ± their SD (ddof=1), n = the group's lesions
    key = ["metric", "acr", "setting"]
    archs = acr_table[acr_table["arch"] != "AVG"]
    assert (archs["spread_kind"] == "sem_over_folds").all()
    avg = acr_table[acr_table["arch"] == "AVG"].set_index(key)
    assert (avg["spread_kind"] == "sd_over_architectures").all()
    defined = archs[archs["defined"]].groupby(key)["mean"]
    pd.testing.assert_series_equal(avg["mean"], defined.mean().reindex(avg.index), check_names=False)
    pd.testing.assert_series_equal(avg["spread"], defined.std(ddof=1).reindex(avg.index), check_names=False)
    assert (avg["n_folds"] == defined.count().reindex(avg.index).fillna(0)).all()
    for column in ("n_lesions", "n_malignant"):
        per_arch = archs.groupby(key)[column]
        assert (per_arch.nunique() == 1).all() and (avg[column] == per_arch.first().reindex(avg.index)).all()
    # an architecture with a one-class group is left out of AVG (AVG = the other's mean, no spread)
    scores = ev.acr_scores(ev.lesion_probabilities(folds))
    one_class = (scores["arch"] == "vgg16") & (scores["acr"] == "c")
    scores.loc[one_class, ["auc", "gmean", "mcc"]] = np.nan
    scores.loc[one_class, "undefined_reason"] = "only malignant lesions"
    table = ev.acr_breakdown(scores).set_index(["metric", "acr", "setting", "arch"])
    for metric in ("auc", "gmean", "mcc"):
        vgg, resnet, mean = (table.loc[(metric, "c", "F+C", arch)] for arch in ("vgg16", "resnet18", "AVG"))
        assert not vgg["defined"] and vgg["reason"] == "one class"
        assert mean["defined"] and mean["mean"] == resnet["mean"] and math.isnan(mean["spread"])
        assert mean["n_folds"] == 1 and mean["n_lesions"] == resnet["n_lesions"]


def test_acr_table_is_tidy_sorted_and_markdown_has_a_column_per_architecture_plus_avg(acr_table) -> None:
    assert list(acr_table.columns) == ["metric", "acr", "setting", "arch", "mean", "spread", "spread_kind", "n_folds",
                                       "n_lesions", "n_malignant", "defined", "reason"]
    archs = [*ARCHS, "AVG"]
    assert list(acr_table["arch"][: len(archs)]) == archs
    assert list(acr_table["setting"][:: len(archs)][:3]) == ["F", "F+C", "F+Ĉ"]
    assert len(acr_table) == 3 * 4 * 3 * len(archs)  # metrics × ACR a-d × settings × (archs + AVG)
    assert not acr_table.duplicated(["metric", "acr", "setting", "arch"]).any()
    order = (acr_table["metric"].map({"auc": 0, "gmean": 1, "mcc": 2}) * 1000
             + acr_table["acr"].map({"a": 0, "b": 1, "c": 2, "d": 3}) * 100
             + acr_table["setting"].map({"F": 0, "F+C": 1, "F+Ĉ": 2}) * 10 + acr_table["arch"].map(archs.index))
    assert order.is_monotonic_increasing
    markdown = ev.acr_breakdown_markdown(acr_table)
    header = "| Metric | ACR | Setting | " + " | ".join(archs) + " |"
    assert markdown.count(header) == 1
    body = [line for line in markdown.splitlines() if line.startswith("| ") and line != header and "---" not in line]
    assert len(body) == 3 * 4 * 3 and all(line.count(" | ") == 2 + len(archs) for line in body)
    expected = [f"| {m} | {a} | {s} |" for m in ("AUC", "G-mean", "MCC") for a in "abcd" for s in ("F", "F+C", "F+Ĉ")]
    assert [line[: len(e)] for line, e in zip(body, expected)] == expected
    assert "AVG: mean of the architectures' means ± SD across architectures" in markdown
    assert "n: test lesions of the group, summed over the folds" in markdown
    assert "undefined (" not in markdown
    assert ev.acr_breakdown(ev.acr_scores(pd.DataFrame(columns=["arch", "fold", "setting", "acr", "label", "p"]))).empty


def test_table_a1_has_one_row_per_architecture_and_setting_on_paper_scale(folds) -> None:
    scores = ev.fold_scores(ev.lesion_probabilities(folds))
    table = ev.table_a1(scores)
    assert table.shape[0] == len(ARCHS) * 5
    assert list(table["setting"][:5]) == ["F", "C", "Ĉ", "F+C", "F+Ĉ"]
    c = scores[(scores["arch"] == "vgg16") & (scores["setting"] == "C")]["auc"]
    row = table[(table["arch"] == "vgg16") & (table["setting"] == "C")].iloc[0]
    assert row["auc_mean"] == pytest.approx(100 * c.mean())
    assert row["auc_sem"] == pytest.approx(100 * c.std(ddof=1) / math.sqrt(FOLDS))
    assert "± " in ev.table_a1_markdown(table)


def test_scoring_marks_single_class_groups_undefined_never_zero() -> None:
    result = ev.score(np.ones(4, int), np.array([0.9, 0.2, 0.7, 0.6]))
    assert result["undefined_reason"] == "only malignant lesions"
    assert all(math.isnan(result[m]) for m in ("auc", "gmean", "mcc"))


def test_predictions_file_breaking_the_contract_is_named_with_the_reason(project: Path, tmp_path: Path) -> None:
    source = ev.predictions_path(ProjectPaths(project), "resnet18", "CESM", "CC")
    bad = tmp_path / "CESM_CC.csv"
    frame = pd.read_csv(source)
    frame.loc[0, "p_malignant"] = 1.5
    frame.to_csv(bad, index=False)
    with pytest.raises(PredictionsError, match=r"CESM_CC.csv: column p_malignant must lie in \[0, 1\]"):
        ev.predictions.read_predictions_file(bad, "resnet18", "CESM", "CC")
    frame.drop(columns=["source"]).to_csv(bad, index=False)
    with pytest.raises(PredictionsError, match=r"missing column\(s\) \['source'\]"):
        ev.predictions.read_predictions_file(bad, "resnet18", "CESM", "CC")


def test_stage_writes_every_report_and_logs_tagged_runs(project: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # With a bare sqlite URI MLflow puts artifacts under ./mlruns: keep them in the temp folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VBIOPSY_EXPERIMENT", "evaluate-test")
    assert stage.main(["--root", str(project)]) == 0

    out = project / "reports" / "evaluation"
    for name in ("table_a1.csv", "table_a1.md", "table3.csv", "table3.md", "robustness.csv", "acr_breakdown.csv",
                 "acr_breakdown.md", "roc.csv", "figure4.png", "figure5.png", "roc.png", "paired_tests.csv",
                 "weights.csv", "weights.md"):
        assert (out / name).stat().st_size > 0, name
    assert "Paired comparisons" in (out / "table_a1.md").read_text(encoding="utf-8")
    paired = pd.read_csv(out / "paired_tests.csv")
    assert len(paired) == 4 * len(ARCHS)
    headline = json.loads((project / "reports" / "metrics.json").read_text())
    assert set(headline) == set(ARCHS) and set(headline["resnet18"]) == {"F", "C", "Ĉ", "F+C", "F+Ĉ"}
    # The known signal: real CESM beats imputed CESM beats FFDM alone.
    for arch in ARCHS:
        assert headline[arch]["C"]["auc"] > headline[arch]["Ĉ"]["auc"] > headline[arch]["F"]["auc"]
    roc = pd.read_csv(out / "roc.csv")
    assert {"fpr", "tpr", "setting"} <= set(roc.columns)
    table3 = pd.read_csv(out / "table3.csv").set_index("view")
    assert table3.at["CC", "ssim_mean"] == pytest.approx(0.81)

    import mlflow

    runs = mlflow.search_runs(experiment_names=["evaluate-test"], output_format="list")
    tagged = [r for r in runs if r.data.tags.get("setting") == "F+Ĉ" and r.data.tags.get("arch") == "vgg16"]
    assert len(tagged) == 1
    assert tagged[0].data.tags["synthetic_share"] == "100"
    assert tagged[0].data.metrics["test_auc"] == pytest.approx(headline["vgg16"]["F+Ĉ"]["auc"])
    # The setting run says what it is computed from (params) and which predictions it read (datasets).
    params = tagged[0].data.params
    assert params["arch"] == "vgg16" and params["setting"] == "F+Ĉ" and params["modalities"] == "FFDM+CESM"
    assert params["cesm_images"] == "imputed" and params["synthetic_share"] == "100"
    assert params["fusion"] == "views, then modalities" and "vgg16/CESM_MLO" in params["weights_source"]
    probabilities = pd.read_csv(out / "test_probabilities.csv")
    assert int(params["test_lesions"]) == ((probabilities["arch"] == "vgg16") & (probabilities["setting"] == "F+Ĉ")).sum()
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
              for d in mlflow.get_run(tagged[0].info.run_id).inputs.dataset_inputs}
    assert inputs == {"predictions vgg16 F+Ĉ val": "val", "predictions vgg16 F+Ĉ test": "test"}
    robustness = [r for r in runs if r.data.tags.get("synthetic_share") == "0-100"]
    assert robustness and all(r.data.params["robustness_draws"] == "3" for r in robustness)
    # The paired tests: on the stage run per comparison, on the setting run against its reference.
    row = paired[(paired["arch"] == "vgg16") & (paired["setting_a"] == "F+Ĉ") & (paired["setting_b"] == "F")].iloc[0]
    assert tagged[0].data.metrics["vs_F_delong_p"] == pytest.approx(row["delong_p"])
    stage_run = next(r for r in runs if r.data.tags.get("mlflow.runName") == "evaluate")
    assert stage_run.data.metrics["vgg16.F_Chat_vs_F.auc_difference_ci_low"] == pytest.approx(row["boot_low"])
    assert int(stage_run.data.tags["weight_warnings"]) == (pd.read_csv(out / "weights.csv")["warning"].notna()).sum()


def test_stage_without_predictions_fails_in_one_line_naming_the_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "params.yaml").write_text("classifier: {architectures: [resnet18]}\n")
    assert stage.main(["--root", str(tmp_path), "--no-mlflow"]) == 1
    err = capsys.readouterr().err
    assert "FFDM_CC.csv: no such predictions file" in err and "Traceback" not in err
