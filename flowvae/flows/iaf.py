"""Inverse autoregressive flow (Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, "Improved
Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016), with MADE networks (Germain, Gregor,
Murray & Larochelle, "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015), in the gated form
of van den Berg et al.'s Sylvester-flow code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from flowvae.flows.base import Flow, check_int, chunks, register

__all__ = ["IAF", "MaskedLinear", "gate_floor", "made_masks"]


def gate_floor(dtype: torch.dtype) -> float:
    """The floor of IAF's gate logits, logit(sqrt(eps)) for the dtype's machine epsilon: sigmoid >= sqrt(eps)."""
    root_eps = torch.finfo(dtype).eps ** 0.5
    return math.log(root_eps) - math.log1p(-root_eps)


def made_masks(dim: int, hidden: int, reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Boolean connectivity masks of a two-hidden-layer MADE, as (out, in) matrices.

    Variable i has degree i + 1 (D - i when ``reverse``); hidden unit k has degree k mod D, so degree-0
    units see no z but do see the context, which lets every output, the first included, depend on it.
    A hidden unit connects to inputs and units of degree no greater than its own; the outputs of variable i
    connect to hidden units of degree below i's.
    Returns masks of shapes (hidden, D), (hidden, hidden), (D, hidden).
    """
    degrees = torch.arange(dim, 0, -1) if reverse else torch.arange(1, dim + 1)
    hidden_degrees = torch.arange(hidden) % dim
    first = hidden_degrees[:, None] >= degrees[None, :]
    middle = hidden_degrees[:, None] >= hidden_degrees[None, :]
    last = degrees[:, None] > hidden_degrees[None, :]
    return first, middle, last


class MaskedLinear(nn.Linear):
    r"""Linear layer :math:`y = (W \odot M) x + c` with a fixed boolean mask M (out, in)."""

    def __init__(self, mask: Tensor, bias: bool = True) -> None:
        super().__init__(mask.shape[1], mask.shape[0], bias=bias)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


