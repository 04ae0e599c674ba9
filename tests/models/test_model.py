"""The flow VAE: its loss terms against closed forms, the likelihoods, generation, and K = 0 for every flow."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from flowvae.flows import FLOWS as REGISTRY
from flowvae.models import MSE_SIGMA, FlowVAE

FLOWS = list(REGISTRY)  # every registered family, "none" included


def _model(**kwargs) -> FlowVAE:
    torch.manual_seed(0)
    return FlowVAE(12, [16], 3, **kwargs)


# Per-element decoder constants: log-variances that do not sum to 0 (so a dropped log_var term shows) and means
# that differ from them (so swapped halves show).
HEAD_MEAN = torch.linspace(-2.0, 2.0, 12)
HEAD_LOG_VAR = torch.linspace(-1.0, 2.0, 12)


def _constant_decoder(model: FlowVAE, mean: torch.Tensor, log_var: torch.Tensor | None = None) -> None:
    """Make p(x|z) independent of z: the decoder head outputs ``mean`` (and ``log_var`` when it is learned)."""
    with torch.no_grad():
        model.decoder_head.weight.zero_()
        model.decoder_head.bias.copy_(mean if log_var is None else torch.cat([mean, log_var]))


def _shift_log_var_head(model: FlowVAE) -> None:
    """Move the learned log-variance well away from 0, keeping its dependence on z."""
    with torch.no_grad():
        model.decoder_head.bias[model.n_in :] += HEAD_LOG_VAR


def test_kl_term_is_the_one_sample_estimate_of_log_q0_minus_log_prior_without_flows():
    model = _model()
    with torch.no_grad():  # a posterior far from the prior
        model.q0_head.bias.copy_(torch.tensor([0.5, -1.0, 1.5, math.log(0.25), math.log(2.0), 0.0]))
    x = torch.randn(64, 12)
    terms = model.loss(x, generator=torch.Generator().manual_seed(5))
    z0, z_k, _ = model.posterior_sample(x, torch.Generator().manual_seed(5))
    assert torch.equal(z0, z_k)
    mean, log_var, _ = model.encode(x)
    log_q0 = Normal(mean, torch.exp(0.5 * log_var)).log_prob(z0).sum(-1)
    log_prior = Normal(0.0, 1.0).log_prob(z0).sum(-1)
    torch.testing.assert_close(terms.kl, (log_q0 - log_prior).mean())


def test_kl_term_is_an_unbiased_estimate_of_the_closed_form_without_flows():
    model = _model()
    with torch.no_grad():
        model.q0_head.bias.copy_(torch.tensor([0.5, -1.0, 1.5, math.log(0.25), math.log(2.0), 0.0]))
    n = 200_000
    x = torch.randn(1, 12).expand(n, 12)  # one event: every row has the same q0
    with torch.no_grad():
        mean, log_var, _ = model.encode(x[:1])
        estimate = model.loss(x, generator=torch.Generator().manual_seed(6)).kl.item()
    mean, log_var = mean.double(), log_var.double()
    var = log_var.exp()
    closed = 0.5 * (mean.pow(2) + var - 1 - log_var).sum().item()
    # per event, dimension d: ½[(s²−1)ε² + 2msε + m² − log s²], ε ~ N(0, 1): variance ½(s²−1)² + m²s²
    standard_error = math.sqrt((0.5 * (var - 1).pow(2) + mean.pow(2) * var).sum().item() / n)
    assert closed > 1.0
    assert estimate == pytest.approx(closed, abs=5 * standard_error)


@pytest.mark.parametrize("flow", ["planar", "iaf", "orthogonal"])
def test_kl_term_with_flows_subtracts_the_log_det(flow):
    model = _model(flow=flow, n_flows=2)
    x = torch.randn(64, 12)
    torch.manual_seed(1)
    z0, z_k, log_q_k = model.posterior_sample(x)
    mean, log_var, params = model.encode(x)
    eps = (z0 - mean) / torch.exp(0.5 * log_var)
    log_q0 = (-0.5 * (eps.pow(2) + log_var + math.log(2 * math.pi))).sum(-1)
    z_again, log_det = model.flows(z0, params)
    torch.testing.assert_close(z_again, z_k)
    torch.testing.assert_close(log_q_k, log_q0 - log_det)


def _recon_inputs(model: FlowVAE, x: torch.Tensor, seed: int):
    """The loss's terms with z0's noise from ``seed``, and the decoder's output at the same z_K."""
    terms = model.loss(x, generator=torch.Generator().manual_seed(seed))
    _, z_k, _ = model.posterior_sample(x, torch.Generator().manual_seed(seed))
    return terms, model.decode(z_k)


