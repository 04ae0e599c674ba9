"""A likelihood whose particles are correlated given z: coupling layers conditioned on z over the whole event.

The ``conditional_flow`` model's p(x|z) is a Gaussian N(mean(z), diag var(z)) (the default model's, its std capped
at 1) pushed through L coupling layers (Dinh et al., "Density estimation using Real NVP", ICLR 2017) whose
parameters depend on z and the event's mask:

    u ~ N(mean(z), diag var(z)),   x = g_L ∘ … ∘ g_1(u; z, mask)
    log p(x|z) = log N(g⁻¹(x); mean, var) + Σ_l log|det ∂g_l⁻¹/∂x|

Layer l splits the event's F × P values into an active set A_l and the rest. Each active value goes through a
monotonic map whose parameters are an MLP of the passive values, the mask and z: a rational-quadratic spline on
[−B, B], the identity outside (``spline``, Durkan et al., "Neural Spline Flows", NeurIPS 2019), or x·exp(s) + t
(``affine``). The Jacobian is triangular, its log-det the sum of the active values' log-slopes, and the inverse is
closed form. The active sets cycle through "feature f of every particle" for each feature, then the even and the
odd particle slots: after one cycle every value has been moved given every other, which is what makes a jet's
particles depend on each other given z.

Masks, exactly: a padded particle is never moved and enters no conditioner (its values are zeroed in their
input), so for an event with n real particles each layer is a bijection of the n·F real values alone, and the
density above — summed over the real values only — is the exact density of those values given z and n. An affine
layer's log-scale is soft-clamped, s = S tanh(raw / S) with S = :data:`LOG_SCALE_BOUND`; a spline layer maps
[−B, B] onto itself. Each layer's last linear map starts at zero, so an untrained flow is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CouplingFlow", "LOG_SCALE_BOUND", "TRANSFORMS", "active_sets"]

# The largest |log scale| one affine coupling layer applies to a value: e^3 ≈ 20.
LOG_SCALE_BOUND = 3.0
# How a coupling layer moves one value (model.coupling_transform).
TRANSFORMS = ("affine", "spline")


def active_sets(n_features: int, n_particles: int, n_layers: int) -> Tensor:
    """(L, F·P) 0/1 float masks, features first as the model flattens an event (index f·P + p): layer l's
    active values. The cycle: feature 0, …, feature F−1 of every particle, then even slots, then odd slots."""
    grid = torch.zeros(n_features + 2, n_features, n_particles)
    for f in range(n_features):
        grid[f, f] = 1.0
    grid[n_features, :, 0::2] = 1.0
    grid[n_features + 1, :, 1::2] = 1.0
    if n_particles == 1:  # one slot: no odd slots, and the even set would move every value at once
        grid = grid[:n_features]
    cycle = grid.reshape(len(grid), -1)
    return cycle[torch.arange(n_layers) % len(cycle)]


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    last = nn.Linear(sizes[-2], sizes[-1])
    nn.init.zeros_(last.weight)  # the identity at initialisation
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class CouplingFlow(nn.Module):
    """L coupling layers over flattened events (B, F·P), conditioned on a context (B, C) — z and the mask.

    ``forward(u, context, weight)`` maps base values to events (generation) and ``inverse(x, context, weight)``
    events to base values (the likelihood); both return the log|det| of the map they apply, (B,). ``weight``
    (B, F·P) is 1 for a real particle's values and 0 for a padded one's (None: every value is real).

    ``transform`` is each moved value's map: ``affine`` (x·exp(s) + t, |s| ≤ :data:`LOG_SCALE_BOUND`) or
    ``spline`` (a monotonic rational-quadratic spline of ``bins`` bins on [−``bound``, ``bound``], the identity
    outside; Durkan et al., "Neural Spline Flows", NeurIPS 2019, as :class:`zuko.transforms.MonotonicRQSTransform`).
    A spline layer maps [−B, B] onto itself, so however its conditioner extrapolates it cannot throw a value far
    out: what keeps generated jets from growing a tail of far-off particles. Each layer's conditioner outputs the
    parameters of its active values only.
    """

    def __init__(self, n_features: int, n_particles: int, n_layers: int, hidden: list[int], context_dim: int,
                 transform: str = "affine", bins: int = 8, bound: float = 5.0):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a coupling flow needs at least one layer, got {n_layers}")
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown coupling transform {transform!r}: one of {', '.join(TRANSFORMS)}")
        self.transform, self.bins, self.bound = transform, bins, bound
        n_values = n_features * n_particles
        self.n_params = 2 if transform == "affine" else 3 * bins - 1  # per moved value
        sets = active_sets(n_features, n_particles, n_layers)
        self.register_buffer("active", sets, persistent=False)
        self.indices = [torch.nonzero(row).squeeze(-1) for row in sets]
        self.nets = nn.ModuleList(_mlp([n_values + context_dim, *hidden, len(index) * self.n_params])
                                  for index in self.indices)

    def _layer(self, layer: int, x: Tensor, context: Tensor, weight: Tensor | None, inverse: bool
               ) -> tuple[Tensor, Tensor]:
        """Layer ``layer`` (or its inverse) applied to ``x``: (x', log|det|). Its conditioner sees the passive real
        values (active and padded ones zeroed) and the context; a padded value is never moved."""
        active = self.active[layer]
        index = self.indices[layer].to(x.device)
        passive = x * (1.0 - active) if weight is None else x * (1.0 - active) * weight
        params = self.nets[layer](torch.cat([passive, context], dim=-1)).view(len(x), len(index), self.n_params)
        values = x[:, index]
        if self.transform == "affine":
            s = LOG_SCALE_BOUND * torch.tanh(params[..., 0] / LOG_SCALE_BOUND)
            t = params[..., 1]
            if inverse:
                moved, ladj = (values - t) * torch.exp(-s), -s
            else:
                moved, ladj = values * torch.exp(s) + t, s
        else:
            from zuko.transforms import MonotonicRQSTransform

            k = self.bins
            spline = MonotonicRQSTransform(params[..., :k], params[..., k:2 * k], params[..., 2 * k:], self.bound)
            moved, ladj = (spline.inv if inverse else spline).call_and_ladj(values)
        if weight is not None:
            real = weight[:, index]
            moved = torch.where(real > 0, moved, values)
            ladj = ladj * real
        return x.index_copy(1, index, moved), ladj.sum(-1)

    def forward(self, u: Tensor, context: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x = g_L ∘ … ∘ g_1(u) and Σ_l log|det ∂g_l/∂u|, shapes (B, F·P) and (B,)."""
        log_det = u.new_zeros(u.shape[0])
        for layer in range(len(self.nets)):
            u, ladj = self._layer(layer, u, context, weight, inverse=False)
            log_det = log_det + ladj
        return u, log_det

    def inverse(self, x: Tensor, context: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u = g_1⁻¹ ∘ … ∘ g_L⁻¹(x) and Σ_l log|det ∂g_l⁻¹/∂x|, shapes (B, F·P) and (B,)."""
        log_det = x.new_zeros(x.shape[0])
        for layer in reversed(range(len(self.nets))):
            x, ladj = self._layer(layer, x, context, weight, inverse=True)
            log_det = log_det + ladj
        return x, log_det
