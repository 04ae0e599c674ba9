"""Priors in a run: the KL term against a learned prior, a learned prior that resumes exactly, the two-stage prior
fitted after training (reproducibly) and generated from, `flowvae fit-prior` for a finished run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from flowvae.models import FlowVAE
from flowvae.models.priors import PlanarPrior
from flowvae.run.rebuild import load_run
from flowvae.run.two_stage import fit_two_stage
from flowvae.training.loop import fit
from tests.conftest import TINY, compose_config, run_flowvae, stop_after_step

PRIOR = ["prior.n_layers=2", "prior.hidden=[16]", "prior.epochs=4", "prior.batch_size=64"]


def test_the_kl_term_with_a_learned_prior_is_the_closed_form_where_one_exists():
    """Planar layers with û = 0 are the identity, the prior N(0, I): the loss's KL estimate, averaged over many
    draws, is KL(N(m, s²) || N(0, I)) in closed form. With other layers it is E_q[log q(z|x) - log p(z)] under the
    flow's exact density, on the loss's own draws."""
    torch.manual_seed(0)
    model = FlowVAE(6, [16], 2)
    model.prior = PlanarPrior(2, 3)
    w = torch.tensor([[0.6, 0.8]] * 3)  # |w| = 1; u = log(e - 1) w gives û = 0
    with torch.no_grad():
        model.prior.w.copy_(w)
        model.prior.u.copy_(math.log(math.e - 1) * w)
    assert model.prior._u_hat().abs().max() < 1e-6
    x = torch.randn(1, 6).repeat(40000, 1)
    with torch.no_grad():
        kl = model.loss(x, generator=torch.Generator().manual_seed(1)).kl.item()
        mean, log_var, _ = model.encode(x[:1])
    closed = (0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var)).sum().item()
    assert kl == pytest.approx(closed, abs=0.01)
    with torch.no_grad():
        model.prior.u.add_(0.7)
        model.prior.b.fill_(0.3)
        eps = torch.randn(40000, 2, generator=torch.Generator().manual_seed(1))
        z = mean + torch.exp(0.5 * log_var) * eps
        log_q = -0.5 * (eps.pow(2) + log_var + math.log(2 * math.pi)).sum(-1)
        expected = (log_q - model.prior.log_prob(z)).mean().item()
        estimate = model.loss(x, generator=torch.Generator().manual_seed(1)).kl.item()
    assert estimate == pytest.approx(expected, rel=1e-5) and abs(expected - closed) > 0.05


def _flow_prior_model() -> tuple[FlowVAE, torch.Tensor, OmegaConf]:
    cfg = compose_config(*TINY, "prior=flow", "prior.family=planar", "prior.n_layers=3")
    from flowvae.models import build_model

    torch.manual_seed(0)
    model = build_model(10 * 3, cfg.model, cfg.flow, 0, cfg_prior=cfg.prior)
    x = torch.randn(200, 30, generator=torch.Generator().manual_seed(2))
    return model, x, cfg


def test_a_learned_prior_trains_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    model, x, cfg = _flow_prior_model()
    assert isinstance(model.prior, PlanarPrior)
    before = model.prior.w.detach().clone()
    straight = fit(model, x, x, cfg.train, seed=0, checkpoint=tmp_path / "a.pt")
    assert not torch.equal(model.prior.w, before)  # the prior trained with the ELBO
    resumed_model, _, _ = _flow_prior_model()
    with monkeypatch.context() as patch:
        first = fit(resumed_model, x, x, cfg.train, seed=0, checkpoint=tmp_path / "b.pt",
                    callbacks=[stop_after_step(patch, 3)])
    assert first.status == "interrupted"
    again, _, _ = _flow_prior_model()
    second = fit(again, x, x, cfg.train, seed=0, checkpoint=tmp_path / "b.pt")
    assert second.status == straight.status == "ok"
    for (name, one), two in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(one, two), name


def test_the_two_stage_fit_is_reproducible_bit_for_bit():
    model, x, cfg = _flow_prior_model()
    settings = compose_config(*TINY, "prior=two_stage", *PRIOR).prior
    one, fit_one = fit_two_stage(model, x, settings, seed=0)
    two, fit_two = fit_two_stage(model, x, settings, seed=0)
    assert fit_one.history == fit_two.history
    for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_stage")
    out = run_flowvae(["train", *TINY, "prior=two_stage", *PRIOR, "hydra.run.dir=run", "results_csv=results.csv"], root)
    assert out.returncode == 0, out.stdout + out.stderr
    return root


def test_a_two_stage_run_fits_its_prior_generates_from_it_and_says_so(two_stage_run):
    row = pd.read_csv(two_stage_run / "results.csv").iloc[0]
    assert row["status"] == "ok" and row["prior.name"] == "two_stage" and row["prior.family"] == "nsf"
    assert 0 < row["latent_gap"] and 0 < row["latent_gap_floor"]
    assert (two_stage_run / "run" / "prior.pt").is_file() and (two_stage_run / "run" / "latent.png").is_file()
    run = load_run(two_stage_run / "run", "cpu")
    assert type(run.model.prior).__name__ == "ZukoPrior" and run.cfg.prior.name == "two_stage"
    # its generation draws z from the fitted prior: not the events N(0, I) would give
    out = run_flowvae(["generate", "run", "--n", "300", "--out", "fitted.npy"], two_stage_run)
    assert out.returncode == 0, out.stderr
    (two_stage_run / "run" / "prior.pt").rename(two_stage_run / "prior.saved")
    try:
        out = run_flowvae(["generate", "run", "--n", "300", "--out", "standard.npy"], two_stage_run)
        assert out.returncode == 0, out.stderr
    finally:
        (two_stage_run / "prior.saved").rename(two_stage_run / "run" / "prior.pt")
    fitted, standard = np.load(two_stage_run / "fitted.npy"), np.load(two_stage_run / "standard.npy")
    assert fitted.shape == standard.shape and not np.array_equal(fitted, standard)


def test_fit_prior_gives_a_finished_standard_run_its_prior_and_evaluate_scores_it(tmp_path):
    out = run_flowvae(["train", *TINY, "hydra.run.dir=run", "results_csv=results.csv"], tmp_path)
    assert out.returncode == 0, out.stderr
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]  # a standard run: its gap, no prior columns, no prior.pt
    assert row["latent_gap"] > 0 and not [c for c in row.index if c.startswith("prior")]
    assert not (tmp_path / "run" / "prior.pt").exists() and (tmp_path / "run" / "latent.png").is_file()
    refused = run_flowvae(["fit-prior", "run", "prior.family=realnvp"], tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "flowvae fit-prior: prior.family=realnvp is not allowed: one of planar, nsf, maf"]
    assert not (tmp_path / "run" / "prior.pt").exists()
    out = run_flowvae(["fit-prior", "run", *PRIOR, "prior.family=planar"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "latent_gap" in out.stdout and (tmp_path / "run" / "prior.pt").is_file()
    out = run_flowvae(["evaluate", "run"], tmp_path)
    assert out.returncode == 0, out.stderr
    trained, evaluated = pd.read_csv(tmp_path / "results.csv").to_dict("records")
    assert evaluated["prior.name"] == "two_stage" and evaluated["prior.family"] == "planar"
    assert evaluated["train_hash"] == trained["train_hash"] and evaluated["config_hash"] != trained["config_hash"]
