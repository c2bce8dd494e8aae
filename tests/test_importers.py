"""Importers on tiny release folders built here in the released layouts (names and columns as released)."""
from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_checks import dciodvfy_errors, needs_dciodvfy
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from virtual_biopsy.data.importers import ImporterError, import_release, register
from virtual_biopsy.core.config import IngestConfig
from virtual_biopsy.data.cdd_cesm_cohort import SHEET_COLUMNS, write_segmentations
from virtual_biopsy.data.cdd_cesm_cohort import write_annotation_sheet as write_sheet
from virtual_biopsy.data.importers import via
from virtual_biopsy.data.importers.cdd_cesm import (
    ANNOTATION_FILE_NAMES,
    LOW_ENERGY_FOLDER,
    SEGMENTATION_FILE_NAME,
    SUBTRACTED_FOLDER,
)
from virtual_biopsy.data.ingest import ingest_raw
from virtual_biopsy.data.layout import FILE_NAME_RE, LESION_COLUMNS, METADATA_COLUMNS
from virtual_biopsy.data.lesions import read_mask_png
from virtual_biopsy.data.importers.jpeg import NOMINAL_PIXEL_SPACING_MM, UNKNOWN_ACQUISITION_ATTRIBUTES
from virtual_biopsy.dicom.cesm import (
    DIGITAL_MG_FOR_PRESENTATION,
    IMAGE_TYPE_DES,
    IMAGE_TYPE_LE,
    energy_of,
)
from virtual_biopsy.dicom.write import (
    Patient,
    Series,
    Study,
    Window,
    build_mammogram_dataset,
    deterministic_uid,
    write_dataset,
)

# Released CDD-CESM sheet 'all' columns, in the released order (data/cdd_cesm_cohort.py writes releases).
CDD_COLUMNS = list(SHEET_COLUMNS)


def run_cli(argv: list[str]) -> int:
    """`vbiopsy import ...` through the command's own parser (other commands are not needed here)."""
    parser = argparse.ArgumentParser(prog="vbiopsy")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# --- CDD-CESM fixture ------------------------------------------------------------------------

