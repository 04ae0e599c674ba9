"""The typed configuration schema and the one place its values are checked.

Hydra checks types and key names against these dataclasses while it composes the config (``n_flows=abc`` or a
typo'd key is refused before the run starts). Values that are well-typed but wrong (``n_flows=-1``,
``data.sigma=0``) are checked by :func:`validate`, which every run calls before it does any work.
Defaults live in ``conf/*.yaml``; the schema only fixes the types.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict  # noqa: UP035 - OmegaConf reads typing.Dict, not dict[...]

from omegaconf import MISSING, DictConfig, OmegaConf

from flowvae.data.events import LAYOUTS, event_axes, per_feature
from flowvae.data.transforms import TRANSFORMS
from flowvae.errors import ConfigError

__all__ = ["Config", "with_schema_defaults", "validate", "validate_prior", "LIKELIHOODS"]

DATA_NAMES = ("gaussian", "npy", "jets")
LIKELIHOODS = ("mse", "gaussian")
DECODES = ("mean", "sample")
SOURCES = ("prior", "posterior")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("constant", "cosine")
LOGGERS = ("none", "mlflow")


@dataclass
class DataConfig:
    """Where events come from. Each ``conf/data/<name>.yaml`` sets the fields of its kind."""

    name: str = MISSING
    seed: int = 0
    # gaussian / jets: drawn on the fly
    mu: Any = None  # a number, or one per feature
    sigma: Any = None  # a number, or one per feature
    n_features: int | None = None
    n_particles: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    # jets: each event draws its own offset per feature and one scale (the event-level latent)
    offset_sigma: Any = None
    scale_sigma: float | None = None
    # npy: the users' own array of shape (N, features, particles), or (N, particles, features)
    path: str | None = None
    key: str | None = None
    test_fraction: float | None = None
    min_events: int | None = None
    layout: str = "features_first"
    mask_feature: int | None = None  # index on the file's feature axis of the 0/1 particle mask
    # any kind; indices on the file's feature axis
    jet_kinematics: list[int] | None = None  # [i_eta, i_phi, i_pt]: jet mass, w1m, jet-level FPD/KPD
    feature_names: list[str] | None = None
    transforms: list[str] | None = None  # one per feature: none, log, logit, fraction (then standardize, if set)
    standardize: bool = False


@dataclass
class ModelConfig:
    name: str = "default"  # the architecture (flowvae.models.MODELS), the model= group's option
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    latent_dim: int = 8
    likelihood: str = "gaussian"
    sigma_x: float | None = None
    coupling_layers: int = 0  # conditional_flow: coupling layers of p(x|z)
    coupling_hidden: list[int] | None = None  # conditional_flow: conditioner widths (null: model.hidden)
    coupling_transform: str = "spline"  # conditional_flow: how a layer moves a value (affine, spline)
    coupling_bins: int = 8  # conditional_flow, spline: bins per spline


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 100
    lr: float = 1e-3
    warmup_epochs: int = 0
    grad_clip: float | None = None
    checkpoint_every: int = 1
    eval_every: int = 1
    device: str = "auto"
    threads: int = 0
    progress: str = "auto"
    val_fraction: float = 0.0  # share of the training events held out for validation (0: none)
    patience: int | None = None  # epochs without a better validation loss before training stops early
    lr_schedule: str = "constant"  # constant, cosine (per step, from lr to lr * lr_min_factor over the epochs)
    lr_min_factor: float = 0.0
    ema: float = 0.0  # decay of the weights' moving average (0: none), updated every step; it is what is scored
    select_by: str = "val_loss"  # what picks the best epoch: val_loss, or a per-feature distance (kl_sum, w1_0, ...)


@dataclass
class EvalConfig:
    n_samples: int = 10000
    decode: str = "sample"
    source: str = "prior"
    bins: int = 100
    eps: float = 1e-10
    protocol: str = "scaled"


@dataclass
class PriorConfig:
    """p(z) (``conf/prior/<name>.yaml``, :mod:`flowvae.models.priors`): ``standard`` N(0, I), ``flow`` learned with
    the ELBO, ``two_stage`` fitted to the training events' latent codes after training."""

    name: str = "standard"
    family: str | None = None  # flow, two_stage: planar, nsf, maf
    n_layers: int | None = None
    hidden: list[int] | None = None
    bins: int | None = None
    epochs: int | None = None  # two_stage: the fit's epochs, learning rate, batch, validation share, patience
    lr: float | None = None
    batch_size: int | None = None
    val_fraction: float | None = None
    patience: int | None = None


