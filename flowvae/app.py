"""Hydra's wiring of flowvae: the top-level schema and every ``${flowvae.*}`` resolver the configs use.

The resolvers of a search (its study's name, its checks before anything is made, the default space's longest
warm-up) are registered here, at the top, because they call both the search's space (:mod:`flowvae.search.space`)
and the sweeper's checks (:mod:`flowvae.sweeps.optuna_sweeper`).
"""

from __future__ import annotations

import secrets
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from flowvae.config import Config, model_part
from flowvae.errors import ConfigError
from flowvae.search.space import CHECK_RESOLVER, RESOLVER, WARMUP_RESOLVER, longest_warmup, refuse, study_name

__all__ = ["register_configs"]


def register_configs() -> None:
    """Register the top-level schema (``conf/config.yaml`` names it first in its defaults list), the
    ``${flowvae.uid:}`` resolver that makes run directories unique, ``${flowvae.model:${model.name}}`` that names
    a model other than the default in them, and ``${flowvae.study:}``, a search's study
    (:mod:`flowvae.search.space`)."""
    ConfigStore.instance().store(name="flowvae_schema", node=Config)
    if not OmegaConf.has_resolver("flowvae.uid"):
        # Cached per config, and Hydra copies the cache into each job of a sweep: one value per run or sweep.
        OmegaConf.register_new_resolver("flowvae.uid", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("flowvae.model"):
        OmegaConf.register_new_resolver("flowvae.model", model_part)
    _register_search_resolvers()


def _register_search_resolvers() -> None:
    """``${flowvae.study:}``: the study's name; ``${flowvae.search_check:}``: a search refused before anything is
    made; ``${flowvae.longest_warmup:N}``: the default space's longest warm-up (see the module's docstring)."""
    for name, resolver in ((RESOLVER, _resolve), (CHECK_RESOLVER, _check_search),
                           (WARMUP_RESOLVER, _longest_warmup)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def _resolve(*, _root_: DictConfig) -> str:
    """The resolver: a search that cannot work is refused before any trial."""
    try:
        return study_name(_root_)
    except ConfigError as err:
        refuse(err)


def _check_search(*, _root_: DictConfig) -> bool:
    """The resolver: in the process that launches a search (multirun), every check of
    :func:`flowvae.sweeps.optuna_sweeper.check_search`, a refusal in one line; nothing in a single run. True once
    checked."""
    from hydra.types import RunMode

    if OmegaConf.select(_root_, "hydra.mode") != RunMode.MULTIRUN:
        return False
    from flowvae.sweeps.optuna_sweeper import check_search  # the sweeper's checks: only when a search is launched

    try:
        check_search(_root_)
    except ConfigError as err:
        refuse(err)
    return True


def _longest_warmup(most: Any, *, _root_: DictConfig) -> int:
    """The resolver: :func:`longest_warmup` of the composed config."""
    return longest_warmup(int(most), _root_)
