"""The fused pipeline: the registered pyfunc, loaded in a fresh process, gives the p of the stages'
functions run by hand; real CESM is never imputed, missing CESM is imputed and flagged."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.preprocess import preprocess_file
from virtual_biopsy.evaluation.predictions import load_predictions
from virtual_biopsy.evaluation.settings import prepare_folds
from virtual_biopsy.mlops import tracking
from virtual_biopsy.models.fusion import fuse
from virtual_biopsy.models.weights import load_classifier, load_generator_weights
from virtual_biopsy.serving import fused_model
from virtual_biopsy.training import generate, predict_proba

URI = "models:/virtual-biopsy-resnet18@champion"
SIZE = 32


@pytest.fixture(scope="module")
def breast(tiny_raw):
    """One simulated breast's preprocessed FFDM and CESM, CC and MLO, at the pipeline's size."""
    meta = pd.read_csv(tiny_raw / "metadata.csv", dtype=str, keep_default_na=False)
    early = meta[meta["phase"] == "early"]
    first = early.iloc[0]
    rows = early[(early["patient_id"] == first["patient_id"]) & (early["laterality"] == first["laterality"])]
    return {(r["energy"], r["view"]): preprocess_file(tiny_raw / r["file"], r["laterality"], SIZE)
            for _, r in rows.iterrows()}


def by_hand(root, breast, cesm_given: bool) -> float:
    """Algorithm 1 with the stages' own functions and files: every serving fold of the gate fused with
    its own weights, calibrated with the evaluate stage's temperature of the setting, averaged."""
    from virtual_biopsy.evaluation.calibration import apply_temperature

    paths = ProjectPaths(root)
    served = json.loads((paths.reports / "gate.json").read_text())["resnet18"]["serving_folds"]
    folds = {f.fold: f.weights for f in prepare_folds(load_predictions(paths, ["resnet18"], ("FFDM", "CESM"),
                                                                       ("CC", "MLO")), ("FFDM", "CESM"), ("CC", "MLO"))}
    calibration = json.loads((root / "outputs" / "calibration" / "resnet18.json").read_text(encoding="utf-8"))
    temperature = calibration["settings"]["F+C" if cesm_given else "F+Ĉ"]["temperature"]
    calibrated = []
    for fold in served:
        weights = folds[fold]
        p = {}
        for modality in ("FFDM", "CESM"):
            per_view = {}
            for view in ("CC", "MLO"):
                image = breast["LE", view]
                if modality == "CESM":
                    image = breast["DES", view] if cesm_given else generate(
                        load_generator_weights(paths.serving_generator(view))[0], image[None])[0]
                model = load_classifier(paths.classifier_weights("resnet18", modality, view, fold))[0]
                per_view[view] = predict_proba(model, image[None], [0])
            p[modality] = fuse(per_view, weights.views[modality])
        calibrated.append(float(apply_temperature(fuse(p, weights.modalities), temperature)[0]))
    return float(np.mean(calibrated))


def request_frame(breast, cesm_given: bool) -> pd.DataFrame:
    enc = fused_model.encode_image
    return pd.DataFrame({"ffdm_cc": [enc(breast["LE", "CC"])], "ffdm_mlo": [enc(breast["LE", "MLO"])],
                         "cesm_cc": [enc(breast["DES", "CC"]) if cesm_given else None],
                         "cesm_mlo": [enc(breast["DES", "MLO"]) if cesm_given else None]})


def test_pyfunc_in_a_fresh_process_matches_the_stage_functions(gated_project, breast, tmp_path):
    frame = pd.concat([request_frame(breast, True), request_frame(breast, False)], ignore_index=True)
    frame.to_json(tmp_path / "in.json", orient="split")
    script = ("import sys, pandas as pd, mlflow\n"
              "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
              "m.predict(pd.read_json(sys.argv[2], orient='split')).to_json(sys.argv[3], orient='records')\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.embedded_store(gated_project)[0]}
    subprocess.run([sys.executable, "-c", script, URI, str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out[0]["p"] == pytest.approx(by_hand(gated_project, breast, cesm_given=True), abs=1e-6)
    assert out[1]["p"] == pytest.approx(by_hand(gated_project, breast, cesm_given=False), abs=1e-6)
    assert out[0]["class"] == ("malignant" if out[0]["p"] >= 0.5 else "benign")
    assert [r["p_calibrated"] for r in out] == [r["p"] for r in out]
    assert [(r["setting"], r["n_folds"], r["imputed_cc"], r["imputed_mlo"]) for r in out] == \
        [("F+C", 2, False, False), ("F+Ĉ", 2, True, True)]
    assert all(r["p_fold_min"] <= r["p"] <= r["p_fold_max"] and r["conformal_set"] for r in out)


def test_real_cesm_is_used_and_missing_cesm_is_imputed_and_flagged(gated_project, breast, tmp_path):
    import mlflow

    from virtual_biopsy.mlops.registry import _fluent_store

    with _fluent_store(gated_project):
        fused = mlflow.pyfunc.load_model(URI).unwrap_python_model().pipeline
    real = fused_model.predict_breast(fused, breast["LE", "CC"], breast["LE", "MLO"], breast["DES", "CC"], breast["DES", "MLO"])
    assert real.synthetic == {"CC": False, "MLO": False}
    assert np.array_equal(real.cesm_images["CC"], breast["DES", "CC"])
    none = fused_model.predict_breast(fused, breast["LE", "CC"], breast["LE", "MLO"])
    assert none.synthetic == {"CC": True, "MLO": True}
    half = fused_model.predict_breast(fused, breast["LE", "CC"], breast["LE", "MLO"], cesm_mlo=breast["DES", "MLO"])
    assert half.synthetic == {"CC": True, "MLO": False}
    assert np.array_equal(half.cesm_images["CC"], none.cesm_images["CC"])
    with pytest.raises(fused_model.PipelineInputError, match=r"FFDM CC: expected a preprocessed \(32, 32\)"):
        fused_model.predict_breast(fused, np.zeros((16, 16)), breast["LE", "MLO"])
