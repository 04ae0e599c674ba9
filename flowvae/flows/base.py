"""The flow interface, the stack of K flows the VAE applies to its posterior sample, and the identity flow.

A flow here is *amortized*: besides the sample z it takes per-sample parameters produced by the encoder, so
every flow reads a (B, num_params) slice of one (B, stack.num_params) tensor.

Speed: a stack of K flows of one family runs as one *chain* (:meth:`Flow.chain`). Everything that does not
depend on z (reparametrizations, orthogonal matrices, masked weights) is computed for all K flows in one
batched pass, and only the genuinely sequential part is a loop over k; for the planar and Sylvester
families that loop is :func:`tanh_chain`, whose hand-written backward replaces K small autograd graphs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["FLOWS", "Flow", "FlowStack", "Identity", "chunks", "register", "tanh_chain"]

# A chain's batched tensors hold (batch x flows) small matrices; past about this many the flows go in groups, so
# that each group's tensors stay in the CPU's cache (the test-loss pass: batch 1000 x 80 flows, 2x faster).
CHAIN_MATRICES = 16384


def check_int(name: str, value: Any, low: int, high: int | None = None, extra: str = "") -> None:
    """Raise a ValueError naming the option, its value and what is allowed unless low <= value <= high."""
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= low
    in_range = in_range and (high is None or value <= high)
    if not in_range:
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}{extra}, got {value!r}")


# The flow registry: every family by its name, in registration order. A family registers itself in its own
# module (``@register("name")``); flowvae.flows imports every module of the package, so adding a family touches
# its module and its ``conf/flow/<name>.yaml`` only.
FLOWS: dict[str, type[Flow]] = {}


def register(name: str, table_rank: int = 1000):
    """Class decorator: make a Flow subclass buildable as ``name``; ``table_rank`` orders the families' columns
    in tables (the seed slides' order; families without a rank follow alphabetically)."""

    def add(cls: type[Flow]) -> type[Flow]:
        if name in FLOWS and FLOWS[name] is not cls:
            raise ValueError(f"flow {name!r} is registered twice ({FLOWS[name].__name__}, {cls.__name__})")
        cls.name, cls.table_rank = name, table_rank
        FLOWS[name] = cls
        return cls

    return add


class Flow(nn.Module, ABC):
    r"""An invertible map :math:`z \mapsto f(z; \lambda)` with per-sample parameters :math:`\lambda`.

    Subclasses set ``num_params`` (the width P of :math:`\lambda`) and implement ``forward``, which maps
    z (B, D) and params (B, P) to (f(z), log|det ∂f/∂z|) with shapes (B, D) and (B,).

    Options of a family are the keyword-only arguments of its constructor; ``check_options`` validates them
    without building anything, so that a stack of zero flows draws no random numbers.
    """

    num_params: int
    #: the family's name in the registry and in configs (set by :func:`register`)
    name: ClassVar[str] = ""
    #: the family's column in tables (set by :func:`register`)
    table_rank: ClassVar[int] = 1000
    #: whether consecutive flows of this family reverse the variable order (the k-th gets reverse=k odd)
    alternates: ClassVar[bool] = False

    @classmethod
    def check_options(cls, dim: int, **options: Any) -> None:
        """Raise ValueError for an option value this family does not allow."""

    @abstractmethod
    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Return (f(z), log|det ∂f/∂z|) for z (B, D) and params (B, num_params)."""

    @classmethod
    def chainable(cls, flows: Sequence[Flow]) -> bool:
        """Whether :meth:`chain` can run ``flows`` together: all of this family, with one dim and one width."""
        return len({(type(flow), flow.dim, flow.num_params) for flow in flows}) == 1 and type(flows[0]) is cls

    @classmethod
    def chain_constants(cls, flows: Sequence[Flow]) -> dict[str, Tensor]:
        """Constants :meth:`chain` needs for ``flows`` (stacked masks, flags); a stack builds them once."""
        return {}

    @classmethod
    def chain(cls, flows: Sequence[Flow], z: Tensor, params: Tensor,
              constants: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Apply ``flows`` in order: z (B, D), params (B, sum of num_params) -> z_K (B, D), summed log-det (B,).

        This default calls each flow in turn; a family overrides it to work on all K flows at once.
        """
        log_det = z.new_zeros(z.shape[0])
        for flow, flow_params in zip(flows, params.split([flow.num_params for flow in flows], dim=1), strict=True):
            z, flow_log_det = flow(z, flow_params)
            log_det = log_det + flow_log_det
        return z, log_det


@register("none", table_rank=0)
class Identity(Flow):
    r"""The identity :math:`f(z) = z`, with :math:`\log|\det| = 0` and no parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_params = 0

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return z, z.new_zeros(z.shape[0])


class FlowStack(nn.Module):
    r"""The composition :math:`f_K \circ \dots \circ f_1` of K amortized flows.

    The encoder emits all flows' parameters at once as params (B, num_params); the stack splits them with
    precomputed widths and returns z_K (B, D) and :math:`\sum_k \log|\det \partial f_k / \partial z_{k-1}|`
    (B,). With no flows it is the identity with num_params == 0 and a zero log-det, and params may be None.
    """

    def __init__(self, dim: int, flows: Sequence[Flow] = ()) -> None:
        super().__init__()
        self.dim = dim
        self.flows = nn.ModuleList(flows)
        self.sizes = [flow.num_params for flow in flows]
        self.num_params = sum(self.sizes)
        family = type(flows[0]) if flows else Flow
        self.family = family if flows and family.chainable(flows) else Flow
        self.constants = _Constants(self.family.chain_constants(flows) if flows else {})

    def __len__(self) -> int:
        return len(self.flows)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_params={self.num_params}"

    def forward(self, z: Tensor, params: Tensor | None = None) -> tuple[Tensor, Tensor]:
        width = 0 if params is None else params.shape[-1]
        if width != self.num_params:
            raise ValueError(f"params must have {self.num_params} columns for this flow stack, got {width}")
        if not self.flows:
            return z, z.new_zeros(z.shape[0])
        return self.family.chain(self.flows, z, params, self.constants.as_dict())


class _Constants(nn.Module):
    """Tensors held as non-persistent buffers: they follow ``.to()`` but stay out of the state dict."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)

    def as_dict(self) -> dict[str, Tensor]:
        return dict(self.named_buffers())


class _TanhChain(torch.autograd.Function):
    """The loop of :func:`tanh_chain`, with a backward that runs it in reverse (no per-flow autograd graph).

    Written for torch.func (forward without ctx, :meth:`setup_context`): what the backward needs comes out of
    forward as extra outputs, empty when no backward will run. Every input is per sample, so under ``vmap`` (a
    stack of models, :mod:`flowvae.training.stacked`) the mapped axis is folded into the batch: one chain for all
    models.
    """

    @staticmethod
    def forward(z: Tensor, a: Tensor, c: Tensor, b: Tensor, q: Tensor | None,
                for_backward: bool) -> tuple[Tensor, ...]:
        z = z.unsqueeze(-1)
        q_k = q.unbind(1) if q is not None else [None] * a.shape[1]
        flow_inputs, inputs, outputs, hidden = [], [], [], []
        for a_k, c_k, b_k, rotation in zip(a.unbind(1), c.unbind(1), b.unsqueeze(-1).unbind(1), q_k, strict=True):
            if rotation is not None:
                flow_inputs.append(z)
                z = rotation.mT @ z  # u = Q^T z
            inputs.append(z)
            h = torch.tanh(torch.baddbmm(b_k, a_k, z))
            z = torch.baddbmm(z, c_k, h)
            hidden.append(h)
            if rotation is not None:
                outputs.append(z)
                z = rotation @ z  # z' = Q (u + C h)
        h = torch.stack(hidden, 1).squeeze(-1)
        saved = [inputs] + ([flow_inputs, outputs] if q is not None else [])
        saved = [torch.stack(tensors, 1).squeeze(-1) if for_backward else h.new_empty(0) for tensors in saved]
        return z.squeeze(-1), h, *saved

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        _, a, c, _, q, for_backward = inputs
        _, h, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zeros made for the saved outputs' (absent) gradients
        if for_backward:  # saved: each flow's input, and with rotations each flow's z and its updated u
            ctx.save_for_backward(a, c, saved[0], h, *([q, *saved[1:]] if q is not None else []))

    @staticmethod
    def vmap(info, in_dims: tuple, z: Tensor, a: Tensor, c: Tensor, b: Tensor, q: Tensor | None,
             for_backward: bool) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """The mapped axis folded into the batch (every input is per sample): one chain for all of it."""

        def fold(tensor: Tensor | None, dim: int | None) -> Tensor | None:
            if tensor is None:
                return None
            tensor = tensor.movedim(dim, 0) if dim is not None else tensor.expand(info.batch_size, *tensor.shape)
            return tensor.flatten(0, 1)

        folded = [fold(tensor, dim) for tensor, dim in zip((z, a, c, b, q), in_dims[:5], strict=True)]
        output = _TanhChain.apply(*folded, for_backward)
        dims = tuple(0 if i < 2 or for_backward else None for i in range(len(output)))  # else empty placeholders
        return tuple(out if dim is None else out.unflatten(0, (info.batch_size, -1))
                     for out, dim in zip(output, dims, strict=True)), dims

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: Tensor | None, grad_h: Tensor | None, *_):
        a, c, inputs, h, *rotated = ctx.saved_tensors
        q, flow_inputs, outputs = rotated if rotated else (None, None, None)
        if grad_z is None:
            grad_z = inputs.new_zeros(inputs.shape[0], inputs.shape[2])
        if grad_h is None:
            grad_h = torch.zeros_like(h)
        g = grad_z.unsqueeze(-1)
        a_k, c_k = a.unbind(1), c.unbind(1)
        q_k = q.unbind(1) if q is not None else None
        grad_h_k = grad_h.unsqueeze(-1).unbind(1)
        slope = (1 - h * h).unsqueeze(-1).unbind(1)  # tanh' at each flow's pre-activation
        n_flows = a.shape[1]
        grad_pre, grad_out = [None] * n_flows, [None] * n_flows
        grad_z_out, grad_u = [None] * n_flows, [None] * n_flows
        for k in reversed(range(n_flows)):
            if q_k is not None:
                grad_z_out[k] = g  # dL/dz_k, for dL/dQ_k = dL/dz_k v_k^T + z_{k-1} (dL/du_k)^T
                g = q_k[k].mT @ g
            grad_out[k] = g  # dL/d(output of the update), for dL/dC_k = g h_k^T
            grad_pre[k] = torch.baddbmm(grad_h_k[k], c_k[k].mT, g) * slope[k]
            g = torch.baddbmm(g, a_k[k].mT, grad_pre[k])
            if q_k is not None:
                grad_u[k] = g
                g = q_k[k] @ g
        pre = torch.stack(grad_pre, 1)  # (B, K, M, 1)
        grad_a = pre * inputs.unsqueeze(-2)
        grad_c = torch.stack(grad_out, 1) * h.unsqueeze(-2)
        grad_q = None
        if q is not None:  # dL/dz_k ⊗ u'_k + z_{k-1} ⊗ dL/du_k, formed (D, D, B, K): the layout a rotation's own
            # backward works in (flowvae.flows.sylvester), returned as its (B, K, D, D) view
            grad_q = (_batch_last(grad_z_out).unsqueeze(1) * _batch_last(outputs).unsqueeze(0)
                      + _batch_last(flow_inputs).unsqueeze(1) * _batch_last(grad_u).unsqueeze(0)).permute(2, 3, 0, 1)
        return g.squeeze(-1), grad_a, grad_c, pre.squeeze(-1), grad_q, None