def test_learned_variance_reconstruction_is_the_gaussian_log_likelihood_of_known_parameters():
    model = _model()  # the default: likelihood gaussian, sigma_x learned
    _constant_decoder(model, HEAD_MEAN, HEAD_LOG_VAR)
    x = torch.randn(64, 12)
    terms = model.loss(x, generator=torch.Generator().manual_seed(0))
    expected = -Normal(HEAD_MEAN, torch.exp(0.5 * HEAD_LOG_VAR)).log_prob(x).sum(-1).mean()
    torch.testing.assert_close(terms.recon, expected)
    by_hand = 0.5 * (x - HEAD_MEAN).pow(2) / HEAD_LOG_VAR.exp() + 0.5 * HEAD_LOG_VAR + 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(terms.recon, by_hand.sum(-1).mean())
    torch.testing.assert_close(terms.loss, terms.recon + terms.kl)


def test_learned_variance_reconstruction_uses_the_decoders_own_mean_and_log_variance():
    model = _model()
    _shift_log_var_head(model)
    x = torch.randn(64, 12)
    terms, (mean, log_var) = _recon_inputs(model, x, seed=1)
    assert isinstance(log_var, torch.Tensor) and mean.shape == log_var.shape == (64, 12)
    assert log_var.mean().abs().item() > 0.3  # the log-variance term matters
    expected = -Normal(mean, torch.exp(0.5 * log_var)).log_prob(x).sum(-1).mean()
    torch.testing.assert_close(terms.recon, expected)
    beta = 0.3
    weighted = model.loss(x, beta, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(weighted.loss, expected + beta * terms.kl)


def test_fixed_sigma_reconstruction_is_the_gaussian_log_likelihood():
    model = _model(likelihood="gaussian", sigma_x=0.3)
    x = torch.randn(64, 12)
    terms, (mean, log_var) = _recon_inputs(model, x, seed=2)
    assert log_var == pytest.approx(2 * math.log(0.3))
    torch.testing.assert_close(terms.recon, -Normal(mean, 0.3).log_prob(x).sum(-1).mean())
    expected = (0.5 * ((x - mean) / 0.3).pow(2) + math.log(0.3) + 0.5 * math.log(2 * math.pi)).sum(-1).mean()
    torch.testing.assert_close(terms.recon, expected)


def test_mse_reconstruction_is_the_sum_of_squares_and_a_gaussian_of_variance_one_half():
    model = _model(likelihood="mse")
    x = torch.randn(64, 12)
    terms, (mean, log_var) = _recon_inputs(model, x, seed=3)
    assert log_var == pytest.approx(math.log(0.5)) and MSE_SIGMA == pytest.approx(math.sqrt(0.5))
    torch.testing.assert_close(terms.recon, (x - mean).pow(2).sum(-1).mean())
    # Σ (x − x̂)² = −log N(x; x̂, ½) − ½ log π per element
    gaussian = -Normal(mean, MSE_SIGMA).log_prob(x).sum(-1).mean() - 12 * 0.5 * math.log(math.pi)
    torch.testing.assert_close(terms.recon, gaussian)


def test_generate_mean_is_the_decoder_mean_exactly():
    model = _model()
    z = torch.randn(50, 3)
    assert torch.equal(model.generate(z, "mean"), model.decode(z)[0])
    _constant_decoder(model, HEAD_MEAN, HEAD_LOG_VAR)
    assert torch.equal(model.generate(z, "mean"), HEAD_MEAN.expand(50, 12))


def test_generate_sample_draws_with_std_exp_half_log_var():
    model = _model()  # learned variance
    _constant_decoder(model, HEAD_MEAN, torch.full((12,), math.log(4.0)))  # std 2 (exp(log_var) would be 4)
    n = 100_000
    sample = model.generate(torch.zeros(n, 3), "sample", torch.Generator().manual_seed(0)).double()
    centred = sample - HEAD_MEAN.double()
    # per element, 10^5 draws of N(mean, 2²): standard errors 2/√n for the mean and 2/√(2n) for the std
    torch.testing.assert_close(sample.mean(0), HEAD_MEAN.double(), rtol=0, atol=5 * 2 / math.sqrt(n))
    torch.testing.assert_close(
        centred.std(0), torch.full((12,), 2.0, dtype=torch.float64), rtol=0, atol=5 * 2 / math.sqrt(2 * n)
    )
    inside = (centred.abs() < 2.0).double().mean().item()  # ±1 std holds 68.27 % of a Gaussian
    assert inside == pytest.approx(0.6827, abs=5 * math.sqrt(0.6827 * 0.3173 / (12 * n)))


def test_generate_sample_uses_the_decoders_own_log_variance_per_element():
    model = _model()
    _shift_log_var_head(model)
    n = 100_000
    z = torch.randn(1, 3).expand(n, 3)  # one latent: every row has the same p(x|z)
    mean, log_var = model.decode(z[:1])
    sample = model.generate(z, "sample", torch.Generator().manual_seed(1)).double()
    std = torch.exp(0.5 * log_var[0]).double()
    assert (std.max() / std.min()).item() > 3  # the elements' spreads differ
    torch.testing.assert_close(
        sample.std(0) / std, torch.ones(12, dtype=torch.float64), rtol=0, atol=5 / math.sqrt(2 * n)
    )
    torch.testing.assert_close(
        (sample.mean(0) - mean[0].double()) / std, torch.zeros(12, dtype=torch.float64), rtol=0, atol=5 / math.sqrt(n)
    )


def test_generation_reads_the_mean_or_samples_with_the_decoder_variance():
    model = _model(likelihood="gaussian", sigma_x=0.7)
    z = torch.zeros(50_000, 3)
    mean = model.generate(z, "mean")
    assert torch.equal(mean, model.generate(z, "mean"))
    sample = model.generate(z, "sample", torch.Generator().manual_seed(0))
    assert (sample - mean).std().item() == pytest.approx(0.7, rel=0.01)
    again = model.generate(z, "sample", torch.Generator().manual_seed(0))
    assert torch.equal(sample, again)


def test_zero_flows_builds_the_same_plain_vae_for_every_flow_type():
    reference = _model().state_dict()
    for flow in FLOWS:
        state = _model(flow=flow, n_flows=0).state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), flow


