"""Where every stage reads and writes, relative to the project root.

One place for the layout so dvc.yaml, the stages and the tests agree. Stages take a ``root``
(default: the current directory, as under ``dvc repro``) so tests can run them in a temp folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectPaths:
    root: Path = Path(".")

    # --- raw data (tracked by data.dvc) -------------------------------------------------------
    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def raw_images(self) -> Path:
        """DICOM studies: images/<patient>/<study>/<patient>_<study>_<L|R><CC|MLO>_<ENERGY>[_LATE].dcm"""
        return self.raw / "images"

    @property
    def raw_metadata(self) -> Path:
        """One row per image file (columns: see data.layout.METADATA_COLUMNS)."""
        return self.raw / "metadata.csv"

    # --- stage outputs -----------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / "data" / "interim" / "manifest.csv"

    @property
    def rejected(self) -> Path:
        return self.root / "reports" / "ingest" / "rejected.csv"

    @property
    def processed_dir(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def processed_images(self) -> Path:
        """float32 array (N, S, S) in [0, 1], np.load(..., mmap_mode='r')."""
        return self.processed_dir / "images.npy"

    @property
    def processed_index(self) -> Path:
        """One row per array row: manifest columns + ``row``."""
        return self.processed_dir / "index.csv"

    @property
    def splits(self) -> Path:
        """Columns: patient_id, fold, subset (train/val/test); one row per patient and fold."""
        return self.root / "data" / "splits" / "folds.csv"

    @property
    def imputed_dir(self) -> Path:
        return self.root / "data" / "imputed"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "outputs" / "predictions"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def mlruns(self) -> Path:
        """Embedded MLflow store: SQLite database + artifact folder."""
        return self.root / "mlruns"