@register("iaf", table_rank=2)
class IAF(Flow):
    r"""Gated IAF step :math:`f(z) = \sigma \odot z + (1 - \sigma) \odot m`, :math:`\sigma = \mathrm{sigmoid}(g)`,
    :math:`g = \max(s + 1, g_{\min})`.

    :math:`(m, s) = \mathrm{MADE}(z, c)`: :math:`h_1 = \mathrm{elu}(W_1 z + E c)`,
    :math:`h_2 = \mathrm{elu}(W_2 h_1)`, :math:`(m, s) = W_3 h_2`, with autoregressive masks on
    :math:`W_1, W_2, W_3` so that :math:`m_d, s_d` depend on the variables before d only, and the per-sample
    context c (the amortized params) entering the first hidden layer; E is the identity when
    ``context == hidden`` and a learned linear map otherwise. The forget bias 1 leans the gate towards
    keeping z (:math:`\sigma \approx 0.73` at initialization). The floor
    :math:`g_{\min} = \mathrm{logit}(\sqrt\varepsilon)` (ε the dtype's machine epsilon; -7.97 in float32,
    -18.0 in float64) keeps :math:`\sigma \ge \sqrt\varepsilon`: a gate never underflows to 0 (nor to a
    subnormal, which training flushes to 0), so the map never drops z, and f(z) still resolves z to
    :math:`\sqrt\varepsilon` of :math:`|z - m|`, half its digits. Below the floor the gate's gradient is 0, as
    for any clamp. The Jacobian is triangular with diagonal :math:`\sigma`, so
    :math:`\log|\det| = \sum_d \log \sigma_d = \sum_d \mathrm{logsigmoid}(g_d)`, exact to rounding for the σ
    the map uses, and since :math:`\sigma \in [\sqrt\varepsilon, 1]` any params give an invertible map. Lower
    triangular in z's order; upper when ``reverse`` (the variable order of the MADE is reversed, z itself stays
    put): in a stack the k-th flow has reverse = (k odd).

    The MADE weights are ordinary learned parameters, shared by all samples; only c is amortized.

    Shapes: z (B, D), params (B, context).
    """

    alternates = True
    forget_bias = 1.0

    def __init__(self, dim: int, reverse: bool = False, *, hidden: int = 64, context: int | None = None) -> None:
        self.check_options(dim, hidden=hidden, context=context)
        super().__init__()
        context = hidden if context is None else context
        self.dim = dim
        self.reverse = reverse
        self.num_params = context
        first, middle, last = made_masks(dim, hidden, reverse)
        self.first = MaskedLinear(first)
        self.embed_context = nn.Identity() if context == hidden else nn.Linear(context, hidden, bias=False)
        self.middle = MaskedLinear(middle)
        self.last = MaskedLinear(torch.cat([last, last]))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_params={self.num_params}, reverse={self.reverse}"

    @classmethod
    def check_options(cls, dim: int, **options: Any) -> None:
        if "hidden" in options:
            check_int("hidden", options["hidden"], 1)
        if options.get("context") is not None:
            check_int("context", options["context"], 1, extra=" or None (= hidden)")

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self.chain([self], z, params, self.chain_constants([self]))

    @classmethod
    def chainable(cls, flows: Sequence[Flow]) -> bool:
        return super().chainable(flows) and len({flow.first.weight.shape for flow in flows}) == 1

    @classmethod
    def chain_constants(cls, flows: Sequence[Flow]) -> dict[str, Tensor]:
        """The K flows' masks stacked, and the forget bias as a bias of the last layer's gate half."""
        constants = {name: torch.stack([getattr(flow, name).mask for flow in flows])
                     for name in ("first", "middle", "last")}
        bias = flows[0].last.bias
        constants["forget_bias"] = torch.cat([torch.zeros_like(bias).chunk(2)[0],
                                              torch.full_like(bias, cls.forget_bias).chunk(2)[1]])
        return constants

    @classmethod
    def chain(cls, flows: Sequence[Flow], z: Tensor, params: Tensor,
              constants: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The masked weights and the context's contribution :math:`E c + b_1` for all K flows at once, then
        the K MADEs in turn."""

        def stacked(layer: str, attribute: str) -> Tensor:
            return torch.stack([getattr(getattr(flow, layer), attribute) for flow in flows])

        first, middle, last = (stacked(name, "weight") * constants[name] for name in ("first", "middle", "last"))
        context = params.unflatten(-1, (len(flows), flows[0].num_params))  # (B, K, context)
        if isinstance(flows[0].embed_context, nn.Identity):
            first_bias = context + stacked("first", "bias")
        else:
            embed = torch.stack([flow.embed_context.weight for flow in flows])  # (K, hidden, context)
            first_bias = torch.einsum("bkc,khc->bkh", context, embed) + stacked("first", "bias")
        last_bias = stacked("last", "bias") + constants["forget_bias"]
        middle_bias = stacked("middle", "bias")
        gate_logits = []
        for start, stop in chunks(len(flows), z.shape[0]):
            z, gates, *_ = _MadeChain.apply(z, first_bias[:, start:stop], first[start:stop], middle[start:stop],
                                            middle_bias[start:stop], last[start:stop], last_bias[start:stop],
                                            torch.is_grad_enabled())
            gate_logits.append(gates)
        gate_logits = torch.cat(gate_logits, 1) if len(gate_logits) > 1 else gate_logits[0]
        return z, F.logsigmoid(gate_logits).sum((1, 2))


class _MadeChain(torch.autograd.Function):
    r"""K gated MADE steps in turn, with a written-out backward: the loop carries only the gradient of z
    (three small matmuls per flow), and the weights' gradients are batched over all K flows afterwards.

    Inputs: z (B, D), first_bias :math:`E_k c_k + b_{1,k}` (B, K, H), masked weights w1 (K, H, D),
    w2 (K, H, H), w3 (K, 2D, H), biases b2 (K, H), b3 (K, 2D) with the forget bias added to its gate half.
    Returns z_K (B, D) and every flow's gate logits (B, K, D), floored at :func:`gate_floor` (the gradient is
    passed only where the raw logit is above it).

    Every input may also carry one leading axis of S models (a stack trained under ``vmap``,
    :mod:`flowvae.training.stacked`): the same steps then run as batched products, one chain for all S, and :meth:`vmap`
    is that rule. Written for torch.func (forward without ctx): what the backward needs comes out of forward as
    extra outputs, empty when no backward will run.
    """

    @staticmethod
    def forward(z: Tensor, first_bias: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
                for_backward: bool) -> tuple[Tensor, ...]:
        saved: dict[str, list[Tensor]] = {"inputs": [], "h1": [], "h2": [], "mean": [], "gate": []}
        floor = gate_floor(z.dtype)
        for k in range(w1.shape[-3]):
            saved["inputs"].append(z)
            h1 = F.elu(_affine(first_bias.select(-2, k), z, w1.select(-3, k).mT))
            h2 = F.elu(_affine(b2.select(-2, k), h1, w2.select(-3, k).mT))
            mean, gate = _affine(b3.select(-2, k), h2, w3.select(-3, k).mT).chunk(2, dim=-1)
            gate = gate.clamp_min(floor)
            z = torch.lerp(mean, z, torch.sigmoid(gate))
            for name, value in zip(("h1", "h2", "mean", "gate"), (h1, h2, mean, gate), strict=True):
                saved[name].append(value)
        gate = torch.stack(saved["gate"], -2)
        kept = [torch.stack(saved[name], -2) if for_backward else gate.new_empty(0)
                for name in ("inputs", "h1", "h2", "mean")]
        return z, gate, *kept

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        z, _, w1, w2, _, w3, _, for_backward = inputs
        _, gate, *kept = output
        ctx.mark_non_differentiable(*kept)
        ctx.set_materialize_grads(False)  # no zeros made for the kept outputs' (absent) gradients
        if for_backward:
            ctx.save_for_backward(w1, w2, w3, *kept, gate)
            ctx.floor = gate_floor(z.dtype)

    @staticmethod
    def vmap(info, in_dims: tuple, *inputs) -> tuple[tuple[Tensor, ...], tuple[int | None, ...]]:
        """The mapped axis as the leading axis of S models: one batched chain, its own written-out backward."""
        *tensors, for_backward = inputs
        tensors = [t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
                   for t, d in zip(tensors, in_dims[:-1], strict=True)]
        output = _MadeChain.apply(*tensors, for_backward)
        return output, (0, 0, *[0 if for_backward else None] * (len(output) - 2))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: Tensor | None, grad_gate: Tensor | None, *_):
        w1, w2, w3, inputs, h1, h2, mean, gate = ctx.saved_tensors
        sigma = torch.sigmoid(gate)
        # z' = m + sigma (z - m): dz'/dz = sigma, dz'/dm = 1 - sigma, dz'/dgate = (z - m) sigma (1 - sigma);
        # the floored logit passes the gradient only where the raw one is above the floor
        above = gate > ctx.floor
        keep, gate_slope = 1 - sigma, (inputs - mean) * sigma * (1 - sigma) * above
        slope1, slope2 = ((h + 1).clamp_max_(1) for h in (h1, h2))  # elu'(x) = min(elu(x) + 1, 1)
        g = torch.zeros_like(inputs.select(-2, 0)) if grad_z is None else grad_z
        grad_gate = torch.zeros_like(gate) if grad_gate is None else grad_gate * above
        n_flows = w1.shape[-3]
        grad_out, grad_pre2, grad_pre1 = [None] * n_flows, [None] * n_flows, [None] * n_flows
        for k in reversed(range(n_flows)):
            grad_out[k] = torch.cat([g * keep.select(-2, k),
                                     torch.addcmul(grad_gate.select(-2, k), g, gate_slope.select(-2, k))], dim=-1)
            grad_pre2[k] = (grad_out[k] @ w3.select(-3, k)) * slope2.select(-2, k)
            grad_pre1[k] = (grad_pre2[k] @ w2.select(-3, k)) * slope1.select(-2, k)
            g = _affine(g * sigma.select(-2, k), grad_pre1[k], w1.select(-3, k))
        grad_out, grad_pre2, grad_pre1 = (torch.stack(grads, -2) for grads in (grad_out, grad_pre2, grad_pre1))

        def weight_grad(grad_pre: Tensor, layer_input: Tensor) -> Tensor:
            return torch.einsum("bko,bki->koi" if grad_pre.dim() == 3 else "sbko,sbki->skoi", grad_pre, layer_input)

        return (g, grad_pre1, weight_grad(grad_pre1, inputs), weight_grad(grad_pre2, h1), grad_pre2.sum(-3),
                weight_grad(grad_out, h2), grad_out.sum(-3), None)


def _affine(bias: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """bias + x @ weight: one addmm for one model, x (B, I) and weight (I, O); for a stack of S models, x (S, B, I),
    weight (S, I, O) and bias (S, B, O) or (S, O), one baddbmm."""
    if x.dim() == 2:
        return torch.addmm(bias, x, weight)
    return torch.baddbmm(bias if bias.dim() == 3 else bias.unsqueeze(-2), x, weight)
