"""CycleGAN training for FFDM (LE, domain A) -> CESM (DES, domain B) imputation (paper 5.2.1).

Losses, as in the paper: least-squares adversarial loss (MSE), L1 cycle consistency weighted by
``lambda_cycle`` (10) and L1 identity weighted by ``lambda_identity`` (5; not computed at 0).
Both generators share one Adam optimiser and both discriminators another (lr, betas
(beta1, 0.999), weight decay).
The data are paired, so validation compares G_AB(LE) with the real DES partner (mean absolute
error); that loss drives early stopping after the warm-up.

Not included, deliberately: the image history pool of the original CycleGAN (its random
replay would need its own checkpointed buffer; with paired data and the paired validation loss
selecting the model it buys little) and CycleGAN's linear learning-rate decay (the paper uses a
constant rate).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from virtual_biopsy.core.config import PRETRAINED_VIEW_PLACEHOLDER, GeneratorConfig
from virtual_biopsy.models.cyclegan import (
    PatchDiscriminator,
    ResnetGenerator,
    init_cyclegan_weights,
)
from virtual_biopsy.models.weights import (
    GeneratorSize,
    MissingWeightsFileError,
    WeightsFileError,
    pretrained_cyclegan_states,
)
from virtual_biopsy.training import distributed
from virtual_biopsy.training.datasets import PairedImageDataset, derive_seed
from virtual_biopsy.training.fit import fit, training_device
from virtual_biopsy.training.loop import (
    EpochCallback,
    autocast_for,
    epoch_loader,
    mean,
    prepare_module,
    resolve_device,
    run_config,
    state_on_cpu,
    to_device,
)

NETWORK_NAMES = ("generator_ab", "generator_ba", "discriminator_a", "discriminator_b")
INIT_STREAM = 3


@dataclass(frozen=True)
class CycleGANLoss:
    """The CycleGAN objective with its weights; the trainer uses exactly this object."""

    lambda_cycle: float
    lambda_identity: float
    lambda_paired: float = 0.0

    @staticmethod
    def adversarial(scores: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        """LSGAN: mean squared distance of the patch scores from 1 (real) or 0 (fake)."""
        target = torch.ones_like(scores) if target_is_real else torch.zeros_like(scores)
        return F.mse_loss(scores.float(), target.float())

    def generator_terms(
        self, nets: dict[str, nn.Module], real_a: torch.Tensor, real_b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Total generator loss, its (unweighted) terms, and the fakes (for the discriminators)."""
        g_ab, g_ba = nets["generator_ab"], nets["generator_ba"]
        fake_b, fake_a = g_ab(real_a), g_ba(real_b)
        adversarial = self.adversarial(nets["discriminator_b"](fake_b), True) + self.adversarial(
            nets["discriminator_a"](fake_a), True
        )
        cycle = F.l1_loss(g_ba(fake_b).float(), real_a) + F.l1_loss(g_ab(fake_a).float(), real_b)
        terms = {"adversarial": adversarial, "cycle": cycle}
        total = adversarial + self.lambda_cycle * cycle
        if self.lambda_identity > 0:
            # two of the six generator passes of a step: skipped, not multiplied by 0, when unused
            identity = F.l1_loss(g_ab(real_b).float(), real_b) + F.l1_loss(g_ba(real_a).float(), real_a)
            terms["identity"] = identity
            total = total + self.lambda_identity * identity
        # The data are paired (paper 5.2.1: losses "directly comparing the synthesized CESM images
        # with the corresponding real CESM images"), so G_AB(LE) is also pulled towards its own
        # DES partner; lambda_paired = 0 gives the unpaired CycleGAN objective.
        paired = F.l1_loss(fake_b.float(), real_b)
        terms["paired"] = paired
        return total + self.lambda_paired * paired, terms, fake_a, fake_b

    def discriminator_loss(
        self, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor
    ) -> torch.Tensor:
        """LSGAN discriminator loss, halved as in CycleGAN to slow D relative to G."""
        return 0.5 * (self.adversarial(discriminator(real), True) + self.adversarial(discriminator(fake.detach()), False))


@dataclass
class GeneratorTrainingResult:
    """Outcome of :func:`train_cyclegan`. ``generator_state`` loads into :func:`build_generator`."""

    generator_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]]
    loss: CycleGANLoss


