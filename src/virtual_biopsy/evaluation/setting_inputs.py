"""What each evaluation setting is computed from: the classifiers and images it fuses, how, and
with which weights, as run tags, params and input tables (what a reviewer filters and compares on).

Pure functions of the evaluation's predictions and fused probabilities; the evaluate stage hands
their results to its MLflow runs.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from virtual_biopsy.evaluation.settings import SETTING_SYNTHETIC_SHARE

SETTING_MODALITY = {"F": "FFDM", "C": "CESM", "Ĉ": "CESM", "F+C": "FFDM+CESM", "F+Ĉ": "FFDM+CESM",
                    "C*": "CESM", "F+C*": "FFDM+CESM"}
# The test predictions each setting fuses: (modality, source) of the classifiers' rows. Its fusion
# weights come from the real validation predictions of the same modalities (settings module).
SETTING_TEST_INPUTS = {"F": (("FFDM", "real"),), "C": (("CESM", "real"),), "Ĉ": (("CESM", "synthetic"),),
                       "F+C": (("FFDM", "real"), ("CESM", "real")), "F+Ĉ": (("FFDM", "real"), ("CESM", "synthetic")),
                       "C*": (("CESM", "real"), ("CESM", "synthetic")),
                       "F+C*": (("FFDM", "real"), ("CESM", "real"), ("CESM", "synthetic"))}


def setting_tags(arch: str, setting: str, share: int | None) -> dict[str, object]:
    """Run tags of one setting; ``share`` of synthetic CESM (None: not applicable)."""
    return {"arch": arch, "setting": setting, "modality": SETTING_MODALITY[setting], "view": "CC+MLO",
            "fold": "all", "synthetic_share": "n/a" if share is None else share}


def setting_params(arch: str, setting: str, views: Sequence[str],
                   probabilities: pd.DataFrame | None = None) -> dict[str, object]:
    """What one setting run is computed from: the classifiers fused, how, with which weights, on what.

    ``probabilities`` (fused p per arch, fold, setting and test lesion) adds the fold and lesion
    counts. The short keys that tell settings apart (cesm_images, fusion, modalities) sort first:
    MLflow's run comparison plots the first three params that differ.
    """
    inputs = SETTING_TEST_INPUTS[setting]
    modalities = list(dict.fromkeys(m for m, _ in inputs))
    cesm = sorted({source for m, source in inputs if m == "CESM"})
    share = SETTING_SYNTHETIC_SHARE.get(setting)
    out: dict[str, object] = {
        "arch": arch, "setting": setting, "modalities": "+".join(modalities),
        "views": "+".join(views),
        "cesm_images": "+".join("imputed" if s == "synthetic" else s for s in cesm) or "none",
        "synthetic_share": "0-100" if share is None and cesm else ("n/a" if share is None else share),
        "fusion": "views" if len(modalities) == 1 else "views, then modalities",
        "fusion_rule": "MCC-weighted late fusion: eq. 7 over views, eq. 8 over modalities; weight = validation "
                       "MCC of the fold, <= 0 or undefined counts 0, all 0: plain mean",
        "weights_source": "val predictions (real images) of " + ", ".join(
            f"{arch}/{m}_{v}" for m in modalities for v in views),
        "test_predictions": ", ".join(f"{arch}/{m}_{v} {source}" for m, source in inputs for v in views),
    }
    if probabilities is not None:
        rows = probabilities[(probabilities["arch"] == arch) & (probabilities["setting"] == setting)]
        out.update(folds=int(rows["fold"].nunique()), test_lesions=int(len(rows)),
                   test_lesions_malignant=int((rows["label"] == 1).sum()))
    return out


def setting_tables(predictions: pd.DataFrame | None, arch: str, setting: str) -> dict[str, pd.DataFrame]:
    """The prediction rows a setting run reads: val rows (fusion weights) and test rows (scored)."""
    if predictions is None:
        return {}
    inputs = SETTING_TEST_INPUTS[setting]
    rows = predictions[predictions["arch"] == arch]
    pairs = rows["modality"] + "|" + rows["source"]
    modalities = {m for m, _ in inputs}
    return {
        "val": rows[(rows["subset"] == "val") & (rows["source"] == "real") & rows["modality"].isin(modalities)],
        "test": rows[(rows["subset"] == "test") & pairs.isin({f"{m}|{s}" for m, s in inputs})],
    }
