"""Random affine augmentation (paper 5.1 and 5.2): shift +-10 %, zoom +-10 %, rotation +-15 deg.

One affine is drawn per call and applied to every channel of the input alike, so an LE image and
its DES partner stacked as channels stay pixel-aligned (the generator learns a pixel-to-pixel map;
misaligned pairs would teach it to blur). Uncovered pixels are filled with 0, the background of a
processed mammogram.

The warp of one sample runs on one thread: its ops are tiny (a 4096 x 3 by 3 x 2 matrix product
at 64 px), and handing them to torch's intra-op thread pool costs more than it saves; when the
cores are busy (a 2-core machine running anything else) each parallel region waits for a
scheduler slice, and one batch of 16 took 250 ms instead of 3 ms. The warped values do not
depend on the thread count, so training results are unchanged.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineAugment:
    """Draws one random affine per call and applies it to all channels of a (C, H, W) tensor.

    ``strength`` in [0, 1] scales every range (0 = identity, 1 = the paper's ranges); tuning
    searches over it. Ranges are symmetric: shift is a fraction of the image side, zoom a
    relative scale change, rotation in degrees.
    """

    strength: float = 1.0
    max_shift: float = 0.10
    max_zoom: float = 0.10
    max_rotation_deg: float = 15.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"augmentation strength must lie in [0, 1], got {self.strength}")
        if not 0.0 <= self.max_zoom < 1.0:
            raise ValueError(f"max_zoom must lie in [0, 1), got {self.max_zoom}")

    def sample_matrix(self, generator: torch.Generator) -> torch.Tensor:
        """A (2, 3) affine in affine_grid's normalised coordinates (output pixel -> input pixel)."""
        shift_x, shift_y, zoom, rotation = (torch.rand(4, generator=generator, dtype=torch.float64) * 2 - 1).tolist()
        zoom = 1.0 + zoom * self.max_zoom * self.strength
        angle = math.radians(rotation * self.max_rotation_deg * self.strength)
        # Normalised coordinates span [-1, 1], so a shift of f image sides is 2f units.
        shift_x *= 2 * self.max_shift * self.strength
        shift_y *= 2 * self.max_shift * self.strength
        # affine_grid maps output to input coordinates: the inverse of "zoom by s, rotate by a,
        # then shift by t" is R(-a)/s applied to (p - t).
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        inverse = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64)
        offset = -inverse @ torch.tensor([shift_x, shift_y], dtype=torch.float64)
        return torch.cat([inverse, offset[:, None]], dim=1).float()

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Apply one random affine to all channels of ``images`` (C, H, W); returns a new tensor."""
        if images.ndim != 3:
            raise ValueError(f"expected a (channels, height, width) tensor, got shape {tuple(images.shape)}")
        if self.strength == 0.0:
            return images.clone()
        return apply_affine(images, self.sample_matrix(generator))


def apply_affine(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Resample (C, H, W) ``images`` through one (2, 3) affine, bilinear, zero fill outside."""
    batch = images[None]  # one sample whose channels share the grid
    with single_threaded():
        grid = F.affine_grid(matrix[None].to(images.dtype), list(batch.shape), align_corners=False)
        warped = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return warped[0].clamp_(0.0, 1.0)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on the calling thread only, restoring the intra-op thread count after.

    For per-sample work too small to gain from threads; the setting is process-wide, so this is
    meant for the data-loading code that runs between (not during) model steps.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
