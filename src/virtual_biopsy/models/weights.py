"""Self-describing weight files: the state dict with what is needed to rebuild the network.

``{"state_dict": ..., "arch" | "ngf", "n_residual_blocks", "view", "fold", ...}``, written through
core.atomic (same weights, same bytes), read back without params.yaml. A pre-training output
(stages/pretrain_generator.py) is a generator file that also holds the other three CycleGAN
networks under ``networks``, so fine-tuning starts from the whole pre-trained CycleGAN.

:func:`pretrained_cyclegan_states` reads any generator file the project writes (and a CycleGAN
checkpoint) as the initialisation of ``generator.pretrained_weights``, refusing any other file
with an error that names it, what was expected and what was found.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from virtual_biopsy.core.atomic import restore_interrupted_swap, write_torch
from virtual_biopsy.core.config import GeneratorConfig
from virtual_biopsy.models.classifiers import build_classifier
from virtual_biopsy.models.cyclegan import ResnetGenerator


def save_classifier_weights(path: Path, state: dict[str, torch.Tensor], **info: Any) -> None:
    """Write a state dict under ``state_dict`` with what identifies it (arch, modality, view, fold ...)."""
    write_torch(path, {"state_dict": state, **info})


def load_classifier(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the classifier saved by :func:`save_classifier_weights`; returns (network in eval mode, info)."""
    if not path.is_file() and not restore_interrupted_swap(path):
        raise FileNotFoundError(f"{path}: no such classifier weights file (run the train_classifier stage)")
    record = torch.load(path, map_location="cpu", weights_only=True)
    model = build_classifier(str(record["arch"]))
    model.load_state_dict(record["state_dict"])
    model.eval()
    return model, {k: v for k, v in record.items() if k != "state_dict"}


def save_generator_weights(path: Path, state: dict[str, torch.Tensor], cfg: GeneratorConfig, **info: Any) -> None:
    """Write a generator's state dict with what is needed to rebuild it (architecture, size, view, fold)."""
    record = {"state_dict": state, "ngf": cfg.ngf, "n_residual_blocks": cfg.n_residual_blocks, **info}
    write_torch(path, record)


def load_generator_weights(path: Path) -> tuple[ResnetGenerator, dict[str, Any]]:
    """Rebuild the generator saved by :func:`save_generator_weights`; returns (network, info)."""
    if not path.is_file() and not restore_interrupted_swap(path):
        raise FileNotFoundError(f"{path}: no such generator weights file (run the train_generator stage)")
    record = torch.load(path, map_location="cpu", weights_only=True)
    generator = ResnetGenerator(channels=1, ngf=int(record["ngf"]), n_residual_blocks=int(record["n_residual_blocks"]))
    generator.load_state_dict(record["state_dict"])
    generator.eval()
    info = {k: v for k, v in record.items() if k != "state_dict"}
    return generator, info


# --- pre-trained initialisation (generator.pretrained_weights) --------------------------------

CYCLEGAN_NETWORKS = ("generator_ab", "generator_ba", "discriminator_a", "discriminator_b")
PRETRAINED_KINDS = (
    "a generator weights file of this project (fold<k>.pt, serving.pt, models/pretrain/<VIEW>.pt)",
    "a CycleGAN training checkpoint (checkpoints/<run>/last.pt)",
    "a bare generator state dict, or a dict of generator_ab / generator_ba / discriminator_a / discriminator_b",
)


class WeightsFileError(ValueError):
    """A weights file is missing, unreadable or not the weights asked for; the message names the
    file, what was expected and what was found."""


class MissingWeightsFileError(WeightsFileError, FileNotFoundError):
    """The weights file does not exist."""


@dataclass(frozen=True)
class GeneratorSize:
    """What decides whether a generator state dict fits a ResnetGenerator (image size does not:
    the network is fully convolutional)."""

    ngf: int
    n_residual_blocks: int

    def __str__(self) -> str:
        return f"ngf={self.ngf}, n_residual_blocks={self.n_residual_blocks}"


def generator_size_of(state: Mapping[str, Any]) -> GeneratorSize | None:
    """The size of a :class:`ResnetGenerator` state dict, or None when it is not one.

    ngf is the width of the first 7x7 convolution (``net.1``); the residual blocks are the
    distinct ``net.<i>.body`` modules.
    """
    first = state.get("net.1.weight")
    if not isinstance(first, torch.Tensor) or first.ndim != 4 or tuple(first.shape[2:]) != (7, 7):
        return None
    blocks = {key.split(".")[1] for key in state if isinstance(key, str) and ".body." in key}
    return GeneratorSize(int(first.shape[0]), len(blocks))


