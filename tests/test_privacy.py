"""Patient privacy: no identifying header value, raw path or original UID reaches anything the
pipeline publishes: DVC outputs, what `dvc push` sends, the MLflow store.

One tiny project runs ingest, preprocess and split under the real `dvc repro` (MLflow in its
embedded store), then `dvc push`es to a local remote folder; the tests grep all three. Only
data/raw and the private data/interim/sources.csv (not a DVC output) may hold the planted values.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml
from tiny_pipeline import BIN, REPO, run

from virtual_biopsy.core.config import SynthConfig
from virtual_biopsy.data.synthetic import synthesize

# Identifying header values planted in one LE/DES pair; none may appear in any output.
IDENTIFYING = {
    "PatientName": "Doe^Jane-PRIVACY",
    "PatientID": "SECRET-ID-4711",
    "PatientBirthDate": "19610203",
    "AccessionNumber": "ACC-PRIV-0815",
    "InstitutionName": "Saint Privacy Hospital",
}
# A probe patient whose id also names its folder and files in the raw layout.
PROBE_ID, PROBE_NAME = "PHI-123", "Probe^Patient"
PRIVATE = {"raw", "sources.csv", ".git", ".dvc", "src", "scripts"}  # not published (see module docstring)
STAGES = ("ingest", "preprocess", "split")


def _plant_probe(raw: Path) -> tuple[list[Path], set[str]]:
    """Make the first patient ``PHI-123`` / ``Probe^Patient``, its folders and files named after it
    (``images/PHI-123/<study>/PHI-123_<study>_...dcm``, its lesion masks ``masks/PHI-123/...png``,
    metadata.csv and lesions.csv following); return its files and their original UIDs (SOP
    instance, study, series)."""
    table = pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)
    lesions = pd.read_csv(raw / "lesions.csv", dtype=str, keep_default_na=False)
    first = table["patient_id"].iloc[0]
    assert lesions["file"].str.startswith(f"images/{first}/").any()  # the probe has lesion masks to hide too
    files, uids = [], set()
    for old in sorted((raw / "images" / first).rglob("*.dcm")):
        new = raw / "images" / PROBE_ID / old.parent.name / old.name.replace(first, PROBE_ID)
        ds = pydicom.dcmread(old)
        ds.PatientID, ds.PatientName = PROBE_ID, PROBE_NAME
        uids |= {str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)}
        new.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(new)
        files.append(new)
        table.loc[table["file"] == old.relative_to(raw).as_posix(), ["file", "patient_id"]] = (
            new.relative_to(raw).as_posix(), PROBE_ID)
    for old in sorted((raw / "masks" / first).rglob("*.png")):
        new = raw / "masks" / PROBE_ID / old.parent.name / old.name.replace(first, PROBE_ID)
        new.parent.mkdir(parents=True, exist_ok=True)
        old.rename(new)
    for column in ("file", "mask"):
        lesions[column] = lesions[column].str.replace(first, PROBE_ID)
    shutil.rmtree(raw / "images" / first)
    shutil.rmtree(raw / "masks" / first)
    table.to_csv(raw / "metadata.csv", index=False)
    lesions.to_csv(raw / "lesions.csv", index=False)
    return files, uids


def _plant_identity(raw: Path) -> list[Path]:
    """Give the first LE/DES pair (of another patient) the identifying header values; return the two files."""
    le = sorted(p for p in (raw / "images").rglob("*_LOW_ENERGY.dcm") if PROBE_ID not in p.parts)[0]
    pair = [le, le.with_name(le.name.replace("LOW_ENERGY", "RECOMBINED"))]
    for path in pair:
        ds = pydicom.dcmread(path)
        for keyword, value in IDENTIFYING.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return pair


def _files_containing(files, needles: list[bytes], base: Path) -> dict[str, list[str]]:
    """{file relative to ``base``: [needles found]} over ``files`` (case-insensitive byte search)."""
    found = {}
    for path in files:
        if not path.is_file():
            continue
        content = path.read_bytes().lower()
        hits = [n.decode() for n in needles if n.lower() in content]
        if hits:
            found[path.relative_to(base).as_posix()] = hits
    return found


@dataclass(frozen=True)
class Published:
    root: Path
    remote: Path
    probe_files: list[Path]
    probe_uids: set[str]
    identity_files: list[Path]

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def sources(self) -> Path:
        return self.root / "data" / "interim" / "sources.csv"

    def outputs(self) -> list[Path]:
        """Every file of the project that is not private: DVC outputs, dvc.lock, params, mlruns."""
        return [p for p in self.root.rglob("*") if p.is_file() and not PRIVATE & set(p.relative_to(self.root).parts)]

    def leaks(self, needles: list[bytes]) -> dict[str, dict[str, list[str]]]:
        """Needles found in the outputs, in what `dvc push` sent, and in the MLflow store."""
        return {
            "outputs": _files_containing(self.outputs(), needles, self.root),
            "dvc remote": _files_containing(self.remote.rglob("*"), needles, self.remote),
            "mlflow": _files_containing((self.root / "mlruns").rglob("*"), needles, self.root),
        }


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    root = tmp_path_factory.mktemp("privacy") / "project"
    raw = root / "data" / "raw"
    # Balanced classes: split needs a benign patient in every fold's val and test set.
    synthesize(raw, SynthConfig(patients=12, image_height=64, malignant_share=0.5), seed=7)
    probe_files, uids = _plant_probe(raw)
    identity_files = _plant_identity(raw)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("src", "scripts"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["workers"] = params["preprocess"]["workers"] = 1
    params["preprocess"]["image_size"] = 16
    params["split"].update(folds=2, val_share=0.25)
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    dvc = str(BIN / "dvc")
    run(["git", "init", "-q"], root)
    run([dvc, "init", "-q"], root)
    run([dvc, "config", "core.analytics", "false"], root)
    run([dvc, "repro", *STAGES], root)  # stages log to the embedded MLflow store, root/mlruns
    remote = root.parent / "remote"
    run([dvc, "remote", "add", "-d", "local", str(remote)], root)
    run([dvc, "push", *STAGES], root)
    return Published(root, remote, probe_files, uids, identity_files)


def test_the_search_finds_the_planted_values_where_they_are_and_the_stages_kept_both_patients(published):
    p = published
    needles = [PROBE_ID.encode(), PROBE_NAME.encode(), *(v.encode() for v in IDENTIFYING.values())]
    planted = {f.relative_to(p.root).as_posix() for f in (*p.probe_files, *p.identity_files)}
    tables = {"data/raw/metadata.csv", "data/raw/lesions.csv"}
    assert set(_files_containing(p.raw.rglob("*"), needles, p.root)) == planted | tables
    assert set(_files_containing([p.sources], [PROBE_ID.encode()], p.root)) == {"data/interim/sources.csv"}
    manifest = pd.read_csv(p.root / "data" / "interim" / "manifest.csv", dtype=str)
    sources = pd.read_csv(p.sources, dtype=str, keep_default_na=False).set_index("source_path")
    kept = sources.loc[[f.relative_to(p.raw).as_posix() for f in (*p.probe_files, *p.identity_files)], "image_id"]
    assert (kept != "").all() and set(kept) <= set(manifest["image_id"])
    assert (p.root / "mlruns" / "mlflow.db").is_file() and any((p.root / "mlruns").rglob("rejected.csv"))
    assert sum(1 for f in p.remote.rglob("*") if f.is_file()) >= 4  # manifest, images.npy, index.csv, folds.csv
    assert {"manifest.csv", "images.npy", "index.csv", "lesions.csv", "lesion_masks.npy", "folds.csv",
            "rejected.csv", "summary.json", "dvc.lock"} <= {f.name for f in p.outputs()}


def test_no_identifying_header_value_is_published(published):
    needles = [v.encode() for v in IDENTIFYING.values()] + [b"Doe^Jane", b"SECRET-ID"]
    assert published.leaks(needles) == {"outputs": {}, "dvc remote": {}, "mlflow": {}}


def test_probe_patient_named_in_raw_paths_and_its_original_uids_are_not_published(published):
    needles = [PROBE_ID.encode(), PROBE_NAME.encode(), *(u.encode() for u in sorted(published.probe_uids))]
    assert published.leaks(needles) == {"outputs": {}, "dvc remote": {}, "mlflow": {}}


def test_no_raw_path_or_original_image_uid_is_published(published):
    sources = pd.read_csv(published.sources, dtype=str, keep_default_na=False)
    assert (sources["mask_path"] != "").any()  # lesion masks too: their paths name the patient like the images'
    needles = [b"images/", b"masks/", *(u.encode() for u in sources["sop_instance_uid"] if u)]
    assert published.leaks(needles) == {"outputs": {}, "dvc remote": {}, "mlflow": {}}
