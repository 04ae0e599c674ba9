"""The flow VAE: its loss terms against closed forms, the likelihoods, generation, and K = 0 for every flow."""

from __future__ import annotations

import math

import pytest
import torch

from flowvae.model import MSE_SIGMA, FlowVAE

FLOWS = ["none", "planar", "orthogonal", "householder", "triangular", "iaf"]


def _model(**kwargs) -> FlowVAE:
    torch.manual_seed(0)
    return FlowVAE(12, [16], 3, **kwargs)


def test_kl_term_is_an_unbiased_estimate_of_the_closed_form_without_flows():
    model = _model()
    x = torch.randn(1, 12).expand(200_000, 12)
    with torch.no_grad():
        mean, log_var, _ = model.encode(x[:1])
        closed = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum().item()
        estimate = model.loss(x).kl.item()
    assert estimate == pytest.approx(closed, abs=5e-3 + 0.01 * closed)


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


def test_reconstruction_terms_match_their_formulas():
    x = torch.randn(8, 12)
    z = torch.randn(8, 3)
    mse = _model(likelihood="mse")
    _, log_var = mse.decode(z)
    assert log_var == pytest.approx(math.log(MSE_SIGMA**2))
    torch.manual_seed(3)
    terms = mse.loss(x)
    torch.manual_seed(3)
    _, z_k, _ = mse.posterior_sample(x)
    torch.testing.assert_close(terms.recon, (x - mse.decode(z_k)[0]).pow(2).sum(-1).mean())
    fixed = _model(likelihood="gaussian", sigma_x=0.3)
    torch.manual_seed(2)
    terms = fixed.loss(x)
    torch.manual_seed(2)
    _, z_k, _ = fixed.posterior_sample(x)
    mean, _ = fixed.decode(z_k)
    expected = (0.5 * ((x - mean) / 0.3).pow(2) + math.log(0.3) + 0.5 * math.log(2 * math.pi)).sum(-1).mean()
    torch.testing.assert_close(terms.recon, expected)
    learned = _model()
    mean, log_var = learned.decode(z)
    assert mean.shape == log_var.shape == (8, 12)


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
