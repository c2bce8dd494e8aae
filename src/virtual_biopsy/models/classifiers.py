"""Per modality x view CNN classifiers (paper section 5.1): ResNet18, ResNet50, VGG16.

Built from torchvision with ``weights=None`` (the paper trains from scratch; nothing is ever
downloaded), adapted to one input channel (mammograms are grey) and two output logits
(0 = benign, 1 = malignant). Optional local weights (e.g. ImageNet weights copied in by hand)
are loaded with ``torch.load(weights_only=True)``: an RGB first convolution is folded into one
channel and a head of another size is skipped, so a 1000-class ImageNet file fits.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

N_CLASSES = 2
MALIGNANT_CLASS = 1

# Per architecture: constructor, name of the first convolution and of the final linear layer
# (as state-dict key prefixes), so the adaptation and the weight loader agree.
_ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], str, str]] = {
    "resnet18": (tv_models.resnet18, "conv1", "fc"),
    "resnet50": (tv_models.resnet50, "conv1", "fc"),
    "vgg16": (tv_models.vgg16, "features.0", "classifier.6"),
}
ARCHITECTURES = tuple(_ARCHITECTURES)


class WeightsFileError(ValueError):
    """A classifier weights file is missing, unreadable or does not fit the architecture."""


def build_classifier(arch: str, weights_file: str | Path | None = None, *, seed: int = 0) -> nn.Module:
    """A 1-channel, 2-logit ``arch`` network, randomly initialised from ``seed``.

    ``weights_file``: optional local state dict (or a dict holding one under ``state_dict`` or
    ``model``) to start from instead; see :func:`load_classifier_weights`.
    """
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unknown classifier architecture {arch!r}; choose from {ARCHITECTURES}")
    constructor, first_conv, head = _ARCHITECTURES[arch]
    # Initialisation draws from torch's global RNG; fork it so building a model neither depends on
    # nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = constructor(weights=None)
        _set_submodule(model, first_conv, _single_channel_conv(_get_submodule(model, first_conv)))
        _set_submodule(model, head, _two_class_head(_get_submodule(model, head)))
    if weights_file is not None:
        load_classifier_weights(model, arch, weights_file)
    return model


def load_classifier_weights(model: nn.Module, arch: str, weights_file: str | Path) -> list[str]:
    """Load a local weights file into ``model`` (built by :func:`build_classifier` for ``arch``).

    - a 3-channel first convolution is summed over its input channels: a grey image replicated
      into R, G and B gives exactly this response, so the pretrained filters keep their meaning;
    - a head whose shape differs (e.g. 1000 ImageNet classes) is skipped and keeps its random init;
    - any other missing key or shape mismatch is an error naming the file and the keys.

    Returns the keys that were skipped (the head, if it did not fit).
    """
    path = Path(weights_file)
    state = _read_state_dict(path)
    _, first_conv, head = _ARCHITECTURES[arch]
    target = model.state_dict()
    adapted: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    mismatched: list[str] = []
    for key, expected in target.items():
        if key not in state:
            continue  # reported below as missing unless it is the head
        value = state[key]
        if key == f"{first_conv}.weight" and value.ndim == 4 and value.shape[1] == 3:
            value = value.sum(dim=1, keepdim=True)
        if value.shape == expected.shape:
            adapted[key] = value.to(expected.dtype)
        elif key.startswith(f"{head}."):
            skipped.append(key)
        else:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(expected.shape)}")
    missing = [k for k in target if k not in state and not k.startswith(f"{head}.")]
    unexpected = [k for k in state if k not in target]
    if mismatched or missing or unexpected:
        raise WeightsFileError(
            f"{path}: weights do not fit {arch}: "
            + "; ".join(
                part
                for part in (
                    _listing("shape mismatch", mismatched),
                    _listing("missing keys", missing),
                    _listing("unexpected keys", unexpected),
                )
                if part
            )
        )
    skipped += [k for k in target if k not in state]  # an absent head keeps its initialisation
    model.load_state_dict({**target, **adapted})
    return skipped


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such weights file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe pickles
        raise WeightsFileError(f"{path}: not a readable torch weights file ({exc})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsFileError(f"{path}: expected a state dict of tensors, got {type(loaded).__name__}")
    return loaded


def _single_channel_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Same geometry, one input channel; initialised as torchvision initialises its convs."""
    single = nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(single.weight, mode="fan_out", nonlinearity="relu")
    if single.bias is not None:
        nn.init.zeros_(single.bias)
    return single


def _two_class_head(linear: nn.Linear) -> nn.Linear:
    """Two logits (benign, malignant); small init as torchvision's VGG uses for its linears."""
    head = nn.Linear(linear.in_features, N_CLASSES)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    return head


def _get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    return model.get_submodule(dotted)


def _set_submodule(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _listing(what: str, keys: list[str], limit: int = 5) -> str:
    if not keys:
        return ""
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{what}: {', '.join(keys[:limit])}{more}"
