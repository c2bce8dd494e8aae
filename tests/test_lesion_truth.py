"""Lesion ground truth through the data layer: the simulator writes it, ingest checks it and keys
it by image id, preprocess carries each mask through its image's geometry."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from virtual_biopsy.core.config import IngestConfig, SynthConfig
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data import phantom
from virtual_biopsy.data.ingest import IngestError, ingest_raw
from virtual_biopsy.data.layout import (
    INTERIM_LESION_COLUMNS,
    LESION_COLUMNS,
    PROCESSED_LESION_COLUMNS,
    lesion_mask_relpath,
)
from virtual_biopsy.data.lesions import read_mask_png, write_mask_png
from virtual_biopsy.data.preprocess import preprocess_mask
from virtual_biopsy.data.synthetic import GLANDULAR_RING_WIDTH, draw_cohort
from virtual_biopsy.stages import ingest as ingest_stage
from virtual_biopsy.stages import preprocess as preprocess_stage

# tiny_raw (conftest): SynthConfig(patients=16, image_height=96), seed 7.
TINY = SynthConfig(patients=16, image_height=96)
TINY_SEED = 7
# sha256 over the relative path and bytes of every DICOM of tiny_raw, recorded before the simulator
# wrote lesion truth: the truth is computed beside the images and must not change one byte of them.
TINY_DICOM_DIGEST = "9a89b2f3d66a063c5ccbdb98fbe7c93dd53c00c9cc660d926b7e8592a5a6031a"
SIZE = 32


def _table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def metadata(tiny_raw) -> pd.DataFrame:
    return _table(tiny_raw / "metadata.csv")


@pytest.fixture(scope="module")
def lesions(tiny_raw) -> pd.DataFrame:
    return _table(tiny_raw / "lesions.csv")


# --- the simulator ---------------------------------------------------------------------------------

def test_simulator_writes_one_mask_per_lesion_image_and_none_for_lesion_free_images(tiny_raw, metadata, lesions):
    assert tuple(lesions.columns) == LESION_COLUMNS
    lesion_images = set(metadata.file[metadata.biopsy != "none"])
    assert lesion_images and set(lesions.file) == lesion_images and lesions.file.is_unique
    assert list(lesions["mask"]) == [lesion_mask_relpath(f) for f in lesions.file]
    on_disk = {p.relative_to(tiny_raw).as_posix() for p in (tiny_raw / "masks").rglob("*") if p.is_file()}
    assert on_disk == set(lesions["mask"])
    assert set(lesions.source) == {"simulator"}


def test_mask_has_the_image_geometry_and_lies_where_the_lesion_enhances(tiny_raw, metadata, lesions):
    malignant = set(metadata.file[(metadata.biopsy == "malignant") & (metadata.energy == "DES")])
    checked = 0
    for row in lesions[lesions.file.isin(malignant)].itertuples():
        des = pydicom.dcmread(tiny_raw / row.file).pixel_array.astype(float)
        mask = read_mask_png(tiny_raw / row.mask)
        assert mask.shape == des.shape
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        assert des[mask].mean() > des[ring].mean() + 100, row.file  # stored units; uptake 0.55 ~ 550
        checked += 1
    assert checked >= 8


def test_le_and_des_of_a_view_and_phase_share_the_mask(tiny_raw, metadata, lesions):
    table = lesions.merge(metadata, on="file")
    for _, group in table.groupby(["patient_id", "laterality", "view", "phase"]):
        assert sorted(group.energy) == ["DES", "LE"]
        le, des = (read_mask_png(tiny_raw / group[group.energy == e]["mask"].iloc[0]) for e in ("LE", "DES"))
        np.testing.assert_array_equal(le, des)


def test_mask_is_the_mass_footprint_in_display_orientation(tiny_raw, lesions):
    breasts = {(r.patient_id, r.laterality): r for r in draw_cohort(TINY, TINY_SEED)}
    for laterality in ("L", "R"):
        row = lesions[lesions.file.str.contains(f"_{laterality}CC_LOW_ENERGY.dcm")].iloc[0]
        record = breasts[(row.file.split("/")[1], laterality)]
        shape = pydicom.dcmread(tiny_raw / row.file).pixel_array.shape
        anatomy = phantom.render_anatomy(record.breast, "CC", *shape)
        expected = phantom.to_display_orientation(anatomy.footprint > 0.5, laterality)
        np.testing.assert_array_equal(read_mask_png(tiny_raw / row["mask"]), expected)


def test_latent_values_are_the_phantoms_and_late_rows_carry_the_late_uptake(tiny_raw, metadata, lesions):
    breasts = {(r.patient_id, r.laterality): r for r in draw_cohort(TINY, TINY_SEED)}
    table = lesions.merge(metadata, on="file")
    assert "late" in set(table.phase)
    for row in table.itertuples():
        breast = breasts[(row.patient_id, row.laterality)].breast
        assert float(row.uptake) == pytest.approx(phantom.lesion_uptake(breast, row.phase == "late"), rel=1e-12)
        assert float(row.le_density_excess) == pytest.approx(phantom.lesion_le_contrast(breast, TINY), rel=1e-12)
    late = table[table.phase == "late"].iloc[0]
    early = table[(table.phase == "early") & (table.patient_id == late.patient_id)
                  & (table.laterality == late.laterality)].iloc[0]
    assert float(late.uptake) != pytest.approx(float(early.uptake))  # wash-out or persistence


def test_glandular_around_is_the_mean_glandular_map_in_the_ring_around_the_mask(tiny_raw, lesions):
    breasts = {(r.patient_id, r.laterality): r for r in draw_cohort(TINY, TINY_SEED)}
    row = lesions[lesions.file.str.contains("MLO_RECOMBINED.dcm")].iloc[0]
    record = breasts[(row.file.split("/")[1], row.file.split("_")[2][0])]
    shape = pydicom.dcmread(tiny_raw / row.file).pixel_array.shape
    anatomy = phantom.render_anatomy(record.breast, "MLO", *shape)
    inside = anatomy.footprint > 0.5
    distance = ndimage.distance_transform_edt(~inside)
    ring = (distance > 0) & (distance <= GLANDULAR_RING_WIDTH * shape[0]) & (anatomy.breast > 0.5)
    assert float(row.glandular_around) == pytest.approx(float(anatomy.glandular[ring].mean()), rel=1e-5)
    assert all(0.0 <= float(v) <= 1.0 for v in lesions.glandular_around)


def test_mask_path_mirrors_the_image_path_and_refuses_a_path_outside_images():
    assert lesion_mask_relpath("images/P1/S1/P1_S1_LCC_RECOMBINED.dcm") == "masks/P1/S1/P1_S1_LCC_RECOMBINED.png"
    with pytest.raises(ValueError, match=r"'masks/P1\.png' is not an image path of the raw layout"):
        lesion_mask_relpath("masks/P1.png")


def test_lesion_truth_leaves_every_dicom_byte_as_it_was(tiny_raw):
    digest = hashlib.sha256()
    for path in sorted((tiny_raw / "images").rglob("*.dcm")):
        digest.update(path.relative_to(tiny_raw).as_posix().encode())
        digest.update(path.read_bytes())
    assert digest.hexdigest() == TINY_DICOM_DIGEST


# --- ingest ------------------------------------------------------------------------------------------

@pytest.fixture
def raw(tiny_raw, tmp_path) -> Path:
    """A private copy of the raw folder that a test may damage."""
    return Path(shutil.copytree(tiny_raw, tmp_path / "data" / "raw"))


def _project(raw: Path) -> ProjectPaths:
    root = raw.parent.parent
    (root / "params.yaml").write_text(f"ingest:\n  workers: 1\npreprocess:\n  workers: 1\n  image_size: {SIZE}\n")
    return ProjectPaths(root)


def test_ingest_writes_the_interim_lesion_table_keyed_by_image_id_without_path_or_patient(raw, lesions):
    paths = _project(raw)
    assert ingest_stage.main(["--root", str(paths.root), "--no-mlflow"]) == 0
    interim = _table(paths.interim_lesions)
    assert tuple(interim.columns) == INTERIM_LESION_COLUMNS
    sources = _table(paths.sources).set_index("image_id")
    manifest = _table(paths.manifest)
    assert set(interim.image_id) <= set(manifest.image_id) and len(interim) == len(lesions)
    raw_rows = lesions.set_index("file")
    for row in interim.itertuples():
        source = sources.loc[row.image_id]
        assert source.mask_path == raw_rows.loc[source.source_path, "mask"]
        assert float(row.uptake) == pytest.approx(float(raw_rows.loc[source.source_path, "uptake"]), rel=1e-12)
    text = paths.interim_lesions.read_text()
    patients = set(_table(raw / "metadata.csv").patient_id) | set(manifest.patient_id)
    assert "images/" not in text and "masks/" not in text and not any(p in text for p in patients)
    assert (sources.loc[~sources.index.isin(interim.image_id), "mask_path"] == "").all()


def test_without_lesions_csv_there_is_no_lesion_truth_and_the_tables_have_their_header_only(raw):
    (raw / "lesions.csv").unlink()
    paths = _project(raw)
    assert ingest_stage.main(["--root", str(paths.root), "--no-mlflow"]) == 0
    assert paths.interim_lesions.read_text().strip() == ",".join(INTERIM_LESION_COLUMNS)
    assert (_table(paths.sources).mask_path == "").all()
    assert preprocess_stage.main(["--root", str(paths.root), "--no-mlflow"]) == 0
    assert not np.load(paths.processed_lesion_masks).any()
    assert paths.processed_lesions.read_text().strip() == ",".join(PROCESSED_LESION_COLUMNS)


def _edit_lesions(raw: Path, edit) -> None:
    table = _table(raw / "lesions.csv")
    table = edit(table) if edit is not None else table
    table.to_csv(raw / "lesions.csv", index=False)


def _first_mask(raw: Path) -> Path:
    return raw / _table(raw / "lesions.csv")["mask"].iloc[0]


def _set_cell(column: str, value: str):
    def edit(table):
        table.loc[0, column] = value
        return table
    return edit


def _write_first_mask(raw: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(_first_mask(raw), format="PNG")


def _mask_shape(raw: Path) -> tuple[int, int]:
    return read_mask_png(_first_mask(raw)).shape


UNKNOWN_IMAGE = "images/P9999/S01/P9999_S01_RCC_LOW_ENERGY.dcm"
BAD_TABLES = {
    "missing column": (lambda raw: _edit_lesions(raw, lambda t: t.drop(columns=["source"])),
                       r"missing column\(s\) \['source'\]"),
    "unknown image": (lambda raw: _edit_lesions(raw, _set_cell("file", UNKNOWN_IMAGE)),
                      r"row 2 \(images/P9999/S01/P9999_S01_RCC_LOW_ENERGY\.dcm\): not an image of this raw folder"),
    "listed twice": (lambda raw: _edit_lesions(raw, lambda t: pd.concat([t, t.iloc[[0]]], ignore_index=True)),
                     r"listed more than once \(first in row 2\)"),
    "source": (lambda raw: _edit_lesions(raw, _set_cell("source", "radiologist")),
               r"row 2 \(images/.*\): source 'radiologist' is not one of \['simulator', 'annotation'\]"),
    "float": (lambda raw: _edit_lesions(raw, _set_cell("uptake", "high")),
              r"row 2 \(images/.*\): uptake 'high' is not a number"),
    "mask outside the raw folder": (lambda raw: _edit_lesions(raw, _set_cell("mask", "../secrets.png")),
                                    r"mask path '\.\./secrets\.png' must be relative to the raw folder"),
    "mask missing": (lambda raw: _first_mask(raw).unlink(), r"row 2 \(images/.*\): mask file masks/.*\.png not found"),
    "mask not a png": (lambda raw: _first_mask(raw).write_bytes(b"not an image"), r"not a readable PNG image"),
    "mask in colour": (lambda raw: _write_first_mask(raw, np.zeros((*_mask_shape(raw), 3), np.uint8)),
                       r"PNG mode 'RGB' with 3 channel\(s\); a mask must be 8-bit single-channel"),
    "mask of another shape": (lambda raw: write_mask_png(_first_mask(raw), np.ones((96, 40), bool)),
                              r"is 96 x 40 pixels but its image is 96 x 81 \(rows x columns\)"),
    "mask empty": (lambda raw: write_mask_png(_first_mask(raw), np.zeros(_mask_shape(raw), bool)),
                   r"is empty \(no pixel is 255\)"),
    "mask values": (lambda raw: _write_first_mask(raw, np.full(_mask_shape(raw), 128, np.uint8)),
                    r"values must be 0 \(outside\) or 255 \(inside\); found \[128\]"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_lesion_table_is_an_ingest_error_naming_row_file_value_and_reason(raw, case):
    damage, message = BAD_TABLES[case]
    damage(raw)
    with pytest.raises(IngestError, match=message) as error:
        ingest_raw(raw, IngestConfig(workers=1))
    assert "lesions.csv" in str(error.value) and "\n" not in str(error.value)


def test_bad_lesion_table_fails_the_stage_in_one_line_and_writes_nothing(raw, capsys):
    paths = _project(raw)
    _edit_lesions(raw, _set_cell("source", "radiologist"))
    assert ingest_stage.main(["--root", str(paths.root), "--no-mlflow"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ingest: ") and "radiologist" in err and "\n" not in err
    assert not any(p.exists() for p in (paths.manifest, paths.interim_lesions, paths.sources, paths.rejected))


def test_lesion_rows_of_rejected_images_go_with_their_images_and_are_counted(raw):
    first = raw / _table(raw / "lesions.csv")["file"].iloc[0]
    first.write_bytes(first.read_bytes()[:500])  # truncated: rejected, and so is its DES partner (unpaired)
    result = ingest_raw(raw, IngestConfig(workers=1, max_rejected_share=1.0))
    assert result.summary["rejected"] == 2 and result.summary["lesion_rows_without_image"] == 2
    assert result.summary["lesion_images"] == len(_table(raw / "lesions.csv")) - 2 == len(result.lesions)
    assert set(result.lesions.image_id) <= set(result.manifest.image_id)


# --- preprocess ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def processed(tiny_raw, make_project, tmp_path_factory) -> ProjectPaths:
    """A temp project after ingest and preprocess (two worker processes)."""
    return make_project(tmp_path_factory.mktemp("lesion-project"),
                        {"ingest": {"workers": 1}, "preprocess": {"image_size": SIZE, "workers": 2}},
                        raw=tiny_raw, stages=("ingest", "preprocess"))


def test_processed_masks_are_binary_row_aligned_with_the_images_and_listed(processed):
    masks = np.load(processed.processed_lesion_masks, mmap_mode="r")
    images = np.load(processed.processed_images, mmap_mode="r")
    index = _table(processed.processed_index)
    table = _table(processed.processed_lesions)
    interim = _table(processed.interim_lesions).set_index("image_id")
    assert masks.dtype == np.uint8 and masks.shape == images.shape == (len(index), SIZE, SIZE)
    assert set(np.unique(masks)) == {0, 1}
    assert tuple(table.columns) == PROCESSED_LESION_COLUMNS
    rows = table.row.astype(int).to_numpy()
    assert (index.image_id.to_numpy()[rows] == table.image_id.to_numpy()).all()
    assert sorted(table.image_id) == sorted(interim.index)
    np.testing.assert_array_equal(masks[rows].sum(axis=(1, 2)), table.mask_pixels.astype(int))
    assert (table.mask_pixels.astype(int) > 0).all()
    assert not masks[np.setdiff1d(np.arange(len(index)), rows)].any()
    pd.testing.assert_frame_equal(table.set_index("image_id")[list(INTERIM_LESION_COLUMNS[1:])],
                                  interim.loc[table.image_id, list(INTERIM_LESION_COLUMNS[1:])])


def test_processed_mask_lies_on_the_lesions_bright_spot_in_left_and_right_breasts(processed):
    masks = np.load(processed.processed_lesion_masks, mmap_mode="r")
    images = np.load(processed.processed_images, mmap_mode="r")
    index = _table(processed.processed_index)
    chosen = index[(index.modality == "CESM") & (index.label == "malignant") & (index.phase == "early")]
    assert set(chosen.laterality) == {"L", "R"}  # a left breast is flipped, a right one is not
    for row in chosen.row.astype(int):
        smooth = ndimage.gaussian_filter(images[row].astype(float), 1.0)
        peak = np.unravel_index(np.argmax(smooth), smooth.shape)
        centre = ndimage.center_of_mass(masks[row])
        assert np.hypot(peak[0] - centre[0], peak[1] - centre[1]) < 2.0, row


def test_mask_goes_through_the_images_orientation_and_padding():
    mask = np.zeros((96, 64), bool)
    mask[40:56, :8] = True  # at the chest wall of a left breast (column 0)
    flipped = preprocess_mask(mask, chest_wall_left=True, size=24)
    rows, cols = np.nonzero(flipped)
    assert cols.min() >= 24 - 3 and 9 <= rows.mean() <= 12  # chest wall on the right, padding on the left
    np.testing.assert_array_equal(preprocess_mask(mask[:, ::-1], chest_wall_left=False, size=24), flipped)


def test_tiny_lesion_keeps_its_most_covered_pixel_instead_of_vanishing():
    mask = np.zeros((96, 80), bool)
    mask[50, 70] = True  # one pixel: about 1/16 of a processed pixel at size 24
    processed = preprocess_mask(mask, chest_wall_left=False, size=24)
    assert processed.sum() == 1
    row, col = np.argwhere(processed)[0]
    assert (row, col) == (50 // 4, (70 + 16) // 4)  # padded 16 columns on the left, then 96 -> 24


def test_mask_whose_geometry_differs_from_its_image_is_a_preprocess_error_naming_the_image(processed, tmp_path,
                                                                                          capsys):
    root = Path(shutil.copytree(processed.root, tmp_path / "project"))
    paths = ProjectPaths(root)
    sources = _table(paths.sources)
    victim = sources[sources.mask_path != ""].iloc[0]
    write_mask_png(paths.raw / victim.mask_path, np.ones((96, 40), bool))  # changed after ingest
    assert preprocess_stage.main(["--root", str(root), "--no-mlflow"]) == 1
    err = capsys.readouterr().err
    assert f"image {victim.image_id}" in err and "96 x 40 pixels but the image is 96 x 81" in err
    assert "masks/" not in err  # the path names the patient