def build_generator(cfg: GeneratorConfig) -> ResnetGenerator:
    """The LE -> DES generator architecture of ``cfg`` (to load a trained ``generator_state``)."""
    return ResnetGenerator(channels=1, ngf=cfg.ngf, n_residual_blocks=cfg.n_residual_blocks)


def build_cyclegan(cfg: GeneratorConfig, seed: int) -> dict[str, nn.Module]:
    """Both generators and both discriminators, CycleGAN-initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, INIT_STREAM))
        nets: dict[str, nn.Module] = {
            "generator_ab": build_generator(cfg),
            "generator_ba": build_generator(cfg),
            "discriminator_a": PatchDiscriminator(channels=1, ndf=cfg.ndf),
            "discriminator_b": PatchDiscriminator(channels=1, ndf=cfg.ndf),
        }
        for net in nets.values():
            init_cyclegan_weights(net)
    return nets


def load_pretrained(nets: dict[str, nn.Module], weights_file: str | Path, image_size: int | None = None) -> list[str]:
    """Initialise from a local file for fine-tuning (paper 5.2.1: pre-trained on CDD-CESM).

    Any generator weight file the project writes loads (models.weights.pretrained_cyclegan_states):
    ``models/pretrain/<VIEW>.pt`` (all four networks), ``fold<k>.pt`` / ``serving.pt`` (the
    LE -> DES generator), a CycleGAN checkpoint ``last.pt`` (all four), a bare generator state
    dict or a dict of network names (:func:`cyclegan_state`). Networks the file does not hold keep
    their fresh initialisation. Another kind of file, networks of another size, or (with
    ``image_size``) a file recorded at another image size raise a ValueError
    (:class:`~virtual_biopsy.models.weights.WeightsFileError`) naming the file, what was expected
    and what was found. Returns the names of the networks loaded.
    """
    path = Path(weights_file)
    if PRETRAINED_VIEW_PLACEHOLDER in str(path):
        raise WeightsFileError(f"{path}: generator.pretrained_weights still holds the {PRETRAINED_VIEW_PLACEHOLDER} "
                               "placeholder; resolve it per view (GeneratorConfig.for_view)")
    if not path.is_file():
        raise MissingWeightsFileError(f"{path}: no such pretrained weights file (generator.pretrained_weights); run "
                                      "the pretrain_generator stage, or set generator.pretrained_weights: null to "
                                      "train from scratch")
    generator = nets["generator_ab"]
    size = GeneratorSize(int(generator.ngf), int(generator.n_residual_blocks))
    parts = pretrained_cyclegan_states(path, size, int(nets["discriminator_a"].ndf), image_size)
    for name, state in parts.items():
        try:
            nets[name].load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise WeightsFileError(f"{path}: weights for {name} do not fit this architecture ({exc})") from exc
    return sorted(parts)


def pretrained_fingerprint(weights_file: str | Path) -> str:
    """SHA-256 of a pretrained weights file: a checkpoint resumes only a run of the same initialisation."""
    return hashlib.sha256(Path(weights_file).read_bytes()).hexdigest()


def cyclegan_state(nets: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """All four networks' CPU state dicts, keyed by name (the format :func:`load_pretrained` reads)."""
    return {name: state_on_cpu(net) for name, net in nets.items()}


