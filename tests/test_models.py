"""Networks: shapes, value ranges, 1-channel/2-class adaptation and local weight loading."""
from __future__ import annotations

import pytest
import torch
from torchvision import models as tv_models

from virtual_biopsy.models import (
    ARCHITECTURES,
    PatchDiscriminator,
    ResnetGenerator,
    WeightsFileError,
    build_classifier,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_generator_keeps_image_shape_and_outputs_unit_range():
    generator = ResnetGenerator(ngf=8, n_residual_blocks=2)
    images = torch.rand(3, 1, 32, 32)
    out = generator(images)
    assert out.shape == images.shape
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_generator_rejects_sizes_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        ResnetGenerator(ngf=4, n_residual_blocks=1)(torch.rand(1, 1, 30, 30))


def test_generator_rejects_non_positive_width():
    with pytest.raises(ValueError, match="ngf"):
        ResnetGenerator(ngf=0)


def test_patch_discriminator_scores_a_grid_of_patches():
    scores = PatchDiscriminator(ndf=8)(torch.rand(2, 1, 64, 64))
    assert scores.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6, as the 70x70 PatchGAN


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_classifier_takes_one_channel_and_gives_two_logits(arch):
    model = build_classifier(arch).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_classifier_initialisation_follows_the_seed():
    first, again, other = (build_classifier("resnet18", seed=s).conv1.weight for s in (1, 1, 2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_build_classifier_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="densenet121"):
        build_classifier("densenet121")


def test_missing_weights_file_fails_naming_the_file(tmp_path):
    missing = tmp_path / "absent.pt"
    with pytest.raises(WeightsFileError, match="absent.pt: no such weights file"):
        build_classifier("resnet18", missing)


def test_unreadable_weights_file_fails_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(WeightsFileError, match="garbage.pt: not a readable torch weights file"):
        build_classifier("resnet18", garbage)


def test_weights_of_another_architecture_fail_with_the_mismatching_keys(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(build_classifier("resnet18").state_dict(), path)
    with pytest.raises(WeightsFileError, match=r"resnet18.pt: weights do not fit resnet50: .*(mismatch|missing)"):
        build_classifier("resnet50", path)


def test_rgb_imagenet_shaped_weights_fold_to_one_channel_and_skip_the_head(tmp_path):
    rgb = tv_models.resnet18(weights=None)  # 3 input channels, 1000 classes, as ImageNet weights
    path = tmp_path / "imagenet_like.pt"
    torch.save({"state_dict": rgb.state_dict()}, path)
    model = build_classifier("resnet18", path, seed=3)
    assert torch.allclose(model.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)
    assert torch.equal(model.fc.weight, build_classifier("resnet18", seed=3).fc.weight)  # head kept its init


def test_own_weights_round_trip_exactly(tmp_path):
    trained = build_classifier("resnet18", seed=5)
    path = tmp_path / "own.pt"
    torch.save(trained.state_dict(), path)
    reloaded = build_classifier("resnet18", path, seed=6)
    for key, value in trained.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_generator_output_is_zero_outside_the_breast_and_free_inside():
    """Pixels that are exactly 0 in the input (air, padding) stay 0; tissue pixels are generated."""
    torch.manual_seed(0)
    image = torch.rand(2, 1, 32, 32) * 0.9 + 0.05
    image[:, :, :, :12] = 0.0  # background strip, as preprocessing leaves it
    masked = ResnetGenerator(ngf=4, n_residual_blocks=1)
    out = masked(image)
    assert torch.all(out[:, :, :, :12] == 0)
    assert torch.all(out[:, :, :, 12:] > 0)
    unmasked = ResnetGenerator(ngf=4, n_residual_blocks=1, mask_background=False)
    unmasked.load_state_dict(masked.state_dict())
    assert torch.any(unmasked(image)[:, :, :, :12] != 0)
