"""Amortized normalizing flows for the VAE posterior, built by name.

Example::

    stack = build("orthogonal", dim=4, n_flows=3, num_ortho_vecs=2)
    z_k, log_det = stack(z, params)  # z (B, 4), params (B, stack.num_params) -> (B, 4), (B,)
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from flowvae.flows.base import FLOWS, Flow, FlowStack, Identity, check_int
from flowvae.flows.iaf import IAF
from flowvae.flows.planar import Planar
from flowvae.flows.sylvester import HouseholderSylvester, OrthogonalSylvester, TriangularSylvester

# Every module of this package registers its families on import: a new family needs no line here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "FLOWS",
    "IAF",
    "Flow",
    "FlowStack",
    "HouseholderSylvester",
    "Identity",
    "OrthogonalSylvester",
    "Planar",
    "TriangularSylvester",
    "build",
    "names",
    "options",
    "table_order",
]

def names() -> list[str]:
    """Every family's name: ``none``, then the table's order."""
    return ["none", *table_order()]


def table_order() -> list[str]:
    """The families in their tables' column order (the seed slides': planar, iaf, householder, triangular,
    orthogonal; then any other by name), ``none`` left out."""
    return sorted((name for name in FLOWS if name != "none"), key=lambda name: (FLOWS[name].table_rank, name))


def options(name: str) -> dict[str, Any]:
    """Return the options of flow family ``name`` with their defaults (its constructor's keyword-only args)."""
    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; allowed: {', '.join(names())}")
    parameters = inspect.signature(FLOWS[name]).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build(name: str, dim: int, n_flows: int, **flow_options: Any) -> FlowStack:
    """Return a stack of ``n_flows`` flows of family ``name`` acting on ``dim``-dimensional z.

    Options are validated even when n_flows is 0; ``none`` and n_flows == 0 give the identity stack with
    num_params == 0, and building it draws nothing from torch's random generator.
    """
    defaults = options(name)
    unknown = sorted(set(flow_options) - set(defaults))
    if unknown:
        allowed = f"allowed: {', '.join(defaults)}" if defaults else "it takes no options"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for flow {name!r}; {allowed}")
    check_int("dim", dim, 1)
    check_int("n_flows", n_flows, 0)
    family = FLOWS[name]
    family.check_options(dim, **flow_options)
    if family is Identity or n_flows == 0:
        return FlowStack(dim)
    flows = [
        family(dim, **({"reverse": k % 2 == 1} if family.alternates else {}), **flow_options) for k in range(n_flows)
    ]
    return FlowStack(dim, flows)
