"""The conditional-flow likelihood (model=conditional_flow): exact log-likelihood over the real particles, masks
respected, generated jets that look like jets."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flowvae.config import validate
from flowvae.cores import torch_threads
from flowvae.data.events import order_particles
from flowvae.errors import ConfigError
from flowvae.models import FlowVAE, build_model, conditional_flow, spline
from flowvae.models.conditional_flow import LOG_SCALE_BOUND, NO_GRAD_BLOCK, CouplingFlow, active_sets
from tests.conftest import compose_config, run_flowvae

DATA = Path(__file__).resolve().parents[1] / "data"
GLUON30 = DATA / "gluon_30p_slice.npz"


def _randomised(module: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (the zero-initialised last layers included), so no map is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


TRANSFORMS = ["affine", "spline"]


def _flow(transform, n_features=2, n_particles=3, layers=5, context=4):
    torch.manual_seed(0)
    flow = CouplingFlow(n_features, n_particles, layers, [16, 16], context, transform, bins=4, bound=3.0)
    return _randomised(flow.double())


def _weight(n_real: int, n_features: int, n_particles: int) -> torch.Tensor:
    mask = (torch.arange(n_particles) < n_real).double()
    return mask.repeat(n_features)  # features first: index f·P + p


def test_active_sets_cycle_features_then_even_and_odd_slots():
    sets = active_sets(2, 3, 6).reshape(6, 2, 3)
    assert sets[0].tolist() == [[1, 1, 1], [0, 0, 0]]
    assert sets[1].tolist() == [[0, 0, 0], [1, 1, 1]]
    assert sets[2].tolist() == [[1, 0, 1], [1, 0, 1]]
    assert sets[3].tolist() == [[0, 1, 0], [0, 1, 0]]
    assert torch.equal(sets[4], sets[0]) and torch.equal(sets[5], sets[1])
    # one slot: the parity sets would move every value at once, so only the features cycle
    assert active_sets(3, 1, 4).reshape(4, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("n_real", [3, 2, 1])
def test_coupling_log_det_is_autograds_over_the_real_values(n_real, transform):
    flow, F, P = _flow(transform), 2, 3
    g = torch.Generator().manual_seed(n_real)
    context = torch.randn(1, 4, generator=g, dtype=torch.float64)
    weight = _weight(n_real, F, P)[None]
    real = weight[0].bool()
    u = 2.0 * torch.randn(1, F * P, generator=g, dtype=torch.float64) * weight  # inside and outside the bound

    def on_real(values):  # the map restricted to the real values, the padded ones held at 0
        full = torch.zeros(1, F * P, dtype=torch.float64)
        full[0, real] = values
        return flow(full, context, weight)[0][0, real]

    jacobian = torch.autograd.functional.jacobian(on_real, u[0, real])
    x, log_det = flow(u, context, weight)
    assert log_det.item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-8)
    assert torch.linalg.slogdet(jacobian)[0].item() == 1.0
    # the inverse undoes it, with the opposite log-det, and padded values stay 0 both ways
    back, inverse_log_det = flow.inverse(x, context, weight)
    assert torch.allclose(back, u, atol=1e-12) and inverse_log_det.item() == pytest.approx(-log_det.item())
    assert (x[0, ~real] == 0).all()


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_padded_values_reach_no_real_value(transform):
    flow, F, P = _flow(transform), 2, 3
    weight = _weight(2, F, P)[None]
    context = torch.randn(1, 4, dtype=torch.float64)
    u = torch.randn(1, F * P, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: flow(v, context, weight)[0][0], u)[:, 0]
    real = weight[0].bool()
    assert (jacobian[real][:, ~real] == 0).all()  # no real output depends on a padded input
    assert torch.equal(jacobian[~real][:, ~real], torch.eye(int((~real).sum()), dtype=torch.float64))


def test_affine_log_scales_are_bounded_whatever_the_weights():
    flow = _randomised(CouplingFlow(2, 3, 2, [8], 4).double(), scale=50.0)
    _, log_det = flow(torch.randn(64, 6, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64))
    assert log_det.abs().max().item() <= 2 * 6 * LOG_SCALE_BOUND  # at most S per moved value per layer


def test_a_spline_layer_keeps_values_inside_its_bound_and_leaves_the_outside_alone():
    flow = _randomised(CouplingFlow(2, 3, 4, [8], 4, "spline", bins=4, bound=3.0).double(), scale=20.0)
    u = torch.empty(256, 6, dtype=torch.float64).uniform_(-3, 3)
    x, _ = flow(u, torch.randn(256, 4, dtype=torch.float64))
    assert x.abs().max().item() <= 3.0 + 1e-9  # however wild the conditioner, [-B, B] maps onto itself
    far = torch.full((1, 6), 7.0, dtype=torch.float64)
    x, log_det = flow(far, torch.randn(1, 4, dtype=torch.float64))
    assert torch.equal(x, far) and log_det.item() == 0.0


def _conditional_model(n_mask: int = 0, n_features: int = 2, n_particles: int = 3, transform: str = "affine"
                       ) -> FlowVAE:
    torch.manual_seed(0)
    model = FlowVAE(n_features * n_particles, [16], 3, "planar", 2, n_mask=n_mask, coupling_layers=4,
                    coupling_hidden=[16], n_features=n_features, coupling_transform=transform, coupling_bins=4)
    _randomised(model.likelihood_flow, 0.3)
    return model.double()


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_the_reconstruction_term_is_the_exact_log_likelihood_of_the_real_particles(transform):
    """-log p(x|z, n) for masked jets against an independent computation: autograd's Jacobian of the whole
    generative map u -> x over the real values, and the Gaussian base's density (torch.distributions)."""
    model, F, P = _conditional_model(n_mask=3, transform=transform), 2, 3
    counts = torch.tensor([3, 2, 1, 3])
    mask = (torch.arange(P) < counts[:, None]).double()
    values = torch.randn(4, F * P, dtype=torch.float64) * mask.repeat(1, F)
    x = torch.cat([values, mask], dim=1)
    g = torch.Generator().manual_seed(5)
    recon = model.loss(x, generator=g).recon.item()
    # the same z_K: the posterior's noise from a generator with the same seed
    z_k = model.posterior_sample(x, torch.Generator().manual_seed(5))[1]
    h = model.decoder(z_k)
    mean, log_var = model._decode(h)
    expected = []
    for i in range(4):
        weight = mask[i].repeat(F)[None]
        real = weight[0].bool()
        context = torch.cat([z_k[i:i + 1], mask[i:i + 1]], dim=1)

        def generative(u_real, context=context, weight=weight, real=real):
            full = torch.zeros(1, F * P, dtype=torch.float64)
            full[0, real] = u_real
            return model.likelihood_flow(full, context, weight)[0][0, real]

        u = model.likelihood_flow.inverse(values[i:i + 1], context, weight)[0][0, real]
        assert torch.allclose(generative(u), values[i, real], atol=1e-10)  # u really maps to x
        jacobian = torch.autograd.functional.jacobian(generative, u)
        base = torch.distributions.Normal(mean[i, real], torch.exp(0.5 * log_var[i, real]))
        log_p = base.log_prob(u).sum() - torch.linalg.slogdet(jacobian)[1]
        log_p = log_p + torch.log_softmax(model.multiplicity_head(h[i]), -1)[counts[i]]
        expected.append(-log_p.item())
    assert recon == pytest.approx(np.mean(expected), rel=1e-9)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_the_likelihood_integrates_to_one(transform):
    """One particle of two features: p(x|z) summed on a fine grid is 1, so it is a density, not a score."""
    model = _conditional_model(n_features=2, n_particles=1, transform=transform)
    z = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mean, log_var = model._decode(model.decoder(z))
    grid = torch.linspace(-12, 12, 801, dtype=torch.float64)
    x = torch.cartesian_prod(grid, grid)
    u, log_det = model.likelihood_flow.inverse(x, z.expand(len(x), -1))
    log_p = torch.distributions.Normal(mean, torch.exp(0.5 * log_var)).log_prob(u).sum(-1) + log_det
    step = (grid[1] - grid[0]).item()
    assert torch.exp(log_p).sum().item() * step**2 == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_an_untrained_coupling_flow_is_the_identity(transform):
    """Zero-initialised last layers: an untrained model's likelihood is its Gaussian base, unmoved."""
    torch.manual_seed(0)
    model = FlowVAE(6, [16], 3, coupling_layers=3, n_features=2, coupling_transform=transform)
    u, context = torch.randn(16, 6), torch.randn(16, 3)
    x, log_det = model.likelihood_flow(u, context)
    assert torch.allclose(x, u, atol=1e-6) and torch.allclose(log_det, torch.zeros(16), atol=1e-6)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("n_mask", [3, 0])
