"""The embedded simulated dataset (vbiopsy synth): layout, cohort, physics, determinism, CLI."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage

from virtual_biopsy.cli.main import main
from virtual_biopsy.core.config import SynthConfig
from virtual_biopsy.data import phantom
from virtual_biopsy.data.layout import FILE_NAME_RE, METADATA_COLUMNS, image_relpath
from virtual_biopsy.data.synthetic import SynthError, allot, draw_cohort, synthesize
from virtual_biopsy.dicom.cesm import energy_of, is_simulated

SMALL = SynthConfig(patients=3, image_height=64)


def folder_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def metadata(tiny_raw: Path) -> pd.DataFrame:
    return pd.read_csv(tiny_raw / "metadata.csv", dtype=str, keep_default_na=False)


def test_metadata_lists_every_image_file_in_the_raw_layout(tiny_raw, metadata):
    assert tuple(metadata.columns) == METADATA_COLUMNS
    on_disk = sorted(p.relative_to(tiny_raw).as_posix() for p in (tiny_raw / "images").rglob("*.dcm"))
    assert sorted(metadata.file) == on_disk
    for row in metadata.itertuples():
        assert row.file == image_relpath(row.patient_id, row.study_id, row.laterality, row.view, row.energy,
                                         row.phase == "late")
        assert FILE_NAME_RE.match(Path(row.file).name)
    assert (tiny_raw / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dicom_tags_agree_with_metadata(tiny_raw, metadata):
    for row in metadata.iloc[::7].itertuples():
        ds = pydicom.dcmread(tiny_raw / row.file)
        assert (ds.PatientID, ds.ImageLaterality, ds.ViewPosition, energy_of(ds)) == (
            row.patient_id, row.laterality, row.view, row.energy)
        assert is_simulated(ds) and "SIMULATED" in ds.SeriesDescription
        assert ds.Rows == 96 and ds.BitsStored == 12


def test_every_le_image_has_a_des_partner_of_the_same_breast_and_compression(tiny_raw, metadata):
    keys = ["patient_id", "study_id", "laterality", "view", "phase"]
    energies = metadata.groupby(keys).energy.apply(sorted)
    assert all(e == ["DES", "LE"] for e in energies)
    first = metadata.iloc[0]
    partner = metadata[(metadata[keys] == first[keys]).all(axis=1) & (metadata.energy != first.energy)].iloc[0]
    le, des = pydicom.dcmread(tiny_raw / first.file), pydicom.dcmread(tiny_raw / partner.file)
    assert le.FrameOfReferenceUID == des.FrameOfReferenceUID and le.SOPInstanceUID != des.SOPInstanceUID


def test_label_acr_and_age_are_constant_per_breast(metadata):
    per_breast = metadata.groupby(["patient_id", "laterality"])[["biopsy", "acr", "age"]].nunique()
    assert (per_breast == 1).all().all()


def test_tiny_cohort_holds_every_label_late_phase_and_unreported_density(metadata):
    early = metadata[metadata.phase == "early"]
    assert {"malignant", "benign", "none"} <= set(early.biopsy)
    assert "late" in set(metadata.phase)
    assert "" in set(metadata.acr) and set(metadata.acr) - {""} <= {"a", "b", "c", "d"}
    ages = metadata.age.astype(int)
    assert ages.between(31, 90).all()


def test_cohort_follows_configured_shares():
    config = SynthConfig(patients=200)
    cohort = draw_cohort(config, seed=1)
    lesions = [r.label for r in cohort if r.label != "none"]
    assert abs(len(lesions) / len(cohort) - config.lesion_share) < 0.01
    assert abs(lesions.count("malignant") / len(lesions) - config.malignant_share) < 0.01
    assert abs(sum(r.late for r in cohort) / len(cohort) - config.late_phase_share) < 0.01
    assert 0.17 <= sum(r.acr_reported == "" for r in cohort) / len(cohort) <= 0.23


def test_allot_gives_exact_quota_counts():
    drawn = allot(10, (0.72, 0.28), np.random.default_rng(0))
    assert sorted(np.bincount(drawn)) == [3, 7]


def test_chest_wall_is_on_the_right_for_right_breasts_and_left_for_left(tiny_raw, metadata):
    for laterality in ("R", "L"):
        row = metadata[(metadata.laterality == laterality) & (metadata.energy == "LE")].iloc[0]
        pixels = pydicom.dcmread(tiny_raw / row.file).pixel_array.astype(float)
        left, right = pixels[:, :5].mean(), pixels[:, -5:].mean()
        assert (right > left) if laterality == "R" else (left > right)


def test_le_window_is_wider_than_des_window(tiny_raw, metadata):
    early = metadata[metadata.phase == "early"]
    widths = {e: [float(pydicom.dcmread(tiny_raw / f).WindowWidth) for f in early[early.energy == e].file[:6]]
              for e in ("LE", "DES")}
    assert min(widths["LE"]) > 1.5 * max(widths["DES"])


def _lesion_contrasts(label: str, config: SynthConfig, draws: int = 12) -> tuple[float, float]:
    """Mean LE and DES contrast of a mass over its surroundings, noise-free, at 128 px."""
    quiet = SynthConfig(**{**config.__dict__, "noise_sd": 0.0})
    le_values, des_values = [], []
    for i in range(draws):
        breast = phantom.draw_breast("c", label, quiet, np.random.default_rng([3, i]))
        anatomy = phantom.render_anatomy(breast, "CC", 128, 108)
        inside = anatomy.footprint > 0.5
        near = ndimage.binary_dilation(inside, iterations=8) & ~ndimage.binary_dilation(inside, iterations=3)
        ring = near & (anatomy.breast > 0.5) & (anatomy.spicules < 0.05)
        le = phantom.low_energy_image(anatomy, breast, quiet, np.random.default_rng(0))
        des = phantom.recombined_image(anatomy, breast, quiet, False, np.random.default_rng(0))
        le_values.append(le[inside].mean() - le[ring].mean())
        des_values.append(des[inside].mean() - des[ring].mean())
    return float(np.mean(le_values)), float(np.mean(des_values))


def test_malignant_masses_enhance_more_than_benign_and_more_in_des_than_le():
    le_malignant, des_malignant = _lesion_contrasts("malignant", SynthConfig())
    le_benign, des_benign = _lesion_contrasts("benign", SynthConfig())
    assert des_malignant > des_benign > 0
    assert des_malignant > 2 * abs(le_malignant)
    assert abs(le_malignant - le_benign) < des_malignant - des_benign


def test_des_depends_on_anatomy_and_enhancement_only_not_on_le_noise():
    config = SynthConfig()
    breast = phantom.draw_breast("b", "malignant", config, np.random.default_rng(5))
    anatomy = phantom.render_anatomy(breast, "MLO", 96, 80)
    des_a = phantom.recombined_image(anatomy, breast, config, False, np.random.default_rng(1))
    des_b = phantom.recombined_image(anatomy, breast, config, False, np.random.default_rng(2))
    le = phantom.low_energy_image(anatomy, breast, config, np.random.default_rng(1))
    # DES is a function of the anatomy (LE shows it) and the enhancement: two draws differ by
    # independent noise only, of the documented size (2 x noise_sd per image)
    difference = des_a - des_b
    assert abs(difference.mean()) < 0.01
    assert difference.std() == pytest.approx(np.sqrt(2) * phantom.DES_NOISE_FACTOR * config.noise_sd, rel=0.1)
    # and it is strongly predictable from the LE image of the same compression
    inside = anatomy.breast > 0.5
    assert np.corrcoef(le[inside], des_a[inside])[0, 1] > 0.3


def test_gaussian_blur_is_ndimage_bit_for_bit_below_the_fft_radius_and_to_rounding_above():
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((120, 700)).astype(np.float32)
    narrow = (2.0, (phantom.FFT_MIN_RADIUS - 1) / phantom.GAUSSIAN_TRUNCATE)  # the direct filter on both axes
    np.testing.assert_array_equal(phantom.gaussian_blur(noise, narrow),
                                  ndimage.gaussian_filter(noise, narrow, mode="reflect"))
    wide = (3.0, 2 * phantom.FFT_MIN_RADIUS / phantom.GAUSSIAN_TRUNCATE)  # axis 1 by FFT
    fast, direct = phantom.gaussian_blur(noise, wide), ndimage.gaussian_filter(noise, wide, mode="reflect")
    assert fast.dtype == np.float32 and fast.shape == noise.shape
    np.testing.assert_allclose(fast, direct, rtol=0, atol=1e-6 * float(np.abs(direct).max()))


def test_gaussian_blur_keeps_a_non_negative_map_non_negative():
    """FFT rounding alone would leave values of -1e-12 on a zero background (and NaN after the
    BPE map's power 1.5); the direct filter's convex weights cannot."""
    tissue = np.zeros((60, 900), np.float32)
    tissue[20:40, 100:200] = 1.0
    blurred = phantom.gaussian_blur(tissue, 2 * phantom.FFT_MIN_RADIUS / phantom.GAUSSIAN_TRUNCATE)
    assert blurred.min() >= 0.0 and blurred.max() <= 1.0 and np.isfinite(blurred ** 1.5).all()


def test_regenerating_with_same_arguments_gives_identical_bytes(tmp_path):
    synthesize(tmp_path / "one", SMALL, seed=11)
    synthesize(tmp_path / "two", SMALL, seed=11)
    assert folder_digest(tmp_path / "one") == folder_digest(tmp_path / "two")


def test_another_seed_gives_another_dataset(tmp_path):
    synthesize(tmp_path / "one", SMALL, seed=11)
    synthesize(tmp_path / "two", SMALL, seed=12)
    assert folder_digest(tmp_path / "one") != folder_digest(tmp_path / "two")


def test_refuses_to_overwrite_a_non_empty_folder_unless_forced(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SynthError, match=r"raw: folder is not empty; pass --force"):
        synthesize(out, SMALL, seed=1)
    assert (out / "keep.txt").exists()
    synthesize(out, SMALL, seed=1, force=True)
    assert not (out / "keep.txt").exists() and (out / "metadata.csv").exists()


@pytest.mark.parametrize("bad,message", [
    (SynthConfig(patients=0), "patients must be at least 1, got 0"),
    (SynthConfig(image_height=20), "image height must be at least 48 pixels, got 20"),
    (SynthConfig(lesion_share=1.5), r"lesion_share must lie in \[0, 1\], got 1.5"),
])
def test_rejects_unusable_settings_naming_the_value(tmp_path, bad, message):
    with pytest.raises(SynthError, match=message):
        synthesize(tmp_path / "raw", bad, seed=1)
    assert not (tmp_path / "raw").exists()


def test_cli_applies_overrides_and_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "raw"
    assert main(["synth", "--out", str(out), "--patients", "2", "--image-size", "64", "--seed", "5",
                 "--params", str(Path(__file__).parents[1] / "params.yaml")]) == 0
    table = pd.read_csv(out / "metadata.csv")
    assert table.patient_id.nunique() == 2
    assert pydicom.dcmread(out / table.file.iloc[0]).Rows == 64
    assert "wrote" in capsys.readouterr().out


def test_cli_reports_an_occupied_folder_in_one_line(tmp_path, capsys):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "x").write_text("x")
    assert main(["synth", "--out", str(out), "--patients", "1", "--image-size", "64"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not empty" in err and str(out) in err


def test_cli_reports_a_bad_params_file(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("synth:\n  patiens: 3\n")
    assert main(["synth", "--out", str(tmp_path / "raw"), "--params", str(bad)]) == 1
    assert "patiens" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian dicom3tools) missing; scripts/install_system_deps.sh installs it")
@pytest.mark.parametrize("energy", ["LE", "DES"])
def test_generated_images_pass_dciodvfy_without_errors(tiny_raw, metadata, energy):
    for row in metadata[metadata.energy == energy].iloc[[0, -1]].itertuples():
        report = subprocess.run(["dciodvfy", str(tiny_raw / row.file)], capture_output=True, text=True, check=False)
        lines = (report.stdout + report.stderr).splitlines()
        assert lines[0].strip() == "MammographyImageForPresentation"
        assert [line for line in lines if line.startswith("Error")] == [], row.file


# The embedded test bed's physics, frozen (README "The embedded dataset"): its knobs were once
# changed after results were seen, so a change now needs a reason stronger than a result, and this
# test (and data.dvc) says so loudly. The docs' tables must say the same values.
FROZEN_PHYSICS = {
    "le_lesion_contrast": 0.06, "le_uptake_coupling": 3.0, "des_glandular_suppression": 0.85,
    "bpe_strength": 0.25, "malignant_enhancement": 0.55, "benign_enhancement": 0.30,
    "enhancement_spread": 0.20, "noise_sd": 0.015,
}
REPO = Path(__file__).resolve().parents[1]


def test_physics_defaults_are_frozen_in_the_config_and_params_yaml():
    import yaml

    defaults = SynthConfig()
    assert {k: getattr(defaults, k) for k in FROZEN_PHYSICS} == FROZEN_PHYSICS
    synth = yaml.safe_load((REPO / "params.yaml").read_text())["synth"]
    assert {k: synth[k] for k in FROZEN_PHYSICS} == FROZEN_PHYSICS


def test_the_documented_physics_tables_state_the_frozen_values():
    from virtual_biopsy.data import synthetic

    docstring = {m.group(1): float(m.group(2)) for m in
                 re.finditer(r"^(\w+)\s{2,}([0-9.]+)\s{2,}", synthetic.__doc__, flags=re.M)}
    readme = {m.group(1): float(m.group(2)) for m in
              re.finditer(r"^\| `(\w+)` \| ([0-9.]+) \|", (REPO / "README.md").read_text(),
                                        flags=re.M)}
    for name, table in (("data/synthetic.py's docstring", docstring), ("README.md", readme)):
        assert {k: table.get(k) for k in FROZEN_PHYSICS} == FROZEN_PHYSICS, name
