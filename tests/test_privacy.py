"""Patient privacy: no identifying header value reaches anything ingest or preprocess writes."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pydicom

from virtual_biopsy.stages import ingest as ingest_stage
from virtual_biopsy.stages import preprocess as preprocess_stage

# Identifying values planted in one LE/DES pair; none may appear in any output.
IDENTIFYING = {
    "PatientName": "Doe^Jane-PRIVACY",
    "PatientID": "SECRET-ID-4711",
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC-PRIV-0815",
    "InstitutionName": "Saint Privacy Hospital",
}


def _plant_identity(raw: Path) -> list[Path]:
    """Give the first LE/DES pair the identifying header values; return the two files."""
    le = sorted((raw / "images").rglob("*_LOW_ENERGY.dcm"))[0]
    pair = [le, le.with_name(le.name.replace("LOW_ENERGY", "RECOMBINED"))]
    for path in pair:
        ds = pydicom.dcmread(path)
        for keyword, value in IDENTIFYING.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return pair


def _files_containing(folder: Path, needles: list[bytes], skip: Path | None = None) -> dict[str, list[str]]:
    """{file: [needles found]} over every file under ``folder`` (case-insensitive byte search)."""
    found = {}
    for path in folder.rglob("*"):
        if not path.is_file() or (skip is not None and skip in path.parents):
            continue
        content = path.read_bytes().lower()
        hits = [n.decode() for n in needles if n.lower() in content]
        if hits:
            found[str(path.relative_to(folder))] = hits
    return found


def test_no_identifying_header_value_reaches_manifest_reports_arrays_or_mlflow(tiny_raw, tmp_path, monkeypatch):
    root = tmp_path / "project"
    raw = Path(shutil.copytree(tiny_raw, root / "data" / "raw"))
    planted = _plant_identity(raw)
    (root / "params.yaml").write_text("ingest:\n  workers: 1\npreprocess:\n  image_size: 16\n  workers: 1\n")
    # MLflow's store and (default, cwd-relative) artifact folder both inside the searched root.
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    (root / "mlruns").mkdir()

    assert ingest_stage.main(["--root", str(root)]) == 0
    assert preprocess_stage.main(["--root", str(root)]) == 0

    needles = [v.encode() for v in IDENTIFYING.values()] + [b"Doe^Jane", b"SECRET-ID"]
    # The search works: it finds the planted values in the input ...
    assert set(_files_containing(raw, needles)) == {str(p.relative_to(raw)) for p in planted}
    # ... the pipeline really ran, logged to MLflow and kept the planted patient ...
    manifest = pd.read_csv(root / "data" / "interim" / "manifest.csv")
    assert {p.relative_to(raw).as_posix() for p in planted} <= set(manifest["source_path"])
    assert (root / "mlruns" / "mlflow.db").exists() and any((root / "mlruns").rglob("rejected.csv"))
    # ... and nothing it wrote carries them.
    assert _files_containing(root, needles, skip=raw) == {}
