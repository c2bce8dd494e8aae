"""Multi-process data-parallel training (``torchrun --nproc_per_node=N``) that changes speed, not results.

A trainer started by torchrun finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment;
:func:`init_from_env` then joins the process group (gloo on CPU, nccl on CUDA). Without those
variables (or with ``WORLD_SIZE=1``) nothing here does anything and training is the
single-process code path, unchanged.

What stays the same as one process
    ``batch_size`` keeps meaning the *global* batch: each of N ranks takes ``batch_size / N``
    images of every batch of the single-process order (:func:`shard_batch`), which is still a
    function of (seed, epoch) only, and so is augmentation (a function of (seed, epoch, item)).
    Losses are scaled so that DistributedDataParallel's gradient *average* equals the gradient of
    the global batch mean (:func:`global_mean_scale`), batch norm normalises with the statistics
    of the global batch (:class:`GlobalBatchNorm2d`, which unlike ``nn.SyncBatchNorm`` also runs
    on CPU with gloo), and epoch metrics are sums and counts all-reduced over the ranks
    (:func:`all_reduce_sum`). A run on N processes therefore ends, up to float rounding of
    summation order, with the weights of the one-process run.

Who writes
    Only rank 0 (:func:`is_main_process`) writes checkpoints and calls the ``on_epoch_end``
    callback (MLflow logging, Optuna pruning); :func:`run_on_main` tells the other ranks whether
    that callback raised, so a stop on rank 0 stops every rank instead of leaving them waiting in
    a collective.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# torch.distributed.nn.functional.all_reduce is the collective with autograd that GlobalBatchNorm2d
# needs; its deprecation notice names a replacement without a backward pass.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")


class StoppedOnMainProcess(RuntimeError):
    """Raised on ranks > 0 when rank 0's ``on_epoch_end`` raised (pruning, a time limit)."""


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = 600.0) -> DistributedContext:
    """Join the torchrun process group when the environment describes one; else a 1-process context.

    Idempotent: a process group that already exists is reused. ``device`` picks the backend
    (nccl for CUDA, gloo otherwise); on CUDA each rank uses GPU ``LOCAL_RANK``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 or not dist.is_available():
        return DistributedContext()
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def rank_device(device: str | torch.device, context: DistributedContext) -> torch.device:
    """On CUDA under torchrun, rank r uses GPU ``LOCAL_RANK`` (whatever index was asked for)."""
    device = torch.device(device)
    if context.enabled and device.type == "cuda":
        return torch.device("cuda", context.local_rank)
    return device


def setup_device(requested: str | torch.device) -> tuple[str, bool]:
    """(this process's torch device, whether it is the main process) for a training stage.

    Under torchrun it joins the process group first, and rank r gets GPU r; only the main process
    logs to MLflow and writes files. An unknown device string, or CUDA asked for but absent, is a
    ConfigError naming the device (a one-line error from the stage), not a traceback.
    """
    from virtual_biopsy.core.config import ConfigError
    from virtual_biopsy.training.loop import resolve_device

    try:
        resolved = resolve_device(requested)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"device {str(requested)!r}: {exc}") from exc
    device = rank_device(resolved, init_from_env(resolved))
    return str(device), is_main_process()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0 and in every single-process run: the process that logs and writes files."""
    return rank() == 0


def shutdown() -> None:
    """Leave the process group (end of a torchrun entry point)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def per_rank_batch_size(batch_size: int, n_ranks: int) -> int:
    """``batch_size`` is the global batch; each rank takes an equal share of it."""
    if batch_size % n_ranks:
        raise ValueError(
            f"batch_size {batch_size} (the global batch) is not divisible by the {n_ranks} processes; "
            f"choose a multiple of {n_ranks}"
        )
    return batch_size // n_ranks


def shard_batch(batch: np.ndarray, rank_index: int, n_ranks: int) -> np.ndarray:
    """This rank's contiguous share of one global batch (shares differ by at most one item)."""
    return np.array_split(np.asarray(batch), n_ranks)[rank_index]


def shard_order(order: np.ndarray, batch_size: int, rank_index: int, n_ranks: int) -> list[list[int]]:
    """Per-rank batches of a global order cut into global batches of ``batch_size``.

    Rank r's step k holds its share of the single-process batch k, so the union of all ranks'
    batches at every step is that batch. A trailing global batch with fewer items than ranks is
    dropped (a rank without data cannot join the gradient all-reduce); with ``batch_size``
    divisible by the ranks only the last batch of an epoch can be that small.
    """
    per_rank_batch_size(batch_size, n_ranks)
    order = np.asarray(order)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [shard_batch(b, rank_index, n_ranks).tolist() for b in batches if len(b) >= n_ranks]


def shard_range(n_items: int, rank_index: int, n_ranks: int) -> np.ndarray:
    """Contiguous share of ``range(n_items)`` for evaluation (may be empty on some ranks)."""
    return np.array_split(np.arange(n_items), n_ranks)[rank_index]


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------
def all_reduce_sum(values: Sequence[float], device: str | torch.device = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves in one process).

    Summed in float64 so that loss sums over thousands of images keep their digits.
    """
    if not is_distributed():
        return [float(v) for v in values]
    device = torch.device(device)
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def global_mean_scale(local_count: float, device: str | torch.device = "cpu") -> float:
    """Factor turning a rank's loss *sum* into its part of the global batch mean under DDP.

    DDP averages gradients over N ranks, so rank r's loss must be ``sum_r * N / total`` for the
    average to be the gradient of ``sum / total`` (the single-process batch mean), also when the
    ranks hold different numbers of items. ``local_count`` is the rank's item count (or the sum
    of its class weights, for weighted cross-entropy).
    """
    if not is_distributed():
        return 1.0 / local_count
    (total,) = all_reduce_sum([local_count], device)
    return world_size() / total


def broadcast_parameters(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (start from identical weights)."""
    if not is_distributed():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across all ranks.

    Per-channel sums, sums of squares and counts are all-reduced with the differentiable
    ``torch.distributed.nn.functional.all_reduce`` (gradients flow back to every rank's
    inputs), on CPU (gloo) as on CUDA. In eval mode, or in one process, it is ``BatchNorm2d``.
    Same parameters and buffers as ``BatchNorm2d``, so state dicts are interchangeable.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        from torch.distributed.nn.functional import (
            all_reduce,  # differentiable (deprecated name, still the API with autograd)
        )

        x = input.float()
        # Two passes (mean, then squared deviations), not E[x^2] - E[x]^2: with few items per
        # channel (1x1 maps deep in a ResNet) that difference cancels catastrophically.
        local = torch.cat([
            x.sum(dim=(0, 2, 3)),
            torch.full((1,), float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device),
        ])
        total = all_reduce(local)
        count = total[-1]
        mean = total[:-1] / count
        centred = x - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        out = centred * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out.to(input.dtype)