@dataclass
class OptimizeConfig:
    """What a search (``+search=default``, :mod:`flowvae.sweeps.optuna_sweeper`) optimizes: a metric column of the
    run's row."""

    metric: str = "kl_sum"


@dataclass
class LoggerConfig:
    """Where runs are tracked besides their directory and the results table (``conf/logger/<name>.yaml``)."""

    name: str = "none"
    tracking_uri: str | None = None
    experiment_name: str | None = None


@dataclass
class Config:
    # One family's ``name`` and its own options, as ``conf/flow/<name>.yaml`` sets them; the flow registry
    # (flowvae.flows) is the one list of families and options, and validate() checks against it.
    flow: Dict[str, Any] = MISSING  # noqa: UP006
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = MISSING
    prior: PriorConfig = field(default_factory=PriorConfig)
    n_flows: int = 0
    seed: int = 0
    results_csv: str = "outputs/results.csv"
    skip_existing: bool = False
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def model_part(name: str) -> str:
    """The model's part of a run directory's name: nothing for the default model (the names runs always had),
    ``<name>_`` before the flow for another (``..._conditional_flow_none_K0_s0``)."""
    return "" if name in ("default", "", None) else f"{name}_"


def with_schema_defaults(written: DictConfig) -> DictConfig:
    """A run's config as written (``.hydra/config.yaml``) merged onto the schema: keys added since it ran get
    their defaults, so runs of older versions can be rebuilt and read."""
    return OmegaConf.merge(OmegaConf.structured(Config), written)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    _require(isinstance(value, int) and value >= minimum, key, value, f"an integer >= {minimum}")


def validate(cfg: DictConfig) -> None:
    """Check every value a user can set; raise :class:`ConfigError` on the first that is wrong."""
    _positive_int(cfg, "n_flows", minimum=0)
    _validate_model(cfg)
    _validate_flow(cfg)
    _validate_train(cfg)
    _validate_eval(cfg)
    _validate_data(cfg)
    _validate_logger(cfg)
    validate_prior(cfg)


def validate_prior(cfg: DictConfig) -> None:
    """The prior's name and, for a flow prior, its family and sizes; a two-stage fit's settings."""
    from flowvae.models.priors import FAMILIES, PRIORS

    prior = cfg.get("prior") or {"name": "standard"}
    name = prior.get("name")
    _require(name in PRIORS, "prior", name, f"one of {', '.join(PRIORS)}")
    if name == "standard":
        return
    _require(prior.get("family") in FAMILIES, "prior.family", prior.get("family"), f"one of {', '.join(FAMILIES)}")
    _positive_int(cfg, "prior.n_layers")
    if prior.family != "planar":
        hidden = prior.get("hidden")
        _require(hidden is not None and len(hidden) > 0 and all(isinstance(h, int) and h > 0 for h in hidden),
                 "prior.hidden", hidden, "a list of positive layer widths, e.g. [64, 64]")
    if prior.family == "nsf":
        _positive_int(cfg, "prior.bins", minimum=2)
    if name == "two_stage":
        for key in ("epochs", "batch_size"):
            _positive_int(cfg, f"prior.{key}")
        _require(isinstance(prior.lr, float) and prior.lr > 0, "prior.lr", prior.lr, "a number > 0")
        fraction = prior.val_fraction
        _require(isinstance(fraction, float) and 0 < fraction < 1, "prior.val_fraction", fraction,
                 "a number in (0, 1): the share of the codes that chooses the best epoch")
        _require(prior.patience is None or (isinstance(prior.patience, int) and prior.patience >= 1),
                 "prior.patience", prior.patience, "an integer >= 1, or null: every epoch")