def discriminator_width_of(state: Mapping[str, Any]) -> int | None:
    """ndf of a :class:`PatchDiscriminator` state dict (its first 4x4 convolution), or None."""
    first = state.get("net.0.weight")
    if not isinstance(first, torch.Tensor) or first.ndim != 4 or tuple(first.shape[2:]) != (4, 4):
        return None
    return int(first.shape[0])


def read_weights_record(path: str | Path) -> Any:
    """``torch.load`` of a weights file (tensors only, on the CPU), or :class:`WeightsFileError`."""
    path = Path(path)
    if not path.is_file() and not restore_interrupted_swap(path):
        raise MissingWeightsFileError(f"{path}: no such weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt, foreign or unsafe files
        raise WeightsFileError(f"{path}: not a readable torch weights file ({type(exc).__name__}: {exc})") from exc


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _cyclegan_parts(path: Path, record: Any) -> tuple[dict[str, Mapping[str, torch.Tensor]], dict[str, Any]]:
    """The network states a weights file holds, by CycleGAN network name, and its info."""
    expected = "; ".join(PRETRAINED_KINDS)
    if not isinstance(record, Mapping):
        raise WeightsFileError(f"{path}: expected {expected}; found a {type(record).__name__}")
    if "state_dict" in record and "arch" in record:
        raise WeightsFileError(f"{path}: holds a classifier's weights (arch {record['arch']}), not a generator's; "
                               f"expected {expected}")
    if "networks" in record and "fingerprint" in record:  # training.checkpoint record
        kind = (record.get("fingerprint") or {}).get("kind")
        if kind != "cyclegan" or not isinstance(record["networks"], Mapping):
            raise WeightsFileError(f"{path}: a training checkpoint of a {kind or 'classifier'} run, not of a CycleGAN; "
                                   f"expected {expected}")
        return dict(record["networks"]), {"checkpoint_epoch": record.get("epoch")}
    if "state_dict" in record:  # save_generator_weights
        parts = {"generator_ab": record["state_dict"], **dict(record.get("networks") or {})}
        return parts, {k: v for k, v in record.items() if k not in ("state_dict", "networks")}
    named = {name: record[name] for name in CYCLEGAN_NETWORKS if name in record}
    if named:
        return named, {}
    if _is_state_dict(record):
        return {"generator_ab": record}, {}
    raise WeightsFileError(f"{path}: expected {expected}; found a dict with keys {sorted(map(str, record))[:8]}")


def pretrained_cyclegan_states(path: str | Path, size: GeneratorSize, ndf: int,
                               image_size: int | None = None) -> dict[str, Mapping[str, torch.Tensor]]:
    """The states of ``path`` to initialise a CycleGAN of generator ``size`` and discriminator
    width ``ndf`` with, by network name (what :func:`~training.generator_trainer.load_pretrained` loads).

    Any generator weight file the project writes is accepted (see :data:`PRETRAINED_KINDS`): its
    LE -> DES generator, plus the other three networks when it holds them (a pre-training output,
    a checkpoint). A file of another kind, or networks of another size, raises
    :class:`WeightsFileError` naming the file, what was expected and what was found. ``image_size``
    (the size this run trains at): a file that records another size is refused too; the network
    would load, but its filters were learnt at another scale of the anatomy.
    """
    path = Path(path)
    parts, info = _cyclegan_parts(path, read_weights_record(path))
    for name, state in parts.items():
        if name not in CYCLEGAN_NETWORKS or not _is_state_dict(state):
            raise WeightsFileError(f"{path}: entry {name!r} is not a state dict of one of {CYCLEGAN_NETWORKS}")
        if name.startswith("generator"):
            found = generator_size_of(state)
            if found != size:
                raise WeightsFileError(f"{path}: weights for {name} do not fit this architecture: expected a generator "
                                       f"of {size} (params generator section), found "
                                       f"{found or 'no ResnetGenerator state dict'}")
        else:
            width = discriminator_width_of(state)
            if width != ndf:
                raise WeightsFileError(f"{path}: weights for {name} do not fit this architecture: expected a "
                                       f"discriminator of ndf={ndf} (params generator section), found "
                                       f"{f'ndf={width}' if width else 'no PatchDiscriminator state dict'}")
    recorded = info.get("image_size")
    if image_size is not None and recorded is not None and int(recorded) != int(image_size):
        raise WeightsFileError(f"{path}: generator trained at {int(recorded)} px; expected {int(image_size)} px "
                               "(preprocess.image_size): pre-train at the size it is fine-tuned at")
    return parts