def test_generated_jets_have_a_prefix_mask_at_least_one_particle_and_the_flow_applied(n_mask, transform):
    model = _conditional_model(n_mask=n_mask, transform=transform).float()
    z = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0))
    out = model.generate(z, "sample", torch.Generator().manual_seed(1))
    values, mask = out[:, :6], out[:, 6:] if n_mask else torch.ones(2000, 3)
    assert (mask.sum(-1) >= 1).all() and (torch.diff(mask, dim=1) <= 0).all()
    assert (values * (1 - mask.repeat(1, 2)) == 0).all()
    # the values are the flow of the Gaussian sample: inverting the flow gives back base values whose
    # standardised residuals are N(0, 1)
    mean, log_var = model._decode(model.decoder(z))
    weight = mask.repeat(1, 2)
    context = torch.cat([z, mask], 1) if n_mask else z
    u = model.likelihood_flow.inverse(values, context, weight if n_mask else None)[0]
    residual = ((u - mean) * torch.exp(-0.5 * log_var))[weight.bool()]
    assert abs(residual.mean().item()) < 0.05 and residual.std().item() == pytest.approx(1.0, abs=0.05)


def _both_paths(flow: CouplingFlow, inverse: bool, x: torch.Tensor, context: torch.Tensor, weight: torch.Tensor):
    """(values, log-det, gradients with respect to x, the context and every parameter) of the flow's layers as they
    run (flowvae.models.spline, reordered products) and of the reference (zuko's spline, autograd), in that order."""
    results = []
    for reference in (False, True):
        flow.reference = reference
        x_, context_ = x.clone().requires_grad_(), context.clone().requires_grad_()
        out, log_det = (flow.inverse if inverse else flow)(x_, context_, weight)
        g = torch.Generator().manual_seed(1)
        loss = (torch.randn(out.shape, generator=g, dtype=out.dtype) * out).sum() + (log_det * 0.7).sum()
        grads = torch.autograd.grad(loss, [x_, context_, *flow.parameters()])
        results.append((out.detach(), log_det.detach(), grads))
    flow.reference = False
    return results


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("batch", [5, 40])  # 40 > the conditioner's width 16: the last map's weight reordered
def test_the_layers_are_the_reference_implementations(batch, inverse, transform):
    """The layers as they run against the implementation they replace (``reference``: zuko's spline, value-major,
    autograd throughout), padded particles included: the same values, log-dets and gradients, in float64."""
    flow, F, P = _flow(transform), 2, 3
    g = torch.Generator().manual_seed(batch)
    counts = torch.randint(1, P + 1, (batch,), generator=g)
    weight = (torch.arange(P) < counts[:, None]).double().repeat(1, F)
    x = 2.0 * torch.randn(batch, F * P, generator=g, dtype=torch.float64) * weight  # inside and outside the bound
    context = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    (out, log_det, grads), (ref_out, ref_log_det, ref_grads) = _both_paths(flow, inverse, x, context, weight)
    assert torch.allclose(out, ref_out, rtol=0, atol=1e-10)
    assert torch.allclose(log_det, ref_log_det, rtol=0, atol=1e-9)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert torch.allclose(grad, ref, rtol=1e-8, atol=1e-8 * ref.abs().max().item())


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_a_jet_sized_float32_flow_is_the_reference_to_rounding(inverse):
    """The model's own sizes (3 features × 30 particles, 8 bins on ±5, 5 layers), float32, a conditioner that
    moves values: the layers as they run and the reference agree to float32 rounding, gradients included."""
    torch.manual_seed(0)
    flow = _randomised(CouplingFlow(3, 30, 5, [64, 64], 38, "spline", bins=8, bound=5.0), 0.1)
    g = torch.Generator().manual_seed(2)
    counts = torch.randint(1, 31, (64,), generator=g)
    weight = (torch.arange(30) < counts[:, None]).float().repeat(1, 3)
    x = torch.randn(64, 90, generator=g) * weight
    context = torch.randn(64, 38, generator=g)
    (out, log_det, grads), (ref_out, ref_log_det, ref_grads) = _both_paths(flow, inverse, x, context, weight)
    assert torch.allclose(out, ref_out, rtol=0, atol=5e-5)  # values up to ~5: a few float32 ulps through 5 layers
    assert torch.allclose(log_det, ref_log_det, rtol=1e-5, atol=2e-4)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert torch.allclose(grad, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_a_large_batch_without_gradients_goes_in_blocks_with_the_same_values(monkeypatch, compiled):
    """Generation's batch, larger than two blocks, on one thread: the values bit-identical to the batch in one go
    without gradients, and the blocks are taken. On the torch path they are also bit-identical to the pass with
    gradients (which never blocks); the spline's compiled pass agrees with it, and with the reference layers, to
    float32 rounding."""
    monkeypatch.setattr(spline, "COMPILED", compiled)
    layers = CouplingFlow._layers
    blocks = []
    monkeypatch.setattr(CouplingFlow, "_layers", lambda self, order, x, *rest: blocks.append(len(x)) or
                        layers(self, order, x, *rest))
    torch.manual_seed(0)
    flow = _randomised(CouplingFlow(3, 30, 5, [32], 38, "spline"), 0.1)
    g = torch.Generator().manual_seed(3)
    u, context = torch.randn(2 * NO_GRAD_BLOCK + 100, 90, generator=g), torch.randn(2 * NO_GRAD_BLOCK + 100, 38)
    with torch_threads(1):
        with torch.no_grad():
            blocked = flow(u, context)
            monkeypatch.setattr(conditional_flow, "NO_GRAD_BLOCK", len(u))  # the whole batch is one block
            whole = flow(u, context)
        with_gradients = flow(u, context)
    assert blocks == [NO_GRAD_BLOCK, NO_GRAD_BLOCK, 100, 2 * NO_GRAD_BLOCK + 100, 2 * NO_GRAD_BLOCK + 100]
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])
    if compiled:  # values up to ~5 and log-dets summed over 450 values: a few float32 ulps
        assert torch.allclose(blocked[0], with_gradients[0].detach(), rtol=0, atol=5e-5)
        assert torch.allclose(blocked[1], with_gradients[1].detach(), rtol=1e-5, atol=2e-4)
    else:
        assert torch.equal(blocked[0], with_gradients[0].detach())
        assert torch.allclose(blocked[1], with_gradients[1].detach(), rtol=1e-6, atol=1e-5)
    flow.reference = True
    with torch.no_grad():
        reference = flow(u, context)
    assert torch.allclose(blocked[0], reference[0], rtol=0, atol=5e-5)