def _validate_flow(cfg: DictConfig) -> None:
    """The family and its options against the flow registry (which imports torch: a run needs it anyway)."""
    from flowvae import flows

    name = cfg.flow.get("name")
    _require(name in flows.FLOWS, "flow", name, f"one of {', '.join(flows.names())}")
    allowed = flows.options(name)
    for key, value in cfg.flow.items():
        if key == "name":
            continue
        _require(key in allowed, f"flow.{key}", value,
                 f"an option of flow {name}: {', '.join(allowed)}" if allowed else f"flow {name} takes no options")
        if value is not None:
            try:
                flows.FLOWS[name].check_options(cfg.model.latent_dim, **{key: value})
            except (TypeError, ValueError) as err:
                raise ConfigError(f"flow.{key}", value, f"{err} (dim is model.latent_dim)") from None


def _validate_model(cfg: DictConfig) -> None:
    from flowvae.models import MODELS

    m = cfg.model
    _require(m.name in MODELS, "model.name", m.name, f"one of {', '.join(MODELS)} (choose it with model=NAME)")
    if m.name == "conditional_flow":
        _positive_int(cfg, "model.coupling_layers")
    else:
        _require(m.coupling_layers == 0, "model.coupling_layers", m.coupling_layers,
                 f"0 for model={m.name} (coupling layers belong to model=conditional_flow)")
    from flowvae.models.conditional_flow import TRANSFORMS as COUPLING_TRANSFORMS

    _require(m.coupling_transform in COUPLING_TRANSFORMS, "model.coupling_transform", m.coupling_transform,
             f"one of {', '.join(COUPLING_TRANSFORMS)}")
    _positive_int(cfg, "model.coupling_bins", 2)
    if m.coupling_hidden is not None:
        _require(len(m.coupling_hidden) >= 1 and all(h >= 1 for h in m.coupling_hidden), "model.coupling_hidden",
                 list(m.coupling_hidden), "a non-empty list of layer widths >= 1, or null for model.hidden")
    _positive_int(cfg, "model.latent_dim")
    hidden = list(cfg.model.hidden)
    _require(len(hidden) >= 1 and all(h >= 1 for h in hidden), "model.hidden", hidden,
             "a non-empty list of layer widths >= 1, e.g. [256,256]")
    _require(cfg.model.likelihood in LIKELIHOODS, "model.likelihood", cfg.model.likelihood,
             f"one of {', '.join(LIKELIHOODS)}")
    sigma_x = cfg.model.sigma_x
    if sigma_x is not None:
        _require(cfg.model.likelihood == "gaussian", "model.sigma_x", sigma_x,
                 "null with model.likelihood=mse (a fixed noise belongs to model.likelihood=gaussian)")
        _require(math.isfinite(sigma_x) and sigma_x > 0, "model.sigma_x", sigma_x,
                 "a number > 0, or null for a learned variance")


