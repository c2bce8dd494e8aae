"""Grad-CAM per classifier (serving/saliency.py): the right layer, the malignant class, maps of the
image's shape in [0, 1] that sit where the evidence is, shares of the fused p, the source geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from virtual_biopsy.data.source_geometry import SourceGeometry
from virtual_biopsy.models import build_classifier
from virtual_biopsy.serving.saliency import (
    TARGET_LAYERS,
    SaliencyError,
    fusion_shares,
    grad_cam,
    in_source_geometry,
    target_layer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 128  # resnet18's last block is a 4 x 4 grid at 128 px: enough to tell the quadrants apart
QUADRANT = SIZE // 2


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build_classifier("resnet18", seed=0).eval()


@pytest.fixture(scope="module")
def activation_reader() -> nn.Module:
    """An untrained resnet18 whose malignant logit is the total activation of its last block
    (head weights +1 for malignant, 0 for benign). Every activation is then evidence for
    malignancy, and on a black background only a bright patch activates anything (no bias before
    the head; eval-mode batch norm of a fresh network is the identity), so the patch is where the
    evidence is: Grad-CAM must sit there, and occluding it must lower the logit most."""
    model = build_classifier("resnet18", seed=1).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[1] = 1.0
        model.fc.bias.zero_()
    return model


def _patch_image(quadrant: tuple[int, int]) -> np.ndarray:
    """A black image with a bright 20 x 20 patch in the middle of ``quadrant`` (row, column: 0 or 1)."""
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    top, left = quadrant[0] * QUADRANT + 22, quadrant[1] * QUADRANT + 22
    image[top:top + 20, left:left + 20] = 1.0
    return image


def _malignant_logit(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)[:, None])[:, 1].numpy()


def _quadrant_sums(image: np.ndarray) -> np.ndarray:
    return image.reshape(2, QUADRANT, 2, QUADRANT).sum(axis=(1, 3))


def test_a_map_has_the_images_shape_is_finite_and_lies_in_0_1(resnet18):
    images = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    result = grad_cam(resnet18, "resnet18", images)
    assert result.maps.shape == (3, 64, 64) and result.maps.dtype == np.float32
    assert np.isfinite(result.maps).all() and result.maps.min() >= 0 and result.maps.max() <= 1
    assert result.grid == (2, 2)  # resnet18's last block works at S / 32


def test_grad_cam_leaves_the_network_as_it_was(resnet18):
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    grad_cam(resnet18, "resnet18", np.random.default_rng(1).random((2, 64, 64), dtype=np.float32))
    assert all(p.requires_grad and p.grad is None for p in resnet18.parameters())
    assert all(torch.equal(before[k], v) for k, v in resnet18.state_dict().items())


@pytest.mark.parametrize("quadrant", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_the_map_sits_where_occluding_the_image_lowers_the_malignant_logit_most(activation_reader, quadrant):
    image = _patch_image(quadrant)
    cam = grad_cam(activation_reader, "resnet18", image[None]).maps[0]
    occluded = []
    for row in (0, 1):
        for column in (0, 1):
            copy = image.copy()
            copy[row * QUADRANT:(row + 1) * QUADRANT, column * QUADRANT:(column + 1) * QUADRANT] = 0
            occluded.append(copy)
    drop = (_malignant_logit(activation_reader, image[None]) - _malignant_logit(activation_reader, np.stack(occluded)))
    most_mass = np.unravel_index(np.argmax(_quadrant_sums(cam)), (2, 2))
    assert most_mass == quadrant == np.unravel_index(np.argmax(drop), (2, 2))


def test_the_map_is_of_the_malignant_class_not_of_the_predicted_one(activation_reader):
    benign_reader = build_classifier("resnet18", seed=1).eval()
    benign_reader.load_state_dict(activation_reader.state_dict())
    with torch.no_grad():  # the patch is now evidence for benign only: the top class, but not ours
        benign_reader.fc.weight[0], benign_reader.fc.weight[1] = 1.0, -1.0
    image = _patch_image((1, 0))[None]
    with torch.no_grad():
        assert benign_reader(torch.from_numpy(image)[:, None]).argmax(dim=1).item() == 0
    assert grad_cam(benign_reader, "resnet18", image).maps.max() == 0.0  # nothing raises the malignant logit


@pytest.mark.parametrize("arch", sorted(TARGET_LAYERS))
def test_the_target_layer_is_the_last_convolutional_block_of_each_architecture(arch):
    model = build_classifier(arch)
    layer = target_layer(model, arch)
    if arch.startswith("resnet"):
        assert layer is model.layer4[-1]
    else:
        assert layer is [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]


def test_an_unknown_architecture_or_a_bad_batch_is_refused_naming_it(resnet18):
    with pytest.raises(SaliencyError, match="'densenet'"):
        target_layer(resnet18, "densenet")
    with pytest.raises(SaliencyError, match="no layer 'features.28'"):
        target_layer(resnet18, "vgg16")
    with pytest.raises(SaliencyError, match=r"\(N, S, S\), got shape \(32, 32\)"):
        grad_cam(resnet18, "resnet18", np.zeros((32, 32), dtype=np.float32))
    with pytest.raises(SaliencyError, match="NaN"):
        grad_cam(resnet18, "resnet18", np.full((1, 32, 32), np.nan, dtype=np.float32))


def test_fusion_shares_follow_the_weights_and_a_zero_weight_gives_a_zero_share():
    shares = fusion_shares({"FFDM": {"CC": 1.0, "MLO": 3.0}, "CESM": {"CC": 0.0, "MLO": 2.0}},
                           {"FFDM": 0.0, "CESM": 0.5})
    assert shares == {("FFDM", "CC"): 0.0, ("FFDM", "MLO"): 0.0, ("CESM", "CC"): 0.0, ("CESM", "MLO"): 1.0}
    even = fusion_shares({"FFDM": {"CC": 0.0, "MLO": 0.0}, "CESM": {"CC": 1.0, "MLO": 1.0}}, {"FFDM": 1, "CESM": 3})
    assert even[("FFDM", "CC")] == pytest.approx(0.125) and sum(even.values()) == pytest.approx(1.0)


def test_a_map_goes_back_onto_its_source_image_like_the_image_does():
    square = np.zeros((32, 32), dtype=np.float32)
    square[:, 24:] = 1.0  # near the chest wall (processed images have it on the right)
    source = in_source_geometry(square, SourceGeometry(rows=96, columns=60, chest_wall_left=True))
    assert source.shape == (96, 60)
    assert source[:, :10].mean() > 0.9 and source[:, -10:].mean() < 0.1  # mirrored back: chest wall on the left