@pytest.mark.parametrize("inverse", [False, True])
def test_on_more_threads_the_parts_run_side_by_side_each_on_one_thread_with_one_threads_values(monkeypatch, inverse):
    """T threads: the batch in T parts of whole blocks on T Python threads, each at one intra-op thread, every value
    bit-identical to one thread's; torch's thread count restored after, and in inference mode too."""
    layers = CouplingFlow._layers
    calls = []

    def recording(self, order, x, *rest):
        calls.append((len(x), threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))
        return layers(self, order, x, *rest)

    monkeypatch.setattr(CouplingFlow, "_layers", recording)
    torch.manual_seed(0)
    flow = _randomised(CouplingFlow(3, 30, 5, [32], 38, "spline"), 0.1)
    g = torch.Generator().manual_seed(4)
    n = 3 * NO_GRAD_BLOCK + 7
    x, context = torch.randn(n, 90, generator=g), torch.randn(n, 38, generator=g)
    weight = (torch.rand(n, 90, generator=g) > 0.2).float()
    go = flow.inverse if inverse else flow
    with torch_threads(1), torch.no_grad():
        one = go(x, context, weight)
    calls.clear()
    with torch_threads(3):
        with torch.no_grad():
            parts = go(x, context, weight)
        assert torch.get_num_threads() == 3
        with torch.inference_mode():
            inferred = go(x, context, weight)
        assert torch.get_num_threads() == 3
    for got in (parts, inferred):
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])
    # four blocks (the last of 7 events), as one thread cuts them, shared out whole: 1, 1 and 2 blocks
    assert sorted(length for length, *_ in calls) == [7] * 2 + [NO_GRAD_BLOCK] * 6
    assert len({name for _, name, *_ in calls}) >= 2
    assert all(name.startswith("flowvae-flow") and threads == 1 and not grad for _, name, threads, grad in calls)