def _validate_train(cfg: DictConfig) -> None:
    t = cfg.train
    _positive_int(cfg, "train.epochs")
    _positive_int(cfg, "train.batch_size")
    _positive_int(cfg, "train.warmup_epochs", minimum=0)
    _positive_int(cfg, "train.checkpoint_every")
    _positive_int(cfg, "train.eval_every")
    _positive_int(cfg, "train.threads", minimum=0)
    _require(math.isfinite(t.lr) and t.lr > 0, "train.lr", t.lr, "a number > 0")
    _require(t.grad_clip is None or (math.isfinite(t.grad_clip) and t.grad_clip > 0), "train.grad_clip",
             t.grad_clip, "a number > 0, or null for no clipping")
    _require(t.device in DEVICES, "train.device", t.device, f"one of {', '.join(DEVICES)}")
    _require(t.progress in ("auto", "bar", "log"), "train.progress", t.progress, "one of auto, bar, log")
    _require(math.isfinite(t.val_fraction) and 0 <= t.val_fraction < 1, "train.val_fraction", t.val_fraction,
             "a number in [0, 1): the share of the training events held out for validation, e.g. 0.1 (0: none)")
    if t.patience is not None:
        _positive_int(cfg, "train.patience")
        _require(t.val_fraction > 0, "train.patience", t.patience,
                 "null unless train.val_fraction > 0: early stopping watches the validation loss (set e.g. "
                 "train.val_fraction=0.1, or train.patience=null)")
    _require(t.lr_schedule in LR_SCHEDULES, "train.lr_schedule", t.lr_schedule, f"one of {', '.join(LR_SCHEDULES)}")
    _require(math.isfinite(t.lr_min_factor) and 0 <= t.lr_min_factor <= 1, "train.lr_min_factor", t.lr_min_factor,
             "a number in [0, 1]: the cosine schedule's last learning rate as a share of train.lr")
    _require(math.isfinite(t.ema) and 0 <= t.ema < 1, "train.ema", t.ema,
             "a number in [0, 1): the decay of the weights' moving average, updated after every step, e.g. 0.999 "
             "(0: none)")
    # the per-feature distances a run computes after every epoch on the validation events (as a search's
    # report=objective: flowvae.search.pruning.OBJECTIVES); the jet-level metrics need a finished run's scoring
    selected = re.fullmatch(r"(kl|w1|js)_(sum|\d+)", str(t.select_by))
    _require(t.select_by == "val_loss" or selected is not None, "train.select_by", t.select_by,
             "val_loss, or a per-feature distance of events generated after each epoch against the validation "
             "events: kl_sum, w1_sum, js_sum, kl_<i>, w1_<i>, js_<i> (lower is better)")
    if selected is not None:
        _require(t.val_fraction > 0, "train.select_by", t.select_by,
                 "val_loss unless train.val_fraction > 0: the metric is computed on the validation events (set e.g. "
                 "train.val_fraction=0.1, or train.select_by=val_loss)")
        n_features = cfg.data.get("n_features") if cfg.data.get("name") in ("gaussian", "jets") else None
        if isinstance(n_features, int) and n_features >= 1 and selected.group(2) != "sum":
            _require(int(selected.group(2)) < n_features, "train.select_by", t.select_by,
                     f"a feature of these events (0 to {n_features - 1}), or a sum")


def _validate_eval(cfg: DictConfig) -> None:
    e = cfg.eval
    _positive_int(cfg, "eval.n_samples")
    _positive_int(cfg, "eval.bins")
    _require(e.decode in DECODES, "eval.decode", e.decode, f"one of {', '.join(DECODES)}")
    _require(e.source in SOURCES, "eval.source", e.source, f"one of {', '.join(SOURCES)}")
    _require(math.isfinite(e.eps) and e.eps > 0, "eval.eps", e.eps, "a small number > 0, e.g. 1e-10")
    from flowvae.metrics.protocol import PROTOCOLS  # numpy and scipy: only when a config is checked

    _require(e.protocol in PROTOCOLS, "eval.protocol", e.protocol, f"one of {', '.join(PROTOCOLS)}")


