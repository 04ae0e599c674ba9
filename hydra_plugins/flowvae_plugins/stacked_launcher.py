"""``hydra/launcher=stacked`` (conf/hydra/launcher/stacked.yaml): flowvae's launcher that trains a sweep's seeds
as one model, :class:`flowvae.sweeps.stacked_launcher.StackedLauncher`, under the name Hydra instantiates it by."""

from __future__ import annotations

from flowvae.sweeps import stacked_launcher

__all__ = ["StackedLauncher"]


class StackedLauncher(stacked_launcher.StackedLauncher):
    """:class:`flowvae.sweeps.stacked_launcher.StackedLauncher` in the ``hydra_plugins`` namespace."""
