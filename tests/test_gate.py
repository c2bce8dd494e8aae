"""The gate: promotes a candidate that passes every check, refuses one for each failing check
(with the reason recorded), and rollback restores the previous champion."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from virtual_biopsy.core.config import load_params
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.evaluation import gate_checks
from virtual_biopsy.evaluation.gate_checks import decide
from virtual_biopsy.mlops import registry, tracking
from virtual_biopsy.stages import gate as gate_stage

NAME = "virtual-biopsy-resnet18"


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False))


def _decide(root: Path, champion=None) -> gate_checks.GateDecision:
    return decide(ProjectPaths(root), load_params(root / "params.yaml"), "resnet18", champion,
                  tracking.data_version(root))


def test_every_check_passes_on_good_reports(fused_project):
    decision = _decide(fused_project)
    assert decision.promoted, decision.reasons
    names = {c.name for c in decision.checks}
    assert {"data_quality", "split_leakage", "imputation", "floor.F+Ĉ.auc", "generator.CC.ssim",
            "generator.MLO.psnr", "champion"} <= names


FAILURES = {
    "data_quality": ("validation/metrics.json", lambda d: d.update(critical_failed=2)),
    "split_leakage": ("split/summary.json", lambda d: d.update(leakage=1)),
    # F falls with F+Ĉ so that imputation (F+Ĉ vs F) still passes: only the floor fails.
    "floor.F+Ĉ.auc": ("metrics.json", lambda d: [d["resnet18"][s].update(auc=0.50) for s in ("F", "F+Ĉ")]),
    "floor.F+C.mcc": ("metrics.json", lambda d: d["resnet18"]["F+C"].update(mcc=None)),
    "imputation": ("metrics.json", lambda d: d["resnet18"]["F"].update(auc=0.78)),
    "generator.MLO.ssim": ("generator/MLO.json", lambda d: d["mean"].update(ssim=0.1)),
    "generator.CC.psnr": ("generator/CC.json", lambda d: d["mean"].update(psnr=9.0)),
}


@pytest.mark.parametrize("check", sorted(FAILURES))
def test_gate_refuses_a_candidate_failing_one_check(fused_project, check):
    report, change = FAILURES[check]
    _edit_json(fused_project / "reports" / report, change)
    decision = _decide(fused_project)
    assert not decision.promoted
    assert [c.name for c in decision.checks if not c.passed] == [check]
    assert decision.reasons[0].startswith(f"{check}: ")


def test_gate_refuses_when_params_raise_a_floor(fused_project):
    params = yaml.safe_load((fused_project / "params.yaml").read_text())
    params["gate"]["floors"]["F+C"]["auc"] = 0.95
    (fused_project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    assert [c.name for c in _decide(fused_project).checks if not c.passed] == ["floor.F+C.auc"]


def test_gate_compares_with_champion_only_on_the_same_data_version(fused_project):
    better = {"version": "1", "data_version": "untracked", "auc": {"F+C": 0.9, "F+Ĉ": 0.71}}
    failed = [c.name for c in _decide(fused_project, better).checks if not c.passed]
    assert failed == ["champion.F+C.auc"]
    other_data = {**better, "data_version": "abc123"}
    skipped = [c for c in _decide(fused_project, other_data).checks if c.name == "champion"]
    assert skipped[0].passed and "not comparable" in skipped[0].detail


def test_gate_stage_promotes_then_records_a_rejection_and_rollback_restores(fused_project, capsys):
    root = str(fused_project)
    assert gate_stage.main(["--root", root]) == 0
    assert registry.aliases(NAME, root) == {"champion": "1", "challenger": "1"}
    tags = registry.get_version_tags(NAME, "1", root)
    assert tags["gate.decision"] == "promoted"
    assert tags["gate.check.floor.F_Chat.auc"].startswith("pass")
    report = json.loads((fused_project / "reports" / "gate.json").read_text())
    assert report["resnet18"]["decision"] == "promoted"
    assert all(c["verdict"] == "pass" for c in report["resnet18"]["checks"])

    # A second, equally good candidate replaces it and remembers its predecessor.
    assert gate_stage.main(["--root", root]) == 0
    assert registry.aliases(NAME, root) == {"champion": "2", "challenger": "2"}
    assert registry.get_version_tags(NAME, "2", root)["previous_champion"] == "1"

    # A leaking split: registered as challenger, refused as champion, exit 0, reason recorded.
    _edit_json(fused_project / "reports" / "split" / "summary.json", lambda d: d.update(leakage=3))
    assert gate_stage.main(["--root", root]) == 0
    assert "rejected" in capsys.readouterr().out
    assert registry.aliases(NAME, root) == {"champion": "2", "challenger": "3"}
    rejected = registry.get_version_tags(NAME, "3", root)
    assert rejected["gate.decision"] == "rejected"
    assert "split_leakage: 3 leaking patient(s)" in rejected["gate.reasons"]
    entry = json.loads((fused_project / "reports" / "gate.json").read_text())["resnet18"]
    assert entry["decision"] == "rejected"
    # Registry version numbers are in MLflow (the gate run's tags), not in the DVC-tracked report.
    assert not {"version", "champion", "previous_champion"} & set(entry)
    client = tracking.get_client(root)
    gate_runs = client.search_runs([tracking.experiment_id(client, root)], filter_string="tags.stage = 'gate'",
                                   order_by=["attributes.start_time ASC"])
    assert [(r.data.tags["resnet18.version"], r.data.tags["resnet18.champion"]) for r in gate_runs
            if "resnet18.version" in r.data.tags] == [("1", "1"), ("2", "2"), ("3", "2")]

    from virtual_biopsy.cli.main import main as vbiopsy

    # Manual promotion runs the same checks: refused while the split leaks ...
    assert vbiopsy(["registry", "promote", "3", "--root", root]) == 1
    assert registry.get_alias(NAME, "champion", root) == "2"
    # ... unless forced, with the reason recorded.
    assert vbiopsy(["registry", "promote", "3", "--root", root, "--force", "--reason", "leak is a known dup"]) == 0
    forced = registry.get_version_tags(NAME, "3", root)
    assert forced["gate.forced"] == "true" and forced["gate.force_reason"] == "leak is a known dup"

    assert vbiopsy(["registry", "rollback", "--root", root]) == 0
    assert registry.get_alias(NAME, "champion", root) == "2"
    assert vbiopsy(["registry", "rollback", "--root", root]) == 0
    assert registry.get_alias(NAME, "champion", root) == "1"
    assert vbiopsy(["registry", "status", "--root", root]) == 0
    status = capsys.readouterr().out
    assert "@champion   v1  gate: promoted" in status and "@challenger v3  gate: rejected" in status
    # each alias's version is followed by its checks, the failed one with its value and threshold
    report_v3 = status.split("gate report v3:")[1]
    assert "split_leakage" in report_v3 and "fail (value 3, threshold 0)" in report_v3
    assert "gate report v1:" in status and status.count("gate report v3:") == 1


def test_gate_reports_the_paired_tests_and_thin_weights_next_to_its_checks(fused_project, capsys):
    assert gate_stage.main(["--root", str(fused_project)]) == 0
    entry = json.loads((fused_project / "reports" / "gate.json").read_text())["resnet18"]
    paired = {c["comparison"]: c for c in entry["evidence"]["paired_tests"]}
    assert set(paired) == {"F+Ĉ vs F", "F+C vs C", "Ĉ vs F", "C vs F"}
    table = pd.read_csv(fused_project / "reports" / "evaluation" / "paired_tests.csv")
    row = table[(table["setting_a"] == "F+Ĉ") & (table["setting_b"] == "F")].iloc[0]
    assert paired["F+Ĉ vs F"]["auc_difference"] == pytest.approx(row["auc_difference"])
    assert paired["F+Ĉ vs F"]["ci_low"] <= paired["F+Ĉ vs F"]["auc_difference"] <= paired["F+Ĉ vs F"]["ci_high"]
    # 8 validation lesions per fold (5 malignant, 3 benign): every weight rests on too few.
    assert entry["evidence"]["weight_warnings"] and "fewer than 10" in entry["evidence"]["weight_warnings"][0]
    out = capsys.readouterr().out
    assert "F+Ĉ vs F: AUC difference" in out and "95 % CI" in out
    tags = registry.get_version_tags(NAME, "1", str(fused_project))
    assert tags["gate.evidence.F_Chat_vs_F"].startswith("AUC difference")
    assert int(tags["gate.evidence.weight_warnings"]) == len(entry["evidence"]["weight_warnings"])
    assert entry["decision"] == "promoted"  # reported, not decided on


def test_gate_without_the_evaluations_evidence_names_the_missing_file(fused_project, capsys):
    (fused_project / "reports" / "evaluation" / "paired_tests.csv").unlink()
    assert gate_stage.main(["--root", str(fused_project)]) == 1
    assert "paired_tests.csv: missing (run the evaluate stage first)" in capsys.readouterr().err


def test_gate_writes_a_model_card_and_makes_it_the_versions_description(fused_project):
    assert gate_stage.main(["--root", str(fused_project)]) == 0
    card = (fused_project / "reports" / "model_cards" / "resnet18.md").read_text(encoding="utf-8")
    assert card.startswith(f"# Model card: {NAME}") and "Research use only" in card
    assert "**Simulated data.**" in card
    predictions = pd.concat(pd.read_csv(p) for p in (fused_project / "outputs" / "predictions" / "resnet18").glob("*.csv"))
    test = predictions[(predictions["subset"] == "test") & (predictions["source"] == "real")].drop_duplicates("lesion_id")
    assert f"{test['patient_id'].nunique()} patients, {len(test)} lesions ({int(test['label'].sum())} malignant" in card
    assert "| F+Ĉ | 71.0 ± n/a |" in card  # the fixture's metrics.json: F+Ĉ AUC 0.71, no SEM
    assert "| F+Ĉ vs F |" in card and "Calibration: not assessed" not in card
    assert "an ensemble of 2 folds (0, 1)" in card and "Folds served: 2 (ensemble)" in card
    assert "Calibration: temperature scaling" in card and "F+Ĉ: T = 1.5, qhat = 0.65 (16 validation lesions)" in card
    assert "Conformal prediction set at level 0.90" in card
    assert "CC: cesm-generator-cc (fold 0, policy best_fold)" in card
    assert "promoted (every check passed)" in card
    version = registry.versions(NAME, str(fused_project))[-1]
    client = tracking.get_client(str(fused_project))
    assert client.get_model_version(NAME, version).description == card
    # Same evidence, same bytes: no version number, run id or time in the card.
    assert gate_stage.main(["--root", str(fused_project)]) == 0
    assert (fused_project / "reports" / "model_cards" / "resnet18.md").read_text(encoding="utf-8") == card


def test_gate_drops_the_model_card_of_an_architecture_no_longer_gated(fused_project):
    stale = fused_project / "reports" / "model_cards" / "vgg16.md"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("an old card")
    assert gate_stage.main(["--root", str(fused_project)]) == 0
    assert sorted(p.name for p in stale.parent.iterdir()) == ["resnet18.md"]


# --- the served pipeline: fold ensemble or one fold, calibrated --------------------------------------
def _candidate(root: Path, serving: str = "ensemble"):
    import dataclasses

    params = load_params(root / "params.yaml")
    params = dataclasses.replace(params, gate=dataclasses.replace(params.gate, serving=serving))
    paths = ProjectPaths(root)
    return gate_stage.build_candidate(paths, params, "resnet18", gate_stage.read_gate_predictions(paths, "resnet18"))


def _breasts(n: int = 3, seed: int = 1):
    import numpy as np

    from virtual_biopsy.serving.fused_model import BreastImages

    rng = np.random.default_rng(seed)
    image = lambda: rng.random((32, 32), dtype=np.float32)  # noqa: E731
    # acquired, both imputed, one imputed
    cesm = [{"CC": image(), "MLO": image()}, {"CC": None, "MLO": None}, {"CC": None, "MLO": image()}]
    return [BreastImages({"CC": image(), "MLO": image()}, cesm[i % 3]) for i in range(n)]


def test_the_ensemble_serves_every_fold_each_with_its_own_weights(fused_project):
    import numpy as np

    from virtual_biopsy.evaluation.calibration import apply_temperature
    from virtual_biopsy.evaluation.gate_checks import fold_validation
    from virtual_biopsy.serving import fused_model

    candidate = _candidate(fused_project)
    assert candidate.serving == "ensemble" and [f.fold for f in candidate.folds] == [0, 1]
    folds = fold_validation(gate_stage.read_gate_predictions(ProjectPaths(fused_project), "resnet18"), "resnet18",
                            ("CC", "MLO"))
    for fold, expected in zip(candidate.folds, folds):
        assert fold.modality_weights == pytest.approx(expected["weights"].modalities.weights)
    breasts = _breasts()
    results = fused_model.predict_breasts(candidate, breasts)
    # each fold alone, then the formula: p = mean_k sigmoid(logit(p_k) / T_setting)
    singles = [fused_model.predict_breasts(dataclasses_replace(candidate, folds=[f],
                                                               calibration=fused_model.identity_calibration()), breasts)
               for f in candidate.folds]
    for i, result in enumerate(results):
        raw = [s[i].p for s in singles]
        setting = "F+C" if i == 0 else "F+Ĉ"  # acquired; both imputed; one imputed -> F+Ĉ
        assert result.setting == setting
        temperature = candidate.calibration.entry(setting)["temperature"]
        calibrated = apply_temperature(np.array(raw), temperature)
        assert result.p_uncalibrated == pytest.approx(np.mean(raw))
        assert result.p == result.p_calibrated == pytest.approx(np.mean(calibrated))
        assert result.p_folds == pytest.approx(tuple(calibrated))
        assert result.p_fold_sd == pytest.approx(np.std(calibrated))
        assert (result.p_fold_min, result.p_fold_max) == pytest.approx((calibrated.min(), calibrated.max()))
        assert result.label == ("malignant" if result.p >= 0.5 else "benign")
        assert result.p_ffdm == pytest.approx(np.mean([s[i].p_ffdm for s in singles]))
    assert [r.synthetic for r in results] == [{"CC": False, "MLO": False}, {"CC": True, "MLO": True},
                                              {"CC": True, "MLO": False}]


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_calibration_with_a_temperature_changes_p_as_the_formula_says(fused_project):
    import numpy as np

    from virtual_biopsy.serving import fused_model

    candidate = _candidate(fused_project, "best_fold")
    breasts = _breasts(2)
    plain = fused_model.predict_breasts(dataclasses_replace(candidate, calibration=fused_model.identity_calibration()),
                                        breasts)
    calibrated = fused_model.predict_breasts(candidate, breasts)
    for raw, cal in zip(plain, calibrated):
        t = candidate.calibration.entry(cal.setting)["temperature"]
        assert t != 1
        logit = np.log(raw.p) - np.log1p(-raw.p)
        assert cal.p == pytest.approx(1 / (1 + np.exp(-logit / t)))
        assert cal.p_uncalibrated == pytest.approx(raw.p)


@pytest.mark.parametrize("p, qhat, expected", [
    (0.9, 0.5, "malignant"), (0.1, 0.5, "benign"), (0.6, 0.7, "benign,malignant"),
    (0.55, 0.3, "malignant"), (0.45, 0.3, "benign"),  # empty LAC set -> the more probable class
])
def test_the_conformal_set_is_a_string_of_the_classes_in_it(p, qhat, expected):
    from virtual_biopsy.serving.fused_model import BreastPrediction
    from virtual_biopsy.evaluation.conformal import conformal_set

    prediction = BreastPrediction(0.5, 0.5, p, "malignant", {"CC": False, "MLO": False}, {}, {},
                                  conformal_set=conformal_set(p, {"qhat": qhat}))
    assert prediction.as_row()["conformal_set"] == expected


def test_best_fold_serves_the_one_fold_of_best_validation_mcc(fused_project):
    from virtual_biopsy.evaluation.gate_checks import fold_validation, serving_fold
    from virtual_biopsy.serving import fused_model

    candidate = _candidate(fused_project, "best_fold")
    best = serving_fold(fold_validation(gate_stage.read_gate_predictions(ProjectPaths(fused_project), "resnet18"),
                                        "resnet18", ("CC", "MLO")))
    assert candidate.serving == "best_fold" and [f.fold for f in candidate.folds] == [best["fold"]]
    ensemble = _candidate(fused_project)
    one = next(f for f in ensemble.folds if f.fold == best["fold"])
    breasts = _breasts(2)
    alone = fused_model.predict_breasts(dataclasses_replace(ensemble, folds=[one]), breasts)
    for served, expected in zip(fused_model.predict_breasts(candidate, breasts), alone):
        assert served.p == pytest.approx(expected.p) and served.p_fold_sd == 0 and len(served.p_folds) == 1


def test_the_bundle_keeps_every_fold_and_the_calibration(fused_project, tmp_path):
    from virtual_biopsy.serving import fused_model

    candidate = _candidate(fused_project)
    loaded = fused_model.load_bundle(fused_model.save_bundle(candidate, tmp_path / "bundle"))
    assert [f.fold for f in loaded.folds] == [0, 1] and loaded.calibration == candidate.calibration
    breasts = _breasts()
    assert [r.as_row() for r in fused_model.predict_breasts(loaded, breasts)] == \
        [r.as_row() for r in fused_model.predict_breasts(candidate, breasts)]


def test_the_signature_lists_the_calibrated_p_spread_conformal_set_and_imputed_flags():
    from virtual_biopsy.serving import fused_model

    names = fused_model.pyfunc_signature().outputs.input_names()
    assert names == list(fused_model.OUTPUT_COLUMNS)
    assert {"p_calibrated", "p_uncalibrated", "p_fold_sd", "p_fold_min", "p_fold_max", "conformal_set",
            "conformal_level", "setting", "imputed_cc", "imputed_mlo"} <= set(names)


CALIBRATION_ERRORS = {
    "missing file": (None, r"missing \(run the evaluate stage first"),
    "not JSON": ("{oops", "not valid JSON"),
    "no settings": ({"method": "temperature", "conformal_level": 0.9}, "no key 'settings'"),
    "no F+Ĉ": ({"method": "temperature", "conformal_level": 0.9, "settings": {"F+C": {"temperature": 1, "qhat": 0.5}}},
               r"settings\.F\+Ĉ missing"),
    "bad temperature": ({"method": "temperature", "conformal_level": 0.9,
                         "settings": {"F+C": {"temperature": 0, "qhat": 0.5}, "F+Ĉ": {"temperature": 1, "qhat": 0.5}}},
                        r"settings.F\+C.temperature 0.0 must be > 0"),
    "no qhat": ({"method": "temperature", "conformal_level": 0.9,
                 "settings": {"F+C": {"temperature": 1, "qhat": 0.5}, "F+Ĉ": {"temperature": 1}}},
                r"settings.F\+Ĉ.qhat missing"),
    "bad level": ({"method": "temperature", "conformal_level": 90, "settings": {}}, "conformal_level 90.0 must lie"),
    "other method": ({"method": "isotonic", "conformal_level": 0.9, "settings": {}}, "method 'isotonic'"),
}


@pytest.mark.parametrize("case", sorted(CALIBRATION_ERRORS))
def test_a_bad_calibration_file_stops_the_gate_naming_the_file_and_key(fused_project, capsys, case):
    content, message = CALIBRATION_ERRORS[case]
    path = fused_project / "outputs" / "calibration" / "resnet18.json"
    if content is None:
        path.unlink()
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    assert gate_stage.main(["--root", str(fused_project)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err
    import re

    assert re.search(message, err), err


def test_a_bundle_of_another_format_or_without_a_part_is_refused_naming_it(fused_project, tmp_path):
    import torch

    from virtual_biopsy.serving import fused_model

    folder = fused_model.save_bundle(_candidate(fused_project, "best_fold"), tmp_path / "bundle")
    record = torch.load(folder / fused_model.BUNDLE_FILE, weights_only=True)
    torch.save({**record, "format": 1}, folder / fused_model.BUNDLE_FILE)
    with pytest.raises(fused_model.BundleError, match=r"pipeline.pt: bundle format 1, this code reads 2 .* rerun the gate"):
        fused_model.load_bundle(folder)
    torch.save({k: v for k, v in record.items() if k != "calibration_json"}, folder / fused_model.BUNDLE_FILE)
    with pytest.raises(fused_model.BundleError, match="pipeline.pt: no key 'calibration_json'"):
        fused_model.load_bundle(folder)


def test_gate_serving_accepts_only_ensemble_or_best_fold(fused_project):
    from virtual_biopsy.core.config import ConfigError

    params = yaml.safe_load((fused_project / "params.yaml").read_text())
    params["gate"]["serving"] = "all_folds"
    (fused_project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    with pytest.raises(ConfigError, match="gate.serving: must be ensemble or best_fold, got 'all_folds'"):
        load_params(fused_project / "params.yaml")
