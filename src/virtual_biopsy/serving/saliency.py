"""Grad-CAM saliency for the fused decision: where in each view the malignancy evidence comes from.

What a map is
    For one classifier f_{m,v} of the fused pipeline (modality m, view v) and one preprocessed
    image, Grad-CAM (pytorch-grad-cam, Selvaraju et al. 2017) of the **malignant logit** at the
    network's **last convolutional block** (:data:`TARGET_LAYERS`): the block's activation maps
    weighted by the mean gradient of the malignant logit over each map, summed, clipped at 0 and
    scaled to [0, 1] per image by the library (an all-zero map means no region raised the logit).
    It is computed in the processed geometry (``S x S``, chest wall on the right, padded square:
    what the network saw) and can be put back onto the source image with
    :func:`in_source_geometry` (data/source_geometry.py, the same path a synthetic CESM takes).

What resolution it has
    The last block works on a coarse grid (:attr:`GradCam.grid`): S/32 cells a side for ResNet,
    S/16 for VGG16, so 1 x 1 at 32 px (a map that cannot localise anything; the report says so)
    and 8 x 8 at 256 px. The map is that grid upsampled (bilinear) to S x S.

For the fused decision
    p = eq. 8 over modalities of eq. 7 over views, both weighted means; each classifier's
    probability therefore enters p with the share :func:`fusion_shares` gives (its view weight
    within its modality times its modality's weight, each normalised). A map whose share is 0
    belongs to a classifier that contributed nothing to p.

Pure functions: a model and images in, arrays out; nothing is read or written here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from virtual_biopsy.core.config import MODALITIES, VIEWS
from virtual_biopsy.data.source_geometry import SourceGeometry, to_source_geometry
from virtual_biopsy.models.classifiers import MALIGNANT_CLASS

# The last convolutional block per architecture, as a submodule name of build_classifier's network:
# ResNet's last residual block (layer4[-1]), VGG16's last convolution (features.28; ReLU and max
# pooling follow it). tests/test_saliency.py checks each name against the built network.
TARGET_LAYERS: dict[str, str] = {
    "resnet18": "layer4.1",
    "resnet50": "layer4.2",
    "vgg16": "features.28",
}


class SaliencyError(ValueError):
    """A saliency map cannot be computed; the message names the architecture or image and why."""


@dataclass(frozen=True)
class GradCam:
    """Grad-CAM maps of a batch: ``maps`` float32 (N, S, S) in [0, 1]; ``grid`` the (rows, columns)
    of the target layer's activation maps, i.e. the map's true resolution before upsampling."""

    maps: np.ndarray
    grid: tuple[int, int]


@dataclass(frozen=True)
class ClassifierSaliency:
    """One classifier's map for one breast, with its weight in the fused decision.

    ``processed``: (S, S) in [0, 1]; ``fusion_share``: this classifier's share of p (0 to 1);
    ``grid``: the map's true resolution (:class:`GradCam`); ``layer``: the target layer's name."""

    modality: str
    view: str
    processed: np.ndarray
    fusion_share: float
    grid: tuple[int, int]
    layer: str

    @property
    def localises(self) -> bool:
        """False when the map is one cell (it can only say "the whole image")."""
        return self.grid[0] * self.grid[1] > 1


def target_layer(model: nn.Module, arch: str) -> nn.Module:
    """The layer Grad-CAM reads in ``model`` (a network of ``arch`` from build_classifier)."""
    if arch not in TARGET_LAYERS:
        raise SaliencyError(f"no Grad-CAM target layer known for architecture {arch!r}; "
                            f"known: {sorted(TARGET_LAYERS)}")
    name = TARGET_LAYERS[arch]
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise SaliencyError(f"the {arch} network has no layer {name!r} (not built by build_classifier?)") from exc


def _check_images(images: np.ndarray) -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    if array.ndim != 3 or array.shape[1] != array.shape[2] or array.shape[0] < 1:
        raise SaliencyError(f"Grad-CAM takes a batch of square preprocessed images (N, S, S), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise SaliencyError("an image given to Grad-CAM holds NaN or infinite values")
    return np.ascontiguousarray(array)


class _GraphFromTargetLayer:
    """Within the block no parameter requires gradients, and the target layer's output is made a
    fresh tensor that does (a forward hook, registered before Grad-CAM's own hooks).

    Grad-CAM needs the gradient of the malignant logit at that output and nothing else; so the
    forward pass records no graph below it (as plain inference) and backward runs only through
    the head (pooling and the last linear layer), not through the network, and no parameter
    gradient is computed or left behind. Flags and hooks are restored on exit."""

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.model, self.layer = model, layer
        self.saved: list[tuple[nn.Parameter, bool]] = []
        self.handle = None

    def __enter__(self) -> None:
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for parameter, _ in self.saved:
            parameter.requires_grad_(False)
        self.handle = self.layer.register_forward_hook(lambda _module, _inputs, output:
                                                       output.detach().requires_grad_(True))

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        for parameter, flag in self.saved:
            parameter.requires_grad_(flag)


def grad_cam(model: nn.Module, arch: str, images: np.ndarray) -> GradCam:
    """Grad-CAM of the malignant logit at ``arch``'s last convolutional block for a batch of
    preprocessed images (N, S, S): maps (N, S, S) in [0, 1] and the map's true grid."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    batch = torch.from_numpy(_check_images(images))[:, None]
    layer = target_layer(model, arch)
    targets = [ClassifierOutputTarget(MALIGNANT_CLASS)] * len(batch)
    model.eval()
    with torch.enable_grad(), _GraphFromTargetLayer(model, layer), GradCAM(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=batch, targets=targets)
        grid = tuple(int(n) for n in cam.activations_and_grads.activations[0].shape[-2:])
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    return GradCam(np.clip(maps, 0.0, 1.0), (grid[0], grid[1]))


def fusion_shares(view_weights: Mapping[str, Mapping[str, float]],
                  modality_weights: Mapping[str, float]) -> dict[tuple[str, str], float]:
    """Each classifier's share of the fused p: normalised eq. 7 weight times normalised eq. 8 weight.

    fuse() divides by the weights' sum and falls back to an unweighted mean when they sum to 0,
    so a zero sum gives equal shares here too. The shares add up to 1."""
    def normalised(weights: Mapping[str, float]) -> dict[str, float]:
        total = float(sum(weights.values()))
        return {k: (float(w) / total if total > 0 else 1.0 / len(weights)) for k, w in weights.items()}

    modality_share = normalised({m: modality_weights[m] for m in MODALITIES})
    return {(m, v): modality_share[m] * normalised({u: view_weights[m][u] for u in VIEWS})[v]
            for m in MODALITIES for v in VIEWS}


def pipeline_saliency(pipeline, ffdm: Sequence[Mapping[str, np.ndarray]],
                      cesm: Sequence[Mapping[str, np.ndarray]]) -> list[dict[tuple[str, str], ClassifierSaliency]]:
    """Grad-CAM of each of a fused pipeline's four classifiers for a batch of breasts.

    ``ffdm[i][view]`` / ``cesm[i][view]``: breast i's preprocessed images as the classifiers saw
    them (CESM acquired or imputed: BreastPrediction.cesm_images). Each classifier runs once over
    the batch. Returns per breast ``{(modality, view): ClassifierSaliency}``."""
    if len(ffdm) != len(cesm):
        raise SaliencyError(f"{len(ffdm)} breasts' FFDM images but {len(cesm)} breasts' CESM images")
    shares = fusion_shares(pipeline.view_weights, pipeline.modality_weights)
    out: list[dict[tuple[str, str], ClassifierSaliency]] = [{} for _ in ffdm]
    for modality in MODALITIES:
        images_of = ffdm if modality == "FFDM" else cesm
        for view in VIEWS:
            result = grad_cam(pipeline.classifiers[modality, view], pipeline.arch,
                              np.stack([breast[view] for breast in images_of]))
            for i, processed in enumerate(result.maps):
                out[i][modality, view] = ClassifierSaliency(modality, view, processed, shares[modality, view],
                                                            result.grid, TARGET_LAYERS[pipeline.arch])
    return out


def in_source_geometry(saliency: np.ndarray, geometry: SourceGeometry) -> np.ndarray:
    """A processed-geometry map (S, S) in [0, 1] on its source image's stored rows x columns
    (resize back, crop the padding, mirror back: data/source_geometry.py)."""
    return to_source_geometry(np.asarray(saliency, dtype=np.float32), geometry)
