"""What the MLflow runs record: data-stage durations that cover the stage's work, and fold runs
with their hyperparameters and the datasets they trained, validated and were tested on."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from virtual_biopsy.core.config import Params, SynthConfig
from virtual_biopsy.data.synthetic import synthesize
from virtual_biopsy.mlops import tracking
from virtual_biopsy.stages import ingest, preprocess, split, train_classifier, validate_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA_PARAMS = {
    "seed": 11,
    "ingest": {"workers": 1},
    "preprocess": {"image_size": 32, "workers": 1},
    "validate_data": {"min_patients": 10, "malignant_share_range": [0.3, 0.9]},
    "split": {"folds": 2, "val_share": 0.25, "test_share": 0.5},
    "classifier": {"epochs": 2, "warmup_epochs": 1, "patience": 1, "lr_patience": 1, "batch_size": 8},
}
# The first file each data stage writes, relative to the project root.
FIRST_OUTPUT = {"ingest": "data/interim/manifest.csv", "preprocess": "data/processed/images.npy",
                "validate_data": "reports/validation/results.json", "split": "data/splits/folds.csv"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Synth (16 patients, balanced), the four data stages and train_classifier FFDM-CC, each
    through its command line with MLflow on the project's embedded store."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv(tracking.PARENT_RUN_ENV, raising=False)
        root = tmp_path_factory.mktemp("run-records")
        synthesize(root / "data" / "raw", SynthConfig(patients=16, image_height=64, malignant_share=0.5), seed=7)
        (root / "params.yaml").write_text(yaml.safe_dump(DATA_PARAMS))
        for stage in (ingest, preprocess, validate_data, split):
            assert stage.main(["--root", str(root)]) == 0, stage.__name__
        assert train_classifier.main(["--arch", "resnet18", "--modality", "FFDM", "--view", "CC",
                                      "--root", str(root)]) == 0
        yield root


def runs(root, filter_string: str = "") -> list:
    client = tracking.get_client(root)
    exp = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    # search_runs leaves out the dataset inputs on some stores: read each run whole.
    return [client.get_run(r.info.run_id) for r in client.search_runs([exp.experiment_id], filter_string)]


def datasets(run) -> dict[str, tuple[str, object]]:
    """{dataset name: (context, dataset entity)} of a run's inputs."""
    out = {}
    for item in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in item.tags}.get(tracking.DATASET_CONTEXT_TAG)
        out[item.dataset.name] = (context, item.dataset)
    return out


def test_data_stage_runs_open_before_the_stage_writes_its_first_output(project):
    for stage, output in FIRST_OUTPUT.items():
        (run,) = runs(project, f"tags.stage = '{stage}'")
        written_ms = (project / output).stat().st_mtime_ns // 1_000_000
        assert run.info.start_time <= written_ms <= run.info.end_time, (stage, run.info, written_ms)


def test_classifier_fold_runs_carry_the_classifier_section_and_their_datasets(project):
    folds = runs(project, "tags.stage = 'train_classifier' and tags.fold != ''")
    assert sorted(r.data.tags["fold"] for r in folds) == ["0", "1"]
    for run in folds:
        fold = run.data.tags["fold"]
        params = run.data.params
        assert params["classifier.epochs"] == "2" and params["classifier.batch_size"] == "8", params
        assert {"classifier.lr", "classifier.weight_decay", "classifier.augment"} <= set(params)
        found = datasets(run)
        assert {name: context for name, (context, _) in found.items()} == {
            f"FFDM-CC fold {fold} {subset}": subset for subset in ("train", "val", "test")}
        for subset in ("train", "val", "test"):
            dataset = found[f"FFDM-CC fold {fold} {subset}"][1]
            source = json.loads(dataset.source)["tags"]
            assert dataset.source_type == "code"
            assert source["data_version"] == run.data.tags["data_version"]
            assert source["table"] == "data/processed/index.csv" and source["fold"] == fold
            assert int(source["rows"]) == int(params[f"images_{subset}"]) == json.loads(dataset.profile)["num_rows"]
            assert int(source["y=0"]) > 0 and int(source["y=1"]) > 0, source
            columns = {c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
            assert columns <= set(tracking.DATASET_COLUMNS) and "patient_id" in columns, columns
            assert not columns & {"image_id", "source_path", "pair_key"}


def test_classifier_stage_run_carries_the_classifier_section(project):
    (stage,) = [r for r in runs(project, "tags.stage = 'train_classifier'") if "fold" not in r.data.tags]
    assert stage.data.params["classifier.epochs"] == "2"


def test_generator_fold_runs_carry_the_generator_section_and_their_pair_tables(generator_project):
    folds = [r for r in runs(generator_project, "tags.stage = 'train_generator'")
             if r.info.run_name.startswith("fold-")]
    assert sorted(r.info.run_name for r in folds) == ["fold-0", "fold-1"]
    for run in folds:
        fold = run.data.tags["fold"]
        assert run.data.params["generator.ngf"] == "4" and run.data.params["generator.epochs"] == "2"
        found = datasets(run)
        assert {name: context for name, (context, _) in found.items()} == {
            f"LE/DES CC pairs fold {fold} {subset}": subset for subset in ("train", "val", "test")}
        for subset in ("train", "val", "test"):
            dataset = found[f"LE/DES CC pairs fold {fold} {subset}"][1]
            assert json.loads(dataset.profile)["num_rows"] == int(run.data.params[f"pairs_{subset}"])
            columns = {c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
            assert "le_row" in columns and not columns & {"le_image_id", "pair_key"}, columns


def test_logged_tables_keep_only_pseudonymous_columns():
    table = pd.DataFrame({"image_id": ["1.2.3"], "source_path": ["images/SITE-ID/S1/x.dcm"], "patient_id": ["p-1f3a"],
                          "pair_key": ["p-1f3a|s|L|CC|early"], "acr": [None], "y": [1], "row": [4]})
    kept = tracking.dataset_table(table)
    assert list(kept.columns) == ["patient_id", "acr", "y", "row"]
    assert kept.at[0, "acr"] == ""
    assert tracking.table_counts(kept, "y") == {"rows": 1, "patients": 1, "y=1": 1}


def test_section_params_redact_secrets():
    flat = tracking.section_params(Params(), "ingest")
    assert flat["ingest.pseudonym_salt"] == "<redacted>"
    assert all(key.startswith("ingest.") for key in flat)