def test_flows_are_built_after_the_base_network():
    plain, with_flows = _model().state_dict(), _model(flow="planar", n_flows=3).state_dict()
    for name, tensor in plain.items():
        assert torch.equal(with_flows[name], tensor), name


@pytest.mark.parametrize("decode", ["mean", "sample"])
def test_generation_draws_the_multiplicity_its_logits_put_the_mass_on(decode):
    """The multiplicity head's logits are over n = 0 … P; a jet has at least one particle, so generation draws from
    n = 1 … P: logits that put all the mass on n = k give exactly k particles, the first k slots, even when n = 0
    has the largest logit of all (fails if the logits were read shifted by one, or with n = 0 drawable)."""
    n_features, n_slots = 2, 5
    torch.manual_seed(0)
    model = FlowVAE(n_features * n_slots, [16], 3, n_mask=n_slots)
    z = torch.randn(500, 3)
    for k in range(1, n_slots + 1):
        for n_zero in (-30.0, 60.0):  # n = 0 impossible, or the most likely of all (and never drawn)
            bias = torch.full((n_slots + 1,), -30.0)
            bias[k], bias[0] = 30.0, n_zero
            with torch.no_grad():
                model.multiplicity_head.weight.zero_()
                model.multiplicity_head.bias.copy_(bias)
            events = model.generate(z, decode, torch.Generator().manual_seed(k))
            mask = events[:, n_features * n_slots:]
            expected = (torch.arange(n_slots) < k).to(mask.dtype).expand_as(mask)
            assert torch.equal(mask, expected), (k, n_zero)
            values = events[:, :n_features * n_slots].reshape(-1, n_features, n_slots)
            assert torch.all(values[:, :, k:] == 0), (k, n_zero)  # the padded slots are 0
