"""A likelihood whose particles are correlated given z: coupling layers conditioned on z over the whole event.

The ``conditional_flow`` model's p(x|z) is a Gaussian N(mean(z), diag var(z)) (the default model's, its std capped
at 1) pushed through L coupling layers (Dinh et al., "Density estimation using Real NVP", ICLR 2017) whose
parameters depend on z and the event's mask:

    u ~ N(mean(z), diag var(z)),   x = g_L ∘ … ∘ g_1(u; z, mask)
    log p(x|z) = log N(g⁻¹(x); mean, var) + Σ_l log|det ∂g_l⁻¹/∂x|

Layer l splits the event's F × P values into an active set A_l and the rest. Each active value goes through a
monotonic map whose parameters are an MLP of the passive values, the mask and z: a rational-quadratic spline on
[−B, B], the identity outside (``spline``, Durkan et al., "Neural Spline Flows", NeurIPS 2019; zuko's
``MonotonicRQSTransform``, written out for this use in :mod:`flowvae.models.spline`), or x·exp(s) + t
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
import torch.nn.functional as F
from torch import Tensor, nn

from flowvae.cores import torch_threads
from flowvae.models.spline import MIN_SLOPE, compiled_path, rqs

__all__ = ["CouplingFlow", "LOG_SCALE_BOUND", "TRANSFORMS", "active_sets"]

# The largest |log scale| one affine coupling layer applies to a value: e^3 ≈ 20.
LOG_SCALE_BOUND = 3.0
# How a coupling layer moves one value (model.coupling_transform).
TRANSFORMS = ("affine", "spline")
# Events per block when a large batch goes through the flow without gradients (generation) on one thread: each
# layer's logits (23 per moved value) then stay in the cache between the conditioner's product and the spline's
# passes over them. The blocks' values are bit-identical to one pass's.
NO_GRAD_BLOCK = 512


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
    outside; Durkan et al., "Neural Spline Flows", NeurIPS 2019: :func:`flowvae.models.spline.rqs`, which is
    :class:`zuko.transforms.MonotonicRQSTransform` to rounding).
    A spline layer maps [−B, B] onto itself, so however its conditioner extrapolates it cannot throw a value far
    out: what keeps generated jets from growing a tail of far-off particles. Each layer's conditioner outputs the
    parameters of its active values only.

    ``reference = True`` (an attribute, not saved) runs the layers as they were before
    :mod:`flowvae.models.spline`: zuko's spline, value-major, autograd throughout — slower, the same parameters and
    the same numbers to rounding; the tests and ``scripts/bench_conditional_flow.py`` compare against it.
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
        self.register_buffer("passive", 1.0 - sets, persistent=False)
        self.indices = [torch.nonzero(row).squeeze(-1) for row in sets]
        for layer, index in enumerate(self.indices):  # buffers, so they follow the module to its device
            self.register_buffer(f"_index{layer}", index, persistent=False)
        self.nets = nn.ModuleList(_mlp([n_values + context_dim, *hidden, len(index) * self.n_params])
                                  for index in self.indices)
        self.reference = False  # True: the layers as before flowvae.models.spline (zuko's), see the docstring

    def _layer(self, layer: int, x: Tensor, context: Tensor, weight: Tensor | None, inverse: bool,
               last: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Layer ``layer`` (or its inverse) applied to ``x``: (x', log|det|). Its conditioner sees the passive real
        values (active and padded ones zeroed) and the context; a padded value is never moved. ``last``: the
        conditioner's last map already reordered bins first (:meth:`_bins_first`)."""
        index = getattr(self, f"_index{layer}")
        passive = x * self.passive[layer] if weight is None else x * self.passive[layer] * weight
        params, dim = self._conditioner(layer, torch.cat([passive, context], dim=-1), len(index), last)
        if dim == 0 and self.transform == "spline":  # without gradients on a CPU: the spline's compiled pass
            compiled = compiled_path(x, params, weight)  # the layer's columns moved in one call
            if compiled is not None:
                return compiled.rqs_columns(x.contiguous(), index, params.contiguous(), self.bound, inverse,
                                            None if weight is None else weight.contiguous(), MIN_SLOPE)
        values = x.index_select(1, index)  # (B, n)
        real = None if weight is None else weight.index_select(1, index)
        if dim == 0:  # params (n_params, n, B): the values batch-last to match
            values, real = values.t().contiguous(), None if real is None else real.t()
        if self.transform == "affine":
            s = LOG_SCALE_BOUND * torch.tanh(params.select(dim, 0) / LOG_SCALE_BOUND)
            t = params.select(dim, 1)
            if inverse:
                moved, ladj = (values - t) * torch.exp(-s), -s
            else:
                moved, ladj = values * torch.exp(s) + t, s
            if real is not None:
                moved = torch.where(real > 0, moved, values)
                ladj = ladj * real
        else:
            moved, ladj = rqs(values, params, self.bound, inverse, real, dim)
        if dim == 0:
            moved, ladj = moved.t(), ladj.t()
        return x.index_copy(1, index, moved), ladj.sum(1)

    def _conditioner(self, layer: int, inputs: Tensor, n: int, last_weight: Tensor | None) -> tuple[Tensor, int]:
        """Layer ``layer``'s MLP at ``inputs`` (B, F·P + C): the n moved values' parameters and the axis of their
        n_params — (B, n, n_params), -1, as the last map writes them (value-major), or, with its weight reordered
        (``last_weight``, or made here for a batch larger than the weight), bins first: (n_params, n, B), 0,
        the layout :func:`flowvae.models.spline.rqs` works in without a copy."""
        *hidden, last = (module for module in self.nets[layer] if isinstance(module, nn.Linear))
        h = inputs
        for linear in hidden:
            h = F.linear(h, linear.weight, linear.bias).relu_()
        batch, width = h.shape
        if last_weight is None and batch <= width:
            return F.linear(h, last.weight, last.bias).view(batch, n, self.n_params), -1
        if last_weight is None:
            last_weight = self._bins_first(layer)
        return torch.mm(last_weight, torch.cat([h, h.new_ones(batch, 1)], dim=1).t()).view(self.n_params, n, batch), 0

    def _bins_first(self, layer: int) -> Tensor:
        """Layer ``layer``'s last linear map as one (n_params·n, width + 1) matrix, rows bins first and the bias as
        its last column (against a row of ones: cheaper than copying the bias into every column of the output)."""
        last = self.nets[layer][-1]
        n, width = last.out_features // self.n_params, last.in_features
        weight = torch.cat([last.weight.view(n, self.n_params, width), last.bias.view(n, self.n_params, 1)], dim=2)
        return weight.transpose(0, 1).reshape(self.n_params * n, width + 1)

    def _flow(self, x: Tensor, context: Tensor, weight: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        """Every layer, in order (or their inverses in reverse): (values, Σ log|det|). A large batch on the CPU
        without gradients (generation) goes through in blocks of :data:`NO_GRAD_BLOCK` events, the last maps
        reordered once for all of them; with T > 1 threads, in T parts side by side (:meth:`_in_parts`)."""
        order = range(len(self.nets) - 1, -1, -1) if inverse else range(len(self.nets))
        if torch.is_grad_enabled() or len(x) <= 2 * NO_GRAD_BLOCK or x.device.type != "cpu":
            return self._layers(order, x, context, weight, inverse, [None] * len(self.nets))
        lasts = [self._bins_first(layer) for layer in range(len(self.nets))]
        if torch.get_num_threads() > 1:
            return self._in_parts(order, x, context, weight, inverse, lasts)
        return self._in_blocks(order, x, context, weight, inverse, lasts)

    def _in_blocks(self, order: range, x: Tensor, context: Tensor, weight: Tensor | None, inverse: bool,
                   lasts: list[Tensor]) -> tuple[Tensor, Tensor]:
        blocks = [self._layers(order, x[i:i + NO_GRAD_BLOCK], context[i:i + NO_GRAD_BLOCK],
                               None if weight is None else weight[i:i + NO_GRAD_BLOCK], inverse, lasts)
                  for i in range(0, len(x), NO_GRAD_BLOCK)]
        return torch.cat([values for values, _ in blocks]), torch.cat([log_det for _, log_det in blocks])

    def _in_parts(self, order: range, x: Tensor, context: Tensor, weight: Tensor | None, inverse: bool,
                  lasts: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The batch cut into T parts (T = torch's threads) of whole blocks, each through :meth:`_in_blocks` on a
        Python thread of its own at one intra-op thread: the same blocks as on one thread, the same values.

        Why: split among threads, each of a layer's ~60 operations waits for the other threads to wake (flowvae's
        CLI has them sleep rather than spin, see :mod:`flowvae.cli`), and 2 threads were no faster than 1. Parts
        need no waking: torch releases the GIL while an operation runs, so the parts run at once (2,000 jets on 2
        threads: 1.5x faster, docs/speed.md)."""
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        n_blocks = -(-len(x) // NO_GRAD_BLOCK)  # whole blocks to each part, cut where one thread cuts them
        edges = [min(len(x), n_blocks * part // threads * NO_GRAD_BLOCK) for part in range(threads + 1)]
        parts = [slice(start, end) for start, end in zip(edges[:-1], edges[1:], strict=True) if end > start]

        inference = torch.is_inference_mode_enabled()

        def run(part: slice) -> tuple[Tensor, Tensor]:
            with torch.inference_mode(inference), torch.no_grad():  # both are per thread: the caller's, here
                return self._in_blocks(order, x[part], context[part], None if weight is None else weight[part],
                                       inverse, lasts)

        # one thread before the pool's threads exist: each takes torch's count at its first operation
        with torch_threads(1), ThreadPoolExecutor(len(parts), thread_name_prefix="flowvae-flow") as pool:
            done = list(pool.map(run, parts))
        return torch.cat([values for values, _ in done]), torch.cat([log_det for _, log_det in done])

    def _layers(self, order: range, x: Tensor, context: Tensor, weight: Tensor | None, inverse: bool,
                lasts: list[Tensor | None]) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for layer in order:
            x, ladj = self._layer(layer, x, context, weight, inverse, lasts[layer])
            log_det = log_det + ladj
        return x, log_det

    def _reference_layer(self, layer: int, x: Tensor, context: Tensor, weight: Tensor | None, inverse: bool
                         ) -> tuple[Tensor, Tensor]:
        """:meth:`_layer` as it was: value-major, zuko's spline, autograd throughout."""
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
        if not self.reference:
            return self._flow(u, context, weight, inverse=False)
        log_det = u.new_zeros(u.shape[0])
        for layer in range(len(self.nets)):
            u, ladj = self._reference_layer(layer, u, context, weight, inverse=False)
            log_det = log_det + ladj
        return u, log_det

    def inverse(self, x: Tensor, context: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """u = g_1⁻¹ ∘ … ∘ g_L⁻¹(x) and Σ_l log|det ∂g_l⁻¹/∂x|, shapes (B, F·P) and (B,)."""
        if not self.reference:
            return self._flow(x, context, weight, inverse=True)
        log_det = x.new_zeros(x.shape[0])
        for layer in reversed(range(len(self.nets))):
            x, ladj = self._reference_layer(layer, x, context, weight, inverse=True)
            log_det = log_det + ladj
        return x, log_det