def test_particles_are_ordered_by_pt_with_the_mask_kept():
    events = np.array([[[1.0, 2.0, 3.0, 0.0], [0.1, 0.5, 0.3, 0.0]],
                       [[1.0, 2.0, 3.0, 0.0], [-1.0, 2.0, -3.0, 0.0]]], dtype=np.float32)  # (2, F=2, P=4)
    mask = np.array([[True, True, True, False]] * 2)
    ordered = order_particles(events, mask, by=1)
    np.testing.assert_array_equal(ordered[0], np.float32([[2.0, 3.0, 1.0, 0.0], [0.5, 0.3, 0.1, 0.0]]))
    # a key below a padded slot's 0 still comes before it: the padded particles stay last
    np.testing.assert_array_equal(ordered[1], [[2.0, 1.0, 3.0, 0.0], [2.0, -1.0, -3.0, 0.0]])


def test_model_config_names_the_architecture():
    cfg = compose_config("model=conditional_flow")
    assert cfg.model.name == "conditional_flow" and cfg.model.coupling_layers == 5
    assert cfg.model.coupling_transform == "spline"
    model = build_model(6, cfg.model, cfg.flow, 0, 0, n_features=2)
    assert len(model.likelihood_flow.nets) == 5
    assert build_model(6, compose_config().model, cfg.flow, 0).likelihood_flow is None
    with pytest.raises(ConfigError, match="model.coupling_layers=0 is not allowed"):
        validate(compose_config("model=conditional_flow", "model.coupling_layers=0"))
    with pytest.raises(ConfigError, match="belong to model=conditional_flow"):
        validate(compose_config("model.coupling_layers=3"))
    with pytest.raises(ConfigError, match="model.name=set is not allowed"):
        validate(compose_config("model.name=set"))
    with pytest.raises(ConfigError, match="model.coupling_transform=cubic is not allowed: one of affine, spline"):
        validate(compose_config("model=conditional_flow", "model.coupling_transform=cubic"))
    with pytest.raises(ConfigError, match="model.coupling_bins=1 is not allowed"):
        validate(compose_config("model=conditional_flow", "model.coupling_bins=1"))


