"""``hydra/sweeper=flowvae_optuna`` (conf/hydra/sweeper/flowvae_optuna.yaml, which ``+search=default`` selects):
flowvae's Optuna sweeper, :class:`flowvae.sweeper.OptunaSweeper`, under the name Hydra instantiates it by."""

from __future__ import annotations

from flowvae import sweeper

__all__ = ["OptunaSweeper"]


class OptunaSweeper(sweeper.OptunaSweeper):
    """:class:`flowvae.sweeper.OptunaSweeper` in the ``hydra_plugins`` namespace."""