def _swap_batchnorm(module: nn.Module, to_global: bool) -> nn.Module:
    source, target = (nn.BatchNorm2d, GlobalBatchNorm2d) if to_global else (GlobalBatchNorm2d, nn.BatchNorm2d)
    for name, child in module.named_children():
        if type(child) is source:
            replacement = target(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            if child.affine:  # keep the very Parameter objects: an optimiser may already hold them
                replacement.weight, replacement.bias = child.weight, child.bias
            replacement.train(child.training)
            setattr(module, name, replacement.to(next(child.buffers(), torch.empty(0)).device))
        else:
            _swap_batchnorm(child, to_global)
    return module


@contextlib.contextmanager
def data_parallel(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Within the block, the module to call for training: ``model`` itself in one process, else
    ``model`` with global batch norm wrapped in DistributedDataParallel (identical start weights).

    ``model`` itself is trained in place and gets its plain ``BatchNorm2d`` layers back on exit.
    """
    if not is_distributed():
        yield model
        return
    from torch.nn.parallel import DistributedDataParallel

    _swap_batchnorm(model, to_global=True)
    try:
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters and buffers at construction.
        yield DistributedDataParallel(model, device_ids=ids)
    finally:
        _swap_batchnorm(model, to_global=False)


# ---------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------
def run_on_main(function: Callable[..., Any] | None, *args: Any, device: str | torch.device = "cpu") -> None:
    """Call ``function(*args)`` on rank 0 only; when it raises, every rank stops.

    Rank 0 re-raises the callback's own exception (e.g. ``optuna.TrialPruned``); the other ranks
    raise :class:`StoppedOnMainProcess`. In one process this is a plain call.
    """
    if not is_distributed():
        if function is not None:
            function(*args)
        return
    error: BaseException | None = None
    if is_main_process() and function is not None:
        try:
            function(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
    (failed,) = all_reduce_sum([1.0 if error is not None else 0.0], device)
    if error is not None:
        raise error
    if failed:
        raise StoppedOnMainProcess("training stopped: the on_epoch_end callback on rank 0 raised")
