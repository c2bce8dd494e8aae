"""Pre-training then fine-tuning (paper 5.2.1): the second simulated cohort in the CDD-CESM release
layout, its import, the pretrain_generator stage, and train_generator fine-tuning from any weight
file the project writes (and refusing any other file, clearly)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
import yaml
from dicom_checks import dciodvfy_errors, needs_dciodvfy
from PIL import Image

from virtual_biopsy.core.config import (
    ConfigError,
    GeneratorConfig,
    PretrainCohortConfig,
    SynthConfig,
    params_from_dict,
)
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.cdd_cesm_cohort import (
    JPEG_COMMENT,
    MARKER_FILE,
    SHEET_COLUMNS,
    CohortError,
    write_cohort,
)
from virtual_biopsy.data.importers import import_release
from virtual_biopsy.data.importers.cdd_cesm import (
    ANNOTATION_FILE_NAMES,
    IMAGE_NAME_RE,
    LOW_ENERGY_FOLDER,
    REQUIRED_COLUMNS,
    SEGMENTATION_FILE_NAME,
    SUBTRACTED_FOLDER,
)
from virtual_biopsy.dicom.cesm import is_simulated
from virtual_biopsy.models.weights import (
    WeightsFileError,
    load_generator_weights,
    save_classifier_weights,
    save_generator_weights,
)
from virtual_biopsy.stages import import_pretrain, pretrain_cohort, pretrain_generator, train_generator
from virtual_biopsy.training.datasets import open_images
from virtual_biopsy.training.generator_trainer import build_cyclegan, cyclegan_state, load_pretrained, train_cyclegan
from virtual_biopsy.training.pretraining import holdout_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_COHORT = PretrainCohortConfig(patients=3, image_height=64)
TINY_GAN = GeneratorConfig(ngf=4, ndf=4, n_residual_blocks=1, epochs=1, warmup_epochs=0, patience=1, batch_size=4)
# A project whose pre-training and fine-tuning run in seconds (32 px, a 4-filter CycleGAN).
PROJECT_PARAMS = {
    "seed": 5,
    "preprocess": {"image_size": 32, "workers": 1},
    "ingest": {"workers": 1},
    "split": {"folds": 2},
    "generator": {"views": ["CC"], "ngf": 4, "ndf": 4, "n_residual_blocks": 1, "epochs": 1, "warmup_epochs": 0,
                  "patience": 1, "batch_size": 8, "sample_every": 0,
                  "pretrained_weights": "models/pretrain/{view}.pt"},
    "pretrain": {"cohort": {"patients": 5, "image_height": 64}, "epochs": 2, "warmup_epochs": 0, "patience": 2},
}


# --- the cohort in the release's layout ------------------------------------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort") / "cdd-cesm"
    write_cohort(root, TINY_COHORT, SynthConfig())
    return root


@pytest.fixture(scope="module")
def imported(cohort, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("imported") / "raw"
    import_release("cdd-cesm", cohort, dest)
    return dest


def test_cohort_is_written_in_the_cdd_cesm_release_layout(cohort):
    low, sub = sorted((cohort / LOW_ENERGY_FOLDER).iterdir()), sorted((cohort / SUBTRACTED_FOLDER).iterdir())
    assert low and len(low) == len(sub)
    for path in low + sub:
        match = IMAGE_NAME_RE.match(path.stem)
        assert match and path.suffix == ".jpg", path.name
        assert match["type"] == ("DM" if path.parent.name == LOW_ENERGY_FOLDER else "CM")
    sheet = pd.read_excel(cohort / ANNOTATION_FILE_NAMES[0], sheet_name="all")
    assert tuple(sheet.columns) == SHEET_COLUMNS and set(REQUIRED_COLUMNS) <= set(sheet.columns)
    assert sorted(sheet["Image_name"]) == sorted(p.stem for p in low + sub)
    assert set(sheet["Type"]) == {"DM", "CESM"} and set(sheet["Pathology Classification/ Follow up"]) <= {
        "Normal", "Benign", "Malignant"}
    assert (cohort / SEGMENTATION_FILE_NAME).is_file() and (cohort / MARKER_FILE).is_file()


def test_cohort_jpegs_are_8bit_grayscale_baseline_and_say_they_are_simulated(cohort):
    for path in sorted(cohort.rglob("*.jpg"))[:4]:
        data = path.read_bytes()
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "L"
            assert image.info["comment"].decode() == JPEG_COMMENT and JPEG_COMMENT.startswith("SIMULATED")
        assert b"\xff\xc0" in data  # baseline frame (SOF0)
    sheet = pd.read_excel(cohort / ANNOTATION_FILE_NAMES[0], sheet_name="all")
    assert sheet["Machine"].str.startswith("SIMULATED").all()


def test_cohort_is_the_same_bytes_for_the_same_seed_and_another_cohort_for_another(cohort, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    write_cohort(again, TINY_COHORT, SynthConfig())
    write_cohort(other, dataclasses.replace(TINY_COHORT, seed=TINY_COHORT.seed + 1), SynthConfig())
    for path in sorted(p for p in cohort.rglob("*") if p.is_file()):
        assert (again / path.relative_to(cohort)).read_bytes() == path.read_bytes(), path.name
    name = f"{LOW_ENERGY_FOLDER}/P1_R_DM_CC.jpg"
    assert (other / name).read_bytes() != (cohort / name).read_bytes()


def _le_pixels(root: Path) -> np.ndarray:
    return np.asarray(Image.open(root / LOW_ENERGY_FOLDER / "P1_R_DM_CC.jpg"), dtype=float)


def test_cohort_scanner_look_follows_its_gamma_and_noise_knobs(cohort, tmp_path):
    write_cohort(tmp_path / "bright", dataclasses.replace(TINY_COHORT, le_gamma=0.4), SynthConfig())
    write_cohort(tmp_path / "quiet", dataclasses.replace(TINY_COHORT, noise_sd=0.0), SynthConfig())
    base, bright, quiet = _le_pixels(cohort), _le_pixels(tmp_path / "bright"), _le_pixels(tmp_path / "quiet")
    inside = base > 40
    assert bright[inside].mean() > base[inside].mean() + 10  # a lower gamma lifts the tissue
    # pixel-to-pixel roughness: the noise knob's, on the same anatomy
    assert np.abs(np.diff(quiet, axis=1))[inside[:, 1:]].mean() < np.abs(np.diff(base, axis=1))[inside[:, 1:]].mean()


def test_cohort_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    release = tmp_path / "cdd-cesm"
    (release / LOW_ENERGY_FOLDER).mkdir(parents=True)
    (release / LOW_ENERGY_FOLDER / "P1_L_DM_CC.jpg").write_bytes(b"a real image")
    with pytest.raises(CohortError, match=r"cdd-cesm: holds files that are not the simulated cohort .*release_dir"):
        write_cohort(release, TINY_COHORT, SynthConfig())
    assert (release / LOW_ENERGY_FOLDER / "P1_L_DM_CC.jpg").read_bytes() == b"a real image"


def test_importer_reads_every_cohort_image_with_its_label_and_lesion_outline(cohort, imported):
    report = pd.read_csv(imported / "import_report.csv", keep_default_na=False)
    images = sorted(cohort.rglob("*.jpg"))
    assert (report["status"] == "imported").sum() == len(images)
    assert set(report.loc[report["status"] != "imported", "status"]) <= {"ignored"}
    metadata = pd.read_csv(imported / "metadata.csv")
    sheet = pd.read_excel(cohort / ANNOTATION_FILE_NAMES[0], sheet_name="all")
    lesion_images = (sheet["Pathology Classification/ Follow up"] != "Normal").sum()
    assert len(metadata) == len(images) and (metadata["biopsy"] != "none").sum() == lesion_images
    assert len(pd.read_csv(imported / "lesions.csv")) == lesion_images  # every lesion image has its mask


def test_every_dicom_the_importer_writes_from_the_cohort_is_marked_simulated(imported):
    files = sorted(imported.rglob("*.dcm"))
    assert files
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert is_simulated(ds) and str(ds.ImageComments).startswith("SIMULATED"), path.name


@needs_dciodvfy
def test_cohort_dicom_passes_dciodvfy_without_errors(imported):
    files = sorted(imported.rglob("*.dcm"))
    kinds = {re.sub(r"^P\d+_S1_[LR]", "", p.stem): p for p in files}  # one of CC/MLO x LE/DES each
    assert sorted(kinds) == ["CC_LOW_ENERGY", "CC_RECOMBINED", "MLO_LOW_ENERGY", "MLO_RECOMBINED"]
    for path in kinds.values():
        assert dciodvfy_errors(path) == [], path.name


# --- loading pretrained weights --------------------------------------------------------------

def _fresh() -> dict:
    return build_cyclegan(TINY_GAN, seed=0)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fold_or_serving_file_loads_its_generator_and_leaves_the_rest_fresh(tmp_path):
    donor = build_cyclegan(TINY_GAN, seed=42)
    path = tmp_path / "fold0.pt"
    save_generator_weights(path, donor["generator_ab"].state_dict(), TINY_GAN, view="CC", fold=0, image_size=32)
    nets = _fresh()
    assert load_pretrained(nets, path, image_size=32) == ["generator_ab"]
    assert _equal(nets["generator_ab"].state_dict(), donor["generator_ab"].state_dict())
    assert _equal(nets["generator_ba"].state_dict(), _fresh()["generator_ba"].state_dict())


def test_a_cyclegan_checkpoint_loads_all_four_networks(tmp_path, images32):
    train_cyclegan(*images32, TINY_GAN, seed=1, checkpoint_dir=tmp_path)
    record = torch.load(tmp_path / "last.pt", weights_only=True)
    nets = _fresh()
    assert load_pretrained(nets, tmp_path / "last.pt") == sorted(record["networks"])
    assert all(_equal(nets[name].state_dict(), record["networks"][name]) for name in record["networks"])


def test_a_file_that_is_not_torch_is_refused_naming_it(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not weights")
    with pytest.raises(WeightsFileError, match=r"notes.pt: not a readable torch weights file"):
        load_pretrained(_fresh(), path)


def test_a_classifiers_weights_are_refused_as_such(tmp_path):
    path = tmp_path / "classifier.pt"
    save_classifier_weights(path, {"fc.weight": torch.zeros(2, 2)}, arch="resnet18", modality="CESM")
    with pytest.raises(WeightsFileError, match=r"classifier.pt: holds a classifier's weights \(arch resnet18\), "
                                               r"not a generator's; expected a generator weights file"):
        load_pretrained(_fresh(), path)


@pytest.mark.parametrize("change, found", [({"ngf": 8}, "ngf=8, n_residual_blocks=1"),
                                           ({"n_residual_blocks": 3}, "ngf=4, n_residual_blocks=3")])
def test_a_generator_of_another_size_is_refused_saying_expected_and_found(tmp_path, change, found):
    other = dataclasses.replace(TINY_GAN, **change)
    path = tmp_path / "other.pt"
    save_generator_weights(path, build_cyclegan(other, seed=0)["generator_ab"].state_dict(), other, view="CC")
    with pytest.raises(WeightsFileError, match=re.escape(
            f"other.pt: weights for generator_ab do not fit this architecture: expected a generator of "
            f"ngf=4, n_residual_blocks=1 (params generator section), found {found}")):
        load_pretrained(_fresh(), path)


def test_discriminators_of_another_width_are_refused(tmp_path):
    path = tmp_path / "wide_d.pt"
    torch.save(cyclegan_state(build_cyclegan(dataclasses.replace(TINY_GAN, ndf=8), seed=0)), path)
    with pytest.raises(WeightsFileError, match=r"wide_d.pt: weights for discriminator_a do not fit .*expected a "
                                               r"discriminator of ndf=4 .*found ndf=8"):
        load_pretrained(_fresh(), path)


def test_a_generator_recorded_at_another_image_size_is_refused(tmp_path):
    path = tmp_path / "big.pt"
    save_generator_weights(path, _fresh()["generator_ab"].state_dict(), TINY_GAN, view="CC", image_size=256)
    with pytest.raises(WeightsFileError, match=r"big.pt: generator trained at 256 px; expected 32 px"):
        load_pretrained(_fresh(), path, image_size=32)


def test_an_unresolved_view_placeholder_or_a_missing_file_is_refused(tmp_path):
    with pytest.raises(WeightsFileError, match=r"still holds the \{view\} placeholder"):
        load_pretrained(_fresh(), "models/pretrain/{view}.pt")
    with pytest.raises(FileNotFoundError, match=r"absent.pt: no such pretrained weights file .*pretrain_generator"):
        load_pretrained(_fresh(), tmp_path / "absent.pt")


@pytest.fixture
def images32(tmp_path):
    """Train and val datasets of 4 and 2 random LE/DES pairs at 32 px."""
    from virtual_biopsy.training.datasets import PairedImageDataset

    rng = np.random.default_rng(0)
    path = tmp_path / "images.npy"
    np.save(path, rng.uniform(0, 1, (12, 32, 32)).astype(np.float32))
    array = open_images(path)
    return PairedImageDataset(array, range(4), range(6, 10)), PairedImageDataset(array, [4, 5], [10, 11])


# --- config ----------------------------------------------------------------------------------

def test_pretrained_weights_placeholder_is_filled_per_view_from_the_root():
    cfg = GeneratorConfig(pretrained_weights="models/pretrain/{view}.pt")
    assert cfg.for_view("MLO", Path("/p")).pretrained_weights == "/p/models/pretrain/MLO.pt"
    assert GeneratorConfig().for_view("CC", Path("/p")).pretrained_weights is None  # null: from scratch


@pytest.mark.parametrize("section, key, value", [("cohort", "le_gamma", 0), ("cohort", "patients", 1),
                                                 (None, "val_share", 1.0), (None, "epochs", 0)])
def test_unusable_pretrain_values_are_refused_naming_the_key(section, key, value):
    raw = {section: {key: value}} if section else {key: value}
    name = f"pretrain.{section}.{key}" if section else f"pretrain.{key}"
    with pytest.raises(ConfigError, match=re.escape(name)):
        params_from_dict({"pretrain": raw})


def test_holdout_keeps_every_patient_on_one_side_and_at_least_one_on_each():
    pairs = pd.DataFrame({"patient_id": ["a", "a", "b", "c", "c", "d"], "le_row": range(6), "des_row": range(6)})
    split = holdout_pairs(pairs, 0.01, seed=0)
    assert split["val"]["patient_id"].nunique() == 1 and not split["train"].empty
    assert not set(split["train"]["patient_id"]) & set(split["val"]["patient_id"])
    assert len(split["train"]) + len(split["val"]) == len(pairs)


# --- the stages: pre-train, then fine-tune ---------------------------------------------------

@pytest.fixture(scope="module")
def pretrained_project(tmp_path_factory, make_project) -> ProjectPaths:
    """A tiny embedded project (ingest, preprocess, split done) after pretrain_cohort,
    import_pretrain and pretrain_generator --view CC, as DVC runs them, without MLflow."""
    root = tmp_path_factory.mktemp("pretrained")
    paths = make_project(root, PROJECT_PARAMS, synth=SynthConfig(patients=16, image_height=64,
                                                                   malignant_share=0.5), seed=7)
    args = ["--root", str(root)]
    assert pretrain_cohort.main(args) == 0
    assert import_pretrain.main([*args, "--no-mlflow"]) == 0
    assert pretrain_generator.main([*args, "--view", "CC", "--no-mlflow"]) == 0
    return paths


def test_import_pretrain_brings_the_release_in_through_import_ingest_and_preprocess(pretrained_project):
    source = pretrained_project.pretrain
    index = pd.read_csv(source.processed_index)
    raw_images = list((source.raw / "images").rglob("*.dcm"))
    assert len(index) == len(raw_images) == len(list(pretrained_project.simulated_release.rglob("*.jpg")))
    assert open_images(source.processed_images).shape[1:] == (32, 32)  # preprocess.image_size
    assert index["patient_id"].nunique() == PROJECT_PARAMS["pretrain"]["cohort"]["patients"]
    assert not index["patient_id"].str.match(r"^P\d+$").any()  # ingest's pseudonyms, not the release's ids


def test_pretrain_generator_writes_a_generator_file_with_all_four_networks(pretrained_project):
    path = pretrained_project.pretrain_weights("CC")
    generator, info = load_generator_weights(path)  # the project's generator format
    assert info["view"] == "CC" and info["image_size"] == 32 and (info["ngf"], info["n_residual_blocks"]) == (4, 1)
    assert sorted(info["networks"]) == ["discriminator_a", "discriminator_b", "generator_ba"]
    report = yaml.safe_load(pretrained_project.pretrain_report("CC").read_text())
    assert report["pairs"]["train"] > 0 and report["pairs"]["val"] > 0 and report["epochs_run"] >= 1


def test_train_generator_fine_tunes_each_fold_from_the_pretrained_weights(pretrained_project, tmp_path):
    """At a learning rate too small to move a weight, a fold's trained generator still is the
    pre-trained one: every fold started from it."""
    params = yaml.safe_load((pretrained_project.root / "params.yaml").read_text())
    params["generator"]["lr"] = 1e-12
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    root = str(pretrained_project.root)
    assert train_generator.main(["--view", "CC", "--root", root, "--params", str(params_file), "--no-mlflow"]) == 0
    pretrained, _ = load_generator_weights(pretrained_project.pretrain_weights("CC"))
    scratch = build_cyclegan(params_from_dict(params).generator, seed=0)["generator_ab"]
    for fold in (0, 1):
        tuned, _ = load_generator_weights(pretrained_project.generator_weights("CC", fold))
        for name, value in tuned.state_dict().items():
            torch.testing.assert_close(value, pretrained.state_dict()[name], atol=1e-6, rtol=0)
        assert not torch.allclose(tuned.net[1].weight, scratch.net[1].weight)


def test_train_generator_without_its_pretrained_file_exits_1_naming_it(pretrained_project, tmp_path, capsys):
    params = yaml.safe_load((pretrained_project.root / "params.yaml").read_text())
    params["generator"]["pretrained_weights"] = "models/missing/{view}.pt"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    argv = ["--view", "CC", "--root", str(pretrained_project.root), "--params", str(params_file), "--no-mlflow"]
    assert train_generator.main(argv) == 1
    assert re.search(r"models/missing/CC.pt: no such pretrained weights file", capsys.readouterr().err)


def test_the_view_placeholder_reaches_dvc_quoted_so_hydra_keeps_it_a_string():
    from virtual_biopsy.core.experiments import exp_run_command

    command = exp_run_command({"generator.pretrained_weights": "models/pretrain/{view}.pt", "pretrain.lr": 0.1}, "x")
    assert command[-3:] == ['generator.pretrained_weights="models/pretrain/{view}.pt"', "-S", "pretrain.lr=0.1"]
