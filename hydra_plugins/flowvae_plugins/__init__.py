"""flowvae's Hydra plugins: Hydra instantiates a launcher or sweeper only from a class defined in the
``hydra_plugins`` namespace. Each module imports nothing heavy (Hydra imports them all when it scans for
plugins); the work is done by the flowvae package.

Hydra finds plugins by listing the folders of ``hydra_plugins``, which an editable install (``pip install -e``)
does not show it, so flowvae's CLI registers them itself (:func:`register`) before Hydra starts."""

from __future__ import annotations

import importlib

# module: class, of every plugin here
PLUGINS = {"stacked_launcher": "StackedLauncher", "optuna_sweeper": "OptunaSweeper"}


def register() -> None:
    """Make every plugin here known to Hydra, however flowvae was installed."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()
    for module, name in PLUGINS.items():
        plugins.register(getattr(importlib.import_module(f"{__name__}.{module}"), name))
