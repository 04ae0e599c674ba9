"""``hydra/sweeper=flowvae_optuna`` (conf/hydra/sweeper/flowvae_optuna.yaml, which ``+search=default`` selects):
flowvae's Optuna sweeper, :class:`flowvae.sweeps.optuna_sweeper.OptunaSweeper`, under the name Hydra instantiates it
by."""

from __future__ import annotations

from flowvae.sweeps import optuna_sweeper as sweeper

__all__ = ["OptunaSweeper"]


class OptunaSweeper(sweeper.OptunaSweeper):
    """:class:`flowvae.sweeps.optuna_sweeper.OptunaSweeper` in the ``hydra_plugins`` namespace."""