def train_cyclegan(
    train_ds: PairedImageDataset,
    val_ds: PairedImageDataset,
    cfg: GeneratorConfig,
    seed: int,
    checkpoint_dir: str | Path | None = None,
    on_epoch_end: EpochCallback | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    restart_if_stale: bool = False,
) -> GeneratorTrainingResult:
    """Train a CycleGAN LE -> DES for up to ``cfg.epochs`` epochs; return the best generator.

    Resumes from ``checkpoint_dir`` when it holds a checkpoint of the same run (same cfg, seed and
    data sizes); a finished run is returned again without training. A checkpoint of another run
    raises :class:`CheckpointError`, or with ``restart_if_stale`` is deleted and training starts
    over (``training.fit``). ``on_epoch_end`` follows the contract in ``training.loop`` (metrics
    ``train/loss_g``, ``train/loss_d``, ``train/adversarial``, ``train/cycle``, ``train/paired``,
    ``train/identity`` (only when ``lambda_identity`` > 0), ``val/l1``, ``lr``).

    Under ``torchrun`` every rank trains its share of each global batch of ``cfg.batch_size``, all
    four networks in DistributedDataParallel (``training.distributed``); only rank 0 checkpoints
    and calls ``on_epoch_end``, and the result equals the single-process run's up to float
    rounding. InstanceNorm normalises each image on its own, so no statistics cross ranks.
    """
    device = training_device(device)
    loss = CycleGANLoss(lambda_cycle=cfg.lambda_cycle, lambda_identity=cfg.lambda_identity,
                        lambda_paired=cfg.lambda_paired)
    nets = build_cyclegan(cfg, seed)
    fingerprint = {"kind": "cyclegan", "config": run_config(cfg), "seed": seed, "train": len(train_ds),
                   "val": len(val_ds)}
    if cfg.pretrained_weights:
        load_pretrained(nets, cfg.pretrained_weights, image_size=int(train_ds.images.shape[1]))
        # the path alone would let a checkpoint of the old pre-training resume after a new one
        fingerprint["pretrained_sha256"] = pretrained_fingerprint(cfg.pretrained_weights)
    for net in nets.values():
        prepare_module(net, device)
    opt_g, opt_d = _optimisers(nets, cfg)
    trainee = _CycleGANTrainee(nets, loss, opt_g, opt_d, train_ds, val_ds, cfg, seed, device, num_workers)
    outcome = fit(trainee, cfg, seed, device, checkpoint_dir, fingerprint, on_epoch_end, restart_if_stale)
    return GeneratorTrainingResult(
        generator_state=outcome.best_state or state_on_cpu(nets["generator_ab"]),
        best_epoch=outcome.best_epoch,
        best_val_loss=outcome.best_val_loss,
        epochs_run=outcome.epochs_run,
        stopped_early=outcome.stopped_early,
        history=outcome.history,
        loss=loss,
    )


@dataclass
class _CycleGANTrainee:
    """The CycleGAN's part of ``training.fit``: :func:`train_step` over an epoch, the paired L1 check."""

    networks: dict[str, nn.Module]
    loss: CycleGANLoss
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    train_ds: PairedImageDataset
    val_ds: PairedImageDataset
    cfg: GeneratorConfig
    seed: int
    device: torch.device
    num_workers: int
    kept_network: str = "generator_ab"

    def train_epoch(self, epoch: int, wrapped: Mapping[str, nn.Module]) -> dict[str, float]:
        """Epoch metrics: the mean over steps of each step's global-batch mean (as in one process)."""
        nets, device = self.networks, self.device
        for net in nets.values():
            net.train()
        loader = epoch_loader(self.train_ds, self.cfg.batch_size, self.seed, epoch, shuffle=True,
                              num_workers=self.num_workers, pin_memory=device.type == "cuda", shard=True,
                              max_steps=self.cfg.max_steps_per_epoch)
        sums: dict[str, list[float]] = {}
        counts: list[int] = []
        for real_a, real_b in tqdm(loader, desc=f"cyclegan epoch {epoch}", leave=False,
                                   disable=None if distributed.is_main_process() else True):
            step = train_step(nets, self.loss, self.opt_g, self.opt_d, to_device(real_a, device),
                              to_device(real_b, device), device, wrapped)
            counts.append(len(real_a))
            for key, value in step.items():
                sums.setdefault(key, []).append(value)
        if distributed.is_distributed():
            # Every rank runs the same number of steps (distributed.shard_order): one all-reduce of
            # per-step sums and counts gives each step's global-batch mean.
            keys = sorted(sums)
            local = [value * count for key in keys for value, count in zip(sums[key], counts)]
            total = np.asarray(distributed.all_reduce_sum([*local, *counts], device))
            per_step = total[: len(local)].reshape(len(keys), len(counts)) / total[len(local):]
            sums = {key: per_step[i].tolist() for i, key in enumerate(keys)}
        return {f"train/{key}": mean(values) for key, values in sums.items()}

    def validate(self) -> tuple[float, dict[str, float]]:
        val_l1 = paired_validation_loss(self.networks["generator_ab"], self.val_ds, self.cfg.batch_size, self.device)
        return val_l1, {"val/l1": val_l1, "lr": self.opt_g.param_groups[0]["lr"]}

    def state_dict(self) -> dict[str, Any]:
        return {"networks": cyclegan_state(self.networks), "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, record: Mapping[str, Any]) -> None:
        for name, net in self.networks.items():
            net.load_state_dict(record["networks"][name])
        self.opt_g.load_state_dict(record["opt_g"])
        self.opt_d.load_state_dict(record["opt_d"])


def _optimisers(nets: dict[str, nn.Module], cfg: GeneratorConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    def adam(params: Iterable[nn.Parameter]) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, 0.999), weight_decay=cfg.weight_decay)

    generators = [*nets["generator_ab"].parameters(), *nets["generator_ba"].parameters()]
    discriminators = [*nets["discriminator_a"].parameters(), *nets["discriminator_b"].parameters()]
    return adam(generators), adam(discriminators)