def _batch_last(vectors: list[Tensor] | Tensor) -> Tensor:
    """Per-flow vectors, K of (B, D, 1) or one (B, K, D), as one contiguous (D, B, K)."""
    if isinstance(vectors, Tensor):
        return vectors.permute(2, 0, 1).contiguous()
    return torch.stack([vector.squeeze(-1).t() for vector in vectors], -1)


def chunks(n_flows: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive groups of flows, each of at most :data:`CHAIN_MATRICES` // batch_size flows."""
    size = max(1, CHAIN_MATRICES // max(1, batch_size))
    return [(start, min(start + size, n_flows)) for start in range(0, n_flows, size)]


def tanh_chain(z: Tensor, a: Tensor, c: Tensor, b: Tensor, q: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""K steps of :math:`z_k = z_{k-1} + C_k h_k`, :math:`h_k = \tanh(A_k z_{k-1} + b_k)`, per sample.

    The update shared by the planar (M = 1) and Sylvester flows. Each family builds its :math:`A_k, C_k,
    b_k` for all K flows at once and computes its log-det from the returned :math:`h_k`, so this loop is
    the only sequential part. Its backward is written out (three small batched products per flow), which
    costs a fraction of K autograd graphs; it is differentiable once.

    With rotations :math:`Q_k` (D, D) each step runs in the frame they give:
    :math:`z_k = Q_k (u_k + C_k h_k)`, :math:`u_k = Q_k^\top z_{k-1}`, :math:`h_k = \tanh(A_k u_k + b_k)`.
    Its Jacobian is :math:`Q_k (I + C_k \mathrm{diag}(h_k') A_k) Q_k^\top`, so its determinant is
    :math:`\det(Q_k)^2 \det(I + \mathrm{diag}(h_k') A_k C_k)` for whatever matrix :math:`Q_k` holds: a
    :math:`Q_k` orthonormal only to rounding moves the log-det by :math:`\log\det(Q_k^\top Q_k)` alone.

    Shapes: z (B, D), a (B, K, M, D), c (B, K, D, M), b (B, K, M), q (B, K, D, D) or None
    -> z_K (B, D), h (B, K, M).
    """
    return _TanhChain.apply(z, a, c, b, q, torch.is_grad_enabled())[:2]
