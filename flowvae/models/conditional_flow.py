"""A likelihood whose particles are correlated given z: affine coupling layers conditioned on z over the event.

The ``conditional_flow`` model's p(x|z) is the default model's Gaussian N(mean(z), diag var(z)) pushed through L
affine coupling layers (Dinh et al., "Density estimation using Real NVP", ICLR 2017) whose parameters depend on z
and the event's mask:

    u ~ N(mean(z), diag var(z)),   x = g_L ∘ … ∘ g_1(u; z, mask)
    log p(x|z) = log N(g⁻¹(x); mean, var) + Σ_l log|det ∂g_l⁻¹/∂x|

Layer l splits the event's F × P values into an active set A_l and the rest: the active values are scaled and
shifted, x'_a = x_a · exp(s_a) + t_a, with (s, t) an MLP of the passive values, the mask and z, so its Jacobian is
triangular with log-det Σ_{a ∈ A_l} s_a, and its inverse is closed form. The active sets cycle through "feature f
of every particle" for each feature, then the even and the odd particle slots: after one cycle every value has
been moved given every other, which is what makes a jet's particles depend on each other given z.

Masks, exactly: a padded particle is never active (s = t = 0 there) and enters no conditioner (its values are
zeroed in their input), so for an event with n real particles each layer is a bijection of the n·F real values
alone, and the density above — summed over the real values only — is the exact density of those values given z
and n. The log-scales are soft-clamped, s = S tanh(raw / S) with S = :data:`LOG_SCALE_BOUND`, so no layer can
scale by more than e^S; each layer's last linear map starts at zero, so an untrained flow is the identity and the
model starts as the default one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CouplingFlow", "LOG_SCALE_BOUND", "active_sets"]

# The largest |log scale| one coupling layer applies to a value: e^3 ≈ 20.
LOG_SCALE_BOUND = 3.0


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
    """L affine coupling layers over flattened events (B, F·P), conditioned on a context (B, C) — z and the mask.

    ``forward(u, context, weight)`` maps base values to events (generation) and ``inverse(x, context, weight)``
    events to base values (the likelihood); both return the log|det| of the map they apply, (B,). ``weight``
    (B, F·P) is 1 for a real particle's values and 0 for a padded one's (None: every value is real).
    """

    def __init__(self, n_features: int, n_particles: int, n_layers: int, hidden: list[int], context_dim: int):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a coupling flow needs at least one layer, got {n_layers}")
        n_values = n_features * n_particles
        self.register_buffer("active", active_sets(n_features, n_particles, n_layers), persistent=False)
        self.nets = nn.ModuleList(_mlp([n_values + context_dim, *hidden, 2 * n_values]) for _ in range(n_layers))

    def _scale_shift(self, layer: int, x: Tensor, context: Tensor, active: Tensor, weight: Tensor | None
                     ) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s log-scale and shift (B, F·P), zero off the active real values; its conditioner sees
        the passive real values (active and padded ones zeroed) and the context."""
        passive = x * (1.0 - active) if weight is None else x * (1.0 - active) * weight
        raw_s, t = self.nets[layer](torch.cat([passive, context], dim=-1)).chunk(2, dim=-1)
        moved = active if weight is None else active * weight
        s = LOG_SCALE_BOUND * torch.tanh(raw_s / LOG_SCALE_BOUND)
        return s * moved, t * moved

    def forward(self, u: Tensor, context: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x = g_L ∘ … ∘ g_1(u) and Σ_l log|det ∂g_l/∂u|, shapes (B, F·P) and (B,)."""
        log_det = u.new_zeros(u.shape[0])
        for layer in range(len(self.nets)):
            s, t = self._scale_shift(layer, u, context, self.active[layer], weight)
            u = u * torch.exp(s) + t
            log_det = log_det + s.sum(-1)
        return u, log_det

    def inverse(self, x: Tensor, context: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u = g_1⁻¹ ∘ … ∘ g_L⁻¹(x) and Σ_l log|det ∂g_l⁻¹/∂x|, shapes (B, F·P) and (B,)."""
        log_det = x.new_zeros(x.shape[0])
        for layer in reversed(range(len(self.nets))):
            s, t = self._scale_shift(layer, x, context, self.active[layer], weight)
            x = (x - t) * torch.exp(-s)
            log_det = log_det - s.sum(-1)
        return x, log_det
