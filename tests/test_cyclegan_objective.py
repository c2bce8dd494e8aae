"""The CycleGAN objective's optional identity term: weighted in when used, not computed when not."""
from __future__ import annotations

import torch

from virtual_biopsy.core.config import GeneratorConfig
from virtual_biopsy.training import generator_trainer
from virtual_biopsy.training.generator_trainer import CycleGANLoss

SIZE = 32
TINY = GeneratorConfig(ngf=4, ndf=4, n_residual_blocks=1, epochs=1, warmup_epochs=0, patience=1, batch_size=2)


class CountingCalls(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def _terms(loss: CycleGANLoss):
    nets = generator_trainer.build_cyclegan(TINY, seed=0)
    counted = {name: CountingCalls(nets[name]) for name in ("generator_ab", "generator_ba")}
    torch.manual_seed(1)
    real_a, real_b = torch.rand(2, 1, SIZE, SIZE), torch.rand(2, 1, SIZE, SIZE)
    total, terms, _, _ = loss.generator_terms({**nets, **counted}, real_a, real_b)
    return total, terms, sum(c.calls for c in counted.values())


def test_zero_identity_weight_skips_the_identity_passes_and_leaves_the_total_unchanged():
    with_identity, terms_with, calls_with = _terms(CycleGANLoss(10.0, 5.0, 2.0))
    without, terms_without, calls_without = _terms(CycleGANLoss(10.0, 0.0, 2.0))
    assert (calls_with, calls_without) == (6, 4)
    assert "identity" in terms_with and "identity" not in terms_without
    expected = terms_without["adversarial"] + 10.0 * terms_without["cycle"] + 2.0 * terms_without["paired"]
    assert torch.equal(without, expected)
    assert torch.allclose(with_identity, without + 5.0 * terms_with["identity"])