def _validate_logger(cfg: DictConfig) -> None:
    logger = cfg.logger
    _require(logger.name in LOGGERS, "logger", logger.name, f"one of {', '.join(LOGGERS)}")
    if logger.name == "mlflow":
        _require(bool(logger.tracking_uri), "logger.tracking_uri", logger.tracking_uri,
                 "an MLflow tracking URI, e.g. sqlite:///outputs/mlflow.db or http://host:5000")
        _require(logger.experiment_name is None or bool(logger.experiment_name), "logger.experiment_name",
                 logger.experiment_name, "the name of the MLflow experiment, e.g. flowvae_jets, or null: named "
                                         "after the data")


def _validate_data(cfg: DictConfig) -> None:
    d = cfg.data
    _require(d.name in DATA_NAMES, "data", d.name, f"one of {', '.join(DATA_NAMES)}")
    if d.name in ("gaussian", "jets"):
        for key in ("n_features", "n_particles", "n_train", "n_test"):
            _positive_int(cfg, f"data.{key}", minimum=2 if key.startswith("n_t") else 1)
        mus = per_feature(d.mu, d.n_features, "data.mu")
        _require(all(math.isfinite(m) for m in mus), "data.mu", d.mu, "finite numbers (one, or one per feature)")
        sigmas = per_feature(d.sigma, d.n_features, "data.sigma")
        _require(all(math.isfinite(s) and s > 0 for s in sigmas), "data.sigma", d.sigma,
                 "every sigma > 0 (one number, or one per feature)")
    if d.name == "jets":
        offsets = per_feature(d.offset_sigma, d.n_features, "data.offset_sigma")
        _require(all(math.isfinite(s) and s >= 0 for s in offsets), "data.offset_sigma", d.offset_sigma,
                 "every value >= 0 (one number, or one per feature)")
        _require(d.scale_sigma is not None and math.isfinite(d.scale_sigma) and d.scale_sigma >= 0,
                 "data.scale_sigma", d.scale_sigma, "a number >= 0 (the std of each event's log-scale)")
    if d.name == "npy":
        shape = f"(N, {event_axes(d.layout)})"  # data.layout's: JetNet's files are (N, particles, features)
        _require(bool(d.path), "data.path", d.path, f"the path of a .npz file whose array {d.key} is {shape}"
                 if d.key else f"the path of a .npy or .npz array {shape}")
        tf = d.test_fraction
        _require(tf is not None and 0 < tf < 1, "data.test_fraction", tf, "a number between 0 and 1")
        _require(d.key is None or bool(d.key), "data.key", d.key, "the name of an array in the .npz, or null")
        _positive_int(cfg, "data.min_events", minimum=4)  # 2 events on each side of the split at least
    if d.feature_names is not None and d.name != "npy":
        _require(len(d.feature_names) == d.n_features, "data.feature_names", d.feature_names,
                 f"one name per feature ({d.n_features})")
    _require(d.layout in LAYOUTS, "data.layout", d.layout, f"one of {', '.join(LAYOUTS)}")
    _require(d.layout == "features_first" or d.name == "npy", "data.layout", d.layout,
             "features_first for drawn data (particles_first describes a file: data=npy)")
    mask = d.mask_feature
    _require(mask is None or (d.name == "npy" and mask >= 0), "data.mask_feature", mask,
             "null, or (data=npy) the index of the 0/1 mask on the file's feature axis, e.g. 3")
    kinematics = d.jet_kinematics
    if kinematics is not None:
        kinematics = list(kinematics)
        _require(len(kinematics) == 3 and len(set(kinematics)) == 3 and min(kinematics) >= 0
                 and mask not in kinematics, "data.jet_kinematics", kinematics,
                 "null, or three different feature indices [i_eta, i_phi, i_pt] (not the mask's)")
    if d.transforms is not None:
        _require(all(t in TRANSFORMS for t in d.transforms), "data.transforms", d.transforms,
                 f"one per feature, each one of {', '.join(TRANSFORMS)}, e.g. [none,none,log]")
        if d.name != "npy":
            _require(len(d.transforms) == d.n_features, "data.transforms", d.transforms,
                     f"one per feature ({d.n_features})")
