"""Random affine augmentation (paper 5.1 and 5.2): shift +-10 %, zoom +-10 %, rotation +-15 deg.

One affine is drawn per call and applied to every channel of the input alike, so an LE image and
its DES partner stacked as channels stay pixel-aligned (the generator learns a pixel-to-pixel map;
misaligned pairs would teach it to blur). Uncovered pixels are filled with 0, the background of a
processed mammogram.
"""
from __future__ import annotations

import math
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
    grid = F.affine_grid(matrix[None].to(images.dtype), list(batch.shape), align_corners=False)
    warped = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[0].clamp_(0.0, 1.0)
