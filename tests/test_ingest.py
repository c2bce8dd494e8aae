"""Ingest: reading DICOM like a viewer, rejecting every unusable file with its reason, pairing."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from virtual_biopsy.core.config import IngestConfig
from virtual_biopsy.core.paths import ProjectPaths
from virtual_biopsy.data.ingest import file_key, ingest_raw, pseudonymize, rejected_reasons
from virtual_biopsy.data.layout import MANIFEST_COLUMNS
from virtual_biopsy.dicom.read import (
    DicomReadError,
    display_window,
    presentation_range,
    read_dataset,
    read_header,
    read_pixels,
)
from virtual_biopsy.stages import ingest as ingest_stage


@pytest.fixture
def raw(tiny_raw, tmp_path) -> Path:
    """A private copy of the raw folder that a test may damage."""
    return Path(shutil.copytree(tiny_raw, tmp_path / "data" / "raw"))


def _cfg(**changes) -> IngestConfig:
    return dataclasses.replace(IngestConfig(workers=1), **changes)


def _files(raw: Path, pattern: str) -> list[Path]:
    return sorted((raw / "images").rglob(pattern))


def _save_variant(source: Path, target: Path, edit) -> Path:
    """Write a copy of ``source`` changed by ``edit(ds)`` under a fresh SOPInstanceUID."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    edit(ds)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


# --- reading like a viewer ---------------------------------------------------------------------

