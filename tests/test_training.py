"""Training: paired augmentation, datasets, early stopping, loss weights, one-step descent, resume."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from virtual_biopsy.core.config import ClassifierConfig, GeneratorConfig
from virtual_biopsy.models import build_classifier
from virtual_biopsy.training import (
    AffineAugment,
    CheckpointError,
    CycleGANLoss,
    EarlyStopping,
    LabelledImageDataset,
    PairedImageDataset,
    classifier_trainer,
    generate,
    generator_trainer,
    loop,
    open_images,
    predict_proba,
    train_classifier,
    train_cyclegan,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
TINY_GAN = GeneratorConfig(
    ngf=4, ndf=4, n_residual_blocks=1, epochs=3, warmup_epochs=1, patience=5, batch_size=4, lr=1e-3
)
TINY_CLASSIFIER = ClassifierConfig(epochs=3, warmup_epochs=1, patience=5, lr_patience=1, batch_size=4)


class KilledAt(Exception):
    """Stands in for a killed process: raised from the epoch callback."""


@pytest.fixture
def images(tmp_path):
    """A processed-like memmapped array: 8 LE rows then their 8 DES partners, with blobs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    le, des = [], []
    for _ in range(8):
        cy, cx, radius = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(3, 6)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        le.append(0.3 + 0.2 * blob + 0.02 * rng.standard_normal((SIZE, SIZE)))
        des.append(0.1 + 0.7 * blob)
    array = np.clip(np.stack(le + des), 0, 1).astype(np.float32)
    path = tmp_path / "images.npy"
    np.save(path, array)
    return open_images(path)


def paired(images, rows, augment=None):
    return PairedImageDataset(images, rows, [r + 8 for r in rows], augment=augment)


def labelled(images, rows, augment=None):
    return LabelledImageDataset(images, rows, [r % 2 for r in rows], augment=augment)


# --- augmentation ---------------------------------------------------------------------------


def test_augmentation_warps_both_images_of_a_pair_alike():
    marker = torch.zeros(SIZE, SIZE)
    marker[6:10, 20:24] = 1.0
    pair = torch.stack([marker, 0.5 * marker])  # same position, different intensity
    out = AffineAugment()(pair, torch.Generator().manual_seed(7))
    assert not torch.allclose(out[0], marker)  # it did move
    assert torch.allclose(out[1], 0.5 * out[0], atol=1e-6)


def test_augmentation_keeps_identical_pair_identical():
    image = torch.rand(SIZE, SIZE)
    out = AffineAugment()(torch.stack([image, image]), torch.Generator().manual_seed(1))
    assert torch.equal(out[0], out[1])


def test_augmentation_strength_zero_is_the_identity():
    image = torch.rand(2, SIZE, SIZE)
    assert torch.equal(AffineAugment(strength=0.0)(image, torch.Generator().manual_seed(1)), image)


def test_augmentation_rejects_strength_outside_unit_interval():
    with pytest.raises(ValueError, match="strength must lie in"):
        AffineAugment(strength=1.5)


def test_augmentation_draws_depend_only_on_seed_epoch_and_item(images):
    dataset = paired(images, range(4), augment=AffineAugment())
    dataset.set_epoch(2, seed=11)
    first = dataset[1][0]
    dataset.set_epoch(3, seed=11)
    other_epoch = dataset[1][0]
    dataset.set_epoch(2, seed=11)
    assert torch.equal(dataset[1][0], first)
    assert not torch.equal(other_epoch, first)


