"""The command line of the commands that work on finished runs (``evaluate``, ``fit-prior``):
``RUN_DIR [RUN_DIR ...] [KEY=VALUE ...] [--device D]``."""

from __future__ import annotations

from pathlib import Path

from flowvae.errors import ConfigError

__all__ = ["split_run_args"]


def split_run_args(args: list[str]) -> tuple[list[str], list[str], str]:
    """(run directories, overrides ``KEY=VALUE`` with any leading ``+`` dropped, device). A word with ``=`` that is
    an existing path is a run directory. Raises :class:`ConfigError` when no run directory is given."""
    runs, overrides, device = [], [], "auto"
    items = iter(args)
    for item in items:
        if item == "--device":
            device = next(items, "")
        elif item.startswith("--device="):
            device = item.partition("=")[2]
        elif "=" in item and not Path(item).exists():
            overrides.append(item.lstrip("+"))
        else:
            runs.append(item)
    if not runs:
        raise ConfigError("RUN_DIR", "", "at least one run directory of `flowvae train`")
    return runs, overrides, device