def jpeg_bytes(mode: str, seed: int, size=(24, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    gray = rng.integers(10, 240, size=size, dtype=np.uint8)
    image = Image.fromarray(gray, "L")
    if mode == "RGB":
        image = Image.merge("RGB", (image, image, image))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sheet_row(name, patient, side, typ, age, acr, view, pathology):
    return [name, patient, side, typ, age, acr, 4, "mass", view, "", "GE", pathology]


# The fixture's outlines (images are 24 rows x 32 columns): CSV rows 2.. in this order.
ELLIPSE = {"name": "ellipse", "cx": 8, "cy": 12, "rx": 5, "ry": 3}
SQUARE = {"name": "polygon", "all_points_x": [20, 28, 28, 20], "all_points_y": [4, 4, 10, 10]}
TURNED_ELLIPSE = {"name": "ellipse", "cx": 16, "cy": 12, "rx": 8, "ry": 2, "theta": math.pi / 2}
FIXTURE_OUTLINES = [
    ("P1_L_CM_CC.jpg", ELLIPSE),              # row 2: two regions of one image, united
    ("P1_L_CM_CC.jpg", SQUARE),               # row 3
    ("P1_L_DM_CC .jpg", TURNED_ELLIPSE),      # row 4: stray space before .jpg, as released
    ("P2_R_DM_MLO.jpg", {"name": "point", "cx": 5, "cy": 5}),  # row 5: a point only: no mask
    ("P2_R_CM_MLO.jpg", {}),                  # row 6: an image without a region
    ("P9_L_CM_CC.jpg", {"name": "circle", "cx": 5, "cy": 5, "r": 3}),  # row 7: not in the release
    ("P5_L_DM_CC.jpg", SQUARE),               # row 8: its image is unreadable, not imported
]


@pytest.fixture
def cdd_release(tmp_path: Path) -> Path:
    """CDD-CESM as downloaded: two image folders, the annotation workbook, a report and a segmentation CSV."""
    root = tmp_path / "CDD-CESM"
    low, sub = root / LOW_ENERGY_FOLDER, root / SUBTRACTED_FOLDER
    low.mkdir(parents=True)
    sub.mkdir()
    (low / "P1_L_DM_CC.jpg").write_bytes(jpeg_bytes("L", 1))
    (sub / "P1_L_CM_CC.jpg").write_bytes(jpeg_bytes("L", 2))
    (low / "P2_R_DM_MLO.jpg").write_bytes(jpeg_bytes("RGB", 3))
    (sub / "P2_R_CM_MLO.jpg").write_bytes(jpeg_bytes("L", 4))
    (low / "P3_left_DM_CC.jpg").write_bytes(jpeg_bytes("L", 5))        # malformed name
    (low / "P5_L_DM_CC.jpg").write_bytes(jpeg_bytes("L", 6)[:200])    # truncated: unreadable
    (low / "P6_R_DM_CC.jpg").write_bytes(jpeg_bytes("L", 7))          # no spreadsheet row
    write_sheet(root / ANNOTATION_FILE_NAMES[0], [
        sheet_row("P1_L_DM_CC ", 1, "L", "DM", 51, "B", "CC", "Benign"),   # stray space, as released
        sheet_row("P1_L_CM_CC", 1, "L", "CESM", 51, "B", "CC", "Benign"),
        sheet_row("P1_L_CM_CC", 1, "L", "CESM", 51, "B", "CC", "Malignant"),  # second finding
        sheet_row("P2_R_DM_MLO", 2, "R", "DM", 63, "_", "MLO", "Normal"),
        sheet_row("P2_R_CM_MLO", 2, "R", "CESM", 63, None, "MLO", "Normal"),
        sheet_row("P4_L_DM_CC", 4, "L", "DM", 40, "C", "CC", "Benign"),     # image missing from release
        sheet_row("P5_L_DM_CC", 5, "L", "DM", 45, "D", "CC", "Malignant"),
    ])
    write_segmentations(root / SEGMENTATION_FILE_NAME, FIXTURE_OUTLINES)
    (root / "Medical reports for cases").mkdir()
    (root / "Medical reports for cases" / "P1.docx").write_bytes(b"PK\x03\x04")
    return root


def report_of(dest: Path) -> pd.DataFrame:
    return pd.read_csv(dest / "import_report.csv", keep_default_na=False)


def metadata_of(dest: Path) -> pd.DataFrame:
    return pd.read_csv(dest / "metadata.csv", keep_default_na=False, dtype=str)


def test_cdd_cesm_import_writes_raw_layout_with_labels_density_and_age(cdd_release, tmp_path):
    dest = tmp_path / "data" / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    meta = metadata_of(dest).set_index("file")
    assert list(metadata_of(dest).columns) == list(METADATA_COLUMNS)
    assert sorted(meta.index) == [
        "images/P1/S1/P1_S1_LCC_LOW_ENERGY.dcm", "images/P1/S1/P1_S1_LCC_RECOMBINED.dcm",
        "images/P2/S1/P2_S1_RMLO_LOW_ENERGY.dcm", "images/P2/S1/P2_S1_RMLO_RECOMBINED.dcm",
    ]
    for file in meta.index:
        assert (dest / file).is_file()
        assert FILE_NAME_RE.match(Path(file).name)
    le, des = meta.loc["images/P1/S1/P1_S1_LCC_LOW_ENERGY.dcm"], meta.loc["images/P1/S1/P1_S1_LCC_RECOMBINED.dcm"]
    assert (le.biopsy, le.acr, le.age, le.phase, le.energy) == ("benign", "b", "51", "early", "LE")
    assert (des.biopsy, des.energy) == ("malignant", "DES")  # most severe of its two findings
    p2 = meta.loc["images/P2/S1/P2_S1_RMLO_LOW_ENERGY.dcm"]
    assert (p2.biopsy, p2.acr, p2.laterality, p2.view) == ("none", "", "R", "MLO")


def test_cdd_cesm_keeps_grayscale_jpeg_bytes_inside_mammography_dicom(cdd_release, tmp_path):
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    source = (cdd_release / SUBTRACTED_FOLDER / "P1_L_CM_CC.jpg").read_bytes()
    ds = pydicom.dcmread(dest / "images/P1/S1/P1_S1_LCC_RECOMBINED.dcm")
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert next(generate_frames(ds.PixelData, number_of_frames=1)).rstrip(b"\x00") == source.rstrip(b"\x00")
    assert ds.SOPClassUID == DIGITAL_MG_FOR_PRESENTATION and ds.Modality == "MG"
    assert list(ds.ImageType) == IMAGE_TYPE_DES and energy_of(ds) == "DES"
    assert (ds.ImageLaterality, ds.ViewPosition, ds.PhotometricInterpretation) == ("L", "CC", "MONOCHROME2")
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (8, 8, 7)
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    expected = np.asarray(Image.open(io.BytesIO(source)))
    # pydicom's JPEG plugin and Pillow are different libjpeg builds: IDCT rounding may differ by 1.
    assert np.abs(ds.pixel_array.astype(int) - expected).max() <= 1
    # No window in the release: the window spans the image's full range (plain min-max).
    assert float(ds.WindowCenter) - float(ds.WindowWidth) / 2 == expected.min()
    assert float(ds.WindowCenter) + float(ds.WindowWidth) / 2 == expected.max()


def test_cdd_cesm_stores_colour_jpeg_as_uncompressed_8bit_grayscale(cdd_release, tmp_path):
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    ds = pydicom.dcmread(dest / "images/P2/S1/P2_S1_RMLO_LOW_ENERGY.dcm")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (ds.PhotometricInterpretation, ds.BitsStored, ds.SamplesPerPixel) == ("MONOCHROME2", 8, 1)
    assert list(ds.ImageType) == IMAGE_TYPE_LE and energy_of(ds) == "LE"
    source = Image.open(cdd_release / LOW_ENERGY_FOLDER / "P2_R_DM_MLO.jpg")
    assert np.array_equal(ds.pixel_array, np.asarray(source.convert("L")))
    imported = report_of(dest).set_index("source").loc[f"{LOW_ENERGY_FOLDER}/P2_R_DM_MLO.jpg"]
    assert imported.status == "imported" and "RGB JPEG decoded to 8-bit grayscale" in imported.reason


def test_cdd_cesm_reports_malformed_name_missing_image_unreadable_file_and_unmatched_row(cdd_release, tmp_path):
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    report = report_of(dest).set_index("source")
    rejected = report[report.status == "rejected"].reason
    assert "does not follow P<number>_<L|R>_<DM|CM>_<CC|MLO>.jpg" in rejected[f"{LOW_ENERGY_FOLDER}/P3_left_DM_CC.jpg"]
    assert "unreadable JPEG" in rejected[f"{LOW_ENERGY_FOLDER}/P5_L_DM_CC.jpg"]
    assert "no row for P6_R_DM_CC" in rejected[f"{LOW_ENERGY_FOLDER}/P6_R_DM_CC.jpg"]
    unmatched = report[(report.status == "unmatched") & report.index.str.startswith(ANNOTATION_FILE_NAMES[0])]
    assert list(unmatched.reason) == ["no image file named P4_L_DM_CC.jpg in the release"]
    assert "row 7 (P4_L_DM_CC)" in unmatched.index[0]
    ignored = report[report.status == "ignored"]
    assert sorted(ignored.index) == sorted(
        [ANNOTATION_FILE_NAMES[0], "Medical reports for cases/P1.docx", SEGMENTATION_FILE_NAME]
    )
    every_file = {p.relative_to(cdd_release).as_posix() for p in cdd_release.rglob("*") if p.is_file()}
    assert every_file <= set(report.index)  # nothing dropped silently


def test_cdd_cesm_rejects_image_whose_sheet_row_disagrees_with_its_name(cdd_release, tmp_path):
    write_sheet(cdd_release / ANNOTATION_FILE_NAMES[0], [
        sheet_row("P1_L_DM_CC", 1, "R", "DM", 51, "B", "CC", "Benign"),
        sheet_row("P1_L_CM_CC", 1, "L", "CESM", 51, "Q", "CC", "Benign"),
        sheet_row("P2_R_DM_MLO", 2, "R", "DM", 63, "A", "MLO", "Suspicious"),
        sheet_row("P2_R_CM_MLO", 2, "R", "CESM", 63, "A", "MLO", "Normal"),
    ])
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    reasons = report_of(dest).set_index("source").reason
    assert "says Side='R'; for a file named P1_L_DM_CC.jpg" in reasons[f"{LOW_ENERGY_FOLDER}/P1_L_DM_CC.jpg"]
    assert "breast density 'Q' is not an ACR category" in reasons[f"{SUBTRACTED_FOLDER}/P1_L_CM_CC.jpg"]
    assert "pathology 'Suspicious' is not Normal, Benign or Malignant" in reasons[f"{LOW_ENERGY_FOLDER}/P2_R_DM_MLO.jpg"]


@pytest.mark.parametrize(("column", "bad", "message"), [
    ("Patient_ID", 7, "sheet row 2 says Patient_ID='7'; for a file named P1_L_CM_CC.jpg (P1 in its name) the sheet "
                      "must say Patient_ID='1' (the number after 'P' in the file name)"),
    ("Side", "R", "sheet row 2 says Side='R'; for a file named P1_L_CM_CC.jpg (L in its name) the sheet must say "
                  "Side='L' ('L' or 'R')"),
    ("Type", "CM", "sheet row 2 says Type='CM'; for a file named P1_L_CM_CC.jpg (CM in its name) the sheet must say "
                   "Type='CESM' (DM images: 'DM', CM images: 'CESM')"),
    ("View", "MLO", "sheet row 2 says View='MLO'; for a file named P1_L_CM_CC.jpg (CC in its name) the sheet must "
                    "say View='CC' ('CC' or 'MLO')"),
])
def test_cdd_cesm_sheet_name_mismatch_names_the_expected_value_and_the_fix(cdd_release, tmp_path, column, bad, message):
    row = sheet_row("P1_L_CM_CC", 1, "L", "CESM", 51, "B", "CC", "Benign")
    row[CDD_COLUMNS.index(column)] = bad
    write_sheet(cdd_release / ANNOTATION_FILE_NAMES[0], [row, sheet_row("P2_R_CM_MLO", 2, "R", "CESM", 63, "A", "MLO",
                                                                       "Normal")])
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    rejected = report_of(dest).set_index("source").loc[f"{SUBTRACTED_FOLDER}/P1_L_CM_CC.jpg"]
    assert rejected.status == "rejected"
    assert rejected.reason == f"{message}; correct the cell, or the file name if the sheet is right"


def test_cdd_cesm_image_in_the_other_energy_folder_is_rejected_naming_the_right_folder(cdd_release, tmp_path):
    (cdd_release / SUBTRACTED_FOLDER / "P1_L_CM_CC.jpg").rename(cdd_release / LOW_ENERGY_FOLDER / "P1_L_CM_CC.jpg")
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    reason = report_of(dest).set_index("source").reason[f"{LOW_ENERGY_FOLDER}/P1_L_CM_CC.jpg"]
    assert reason == (f"CM image in folder '{LOW_ENERGY_FOLDER}', which holds DM images; move it to "
                      f"'{SUBTRACTED_FOLDER}', or correct its name if the folder is right")


CDD_FIXTURE_IMAGES = [  # every image the fixture imports: both energies, both views, kept and decoded JPEGs
    "images/P1/S1/P1_S1_LCC_LOW_ENERGY.dcm", "images/P1/S1/P1_S1_LCC_RECOMBINED.dcm",
    "images/P2/S1/P2_S1_RMLO_LOW_ENERGY.dcm", "images/P2/S1/P2_S1_RMLO_RECOMBINED.dcm",
]


@needs_dciodvfy
@pytest.mark.parametrize("image", CDD_FIXTURE_IMAGES)
def test_cdd_cesm_dicom_passes_dciodvfy_without_errors(cdd_release, tmp_path, image):
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    assert sorted(metadata_of(dest).file) == CDD_FIXTURE_IMAGES
    assert dciodvfy_errors(dest / image) == []


def test_cdd_cesm_dicom_says_its_spacing_is_nominal_and_invents_no_acquisition_facts(cdd_release, tmp_path):
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    ds = pydicom.dcmread(dest / "images/P1/S1/P1_S1_LCC_LOW_ENERGY.dcm")
    assert [float(v) for v in ds.ImagerPixelSpacing] == [NOMINAL_PIXEL_SPACING_MM] * 2
    assert "nominal" in ds.ImageComments and "CDD-CESM P1_L_DM_CC.jpg" in ds.ImageComments
    assert [k for k in UNKNOWN_ACQUISITION_ATTRIBUTES if k in ds] == []  # kVp, filter, calibrated spacing ...
    assert (ds.Manufacturer, ds.StudyDate, ds.PatientBirthDate, ds.PatientAge) == ("", "", "", "051Y")


def test_cdd_cesm_dicom_without_age_in_the_sheet_has_no_patient_age(cdd_release, tmp_path):
    write_sheet(cdd_release / ANNOTATION_FILE_NAMES[0], [
        sheet_row("P1_L_CM_CC", 1, "L", "CESM", None, "B", "CC", "Benign")])
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    ds = pydicom.dcmread(dest / "images/P1/S1/P1_S1_LCC_RECOMBINED.dcm")
    assert "PatientAge" not in ds and metadata_of(dest).age.tolist() == [""]


def test_cdd_cesm_sheet_without_released_column_is_an_error_naming_it(cdd_release, tmp_path):
    columns = [c if c != "Pathology Classification/ Follow up" else "Pathology" for c in CDD_COLUMNS]
    write_sheet(cdd_release / ANNOTATION_FILE_NAMES[0], [], columns=columns)
    with pytest.raises(ImporterError, match=r"lacks column\(s\) \['Pathology Classification/ Follow up'\]"):
        import_release("cdd-cesm", cdd_release, tmp_path / "raw")


def test_cdd_cesm_import_twice_gives_identical_bytes(cdd_release, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    import_release("cdd-cesm", cdd_release, first)
    import_release("cdd-cesm", cdd_release, second)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


# --- CDD-CESM lesion outlines ------------------------------------------------------------------

def _masks_by_image(dest: Path) -> dict[str, np.ndarray]:
    lesions = pd.read_csv(dest / "lesions.csv", dtype=str, keep_default_na=False)
    return {row.file: read_mask_png(dest / row.mask) for row in lesions.itertuples()}


def test_cdd_cesm_outlines_become_one_mask_per_image_in_the_dicom_geometry(cdd_release, tmp_path):
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    lesions = pd.read_csv(dest / "lesions.csv", dtype=str, keep_default_na=False)
    assert list(lesions.columns) == list(LESION_COLUMNS)
    assert list(lesions.file) == ["images/P1/S1/P1_S1_LCC_LOW_ENERGY.dcm", "images/P1/S1/P1_S1_LCC_RECOMBINED.dcm"]
    assert list(lesions["mask"]) == ["masks/P1/S1/P1_S1_LCC_LOW_ENERGY.png", "masks/P1/S1/P1_S1_LCC_RECOMBINED.png"]
    assert set(lesions.source) == {"annotation"}
    assert (lesions[["uptake", "le_density_excess", "glandular_around"]] == "").all().all()  # nobody knows them
    for file, mask in _masks_by_image(dest).items():
        ds = pydicom.dcmread(dest / file)
        assert mask.shape == (ds.Rows, ds.Columns) == (24, 32)
    assert sorted(p.relative_to(dest).as_posix() for p in (dest / "masks").rglob("*")
                  if p.is_file()) == sorted(lesions["mask"])


def test_cdd_cesm_ellipse_and_polygon_are_rasterised_where_they_were_drawn(cdd_release, tmp_path):
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    masks = _masks_by_image(dest)
    des = masks["images/P1/S1/P1_S1_LCC_RECOMBINED.dcm"]  # ellipse and square, united
    rows, cols = np.nonzero(des[:, :15])                   # the ellipse: centre (x 8, y 12), radii 5 x 3
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == pytest.approx((9, 15, 3, 13), abs=1)
    assert des[12, 8] and not des[12, 15] and not des[5, 8]
    assert des[4:11, 20:29].all() and not des[:, 29:].any() and not des[12:, 16:].any()  # the square x 20-28, y 4-10
    le = masks["images/P1/S1/P1_S1_LCC_LOW_ENERGY.dcm"]    # an ellipse 8 x 2 turned by 90 degrees: upright
    rows, cols = np.nonzero(le)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == pytest.approx((4, 20, 14, 18), abs=1)


def test_cdd_cesm_report_counts_skipped_points_and_names_unusable_outline_rows(cdd_release, tmp_path):
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    report = report_of(dest).set_index("source")
    summary = report.loc[SEGMENTATION_FILE_NAME]
    assert "2 masks written from 3 regions" in summary.reason
    assert "1 point annotations skipped" in summary.reason and "1 point-only images without a mask" in summary.reason
    assert report.loc[f"{LOW_ENERGY_FOLDER}/P2_R_DM_MLO.jpg"].reason.endswith("points only (no area)")
    assert report.loc[f"{SEGMENTATION_FILE_NAME}#row 7 (P9_L_CM_CC.jpg)"].status == "unmatched"
    assert "no image file named P9_L_CM_CC.jpg" in report.loc[f"{SEGMENTATION_FILE_NAME}#row 7 (P9_L_CM_CC.jpg)"].reason
    not_imported = report.loc[f"{SEGMENTATION_FILE_NAME}#row 8 (P5_L_DM_CC.jpg)"]
    assert (not_imported.status, not_imported.reason) == (
        "rejected", "its image P5_L_DM_CC.jpg was not imported (see that file's row)")


@pytest.mark.parametrize(("cell", "reason"), [
    ('{"name":"polygon","all_points_x":[1,2,3],"all_points_y":[1,2', "malformed JSON in region_shape_attributes"),
    ('{"name":"freehand","points":[1,2,3]}', "unknown region shape 'freehand'"),
    ('{"name":"ellipse","cx":5,"cy":5,"rx":"wide","ry":2}', "ellipse: 'rx' is 'wide', not a number"),
    ('{"name":"polygon","all_points_x":[1,2],"all_points_y":[1,2]}',
     "polygon: 2 point(s); an outline needs at least 3"),
])
def test_cdd_cesm_unusable_outline_row_is_rejected_with_its_row_and_its_image_gets_no_mask(
        cdd_release, tmp_path, cell, reason):
    write_segmentations(cdd_release / SEGMENTATION_FILE_NAME, [
        ("P1_L_CM_CC.jpg", ELLIPSE),    # row 2: usable, but its image has an unusable row below
        ("P1_L_CM_CC.jpg", cell),       # row 3
        ("P1_L_DM_CC.jpg", SQUARE),     # row 4: another image keeps its mask
    ])
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    report = report_of(dest).set_index("source")
    bad = report.loc[f"{SEGMENTATION_FILE_NAME}#row 3 (P1_L_CM_CC.jpg)"]
    assert bad.status == "rejected" and reason in bad.reason and "no lesion mask for P1_L_CM_CC" in bad.reason
    assert "outline rows is unusable" in report.loc[f"{SUBTRACTED_FOLDER}/P1_L_CM_CC.jpg"].reason
    assert list(_masks_by_image(dest)) == ["images/P1/S1/P1_S1_LCC_LOW_ENERGY.dcm"]
    assert len(metadata_of(dest)) == 4  # the images themselves are all imported


@pytest.mark.parametrize(("shape", "smallest", "largest"), [  # the filled outline reaches a pixel either way
    ({"name": "rect", "x": 2, "y": 3, "width": 10, "height": 4}, 9 * 3, 11 * 5),
    ({"name": "circle", "cx": 15, "cy": 12, "r": 6}, math.pi * 5**2, math.pi * 7**2),
    ({"name": "polyline", "all_points_x": [2, 12, 12, 2], "all_points_y": [2, 2, 12, 12]}, 9 * 9, 11 * 11),  # closed
])
def test_via_rect_circle_and_open_polyline_fill_their_area(shape, smallest, largest):
    mask = via.rasterise([via.parse_region(json.dumps(shape))], 24, 32)
    assert smallest <= mask.sum() <= largest


def test_via_cell_without_a_region_is_no_region():
    assert via.parse_region("{}") is None


def test_cdd_cesm_segmentation_file_without_its_columns_is_an_error_naming_them(cdd_release, tmp_path):
    (cdd_release / SEGMENTATION_FILE_NAME).write_text("filename,shape\nP1_L_CM_CC.jpg,{}\n")
    with pytest.raises(ImporterError, match=r"lacks column\(s\) \['#filename', 'region_shape_attributes'\]"):
        import_release("cdd-cesm", cdd_release, tmp_path / "raw")


def test_cdd_cesm_release_without_outlines_imports_without_lesion_truth(cdd_release, tmp_path):
    (cdd_release / SEGMENTATION_FILE_NAME).unlink()
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    assert not (dest / "lesions.csv").exists() and not (dest / "masks").exists()


def test_ingest_accepts_the_imported_cdd_cesm_masks(cdd_release, tmp_path):
    dest = tmp_path / "raw"
    import_release("cdd-cesm", cdd_release, dest)
    result = ingest_raw(dest, IngestConfig(workers=1))
    assert result.rejected.empty and len(result.manifest) == 4  # every imported DICOM is accepted
    assert len(result.lesions) == 2 and set(result.lesions.source) == {"annotation"}
    assert result.lesions[["uptake", "le_density_excess", "glandular_around"]].isna().all().all()
    with_mask = result.sources[result.sources.mask_path != ""]
    assert sorted(with_mask.mask_path) == ["masks/P1/S1/P1_S1_LCC_LOW_ENERGY.png",
                                           "masks/P1/S1/P1_S1_LCC_RECOMBINED.png"]


# --- the command -----------------------------------------------------------------------------

def test_import_command_refuses_non_empty_destination_unless_forced(cdd_release, tmp_path, capsys):
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / "keep.txt").write_text("real data")
    assert run_cli(["import", "--format", "cdd-cesm", str(cdd_release), str(dest)]) == 1
    assert "not empty; pass --force" in capsys.readouterr().err
    assert (dest / "keep.txt").exists()
    assert run_cli(["import", "--format", "cdd-cesm", str(cdd_release), str(dest), "--force"]) == 0
    out = capsys.readouterr().out
    assert "imported 4 images" in out and "warning:" in out and f"dvc add {dest}" in out
    assert not (dest / "keep.txt").exists()


def test_import_command_fails_and_leaves_destination_alone_when_nothing_imports(tmp_path, capsys):
    source = tmp_path / "release"
    (source / LOW_ENERGY_FOLDER).mkdir(parents=True)
    (source / LOW_ENERGY_FOLDER / "scan.jpg").write_bytes(jpeg_bytes("L", 1))
    write_sheet(source / ANNOTATION_FILE_NAMES[0], [])
    dest = tmp_path / "raw"
    assert run_cli(["import", "--format", "cdd-cesm", str(source), str(dest)]) == 1
    err = capsys.readouterr().err
    assert "no image could be imported" in err and "file name does not follow" in err
    assert not dest.exists()


def test_import_command_rejects_missing_source_folder(tmp_path, capsys):
    assert run_cli(["import", "--format", "cesm-ucbm", str(tmp_path / "nowhere"), str(tmp_path / "raw")]) == 1
    assert "nowhere: source release folder does not exist" in capsys.readouterr().err


def test_import_of_unknown_format_is_an_error_naming_the_choices(tmp_path):
    with pytest.raises(ImporterError, match=r"unknown format 'inbreast'; choose from \['cdd-cesm', 'cesm-ucbm'\]"):
        import_release("inbreast", tmp_path, tmp_path / "raw")


# --- CESM@UCBM fixture -----------------------------------------------------------------------

def write_mammogram(path: Path, laterality: str, view: str, energy: str, age: str = "056Y", seed: int = 0) -> None:
    """A small GE-style CESM image: 12-bit MG, LE/DES marked in ImageType as the Pristina marks it,
    written by the project's writer (so a copy of it is as conformant as a vendor's file)."""
    pixels = np.random.default_rng(seed).integers(0, 4096, size=(12, 10), dtype=np.uint16)
    ds = build_mammogram_dataset(
        pixels,
        patient=Patient("P96", "UCBM^P96", "", int(age[:3])),
        study=Study(deterministic_uid("ucbm", "study"), "76", "", "20220103", "101500"),
        series=Series(deterministic_uid("ucbm", "series", energy), 1 if energy == "LE" else 2, energy),
        laterality=laterality, view=view, energy=energy, window=Window(2000, 4000),
        sop_instance_uid=deterministic_uid("ucbm", "image", str(path)),
        frame_of_reference_uid=deterministic_uid("ucbm", "frame", laterality, view),
    )
    write_dataset(ds, path)


@pytest.fixture
def ucbm_release(tmp_path: Path) -> tuple[Path, Path]:
    """CESM@UCBM-style release: DICOMs named as in the authors' code, plus a clinical table."""
    root = tmp_path / "CESM_UCBM"
    write_mammogram(root / "P96" / "P96_76_RMLO_LOW_ENERGY.dcm", "R", "MLO", "LE", seed=1)
    write_mammogram(root / "P96" / "P96_76_RMLO_RECOMBINED.dcm", "R", "MLO", "DES", seed=2)
    write_mammogram(root / "P96" / "P96_76_RCC_LOW_ENERGY", "R", "CC", "LE", seed=3)     # no suffix
    write_mammogram(root / "P96" / "P96_76_RCC_RECOMBINED", "R", "MLO", "DES", seed=4)   # view disagrees
    write_mammogram(root / "P97" / "P97-12-LCC-LE.dcm", "L", "CC", "LE", seed=5)          # malformed name
    (root / "P97" / "P97_12_LCC_RECOMBINED.dcm").write_bytes(b"not a dicom file")       # unreadable
    table = tmp_path / "clinical.csv"
    pd.DataFrame({
        "image": ["P96_76_RMLO_LOW_ENERGY", "P96_76_RMLO_RECOMBINED", "P96_76_RCC_LOW_ENERGY",
                  "P96_76_RCC_RECOMBINED", "P97_12_LCC_RECOMBINED", "P98_3_LMLO_LOW_ENERGY"],
        "biopsy": ["Malignant", "malignant", "", "", "benign", "benign"],
        "ACR": ["c", "C", "b", "b", "a", "d"],
        "phase": ["early", "early", "late", "late", "early", "early"],
        "age": ["", "", "57", "57", "", "70"],
    }).to_csv(table, index=False)
    return root, table


def test_cesm_ucbm_copies_dicom_byte_for_byte_with_clinical_values(ucbm_release, tmp_path):
    root, table = ucbm_release
    dest = tmp_path / "raw"
    import_release("cesm-ucbm", root, dest, table=table)
    meta = metadata_of(dest).set_index("file")
    assert sorted(meta.index) == [
        "images/P96/76/P96_76_RCC_LOW_ENERGY_LATE.dcm",
        "images/P96/76/P96_76_RMLO_LOW_ENERGY.dcm",
        "images/P96/76/P96_76_RMLO_RECOMBINED.dcm",
    ]
    source = (root / "P96" / "P96_76_RMLO_RECOMBINED.dcm").read_bytes()
    assert (dest / "images/P96/76/P96_76_RMLO_RECOMBINED.dcm").read_bytes() == source
    des = meta.loc["images/P96/76/P96_76_RMLO_RECOMBINED.dcm"]
    assert (des.biopsy, des.acr, des.age, des.phase, des.energy, des.study_id) == ("malignant", "c", "56", "early", "DES", "76")
    late = meta.loc["images/P96/76/P96_76_RCC_LOW_ENERGY_LATE.dcm"]
    assert (late.biopsy, late.acr, late.age, late.phase) == ("none", "b", "57", "late")


def test_cesm_ucbm_reports_malformed_name_unreadable_file_tag_mismatch_and_missing_image(ucbm_release, tmp_path):
    root, table = ucbm_release
    dest = tmp_path / "raw"
    import_release("cesm-ucbm", root, dest, table=table)
    report = report_of(dest).set_index("source")
    reasons = report[report.status == "rejected"].reason
    assert "file name does not follow" in reasons["P97/P97-12-LCC-LE.dcm"]
    assert "not a readable DICOM file" in reasons["P97/P97_12_LCC_RECOMBINED.dcm"]
    assert "DICOM view is MLO but the file name says CC" in reasons["P96/P96_76_RCC_RECOMBINED"]
    unmatched = report[report.status == "unmatched"]
    assert list(unmatched.index) == ["clinical.csv!row 7 (P98_3_LMLO_LOW_ENERGY)"]
    assert list(unmatched.reason) == ["no image file named P98_3_LMLO_LOW_ENERGY in the release"]


def test_cesm_ucbm_without_table_imports_unlabelled_images_and_says_so(ucbm_release, tmp_path):
    root, _ = ucbm_release
    dest = tmp_path / "raw"
    import_release("cesm-ucbm", root, dest)
    meta = metadata_of(dest)
    assert set(meta.biopsy) == {"none"} and set(meta.acr) == {""} and set(meta.age) == {"56"}
    imported = report_of(dest).query("status == 'imported'")
    assert set(imported.reason) == {"no clinical table: biopsy none, ACR not reported"}


def test_cesm_ucbm_table_without_image_column_is_an_error_naming_the_file(ucbm_release, tmp_path):
    root, _ = ucbm_release
    table = tmp_path / "bad.csv"
    pd.DataFrame({"patient": ["P96"], "biopsy": ["benign"]}).to_csv(table, index=False)
    with pytest.raises(ImporterError, match=r"bad\.csv: no image column"):
        import_release("cesm-ucbm", root, tmp_path / "raw", table=table)


@needs_dciodvfy
def test_cesm_ucbm_copies_pass_dciodvfy_without_errors(ucbm_release, tmp_path):
    root, table = ucbm_release
    dest = tmp_path / "raw"
    import_release("cesm-ucbm", root, dest, table=table)
    files = sorted(metadata_of(dest).file)
    assert len(files) == 3 and {f: dciodvfy_errors(dest / f) for f in files} == dict.fromkeys(files, [])


def test_ingest_accepts_the_imported_cesm_ucbm_images(ucbm_release, tmp_path):
    root, table = ucbm_release
    dest = tmp_path / "raw"
    import_release("cesm-ucbm", root, dest, table=table)
    result = ingest_raw(dest, IngestConfig(workers=1))
    assert len(result.manifest) == 2  # the RMLO pair; the late RCC LE lost its DES partner at import (view disagrees)
    assert [reason.split(" (")[0] for reason in result.rejected.reason] == ["LE image without its DES partner"]