def test_augmentation_warps_on_one_thread_with_the_values_of_a_threaded_warp(monkeypatch):
    """Per-sample warps run single-threaded (threaded tiny ops stall on a busy 2-core machine),
    restore the thread count after, and give bit for bit the values torch's threaded ops give."""
    from torch.nn import functional as F

    from virtual_biopsy.training import augment

    image = torch.rand(2, 64, 64)
    matrix = AffineAugment().sample_matrix(torch.Generator().manual_seed(3))
    torch.set_num_threads(2)  # the module fixture's 1 is restored at its end
    threaded_grid = F.affine_grid(matrix[None], [1, 2, 64, 64], align_corners=False)
    threaded = F.grid_sample(image[None], threaded_grid, align_corners=False)[0].clamp(0.0, 1.0)
    seen = []
    real_affine_grid = F.affine_grid

    def recording_affine_grid(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_affine_grid(*args, **kwargs)

    monkeypatch.setattr(augment.F, "affine_grid", recording_affine_grid)
    try:
        warped = augment.apply_affine(image, matrix)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    assert seen == [1] and after == 2
    assert torch.equal(warped, threaded)


# --- datasets -------------------------------------------------------------------------------


def test_paired_dataset_yields_single_channel_le_and_des(images):
    le, des = paired(images, [0, 1])[1]
    assert le.shape == des.shape == (1, SIZE, SIZE)
    assert torch.equal(des[0], torch.from_numpy(np.array(images[9])))


def test_dataset_rejects_rows_outside_the_array(images):
    with pytest.raises(IndexError, match=r"le_rows: row\(s\) \[99\] outside the image array of 16 rows"):
        PairedImageDataset(images, [99], [0])


def test_paired_dataset_rejects_unpaired_row_lists(images):
    with pytest.raises(ValueError, match="pair up one to one"):
        PairedImageDataset(images, [0, 1], [8])


def test_labelled_dataset_rejects_labels_other_than_zero_and_one(images):
    with pytest.raises(ValueError, match=r"labels: expected 0 \(benign\) or 1 \(malignant\), got \[2\]"):
        LabelledImageDataset(images, [0, 1], [1, 2])


def test_open_images_rejects_float64_array(tmp_path):
    path = tmp_path / "wrong.npy"
    np.save(path, np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="wrong.npy: expected float32"):
        open_images(path)


def test_open_images_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npy: no such processed image array"):
        open_images(tmp_path / "nothere.npy")


# --- early stopping -------------------------------------------------------------------------


def test_early_stopping_does_not_stop_during_warmup():
    stopper = EarlyStopping(warmup_epochs=5, patience=1)
    worsening = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert not any(stopper.step(epoch, loss, {}) for epoch, loss in enumerate(worsening))
    assert stopper.step(5, 6.0, {})  # first post-warm-up epoch without improvement


def test_early_stopping_keeps_the_best_state_and_stops_after_patience():
    stopper = EarlyStopping(warmup_epochs=0, patience=2)
    weights = torch.zeros(1)
    decisions = []
    for epoch, loss in enumerate([3.0, 1.0, 2.0, 2.5]):
        weights += 1
        decisions.append(stopper.step(epoch, loss, {"w": weights}))
    assert decisions == [False, False, False, True]
    assert stopper.best_epoch == 1 and stopper.best_state["w"].item() == 2.0  # a copy, not a view


def test_early_stopping_rejects_a_diverged_loss():
    with pytest.raises(FloatingPointError, match="epoch 3"):
        EarlyStopping(0, 1).step(3, float("nan"), {})


# --- CycleGAN -------------------------------------------------------------------------------


def test_cyclegan_trains_on_its_terms_weighted_as_configured(images):
    cfg = dataclasses.replace(TINY_GAN, epochs=1, lambda_cycle=7.0, lambda_identity=2.5, lambda_paired=3.0)
    result = train_cyclegan(paired(images, range(4)), paired(images, [4, 5]), cfg, seed=0)
    (epoch,) = result.history
    weighted = (epoch["train/adversarial"] + 7.0 * epoch["train/cycle"] + 2.5 * epoch["train/identity"]
                + 3.0 * epoch["train/paired"])
    assert epoch["train/loss_g"] == pytest.approx(weighted, rel=1e-5)


def test_cyclegan_loss_adds_the_weighted_terms():
    nets = generator_trainer.build_cyclegan(TINY_GAN, seed=0)
    real_a, real_b = torch.rand(2, 1, SIZE, SIZE), torch.rand(2, 1, SIZE, SIZE)
    loss = CycleGANLoss(lambda_cycle=10.0, lambda_identity=5.0, lambda_paired=2.0)
    total, terms, _, fake_b = loss.generator_terms(nets, real_a, real_b)
    expected = terms["adversarial"] + 10.0 * terms["cycle"] + 5.0 * terms["identity"] + 2.0 * terms["paired"]
    assert torch.allclose(terms["paired"], torch.nn.functional.l1_loss(fake_b, real_b))
    assert torch.allclose(total, expected)


def test_cyclegan_training_step_lowers_reconstruction_loss_on_a_fixed_batch(images):
    torch.manual_seed(0)
    nets = generator_trainer.build_cyclegan(TINY_GAN, seed=0)
    loss = CycleGANLoss(TINY_GAN.lambda_cycle, lambda_identity=5.0)
    opt_g, opt_d = generator_trainer._optimisers(nets, TINY_GAN)
    real_a, real_b = next(iter(torch.utils.data.DataLoader(paired(images, range(4)), batch_size=4)))

    def reconstruction() -> float:  # cycle + identity: the part D's update cannot move
        with torch.no_grad():
            _, terms, _, _ = loss.generator_terms(nets, real_a, real_b)
        return (loss.lambda_cycle * terms["cycle"] + loss.lambda_identity * terms["identity"]).item()

    before = reconstruction()
    generator_trainer.train_step(nets, loss, opt_g, opt_d, real_a, real_b)
    assert reconstruction() < before


def test_cyclegan_resumed_after_kill_ends_with_identical_weights(images, tmp_path):
    train, val = paired(images, range(6), AffineAugment()), paired(images, [6, 7])
    reference = train_cyclegan(train, val, TINY_GAN, seed=3)  # never checkpointed

    def kill_after_epoch_one(epoch, metrics, state):
        assert {"train/loss_g", "train/loss_d", "val/l1", "lr"} <= set(metrics)
        if epoch == 1:
            raise KilledAt(epoch)

    with pytest.raises(KilledAt):
        train_cyclegan(train, val, TINY_GAN, seed=3, checkpoint_dir=tmp_path / "killed", on_epoch_end=kill_after_epoch_one)
    resumed = train_cyclegan(train, val, TINY_GAN, seed=3, checkpoint_dir=tmp_path / "killed")
    assert resumed.history == reference.history
    assert resumed.best_epoch == reference.best_epoch
    for key, value in reference.generator_state.items():
        assert torch.equal(resumed.generator_state[key], value), key


def test_cyclegan_refuses_a_checkpoint_of_another_configuration(images, tmp_path):
    train, val = paired(images, range(4)), paired(images, [4, 5])
    train_cyclegan(train, val, dataclasses.replace(TINY_GAN, epochs=1), seed=0, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"last.pt: checkpoint belongs to a different training run .*config"):
        train_cyclegan(train, val, dataclasses.replace(TINY_GAN, epochs=1, lr=0.5), seed=0, checkpoint_dir=tmp_path)


def test_cyclegan_asked_to_restart_if_stale_trains_anew_over_a_checkpoint_of_another_configuration(images, tmp_path):
    train, val, cfg = paired(images, range(4)), paired(images, [4, 5]), dataclasses.replace(TINY_GAN, epochs=1)
    fresh = train_cyclegan(train, val, cfg, seed=0)
    train_cyclegan(train, val, dataclasses.replace(cfg, lr=0.5), seed=0, checkpoint_dir=tmp_path)
    restarted = train_cyclegan(train, val, cfg, seed=0, checkpoint_dir=tmp_path, restart_if_stale=True)
    assert restarted.history == fresh.history
    resumed = train_cyclegan(train, val, cfg, seed=0, checkpoint_dir=tmp_path)  # the checkpoint is now this run's
    assert resumed.history == fresh.history


def test_cyclegan_fine_tunes_from_pretrained_generator_weights(images, tmp_path):
    donor = generator_trainer.build_cyclegan(TINY_GAN, seed=42)["generator_ab"]
    path = tmp_path / "pretrained.pt"
    torch.save(donor.state_dict(), path)
    nets = generator_trainer.build_cyclegan(TINY_GAN, seed=0)
    assert generator_trainer.load_pretrained(nets, path) == ["generator_ab"]
    assert torch.equal(nets["generator_ab"].net[1].weight, donor.net[1].weight)


def test_cyclegan_pretrained_weights_of_other_size_fail_clearly(images, tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(generator_trainer.build_generator(dataclasses.replace(TINY_GAN, ngf=8)).state_dict(), path)
    cfg = dataclasses.replace(TINY_GAN, epochs=1, pretrained_weights=str(path))
    with pytest.raises(ValueError, match="wide.pt: weights for generator_ab do not fit"):
        train_cyclegan(paired(images, range(4)), paired(images, [4]), cfg, seed=0)


def test_generate_returns_unit_range_images_of_the_input_shape(images):
    generator = generator_trainer.build_generator(TINY_GAN)
    out = generate(generator, images[:5], batch_size=2)
    assert out.shape == (5, SIZE, SIZE) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


# --- classifiers ----------------------------------------------------------------------------


def test_classifier_training_step_lowers_the_loss_on_a_fixed_batch(images):
    model = build_classifier("resnet18", seed=0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch, labels = next(iter(torch.utils.data.DataLoader(labelled(images, range(8)), batch_size=8)))

    def batch_loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(batch), labels).item()

    model.train()
    before = batch_loss()
    classifier_trainer.train_step(model, optimiser, batch, labels)
    assert batch_loss() < before


def test_classifier_resumed_after_kill_ends_with_identical_weights(images, tmp_path):
    train, val = labelled(images, range(10), AffineAugment()), labelled(images, range(10, 16))
    reference_model = build_classifier("resnet18", seed=1)
    reference = train_classifier(reference_model, train, val, TINY_CLASSIFIER, seed=4)  # never checkpointed

    def kill_after_epoch_zero(epoch, metrics, state):
        assert {"train/loss", "val/loss", "val/accuracy", "lr"} <= set(metrics)
        raise KilledAt(epoch)

    with pytest.raises(KilledAt):
        train_classifier(
            build_classifier("resnet18", seed=1), train, val, TINY_CLASSIFIER, seed=4,
            checkpoint_dir=tmp_path / "killed", on_epoch_end=kill_after_epoch_zero,
        )
    # A fresh process would build the model again, with whatever init: the checkpoint decides.
    resumed_model = build_classifier("resnet18", seed=99)
    resumed = train_classifier(resumed_model, train, val, TINY_CLASSIFIER, seed=4, checkpoint_dir=tmp_path / "killed")
    assert resumed.history == reference.history
    for key, value in reference_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


def test_classifier_ends_holding_the_weights_of_its_best_epoch(images):
    model = build_classifier("resnet18", seed=2)
    result = train_classifier(model, labelled(images, range(10)), labelled(images, range(10, 16)), TINY_CLASSIFIER, seed=0)
    val_losses = [entry["val/loss"] for entry in result.history]
    assert result.best_epoch == int(np.argmin(val_losses))
    for key, value in result.state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_predict_proba_gives_one_malignancy_probability_per_row(images):
    probabilities = predict_proba(build_classifier("resnet18"), images, [0, 3, 5], batch_size=2)
    assert probabilities.shape == (3,)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()


def test_classifier_rejects_class_weights_of_wrong_length(images):
    with pytest.raises(ValueError, match="class_weights: expected two weights"):
        train_classifier(
            build_classifier("resnet18"), labelled(images, range(4)), labelled(images, [4, 5]),
            TINY_CLASSIFIER, seed=0, class_weights=[1.0, 2.0, 3.0],
        )


def test_auto_device_is_cuda_when_present_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loop.resolve_device("auto").type == expected
    assert loop.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'tpu9': not a torch device"):
        loop.resolve_device("tpu9")


# --- step cap (make paper-smoke) -----------------------------------------------------------------

def test_a_capped_epoch_trains_the_first_batches_of_that_epochs_own_order(images):
    dataset = labelled(images, list(range(8)))
    def batches(epoch, cap):  # each batch as its images' sums, which tell the 8 images apart
        return [x.sum(dim=(1, 2, 3)).tolist() for x, _ in loop.epoch_loader(dataset, 2, 7, epoch, shuffle=True,
                                                                            max_steps=cap)]

    whole, capped = batches(0, None), batches(0, 3)
    assert len(whole) == 4 and capped == whole[:3]
    assert batches(1, 3) != capped  # each capped epoch is its own random subset
    assert batches(0, 10) == whole  # a cap above the epoch's length changes nothing


def test_a_step_cap_below_one_is_refused(images):
    with pytest.raises(ValueError, match="max_steps must be at least 1, got 0"):
        loop.epoch_loader(labelled(images, list(range(8))), 2, 7, 0, shuffle=True, max_steps=0)