def train_step(
    nets: dict[str, nn.Module],
    loss: CycleGANLoss,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real_a: torch.Tensor,
    real_b: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    wrapped: Mapping[str, nn.Module] | None = None,
) -> dict[str, float]:
    """One CycleGAN update: generators first (discriminators frozen), then both discriminators.

    ``wrapped``: the networks to call for training (DDP modules under torchrun; ``nets`` itself by
    default). The batch is then this rank's share of the global batch, and each loss (a mean over
    the share's images) is scaled so that DDP's gradient average is the gradient of the global
    batch mean (``distributed.global_mean_scale``); the returned values are means over the share.
    """
    wrapped = nets if wrapped is None else wrapped
    # Rank r's loss mean * count_r * N / total: DDP's average over N ranks is the global mean.
    scale = len(real_a) * distributed.global_mean_scale(len(real_a), device) if distributed.is_distributed() else None
    for name in ("discriminator_a", "discriminator_b"):
        nets[name].requires_grad_(False)  # G's step must not accumulate gradients into D
    opt_g.zero_grad(set_to_none=True)
    # The frozen discriminators are called unwrapped in G's step: a DDP module whose parameters
    # get no gradient in a backward pass would wait for that reduction at its next forward.
    generator_nets = {**nets, "generator_ab": wrapped["generator_ab"], "generator_ba": wrapped["generator_ba"]}
    with autocast_for(device):
        loss_g, terms, fake_a, fake_b = loss.generator_terms(generator_nets, real_a, real_b)
    (loss_g if scale is None else loss_g * scale).backward()
    opt_g.step()
    for name in ("discriminator_a", "discriminator_b"):
        nets[name].requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    with autocast_for(device):
        loss_d = loss.discriminator_loss(wrapped["discriminator_a"], real_a, fake_a) + loss.discriminator_loss(
            wrapped["discriminator_b"], real_b, fake_b
        )
    (loss_d if scale is None else loss_d * scale).backward()
    opt_d.step()
    return {"loss_g": loss_g.item(), "loss_d": loss_d.item(), **{k: v.item() for k, v in terms.items()}}


@torch.no_grad()
def paired_validation_loss(
    generator: nn.Module, val_ds: PairedImageDataset, batch_size: int, device: str | torch.device = "cpu"
) -> float:
    """Mean absolute error between G(LE) and the real DES partner over ``val_ds`` (per pixel).

    Under torchrun each rank evaluates a share of ``val_ds`` and the sums are all-reduced.
    """
    device = torch.device(device)
    generator.eval()
    total, pixels = 0.0, 0
    for real_a, real_b in epoch_loader(val_ds, batch_size, seed=0, epoch=0, shuffle=False,
                                       pin_memory=device.type == "cuda", shard=True):
        with autocast_for(device):
            fake_b = generator(to_device(real_a, device))
        total += F.l1_loss(fake_b.float(), to_device(real_b, device), reduction="sum").item()
        pixels += real_b.numel()
    total, pixels = distributed.all_reduce_sum([total, pixels], device)
    return total / pixels


@torch.no_grad()
def generate(
    generator: nn.Module, images: np.ndarray, batch_size: int = 16, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Synthetic CESM for (N, S, S) LE images in [0, 1]: float32 (N, S, S) in [0, 1].

    ``images`` may be a memory map (rows are read one batch at a time).
    """
    if images.ndim != 3:
        raise ValueError(f"generate expects an (N, S, S) image array, got shape {images.shape}")
    device = resolve_device(device)
    generator.eval()
    out = np.empty(images.shape, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32))[:, None]
        with autocast_for(device):
            fake = generator(to_device(batch, device))
        out[start : start + batch_size] = fake.float().clamp(0.0, 1.0)[:, 0].cpu().numpy()
    return out


def describe(result: GeneratorTrainingResult) -> dict[str, Any]:
    """Summary numbers of a run (for logging as run-level metrics)."""
    return {
        "best_epoch": result.best_epoch,
        "best_val_l1": result.best_val_loss,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
    }