def test_a_conditional_flow_run_on_real_jets_writes_jets_that_look_like_jets(tmp_path):
    """End to end: model=conditional_flow trains on the real-jet slice; its sample has the mask a prefix, at least
    one particle per jet, and the particles ordered by pT, as the data."""
    out = run_flowvae(["train", "model=conditional_flow", "data=jetnet", f"data.path={GLUON30}", "model.hidden=[32]",
                       "model.latent_dim=4", "model.coupling_layers=3", "train.epochs=2", "train.batch_size=50",
                       "eval.n_samples=300", "eval.bins=20", "train.threads=1", "flow=triangular", "n_flows=2",
                       "hydra.run.dir=run", "results_csv=results.csv"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]
    assert row["status"] == "ok" and row["model.name"] == "conditional_flow" and math.isfinite(row["fpd"])
    sample = np.load(tmp_path / "run" / "generated_sample.npy")  # (N, 30, 4): etarel, phirel, ptrel, mask
    real, ptrel = sample[:, :, 3] == 1, sample[:, :, 2]
    assert real.sum(1).min() >= 1
    assert (np.diff(real.astype(int), axis=1) <= 0).all()
    assert (np.diff(np.where(real, ptrel, -1.0), axis=1) <= 0).all()  # padded slots last, below every ptrel
    assert ((ptrel > 0) & (ptrel < 1))[real].all() and (sample[~real] == 0).all()


def test_the_coupling_base_is_never_wider_than_the_standardized_data():
    """The splines are the identity beyond ±B, so the base's std is capped at 1: far-out base values would reach
    the events unreshaped. The default model's learned variance stays free."""
    z = 10.0 * torch.randn(512, 3, dtype=torch.float64)
    model = _conditional_model(transform="spline")
    _randomised(model.decoder_head, 5.0)
    assert model._decode(model.decoder(z))[1].max().item() <= 0.0
    torch.manual_seed(0)
    default = _randomised(FlowVAE(6, [16], 3).double(), 5.0)
    assert default._decode(default.decoder(z))[1].max().item() > 1.0
