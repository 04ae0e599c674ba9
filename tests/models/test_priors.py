"""Priors: exact log-densities (against an independent change of variables with autograd's Jacobian, float64),
exact sampling (the sample mapped back gives its own noise), and N(0, I) as before."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from flowvae.models.priors import FAMILIES, PlanarPrior, StandardNormal, build_flow_prior, build_prior

DIM = 3


def _prior(family: str, dtype=torch.float64, seed: int = 0, spread: float = 0.5):
    torch.manual_seed(seed)
    cfg = OmegaConf.create({"name": "flow", "family": family, "n_layers": 4, "hidden": [16, 16], "bins": 8})
    prior = build_flow_prior(DIM, cfg).to(dtype)
    with torch.no_grad():  # away from the identity an untrained flow starts at
        for parameter in prior.parameters():
            parameter.add_(torch.randn_like(parameter) * spread)
    return prior


def _normalizer(prior):
    """z -> the noise, as a function of one latent vector (D,) -> (D,)."""
    if isinstance(prior, PlanarPrior):
        return lambda z: prior.normalize(z[None])[0][0]
    transform = prior.flow().transform
    return lambda z: transform(z[None])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_log_prob_is_the_change_of_variables_with_autograds_jacobian(family):
    prior = _prior(family)
    z = torch.randn(6, DIM, dtype=torch.float64) * 1.5
    g = _normalizer(prior)
    for row, value in zip(z, prior.log_prob(z), strict=True):
        jacobian = torch.autograd.functional.jacobian(g, row)
        eps = g(row)
        expected = -0.5 * (eps.pow(2).sum() + DIM * math.log(2 * math.pi)) + torch.linalg.slogdet(jacobian)[1]
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sample_maps_back_to_its_own_noise(family, dtype):
    """sample(n) = g⁻¹(ε): g of it gives ε back, to the dtype's precision (planar: bisection; zuko: its inverse).
    In float32 the parameters are those of a well-conditioned flow (a trained prior's scale): far from it, zuko's
    float32 inverse loses digits through its own conditioning (an affine MAF then maps ε to |z| ~ 1e8)."""
    prior = _prior(family, dtype, spread=0.1 if dtype == torch.float32 else 0.5)
    generator = torch.Generator().manual_seed(3)
    eps = torch.randn(500, DIM, generator=torch.Generator().manual_seed(3)).to(dtype)
    z = prior.sample(500, generator).to(dtype)
    with torch.no_grad():
        back = prior.normalize(z)[0] if isinstance(prior, PlanarPrior) else prior.flow().transform(z)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(back, eps, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_density_integrates_to_one(family):
    """In one dimension, on a grid wide enough for the flow's mass."""
    torch.manual_seed(1)
    cfg = OmegaConf.create({"name": "flow", "family": family, "n_layers": 3, "hidden": [8], "bins": 8})
    prior = build_flow_prior(1, cfg).double()
    grid = torch.linspace(-30, 30, 60001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        total = torch.trapezoid(prior.log_prob(grid).exp(), grid[:, 0])
    assert total.item() == pytest.approx(1.0, abs=1e-4)


def test_planar_inverse_is_exact_where_a_layer_is_nearly_flat():
    """w·û close to −1 (the layer's slope near 0 at one point): the bisection still inverts it."""
    prior = PlanarPrior(2, 1).double()
    with torch.no_grad():
        prior.w.copy_(torch.tensor([[1.0, 0.0]]))
        prior.u.copy_(torch.tensor([[-8.0, 0.3]]))  # m(w·u) = softplus(-8) - 1 ≈ -0.9997
        prior.b.zero_()
    y = torch.linspace(-3, 3, 101, dtype=torch.float64)[:, None].repeat(1, 2)
    torch.testing.assert_close(prior.normalize(prior.invert(y))[0], y, rtol=1e-10, atol=1e-10)


def test_the_standard_prior_is_n01_as_before():
    """N(0, I)'s density is the expression the loss always used, bit for bit; its sample is the generator's draw."""
    z = torch.randn(7, 5)
    assert torch.equal(StandardNormal(5).log_prob(z), -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1))
    drawn = StandardNormal(5).sample(4, torch.Generator().manual_seed(9))
    assert torch.equal(drawn, torch.randn(4, 5, generator=torch.Generator().manual_seed(9)))
    assert isinstance(build_prior(5, None), StandardNormal)
    assert isinstance(build_prior(5, OmegaConf.create({"name": "two_stage"})), StandardNormal)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_reproducible_from_a_seeded_generator(family):
    prior = _prior(family, torch.float32)
    one = prior.sample(50, torch.Generator().manual_seed(4))
    two = prior.sample(50, torch.Generator().manual_seed(4))
    assert torch.equal(one, two)
    assert not torch.equal(one, prior.sample(50, torch.Generator().manual_seed(5)))


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown prior 'nope'"):
        build_prior(2, OmegaConf.create({"name": "nope"}))
    with pytest.raises(ValueError, match="unknown prior family 'realnvp'"):
        build_flow_prior(2, OmegaConf.create({"name": "flow", "family": "realnvp", "n_layers": 2}))
