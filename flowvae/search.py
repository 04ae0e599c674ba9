"""An Optuna search's identity (``+search=default``): which study a command continues, and a search space that
cannot work refused before its first trial.

A study is keyed by everything the search does not sample: the run identity of the composed config
(:func:`flowvae.identity.run_settings`) without the searched keys, with the data file named by its contents
(:func:`flowvae.identity.data_label`), flowvae's version, the search space, the metric and the direction. So
the same command continues its study (after a kill, or for more trials: ``hydra.sweeper.n_trials`` is not part of it),
and a command that fixes anything else (``train.epochs=1``, ``data.n_train=2000``, another file) starts its own:
the best trial of a study is then always a trial of the command that reports it, and its rerun line gives its
number. conf/search/default.yaml names the study ``${flowvae.study:}``; this module's resolver computes it in
the launching process, when Hydra builds the sweeper, from the composed config (the command line's overrides in
``hydra.overrides.task``, the space in ``hydra.sweeper.params``). A study named on the command line
(``hydra.sweeper.study_name=...``) is the user's: neither keyed nor checked.

The space is read by the Optuna sweeper's own parser, so it is the one the trials will sample (its ``range(a, b)``
includes b).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flowvae.config import ConfigError
from flowvae.identity import data_label, run_settings

__all__ = ["study_name", "search_space", "check_space", "register_resolver", "RESOLVER"]

RESOLVER = "flowvae.study"
PARAMS_KEY = "hydra.sweeper.params"


def register_resolver() -> None:
    """``${flowvae.study:}``: the study's name (see the module's docstring)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolve)


def _resolve(*, _root_: DictConfig) -> str:
    """The resolver: a search that cannot work is refused in one line, exit 2, before any trial (Hydra would
    print a traceback for an exception raised while it builds the sweeper)."""
    try:
        return study_name(_root_)
    except ConfigError as err:
        print(f"flowvae train: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def study_name(root: DictConfig) -> str:
    """``flowvae_<flow>_K<n_flows>_<data>_<hash>`` for the composed config ``root`` (Hydra's node included);
    the flow, K and data parts are left out when the search samples them. Raises :class:`ConfigError` for a space
    that contradicts the fixed settings (:func:`check_space`)."""
    space, written = search_space(root)
    job = _job_config(root)
    check_space(space, written, job)
    searched = set(space)
    settings = {key: value for key, value in run_settings(job).items() if not _under(key, searched)}
    # the data by its contents, not by how its path is spelled: a file made again under the same name is other data
    launch_dir = Path(OmegaConf.select(root, "hydra.runtime.cwd") or os.getcwd())
    data = data_label(job["data"], launch_dir)
    settings.pop("data.path", None)
    from optuna.distributions import distribution_to_json

    from flowvae import __version__

    # the code's version decides numbers too, as in the results table (flowvae.identity.VERSION_COLUMN)
    key = {"settings": settings, "data": data, "version": __version__,
           "metric": OmegaConf.select(root, "optimize.metric"),
           "space": {name: distribution_to_json(d) for name, d in sorted(space.items())},
           "direction": str(OmegaConf.select(root, "hydra.sweeper.direction"))}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = [("flow", str(settings.get("flow"))), ("n_flows", f"K{settings.get('n_flows')}"), ("data", data)]
    data_keys = {"data", "data.name", "data.path", "data.key"}
    shown = [text for name, text in parts if not (_under(name, searched) or (name == "data" and searched & data_keys))]
    return "_".join(["flowvae", *shown, digest])


def search_space(root: DictConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """(the sampled keys and their Optuna distributions, each key's definition as its source wrote it: ``KEY=TEXT``
    on the command line, ``hydra.sweeper.params.KEY=TEXT`` in the search's config), as the sweeper reads them:
    ``hydra.sweeper.params`` then the command line, a later fixed value taking a key out of the space."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    params = [f"{key}={value}" for key, value in (OmegaConf.select(root, PARAMS_KEY) or {}).items()]
    command_line = list(OmegaConf.select(root, "hydra.overrides.task") or [])
    distributions, fixed = create_params_from_overrides([*params, *command_line])
    written = {_bare(a.partition("=")[0]): f"{PARAMS_KEY}.{a}" for a in params}
    written.update({_bare(a.partition("=")[0]): a for a in command_line})
    space = {_bare(name): d for name, d in distributions.items() if name not in fixed}
    return space, written


def check_space(space: dict[str, Any], written: dict[str, str], job: dict) -> None:
    """Refuse a space whose samples contradict a fixed setting: a KL warm-up (``train.warmup_epochs``) as long as
    training (``train.epochs``) never reaches beta = 1, so such trials would train another objective than the
    runs they are compared with. Checked when either key is sampled, against the worst combination."""
    warmup, epochs = "train.warmup_epochs", "train.epochs"
    if warmup not in space and epochs not in space:
        return
    longest = _bounds(space.get(warmup), job["train"]["warmup_epochs"])[1]
    shortest = _bounds(space.get(epochs), job["train"]["epochs"])[0]
    if longest < shortest:
        return
    sampled = warmup if warmup in space else epochs
    shorter = (f"e.g. train.warmup_epochs='range(0,{int(shortest) - 1})' on the command line (Optuna's range "
               f"includes its end)" if shortest >= 2 else "e.g. train.warmup_epochs=0")
    trained = f"{epochs} from {shortest:g}" if epochs in space else f"{epochs}={shortest:g}"
    key, _, text = written[sampled].partition("=")
    raise ConfigError(key, text,
                      f"a warm-up shorter than training in every trial: {warmup} up to {longest:g} with {trained} "
                      f"never reaches beta = 1; search a shorter warm-up, {shorter}, or train longer")


def _bounds(distribution: Any, fixed: Any) -> tuple[float, float]:
    """The smallest and largest value a key takes: its distribution's, or the fixed value."""
    if distribution is None:
        return float(fixed), float(fixed)
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        return float(min(choices)), float(max(choices))
    return float(distribution.low), float(distribution.high)


def _job_config(root: DictConfig) -> dict:
    """The composed config without Hydra's node, resolved, as plain data (the study's own name is in that node)."""
    return {key: OmegaConf.to_container(root[key], resolve=True) if OmegaConf.is_config(root[key]) else root[key]
            for key in root if key != "hydra"}


def _bare(key: str) -> str:
    """An override's key without its +, ++ or ~ prefix."""
    return key.lstrip("+~")


def _under(key: str, names: set[str]) -> bool:
    """Whether ``key`` is one of ``names`` or lies under one of them (``flow.num_ortho_vecs`` under ``flow``)."""
    return any(key == name or key.startswith(f"{name}.") for name in names)
