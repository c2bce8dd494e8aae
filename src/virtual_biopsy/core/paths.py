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

    @property
    def raw_lesions(self) -> Path:
        """OPTIONAL lesion ground truth: one row per image with a lesion mask (data.layout.LESION_COLUMNS)."""
        return self.raw / "lesions.csv"

    # --- stage outputs -----------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / "data" / "interim" / "manifest.csv"

    @property
    def interim_lesions(self) -> Path:
        """Lesion truth of the manifest images, keyed by image_id, no path (data.layout.INTERIM_LESION_COLUMNS);
        header only when the raw data have no lesions.csv. Written by ingest."""
        return self.root / "data" / "interim" / "lesions.csv"

    @property
    def sources(self) -> Path:
        """PRIVATE: pseudonymous keys -> raw files and original UIDs (data.layout.SOURCES_COLUMNS).

        Beside the manifest but not a DVC output (so `dvc push` never sends it) and git-ignored;
        only ingest, preprocess and `vbiopsy impute --dicom-out` read it (data.sources)."""
        return self.root / "data" / "interim" / "sources.csv"

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
    def processed_lesion_masks(self) -> Path:
        """uint8 array (N, S, S), row-aligned with images.npy: 1 inside the lesion, 0 elsewhere and
        for images without a mask."""
        return self.processed_dir / "lesion_masks.npy"

    @property
    def processed_lesions(self) -> Path:
        """One row per array row with a lesion mask (data.layout.PROCESSED_LESION_COLUMNS)."""
        return self.processed_dir / "lesions.csv"

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
    def imputed_images(self) -> Path:
        """float32 (N, S, S) synthetic CESM, one per LE image (the impute stage)."""
        return self.imputed_dir / "images.npy"

    @property
    def imputed_index(self) -> Path:
        """One row per imputed image: the LE row as synthetic CESM, with source_image_id and row."""
        return self.imputed_dir / "index.csv"

    # --- models ------------------------------------------------------------------------------
    def generator_dir(self, view: str) -> Path:
        """``models/generator/<VIEW>``: the CycleGAN generators of one view."""
        return self.models_dir / "generator" / view

    def generator_weights(self, view: str, fold: int) -> Path:
        """Best generator of one fold (impute reads these)."""
        return self.generator_dir(view) / f"fold{fold}.pt"

    def serving_generator(self, view: str) -> Path:
        return self.generator_dir(view) / "serving.pt"

    def generator_checkpoint(self, view: str, name: str) -> Path:
        """Per-epoch checkpoints of one generator run (``fold<k>`` or ``refit``), for resuming."""
        return self.generator_dir(view) / "checkpoints" / name

    def classifier_dir(self, arch: str, modality: str, view: str) -> Path:
        """``models/classifier/<arch>/<MOD>_<VIEW>``: everything kept for f_{m,v}."""
        return self.models_dir / "classifier" / arch / f"{modality}_{view}"

    def classifier_weights(self, arch: str, modality: str, view: str, fold: int) -> Path:
        return self.classifier_dir(arch, modality, view) / f"fold{fold}.pt"

    def classifier_checkpoint(self, arch: str, modality: str, view: str, fold: int) -> Path:
        return self.classifier_dir(arch, modality, view) / "checkpoints" / f"fold{fold}"

    def val_mcc(self, arch: str, modality: str, view: str) -> Path:
        """Per-fold validation MCC: the fusion weights (paper eq. 7) of the registered pipeline."""
        return self.classifier_dir(arch, modality, view) / "val_mcc.json"

    # --- pre-training (paper 5.2.1) ------------------------------------------------------------
    @property
    def simulated_release(self) -> Path:
        """The simulated CDD-CESM release the pretrain_cohort stage writes (pretrain.release_dir's default)."""
        return self.root / "data" / "external" / "cdd-cesm"

    @property
    def pretrain(self) -> PretrainPaths:
        """Where the pre-training cohort's imported, ingested and preprocessed data go."""
        return PretrainPaths(self.root)

    def pretrain_weights(self, view: str) -> Path:
        """``models/pretrain/<VIEW>.pt``: the pre-trained CycleGAN of one view (generator file + ``networks``)."""
        return self.models_dir / "pretrain" / f"{view}.pt"

    def pretrain_checkpoint(self, view: str) -> Path:
        """Per-epoch checkpoints of one view's pre-training (resume after a kill); not a DVC output."""
        return self.models_dir / "pretrain" / "checkpoints" / view

    def pretrain_report(self, view: str) -> Path:
        """Pre-training summary of one view: pairs, epochs, validation L1."""
        return self.reports / "pretrain" / f"{view}.json"

    # --- reports -----------------------------------------------------------------------------
    def generator_report(self, view: str) -> Path:
        """Per-fold and mean test metrics of one view's generators (Table 3)."""
        return self.reports / "generator" / f"{view}.json"

    def figure3(self, view: str) -> Path:
        return self.reports / "generator" / f"figure3_{view}.png"

    @property
    def evaluation_dir(self) -> Path:
        return self.reports / "evaluation"

    @property
    def calibration_dir(self) -> Path:
        """outputs/calibration: the evaluate stage's served calibration, one <arch>.json each."""
        return self.root / "outputs" / "calibration"

    def calibration_file(self, arch: str) -> Path:
        return self.calibration_dir / f"{arch}.json"

    @property
    def ceilings_dir(self) -> Path:
        """Observer ceilings of the test folds (observer_ceiling stage): ceilings.csv/.md, observer_scores.csv."""
        return self.reports / "ceilings"

    @property
    def saliency_dir(self) -> Path:
        """Grad-CAM against the lesion masks (saliency_eval stage): pointing_game.csv, summary.json, examples.png."""
        return self.reports / "saliency"

    @property
    def metrics_file(self) -> Path:
        """Headline metrics per architecture and setting (``dvc metrics``)."""
        return self.reports / "metrics.json"

    @property
    def gate_report(self) -> Path:
        return self.reports / "gate.json"

    @property
    def model_cards_dir(self) -> Path:
        return self.reports / "model_cards"

    def model_card(self, arch: str) -> Path:
        return self.model_cards_dir / f"{arch}.md"

    @property
    def mlruns(self) -> Path:
        """Embedded MLflow store: SQLite database + artifact folder."""
        return self.root / "mlruns"


@dataclass(frozen=True)
class PretrainPaths(ProjectPaths):
    """The pre-training cohort's data (import_pretrain stage): the project's ingest and preprocess
    outputs under ``data/pretrain/`` and ``reports/pretrain/ingest/``, so the same functions write
    them (data.ingest.write_outputs, data.preprocess.write_processed take a ProjectPaths).
    ``root`` stays the project root."""

    @property
    def base(self) -> Path:
        return self.root / "data" / "pretrain"

    @property
    def raw(self) -> Path:
        """The imported release in the raw layout (``vbiopsy import --format cdd-cesm`` output)."""
        return self.base / "raw"

    @property
    def manifest(self) -> Path:
        return self.base / "interim" / "manifest.csv"

    @property
    def interim_lesions(self) -> Path:
        return self.base / "interim" / "lesions.csv"

    @property
    def sources(self) -> Path:
        """PRIVATE, as ProjectPaths.sources: keys -> raw files of the pre-training cohort."""
        return self.base / "interim" / "sources.csv"

    @property
    def rejected(self) -> Path:
        return self.reports / "pretrain" / "ingest" / "rejected.csv"

    @property
    def processed_dir(self) -> Path:
        return self.base / "processed"
