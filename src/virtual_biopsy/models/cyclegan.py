"""CycleGAN networks (Zhu et al. 2017) for FFDM -> CESM imputation (paper section 3.2, eq. 4).

Single-channel images in [0, 1] go in and come out. Internally the generator works on [-1, 1]
with a tanh output, as the original CycleGAN does; the rescaling at both ends keeps the
project-wide [0, 1] contract so a generated image can be fed straight to a CESM classifier.

Networks only: no I/O, no training logic (see ``virtual_biopsy.training.generator_trainer``).
"""
from __future__ import annotations

import torch
from torch import nn

N_DOWNSAMPLING = 2  # CycleGAN's ResNet generator: two stride-2 convolutions down, two up


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with reflection padding and instance norm, plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN ResNet generator: c7s1-ngf, d(2ngf), d(4ngf), n x R(4ngf), u(2ngf), u(ngf), c7s1-1.

    Input and output: (N, channels, H, W) in [0, 1]; H and W must be multiples of 4 so the two
    downsamplings are undone exactly by the two upsamplings.

    ``mask_background`` (default on) sets the output to 0 wherever the input is exactly 0: after
    preprocessing that is the air and padding outside the breast (clipped by the display window),
    where neither energy carries tissue signal and no contrast can be taken up. Without it the
    network has to learn to output flat zeros over more than half of every image, and the residual
    noise it leaves there dominates SSIM. The mask has no parameters (state dicts are unchanged).
    """

    def __init__(self, channels: int = 1, ngf: int = 64, n_residual_blocks: int = 9,
                 mask_background: bool = True) -> None:
        super().__init__()
        _check_positive(ngf=ngf, n_residual_blocks=n_residual_blocks, channels=channels)
        self.channels, self.ngf, self.n_residual_blocks = channels, ngf, n_residual_blocks
        self.mask_background = mask_background
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, ngf, kernel_size=7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(inplace=True),
        ]
        width = ngf
        for _ in range(N_DOWNSAMPLING):
            layers += [
                nn.Conv2d(width, width * 2, kernel_size=3, stride=2, padding=1),
                nn.InstanceNorm2d(width * 2),
                nn.ReLU(inplace=True),
            ]
            width *= 2
        layers += [ResidualBlock(width) for _ in range(n_residual_blocks)]
        for _ in range(N_DOWNSAMPLING):
            layers += [
                nn.ConvTranspose2d(width, width // 2, kernel_size=3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(width // 2),
                nn.ReLU(inplace=True),
            ]
            width //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, channels, kernel_size=7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_multiple = 2**N_DOWNSAMPLING
        if x.shape[-1] % size_multiple or x.shape[-2] % size_multiple:
            raise ValueError(
                f"ResnetGenerator needs height and width divisible by {size_multiple}, got {tuple(x.shape[-2:])}"
            )
        out = (self.net(x * 2.0 - 1.0) + 1.0) / 2.0
        if self.mask_background:
            out = out * (x > 0).to(out.dtype)
        return out


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (pix2pix/CycleGAN): C64-C128-C256-C512 then a 1-channel patch map.

    Outputs unbounded scores, one per receptive-field patch, for the least-squares (MSE)
    adversarial loss. With ``n_layers=3`` each score sees 70x70 input pixels; inputs must be at
    least 32 px so the patch map is not empty.
    """

    def __init__(self, channels: int = 1, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        _check_positive(ndf=ndf, n_layers=n_layers, channels=channels)
        self.channels, self.ndf, self.n_layers = channels, ndf, n_layers
        # The first layer has no norm (as in CycleGAN): normalising raw intensities would discard
        # the absolute contrast level that tells real CESM from fake.
        layers: list[nn.Module] = [
            nn.Conv2d(channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = ndf
        for index in range(1, n_layers + 1):
            out_width = ndf * min(2**index, 8)
            stride = 2 if index < n_layers else 1
            layers += [
                nn.Conv2d(width, out_width, kernel_size=4, stride=stride, padding=1),
                nn.InstanceNorm2d(out_width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = out_width
        layers.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2.0 - 1.0)


def init_cyclegan_weights(module: nn.Module, std: float = 0.02) -> None:
    """CycleGAN's initialisation: conv weights ~ N(0, std), biases 0 (draws from torch's RNG)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