def _monochrome1_twin(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Same image as MONOCHROME1: stored values mirrored over the stored range, window too."""
    top = (1 << int(ds.BitsStored)) - 1
    twin = ds.copy()
    twin.PixelData = (top - ds.pixel_array.astype(np.int32)).astype("<u2").tobytes()
    twin.PhotometricInterpretation = "MONOCHROME1"
    twin.WindowCenter = top - float(ds.WindowCenter)
    return twin


def test_monochrome1_twin_reads_as_the_same_pixels_and_window(tiny_raw):
    plain = read_dataset(_files(tiny_raw, "*LOW_ENERGY.dcm")[0])
    twin = _monochrome1_twin(plain)
    np.testing.assert_array_equal(read_pixels(twin), read_pixels(plain))
    assert display_window(twin) == pytest.approx(display_window(plain))


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
@pytest.mark.parametrize("read", [read_dataset, read_header], ids=["whole-file", "header-only"])
def test_compressed_twin_decodes_to_the_same_pixels(tiny_raw, tmp_path, syntax, read):
    source = _files(tiny_raw, "*RECOMBINED.dcm")[0]
    ds = pydicom.dcmread(source)
    ds.compress(syntax)
    ds.save_as(tmp_path / "compressed.dcm")
    compressed = read(tmp_path / "compressed.dcm")
    assert compressed.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_pixels(compressed), read_pixels(source))


def test_rescale_slope_and_intercept_are_applied(tiny_raw):
    ds = read_dataset(_files(tiny_raw, "*LOW_ENERGY.dcm")[0])
    stored = ds.pixel_array.astype(np.float32)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    np.testing.assert_allclose(read_pixels(ds), 2 * stored - 100)


def _as_pydicom_reads_it(ds: pydicom.Dataset) -> np.ndarray:
    """read_pixels as it was before its native fast path: pydicom's decoder and modality LUT."""
    pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        lo, hi = presentation_range(ds)
        pixels = np.float32(lo + hi) - pixels
    return pixels


def _signed_with_dirty_high_bits(ds: pydicom.Dataset) -> None:
    values = ds.pixel_array.astype(np.int16) - 2048  # 12-bit signed
    values.flat[::7] |= np.int16(0x7000)  # garbage in the 4 unused bits of some pixels
    ds.PixelRepresentation, ds.PixelData = 1, values.astype("<i2").tobytes()


def _eight_bit(ds: pydicom.Dataset) -> None:
    ds.PixelData = (ds.pixel_array >> 4).astype(np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7


_NATIVE_EDITS = [
    lambda ds: None,
    lambda ds: setattr(ds, "PixelData", (np.frombuffer(ds.PixelData, "<u2") | 0xF000).astype("<u2").tobytes()),
    _signed_with_dirty_high_bits,
    _eight_bit,
    lambda ds: (setattr(ds, "RescaleSlope", 0.7), setattr(ds, "RescaleIntercept", -3.5)),
    lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"),
]
_NATIVE_EDIT_IDS = ["plain", "dirty-unused-bits", "signed", "8-bit", "rescale", "monochrome1"]


@pytest.mark.parametrize("edit", _NATIVE_EDITS, ids=_NATIVE_EDIT_IDS)
def test_native_pixels_read_exactly_as_pydicom_decodes_them(tiny_raw, edit):
    ds = read_dataset(_files(tiny_raw, "*LOW_ENERGY.dcm")[0])
    edit(ds)
    np.testing.assert_array_equal(read_pixels(ds), _as_pydicom_reads_it(ds))


@pytest.mark.parametrize("edit", _NATIVE_EDITS, ids=_NATIVE_EDIT_IDS)
def test_header_only_read_leaves_native_pixels_in_the_file_and_reads_them_exactly(tiny_raw, tmp_path, edit):
    ds = read_dataset(_files(tiny_raw, "*LOW_ENERGY.dcm")[0])
    edit(ds)
    ds.save_as(tmp_path / "edited.dcm")
    header = read_header(tmp_path / "edited.dcm")
    assert header.get_item("PixelData", keep_deferred=True).value is None  # not read with the header
    np.testing.assert_array_equal(read_pixels(header), _as_pydicom_reads_it(pydicom.dcmread(tmp_path / "edited.dcm")))


@pytest.mark.parametrize("edit", _NATIVE_EDITS, ids=_NATIVE_EDIT_IDS)
def test_pixels_read_into_a_mirrored_region_of_a_larger_array_are_the_same_values(tiny_raw, edit):
    ds = read_dataset(_files(tiny_raw, "*LOW_ENERGY.dcm")[0])
    edit(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    canvas = np.full((rows + 4, cols + 7), -1.0, dtype=np.float32)
    region = canvas[2:2 + rows, 5:5 + cols][:, ::-1]
    assert read_pixels(ds, out=region) is region
    np.testing.assert_array_equal(region, read_pixels(ds))
    assert (canvas[:2] == -1).all() and (canvas[:, :5] == -1).all()  # nothing written outside the region


def test_header_only_read_still_finds_a_file_cut_short_in_its_pixel_data(tiny_raw, tmp_path):
    source = _files(tiny_raw, "*LOW_ENERGY.dcm")[0]
    (tmp_path / "cut.dcm").write_bytes(source.read_bytes()[:-1000])
    with pytest.raises(DicomReadError, match="truncated file"):
        read_header(tmp_path / "cut.dcm")


def test_short_native_pixel_data_is_corrupt(tiny_raw):
    ds = read_dataset(_files(tiny_raw, "*LOW_ENERGY.dcm")[0])
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(DicomReadError, match="corrupt pixel data"):
        read_pixels(ds)


def test_display_window_falls_back_to_full_stored_range(tiny_raw):
    ds = read_dataset(_files(tiny_raw, "*LOW_ENERGY.dcm")[0])
    del ds.WindowCenter, ds.WindowWidth
    top = (1 << int(ds.BitsStored)) - 1
    assert display_window(ds) == (top / 2, top)


def test_pseudonymize_is_stable_salted_and_hides_the_id():
    key = pseudonymize("P0001", "salt-a")
    assert key == pseudonymize("P0001", "salt-a") and key.startswith("anon-") and len(key) == 17
    assert key != pseudonymize("P0001", "salt-b") and "P0001" not in key


# --- the manifest --------------------------------------------------------------------------------

def test_clean_dataset_ingests_every_file_into_pairs(raw):
    result = ingest_raw(raw, _cfg())
    manifest = result.manifest
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert len(manifest) == len(_files(raw, "*.dcm")) and result.rejected.empty
    per_pair = manifest.groupby("pair_key")["modality"].apply(sorted)
    assert per_pair.map(lambda m: m == ["CESM", "FFDM"]).all()
    assert manifest["patient_id"].str.startswith("anon-").all()
    metadata = pd.read_csv(raw / "metadata.csv", dtype=str)
    assert not set(metadata["patient_id"]) & set(manifest["patient_id"])
    assert set(manifest["label"]) <= {"malignant", "benign", "none"}
    assert (manifest["simulated"]).all() and not manifest["synthetic"].any()


def test_view_comes_from_view_code_sequence_when_view_position_is_absent(raw):
    mlo = _files(raw, "*MLO_LOW_ENERGY.dcm")[0]
    ds = pydicom.dcmread(mlo)
    del ds.ViewPosition
    ds.save_as(mlo)
    result = ingest_raw(raw, _cfg())
    image = result.sources.set_index("source_path").loc[mlo.relative_to(raw).as_posix(), "image_id"]
    assert result.manifest.set_index("image_id").loc[image, "view"] == "MLO"


def _inject_defects(raw: Path) -> dict[str, str]:
    """Damage a copy of the raw folder in every way item 4 lists; return {file: expected reason}."""
    le, des = _files(raw, "*LOW_ENERGY.dcm"), _files(raw, "*RECOMBINED.dcm")
    extra = raw / "images" / "extra"
    extra.mkdir()
    (extra / "notes.txt").write_text("not an image\n")
    truncated = extra / "truncated.dcm"
    truncated.write_bytes(le[0].read_bytes()[: le[0].stat().st_size // 2])
    _save_variant(le[0], extra / "short_pixels.dcm", lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]))

    def garble_compressed(ds):
        ds.compress(RLELossless)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[: len(frame) // 2]])  # the RLE segments end too early

    _save_variant(le[0], extra / "garbled_rle.dcm", garble_compressed)
    _save_variant(le[0], extra / "ct.dcm", lambda ds: setattr(ds, "Modality", "CT"))
    _save_variant(le[0], extra / "no_laterality.dcm", lambda ds: delattr(ds, "ImageLaterality"))
    _save_variant(le[0], extra / "no_view.dcm", lambda ds: (delattr(ds, "ViewPosition"), delattr(ds, "ViewCodeSequence")))
    shutil.copy(le[1], extra / "duplicate.dcm")
    lonely_le = des[2].with_name(des[2].name.replace("RECOMBINED", "LOW_ENERGY"))
    des[2].unlink()
    rel = lambda p: p.relative_to(raw).as_posix()  # noqa: E731
    return {
        rel(extra / "notes.txt"): "not a DICOM file",
        rel(truncated): "truncated file",
        rel(extra / "short_pixels.dcm"): "corrupt pixel data",
        rel(extra / "garbled_rle.dcm"): "corrupt pixel data",
        rel(extra / "ct.dcm"): "not a mammogram: Modality is 'CT'",
        rel(extra / "no_laterality.dcm"): "no laterality",
        rel(extra / "no_view.dcm"): "no view",
        rel(extra / "duplicate.dcm"): "duplicate SOPInstanceUID: same image as file "
                                      + file_key(rel(le[1]), IngestConfig().pseudonym_salt),
        rel(lonely_le): "LE image without its DES partner",
    }


def test_every_bad_file_is_rejected_with_its_reason_and_good_files_still_ingest(raw):
    good_before = {p.relative_to(raw).as_posix() for p in _files(raw, "*.dcm")}
    # A good file stored compressed must still be accepted like its plain original.
    compressed = _files(raw, "*RECOMBINED.dcm")[-1]
    ds = pydicom.dcmread(compressed)
    ds.compress(JPEGLSLossless)
    ds.save_as(compressed)
    expected = _inject_defects(raw)

    result = ingest_raw(raw, _cfg(max_rejected_share=1.0))

    reasons = rejected_reasons(result)
    assert set(reasons) == set(expected)
    for file, reason in expected.items():
        assert reason in reasons[file], f"{file}: {reasons[file]!r}"
        assert "\n" not in reasons[file]
    accepted = set(result.sources.loc[result.sources["image_id"] != "", "source_path"])
    assert len(accepted) == len(result.manifest)
    deleted_or_lonely = {f for f in good_before if not (raw / f).exists()} | set(expected)
    assert accepted == good_before - deleted_or_lonely
    assert compressed.relative_to(raw).as_posix() in accepted
    assert result.summary["rejected"] == len(expected) and result.summary["files"] == len(accepted) + len(expected)


def test_unpaired_les_are_kept_when_pairing_is_not_required(raw):
    _files(raw, "*RECOMBINED.dcm")[0].unlink()
    result = ingest_raw(raw, _cfg(require_pairs=False))
    assert result.rejected.empty
    assert (result.manifest["modality"] == "FFDM").sum() == (result.manifest["modality"] == "CESM").sum() + 1


def _project(raw: Path, **ingest) -> ProjectPaths:
    """The temp project around ``raw`` with a params file (ingest section overridden)."""
    root = raw.parent.parent
    lines = [f"  {k}: {v}" for k, v in {"workers": 1, **ingest}.items()]
    (root / "params.yaml").write_text("ingest:\n" + "\n".join(lines) + "\n")
    return ProjectPaths(root)


def test_stage_fails_in_one_line_when_too_many_files_are_rejected(raw, capsys):
    paths = _project(raw, max_rejected_share=0.01)
    _inject_defects(raw)
    assert ingest_stage.main(["--root", str(paths.root), "--no-mlflow"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ingest: ") and "max_rejected_share" in err and "\n" not in err
    report = pd.read_csv(paths.rejected)  # the reasons are written even though the stage failed
    assert len(report) == 9 and list(report.columns) == ["file_key", "reason"]
    assert report["file_key"].str.startswith("anon-").all()  # a path would name the patient
    assert not paths.manifest.exists()


def test_stage_writes_manifest_report_and_summary(raw, capsys):
    paths = _project(raw)
    assert ingest_stage.main(["--root", str(paths.root), "--no-mlflow"]) == 0
    manifest = pd.read_csv(paths.manifest)
    summary = ingest_stage.summary_path(paths)
    assert len(manifest) == len(_files(raw, "*.dcm")) and pd.read_csv(paths.rejected).empty and summary.exists()
    assert "accepted" in capsys.readouterr().out


def test_stage_names_the_missing_metadata_table(raw, capsys):
    paths = _project(raw)
    (raw / "metadata.csv").unlink()
    assert ingest_stage.main(["--root", str(paths.root), "--no-mlflow"]) == 1
    err = capsys.readouterr().err
    assert "metadata.csv" in err and "not found" in err


def test_file_missing_from_metadata_table_is_rejected(raw):
    table = pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)
    dropped = table["file"].iloc[0]
    table.iloc[1:].to_csv(raw / "metadata.csv", index=False)
    reasons = rejected_reasons(ingest_raw(raw, _cfg(max_rejected_share=1.0)))
    assert "not listed in metadata.csv" in reasons[dropped]


def test_process_pool_gives_the_same_manifest_as_one_process(raw):
    one = ingest_raw(raw, _cfg(workers=1)).manifest
    two = ingest_raw(raw, _cfg(workers=2)).manifest
    pd.testing.assert_frame_equal(one, two)


def test_manifest_keys_images_by_pseudonym_and_only_the_private_sources_name_the_files(raw):
    paths = _project(raw)
    assert ingest_stage.main(["--root", str(paths.root), "--no-mlflow"]) == 0
    manifest = pd.read_csv(paths.manifest, dtype=str)
    sources = pd.read_csv(paths.sources, dtype=str, keep_default_na=False)
    assert "source_path" not in manifest and manifest["image_id"].str.startswith("anon-").all()
    salt = IngestConfig().pseudonym_salt
    for _, row in sources[sources["image_id"] != ""].head(3).iterrows():  # the private link back
        ds = pydicom.dcmread(raw / row["source_path"], stop_before_pixels=True)
        assert row["sop_instance_uid"] == ds.SOPInstanceUID
        assert row["image_id"] == pseudonymize(ds.SOPInstanceUID, salt) in set(manifest["image_id"])
        assert row["file_key"] == file_key(row["source_path"], salt)
    published = paths.manifest.read_text() + paths.rejected.read_text() + ingest_stage.summary_path(paths).read_text()
    assert "images/" not in published and not any(uid in published for uid in sources["sop_instance_uid"])
