"""``flowvae fit-prior RUN_DIR [RUN_DIR ...] [prior.KEY=VALUE ...]``: the two-stage prior for finished runs.

The user's ConVAE+NF second step, for a run that trained with N(0, I): the trained encoder gives one latent code
per training event, a flow is fitted to them by maximum likelihood (:mod:`flowvae.run.two_stage`), and it is
written into the run directory as ``prior.pt``. From then on ``flowvae generate`` and ``flowvae evaluate`` draw z
from it (their rows say ``prior.name=two_stage``), so ``flowvae evaluate RUN_DIR`` scores the run with its new
prior beside the training row. The settings are ``prior=two_stage``'s (conf/prior/two_stage.yaml), or the run's
own when it trained with ``prior=two_stage``, with the overrides on top; the latent gap before and after is
printed, and ``latent.png`` shows each latent dimension's codes against the new prior's samples.
"""

from __future__ import annotations

import sys
from importlib.resources import files

from omegaconf import OmegaConf

from flowvae.commands.run_args import split_run_args
from flowvae.errors import ConfigError

__all__ = ["main", "prior_settings"]

USAGE = """\
usage: flowvae fit-prior RUN_DIR [RUN_DIR ...] [prior.KEY=VALUE ...] [--device auto|cpu|cuda]

Fit a flow prior to a trained run's latent codes (the two-stage prior of ConVAE+NF) and store it in the run
directory: flowvae generate and flowvae evaluate then draw z from it. E.g.
  flowvae fit-prior outputs/runs/<run>
  flowvae fit-prior outputs/runs/<run> prior.family=planar prior.n_layers=40 prior.epochs=200
  flowvae evaluate outputs/runs/<run>            # the run scored with its new prior
Settings (prior.*): family (nsf, maf, planar), n_layers, hidden, bins, epochs, lr, batch_size, val_fraction,
patience. A run's prior.pt is replaced by a new fit.
exit codes: 0 every prior fitted, 1 a run failed, 2 bad arguments, 3 interrupted
"""


def _packaged_two_stage():
    """conf/prior/two_stage.yaml over conf/prior/flow.yaml, as Hydra composes ``prior=two_stage``."""
    folder = files("flowvae.conf").joinpath("prior")
    merged = OmegaConf.create()
    for name in ("flow.yaml", "two_stage.yaml"):
        node = OmegaConf.create(folder.joinpath(name).read_text())
        node.pop("defaults", None)
        merged = OmegaConf.merge(merged, node)
    return merged


def prior_settings(run_prior, overrides: list[str]):
    """The two-stage settings for a run whose ``prior`` node is ``run_prior``, with ``prior.KEY=VALUE``
    overrides; checked as ``flowvae train`` checks them (:class:`ConfigError`)."""
    from flowvae.config import PriorConfig, validate_prior

    base = OmegaConf.merge(OmegaConf.structured(PriorConfig), _packaged_two_stage())
    if run_prior is not None and run_prior.get("name") == "two_stage":
        base = OmegaConf.merge(base, run_prior)
    for item in overrides:
        key, _, value = item.partition("=")
        if not key.startswith("prior.") or key == "prior.name":
            raise ConfigError(key, value, "prior.KEY=VALUE settings of the fit (prior.family, prior.n_layers, "
                                          "prior.epochs, ...): the rest of the run is as it was trained")
        try:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([item]).prior)
        except Exception as err:  # noqa: BLE001 - OmegaConf's validation errors name the key
            raise ConfigError(key, value, str(err).splitlines()[0]) from None
    base.name = "two_stage"
    validate_prior(OmegaConf.create({"prior": base}))
    return base


def fit_run(run_dir: str, overrides: list[str], device: str) -> None:
    """Fit and store the two-stage prior of one run; print the latent gap before and after."""
    from flowvae import progress
    from flowvae.cores import choose_threads
    from flowvae.files import RunFiles
    from flowvae.run.experiment import model_tensors
    from flowvae.run.preflight import configure_torch
    from flowvae.run.rebuild import load_run
    from flowvae.run.two_stage import fit_two_stage, latent_columns, save_prior

    run = load_run(run_dir, device)
    cfg_prior = prior_settings(run.cfg.get("prior"), overrides)
    configure_torch(choose_threads(run.cfg.train.threads, 1))
    with progress.console(), progress.settings(run.cfg.train.progress):
        train_x, _, test_x = model_tensors(run.cfg, run.events, run.feature_map, run.device)
        before = latent_columns(run.model, test_x, run.cfg.seed)
        prior, fit = fit_two_stage(run.model, train_x, cfg_prior, run.cfg.seed)
        run.model.prior = prior
        files = RunFiles(run.root)
        after = latent_columns(run.model, test_x, run.cfg.seed, files.latent, title=f"{run.root.name}, two-stage prior")
        save_prior(files.prior, prior, cfg_prior, fit)
    print(f"{run.root}: {cfg_prior.family} prior ({cfg_prior.n_layers} layers), best epoch {fit.best_epoch}; "
          f"latent_gap {before['latent_gap']:.4f} -> {after['latent_gap']:.4f} (floor "
          f"{after['latent_gap_floor']:.4f}); written to {files.prior}")


def main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE, end="")
        return 0
    from flowvae import stopping
    from flowvae.run.rebuild import RebuildError

    try:
        runs, overrides, device = split_run_args(args)
        prior_settings(None, overrides)  # bad settings refused before any run is loaded
    except ConfigError as err:
        print(f"flowvae fit-prior: {err}", file=sys.stderr)
        return 2
    stopping.install()
    code = 0
    for run_dir in runs:
        try:
            fit_run(run_dir, overrides, device)
        except RebuildError as err:
            print(f"flowvae fit-prior: {err}", file=sys.stderr)
            code = max(code, 2 if len(runs) == 1 else 1)
        except (stopping.Interrupted, KeyboardInterrupt):
            print(f"flowvae fit-prior: interrupted in {run_dir}; its prior.pt is as it was", file=sys.stderr)
            return 3
    return code
