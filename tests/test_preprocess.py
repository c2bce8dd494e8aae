"""Preprocess (paper 4.1): padding value and side, orientation, contrast stretch, range, shape."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data import preprocess as preprocess_module
from virtual_biopsy.data.layout import MANIFEST_COLUMNS
from virtual_biopsy.data.preprocess import (
    BACKGROUND_STRIP,
    chest_wall_on_left,
    contrast_stretch,
    mask_coverage,
    pad_to_square,
    preprocess_dataset,
    preprocess_file,
    preprocess_pixels,
    resize_square,
)
from virtual_biopsy.stages import preprocess as preprocess_stage

SIZE = 32


@pytest.fixture(scope="module")
def processed(tiny_raw, make_project, tmp_path_factory) -> ProjectPaths:
    """A temp project after the ingest and preprocess stages (two worker processes)."""
    return make_project(tmp_path_factory.mktemp("project"),
                        {"ingest": {"workers": 2}, "preprocess": {"image_size": SIZE, "workers": 2}},
                        raw=tiny_raw, stages=("ingest", "preprocess"))


# --- single steps on hand-made arrays ----------------------------------------------------------

def _tall_image() -> np.ndarray:
    """8 x 4 image: background 10 in the leftmost column, tissue 100 elsewhere."""
    image = np.full((8, 4), 100.0, dtype=np.float32)
    image[:, 0] = 10.0
    return image


def test_padding_goes_on_the_side_away_from_the_chest_wall_with_the_background_mean():
    image = _tall_image()
    strip = max(1, round(image.shape[1] * BACKGROUND_STRIP))
    padded = pad_to_square(image, float(image[:, :strip].mean()))
    assert padded.shape == (8, 8)
    np.testing.assert_array_equal(padded[:, :4], 10.0)  # chest wall is on the right: pad left
    np.testing.assert_array_equal(padded[:, 4:], image)


def test_wide_image_is_padded_top_and_bottom():
    padded = pad_to_square(np.ones((3, 6), dtype=np.float32), 0.0)
    assert padded.shape == (6, 6)
    assert padded[1:4].all() and not padded[0].any() and not padded[4:].any()


def test_left_breast_is_mirrored_so_a_chest_wall_marker_ends_on_the_right():
    image = np.zeros((64, 48), dtype=np.float32)
    image[28:36, :4] = 1000.0  # marker at the chest wall of a left breast (column 0)
    out = preprocess_pixels(image, center=500.0, width=1000.0, chest_wall_left=True, size=SIZE)
    rows, cols = np.nonzero(out > 0.5)
    assert cols.min() >= SIZE * 3 // 4 and 12 <= rows.mean() <= 20
    kept = preprocess_pixels(image[:, ::-1], center=500.0, width=1000.0, chest_wall_left=False, size=SIZE)
    np.testing.assert_allclose(kept, out, atol=1e-6)  # a right breast with the same anatomy


@pytest.mark.parametrize(
    ("orientation", "laterality", "expected"),
    [(["A", "R"], "R", True), (["P", "L"], "L", False), (None, "L", True), ("", "R", False)],
)
def test_chest_wall_side_comes_from_patient_orientation_then_laterality(orientation, laterality, expected):
    assert chest_wall_on_left(orientation, laterality) is expected


def _right_breast_file(raw: Path) -> Path:
    return next(p for p in sorted((raw / "images").rglob("*.dcm")) if pydicom.dcmread(p).ImageLaterality == "R")


@pytest.mark.parametrize("orientation", [["A", "L"], "A\\L", "A"])
def test_patient_orientation_read_back_from_a_dicom_file_decides_the_chest_wall_side(
        tiny_raw, tmp_path, orientation):
    """A right breast stored with its chest wall on the left (PatientOrientation A, i.e. columns
    run towards the nipple) is mirrored: pydicom gives the tag back as a MultiValue, not a list."""
    source = _right_breast_file(tiny_raw)
    ds = pydicom.dcmread(source)
    ds.PatientOrientation = orientation
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()  # chest wall now on the left
    stored = tmp_path / "chest_wall_left.dcm"
    ds.save_as(stored)
    read_back = pydicom.dcmread(stored)
    assert chest_wall_on_left(read_back.get("PatientOrientation"), "R") is True
    np.testing.assert_array_equal(preprocess_file(stored, "R", SIZE), preprocess_file(source, "R", SIZE))


def test_contrast_stretch_clips_to_the_window_and_spans_zero_to_one():
    image = np.array([[0.0, 100.0, 150.0, 200.0, 1000.0]], dtype=np.float32)
    out = contrast_stretch(image, center=150.0, width=100.0)
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.5, 1.0, 1.0]])


def test_constant_image_stretches_to_zeros_not_nan():
    out = contrast_stretch(np.full((4, 4), 7.0, dtype=np.float32), center=7.0, width=10.0)
    assert np.isfinite(out).all() and not out.any()


def test_resize_keeps_values_in_range_and_averages_instead_of_aliasing():
    checker = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)  # finest possible pattern
    out = resize_square(checker, 16)
    assert out.shape == (16, 16) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out, 0.5, atol=0.05)  # aliasing would give stripes of 0 and 1


def test_resize_of_the_mapped_float_buffer_equals_resizing_a_pillow_copy():
    """resize_square hands Pillow the array's memory (no copy); the values must be what resizing
    Pillow's own copy of it gives, at a processed size and when enlarging (source_geometry)."""
    from PIL import Image

    square = np.random.default_rng(4).random((301, 301), dtype=np.float32)
    for size in (64, 256, 400):
        copied = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(resize_square(square, size), np.clip(copied, 0.0, 1.0))
    assert square.flags.writeable and np.isfinite(square).all()


