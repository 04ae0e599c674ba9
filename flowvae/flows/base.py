"""The flow interface, the stack of K flows the VAE applies to its posterior sample, and the identity flow.

A flow here is *amortized*: besides the sample z it takes per-sample parameters produced by the encoder, so
every flow reads a (B, num_params) slice of one (B, stack.num_params) tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Flow", "FlowStack", "Identity"]


def check_int(name: str, value: Any, low: int, high: int | None = None, extra: str = "") -> None:
    """Raise a ValueError naming the option, its value and what is allowed unless low <= value <= high."""
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= low
    in_range = in_range and (high is None or value <= high)
    if not in_range:
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}{extra}, got {value!r}")


class Flow(nn.Module, ABC):
    r"""An invertible map :math:`z \mapsto f(z; \lambda)` with per-sample parameters :math:`\lambda`.

    Subclasses set ``num_params`` (the width P of :math:`\lambda`) and implement ``forward``, which maps
    z (B, D) and params (B, P) to (f(z), log|det ∂f/∂z|) with shapes (B, D) and (B,).

    Options of a family are the keyword-only arguments of its constructor; ``check_options`` validates them
    without building anything, so that a stack of zero flows draws no random numbers.
    """

    num_params: int
    #: whether consecutive flows of this family reverse the variable order (the k-th gets reverse=k odd)
    alternates: ClassVar[bool] = False

    @classmethod
    def check_options(cls, dim: int, **options: Any) -> None:
        """Raise ValueError for an option value this family does not allow."""

    @abstractmethod
    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Return (f(z), log|det ∂f/∂z|) for z (B, D) and params (B, num_params)."""


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
        log_dets = []
        for flow, flow_params in zip(self.flows, params.split(self.sizes, dim=1), strict=True):
            z, log_det = flow(z, flow_params)
            log_dets.append(log_det)
        return z, torch.stack(log_dets).sum(0)
