"""An Optuna search's space and identity (``+search=default``): the override grammar read into Optuna's
distributions, which study a command continues, and a search space that cannot work refused before its first trial.

The space is written in Hydra's override grammar, in ``hydra.sweeper.params`` or on the command line:
``choice(a, b, ...)`` is a categorical, ``range(a, b[, step])`` an integer (or stepped float) range that includes
b, ``interval(a, b)`` a float interval, ``tag(log, interval(a, b))`` (or ``tag(log, range(a, b))``) its log-uniform
form; any other value fixes the key. :func:`parse_space` is the one reader of that grammar: the sweeper samples
from what it returns and the study's identity hashes it.

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

The default space's KL warm-up is ``range(0, ${flowvae.longest_warmup:5})``: up to 5 epochs, fewer when training
is shorter (:func:`longest_warmup`: at most the shortest training's epochs less one, so that every trial's beta
reaches 1), so ``+search=default train.epochs=3`` searches warm-ups of 0 to 2 epochs. A warm-up range written on
the command line is taken as written, and refused when it can outlast training (:func:`check_space`).

Nothing is made before a refusal: ``${flowvae.search_check:}`` (a parameter of the sweeper's callback,
:class:`flowvae.sweeps.optuna_sweeper.SearchCheck`) makes every check the sweeper makes before its first trial, study
name
included, while Hydra instantiates its callbacks, before any of them makes the sweep folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from flowvae.errors import ConfigError
from flowvae.identity import data_label, run_settings

__all__ = ["study_name", "search_space", "parse_space", "sweeper_params", "check_space", "longest_warmup", "bounds",
           "refuse", "RESOLVER", "CHECK_RESOLVER", "WARMUP_RESOLVER"]

RESOLVER = "flowvae.study"
CHECK_RESOLVER = "flowvae.search_check"
WARMUP_RESOLVER = "flowvae.longest_warmup"
PARAMS_KEY = "hydra.sweeper.params"
WARMUP, EPOCHS = "train.warmup_epochs", "train.epochs"


def longest_warmup(most: int, root: DictConfig) -> int:
    """The longest KL warm-up a search of ``root`` (the composed config, Hydra's node included) can sample: ``most``
    epochs, or fewer when the shortest training is shorter: its epochs less one (a warm-up of w epochs reaches
    beta = 1 after epoch w), at least 0. The shortest training is ``train.epochs`` or, when the search samples it
    (on the command line or in ``hydra.sweeper.params``), its smallest value."""
    epochs = OmegaConf.select(root, EPOCHS)
    if epochs is None:  # a config without the job's part (flowvae train --cfg hydra)
        return int(most)
    params = OmegaConf.select(root, PARAMS_KEY) or {}
    # its own key's value is this function's: only train.epochs is resolved
    sampled = [f"{EPOCHS}={params[key]}" for key in list(params.keys()) if _bare(str(key)) == EPOCHS]
    sampled += [a for a in OmegaConf.select(root, "hydra.overrides.task") or [] if _bare(a.partition("=")[0]) == EPOCHS]
    try:
        space, _ = parse_space(sampled)
    except ConfigError:  # the search refuses it itself, naming it
        space = {}
    shortest = bounds(next(iter(space.values()), None), epochs)[0]
    return max(0, min(int(most), int(shortest) - 1))


def refuse(err: ConfigError) -> NoReturn:
    """Refuse a search in one line, exit 2 (Hydra would print a traceback for an exception raised while it
    builds or runs the sweeper)."""
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
    """(the sampled keys, bare, and their Optuna distributions; each key's definition as its source wrote it:
    ``KEY=TEXT`` on the command line, ``hydra.sweeper.params.KEY=TEXT`` in the search's config), as the sweeper
    reads them (:func:`parse_space`): ``hydra.sweeper.params`` then the command line, a later value of a key
    replacing an earlier one."""
    params = sweeper_params(root)
    command_line = list(OmegaConf.select(root, "hydra.overrides.task") or [])
    space, _ = parse_space([*params, *command_line], sources=[f"{PARAMS_KEY}.{a}" for a in params] + command_line)
    written = {_bare(a.partition("=")[0]): f"{PARAMS_KEY}.{a}" for a in params}
    written.update({_bare(a.partition("=")[0]): a for a in command_line})
    return {_bare(name): d for name, d in space.items()}, written


def sweeper_params(root: DictConfig) -> list[str]:
    """``hydra.sweeper.params`` of the composed config as overrides, ``KEY=TEXT``."""
    return [f"{key}={value}" for key, value in (OmegaConf.select(root, PARAMS_KEY) or {}).items()]


def parse_space(arguments: list[str], sources: list[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Overrides in Hydra's grammar as (each sampled key, as written with any ``+`` prefix, and its Optuna
    distribution; each fixed key and its override as written), in their order, a later override of a key (with
    or without a prefix) replacing an earlier one. ``range(a, b)`` includes b, as Optuna's integer distributions
    do. Raises :class:`ConfigError` naming ``sources[i]`` (the
    argument as its source wrote it; default the argument) for what a sampler cannot sample."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    chosen: dict[str, tuple[str, Any]] = {}  # bare key -> (key as written, distribution or the override's text)
    for i, argument in enumerate(arguments):
        source = sources[i] if sources else argument
        try:
            override = parser.parse_override(argument)
        except HydraException as err:
            key, _, text = source.partition("=")
            raise ConfigError(key, text, f"an override in Hydra's grammar ({err})") from None
        key = override.get_key_element()
        chosen.pop(_bare(key), None)
        chosen[_bare(key)] = (key, _distribution(override, source) if override.is_sweep_override() else argument)
    space = {key: value for key, value in chosen.values() if not isinstance(value, str)}
    fixed = {key: value for key, value in chosen.values() if isinstance(value, str)}
    return space, fixed


def _distribution(override: Any, source: str) -> Any:
    """The Optuna distribution of a sweep override (choice, range or interval, maybe tagged log)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, _, text = source.partition("=")
    sweep = override.value()
    if not isinstance(sweep, (ChoiceSweep, RangeSweep, IntervalSweep)):
        raise ConfigError(key, text, "choice(a, b, ...), range(a, b), interval(a, b) or tag(log, interval(a, b))")
    log = "log" in sweep.tags
    if getattr(sweep, "shuffle", False):
        raise ConfigError(key, text, "a choice(...), range(...) or interval(...) to sample from: shuffle() orders "
                                     "a grid, which a search does not walk")
    try:
        if isinstance(sweep, ChoiceSweep):
            if log:
                raise ValueError("tag(log, ...) belongs to an interval(a, b) or a range(a, b), not to a choice")
            # numbers and booleans as themselves, anything else as its override text (a string with a comma or a
            # space escaped, a list in brackets), which goes back into the trial's override as it is
            return CategoricalDistribution([x if isinstance(x, (int, float)) else Transformer.str(x)
                                            for x in override.sweep_iterator()])
        if isinstance(sweep, RangeSweep):
            if any(isinstance(v, float) for v in (sweep.start, sweep.stop, sweep.step)):
                return FloatDistribution(sweep.start, sweep.stop, step=sweep.step, log=log)
            return IntDistribution(int(sweep.start), int(sweep.stop), step=int(sweep.step), log=log)
        return FloatDistribution(sweep.start, sweep.end, log=log)
    except ValueError as err:  # Optuna's own checks: low > high, log of a bound <= 0, log with a step
        raise ConfigError(key, text, f"a distribution Optuna can sample ({err})") from None


def check_space(space: dict[str, Any], written: dict[str, str], job: dict) -> None:
    """Refuse a space whose samples contradict a fixed setting: a KL warm-up (``train.warmup_epochs``) as long as
    training (``train.epochs``) never reaches beta = 1, so such trials would train another objective than the
    runs they are compared with. Checked when either key is sampled, against the worst combination. (The default
    space's warm-up is shortened to what training allows instead: :func:`longest_warmup`.)"""
    warmup, epochs = WARMUP, EPOCHS
    if warmup not in space and epochs not in space:
        return
    longest = bounds(space.get(warmup), job["train"]["warmup_epochs"])[1]
    shortest = bounds(space.get(epochs), job["train"]["epochs"])[0]
    if longest < shortest:
        return
    sampled = warmup if warmup in space else epochs
    shorter = (f"e.g. train.warmup_epochs='range(0,{int(shortest) - 1})' on the command line (a search's range "
               f"includes its end)" if shortest >= 2 else "e.g. train.warmup_epochs=0")
    trained = f"{epochs} from {shortest:g}" if epochs in space else f"{epochs}={shortest:g}"
    key, _, text = written[sampled].partition("=")
    raise ConfigError(key, text,
                      f"a warm-up shorter than training in every trial: {warmup} up to {longest:g} with {trained} "
                      f"never reaches beta = 1; search a shorter warm-up, {shorter}, or train longer")


def bounds(distribution: Any, fixed: Any) -> tuple[float, float]:
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
