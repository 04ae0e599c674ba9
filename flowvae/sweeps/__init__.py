"""Hydra's plugins and callbacks: flowvae's Optuna sweeper, the stacked launcher and the group of seeds it trains
as one model, and the sweep summary. Hydra instantiates them from ``hydra_plugins.flowvae_plugins``."""