def test_preprocessing_one_image_after_another_of_other_sizes_gives_each_its_own_result():
    """The padded square is scratch memory reused per thread: a later image, smaller or larger,
    must not see an earlier one, nor an earlier result change."""
    rng = np.random.default_rng(5)
    images = [rng.random(shape, dtype=np.float32) * 1000 for shape in ((40, 30), (40, 30), (25, 50), (60, 20))]
    first = preprocess_pixels(images[0], 500.0, 1000.0, True, SIZE)
    kept = first.copy()
    results = [preprocess_pixels(image, 500.0, 1000.0, True, SIZE) for image in images[1:]]
    np.testing.assert_array_equal(first, kept)
    for image, result in zip(images[1:], results):
        fresh = resize_square(contrast_stretch(pad_to_square(image[:, ::-1], float(image[:, ::-1][:, :2].mean())),
                                               500.0, 1000.0), SIZE)
        assert result.shape == (SIZE, SIZE) and not np.shares_memory(result, first)
        assert np.abs(result - fresh).max() < 0.05  # its own image (background strip aside), not a neighbour's
    assert not np.array_equal(results[0], first)


@pytest.mark.parametrize("seed", range(4))
def test_mask_coverage_from_the_lesion_rows_equals_resizing_the_whole_padded_mask(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        rows, cols = (int(n) for n in rng.integers(20, 300, size=2))
        mask = np.zeros((rows, cols), dtype=bool)
        top, left = int(rng.integers(0, rows)), int(rng.integers(0, cols))
        mask[top: top + int(rng.integers(1, rows)), left: left + int(rng.integers(1, cols))] = True
        mask &= rng.random(mask.shape) < rng.choice([0.5, 1.0])
        chest_wall_left, size = bool(rng.integers(2)), int(rng.choice([8, 32, 64, 256]))
        whole = resize_square(pad_to_square(mask[:, ::-1] if chest_wall_left else mask, 0.0).astype(np.float32), size)
        np.testing.assert_array_equal(mask_coverage(mask, chest_wall_left, size), whole)


def _wide_variant(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The same pixels transposed: wider than tall, so padding goes top and bottom."""
    wide = ds.copy()
    wide.PixelData = np.ascontiguousarray(ds.pixel_array.T).tobytes()
    wide.Rows, wide.Columns = ds.Columns, ds.Rows
    return wide


@pytest.mark.parametrize("laterality", ["L", "R"])
@pytest.mark.parametrize("shape", ["tall", "wide"])
def test_preprocessing_a_dataset_equals_preprocessing_its_pixels(tiny_raw, laterality, shape):
    """preprocess_dataset reads the pixels straight into the padded square; the values must be
    those of reading them and preprocessing the array, exactly."""
    from virtual_biopsy.dicom.read import display_window, read_header, read_pixels

    path = next(p for p in sorted((tiny_raw / "images").rglob("*.dcm")) if pydicom.dcmread(p).ImageLaterality == laterality)
    ds = read_header(path)
    if shape == "wide":
        ds = _wide_variant(pydicom.dcmread(path))
    expected = preprocess_pixels(read_pixels(ds), *display_window(ds),
                                 chest_wall_on_left(ds.get("PatientOrientation"), laterality), SIZE).copy()
    np.testing.assert_array_equal(preprocess_dataset(ds, laterality, SIZE), expected)


# --- the stage on a tiny simulated dataset -----------------------------------------------------

def test_stage_writes_a_memory_mappable_unit_range_array_and_an_index(processed):
    images = np.load(processed.processed_images, mmap_mode="r")
    index = pd.read_csv(processed.processed_index)
    manifest = pd.read_csv(processed.manifest)
    assert isinstance(images, np.memmap) and images.dtype == np.float32
    assert images.shape == (len(manifest), SIZE, SIZE)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert list(index.columns) == [*MANIFEST_COLUMNS, "row"]
    assert index["row"].tolist() == list(range(len(manifest)))
    assert index["image_id"].tolist() == manifest["image_id"].tolist()


def test_every_breast_ends_with_the_chest_wall_on_the_right(processed):
    images = np.load(processed.processed_images, mmap_mode="r")
    half = SIZE // 2
    right, left = images[:, :, half:].mean(axis=(1, 2)), images[:, :, :half].mean(axis=(1, 2))
    assert (right > left).all()


def test_stage_rows_match_preprocessing_each_file_alone(processed):
    images = np.load(processed.processed_images, mmap_mode="r")
    index = pd.read_csv(processed.processed_index)
    for row in (0, len(index) - 1):
        source = pd.read_csv(processed.sources, dtype=str).set_index("image_id").loc[index.at[row, "image_id"]]
        alone = preprocess_file(processed.raw / source["source_path"], index.at[row, "laterality"], SIZE)
        np.testing.assert_array_equal(images[row], alone)


def test_stage_names_the_missing_manifest(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("preprocess:\n  workers: 1\n")
    assert preprocess_stage.main(["--root", str(tmp_path), "--no-mlflow"]) == 1
    err = capsys.readouterr().err
    assert "manifest.csv" in err and "run the ingest stage first" in err


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_processed_folder_is_replaced_as_one_set(processed, tmp_path, monkeypatch):
    """A rerun dying between the array and its index keeps the previous pair; a full rerun gives
    the same bytes and drops a file the stage does not write."""
    root = Path(shutil.copytree(processed.root, tmp_path / "project"))
    paths = ProjectPaths(root)
    before = _digests(paths.processed_dir)
    (paths.processed_dir / "stale.csv").write_text("of an older run")

    def killed(*args, **kwargs):
        raise RuntimeError("killed while writing the index")

    monkeypatch.setattr(preprocess_module, "write_csv", killed)
    with pytest.raises(RuntimeError, match="killed"):
        preprocess_stage.main(["--root", str(root), "--no-mlflow"])
    assert _digests(paths.processed_dir) == {**before, "stale.csv": hashlib.md5(b"of an older run").hexdigest()}
    monkeypatch.undo()
    assert preprocess_stage.main(["--root", str(root), "--no-mlflow"]) == 0
    assert _digests(paths.processed_dir) == before
    assert sorted(p.name for p in paths.processed_dir.parent.iterdir()) == ["interim", "processed", "raw"]


def test_missing_private_sources_table_is_rebuilt_from_the_raw_data(processed, tmp_path):
    """A clone that pulled the outputs (`dvc pull`) has no sources table: it is never pushed."""
    root = Path(shutil.copytree(processed.root, tmp_path / "project"))
    paths = ProjectPaths(root)
    before, sources = _digests(paths.processed_dir), paths.sources.read_bytes()
    paths.sources.unlink()
    assert preprocess_stage.main(["--root", str(root), "--no-mlflow"]) == 0
    assert paths.sources.read_bytes() == sources and _digests(paths.processed_dir) == before


def test_raw_file_that_no_longer_holds_its_image_is_refused(processed, tmp_path, capsys):
    root = Path(shutil.copytree(processed.root, tmp_path / "project"))
    paths = ProjectPaths(root)
    first = pd.read_csv(paths.sources, dtype=str, keep_default_na=False).iloc[0]
    ds = pydicom.dcmread(paths.raw / first["source_path"])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()  # another image under the same path
    ds.save_as(paths.raw / first["source_path"])
    assert preprocess_stage.main(["--root", str(root), "--no-mlflow"]) == 1
    assert "rerun the ingest stage" in capsys.readouterr().err
