"""``flowvae evaluate RUN_DIR [RUN_DIR ...] [eval.KEY=VALUE ...]``: score trained runs again, without training.

Comparing prior against posterior generation, a sampled against a mean read-out, more events or other bins needs
no new training: the model is rebuilt from the run directory (:func:`flowvae.run.rebuild.load_run`), generates
with the new ``eval.*`` settings, is scored exactly as a run scores itself, and one row is appended to the run's
results table (and to ``evaluations.csv`` in the run directory). The row's identity is the training identity plus
the evaluation settings (:mod:`flowvae.identity`): its ``train_hash`` is the training run's, its ``config_hash``
says which evaluation it is, so ``skip_existing=true`` skips evaluations already in the table. With the run's own
``eval.*`` values the row's metrics equal the training row's to the bit (same device, torch build and threads).

Only ``eval.*``, ``results_csv``, ``skip_existing`` and the tracker (``logger=mlflow``, ``logger.*``) may be set:
anything else would change what was trained. A run trained with ``logger=mlflow`` has its evaluations tracked too,
each an MLflow run of its own tagged with the trained run's (``evaluates``).
Many runs at once: ``flowvae evaluate outputs/multirun/<sweep>/*/ eval.source=posterior``.

Generating and scoring say what they do on stderr as a run does (the run's ``train.progress``: a bar on a
terminal, else a log line at least every 10 s; :mod:`flowvae.progress`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from flowvae import progress
from flowvae.commands.run_args import split_run_args
from flowvae.errors import ConfigError
from flowvae.results.tracking import Tracker, open_tracker

__all__ = ["main", "evaluate_run", "EVALUATION_KEYS"]

# What may change after training: the scoring settings, where the row goes, and where it is tracked.
EVALUATION_KEYS = ("eval.", "results_csv", "skip_existing", "logger")

USAGE = """\
usage: flowvae evaluate RUN_DIR [RUN_DIR ...] [eval.KEY=VALUE ...] [results_csv=FILE] [skip_existing=true]
                        [logger=mlflow|none] [logger.KEY=VALUE ...] [--device auto|cpu|cuda]

Score trained runs again with other evaluation settings, without training: e.g.
  flowvae evaluate outputs/runs/<run> eval.source=posterior eval.n_samples=100000 eval.bins=50
  flowvae evaluate outputs/multirun/<sweep>/*/ eval.decode=mean skip_existing=true
Each run appends one row to its results table (its results_csv, or results_csv=...) and to its evaluations.csv,
and is tracked in MLflow when the run was (or with logger=mlflow).
Only eval.*, results_csv, skip_existing and logger can be set: other settings change what was trained (train again).
exit codes: 0 every run scored or skipped, 1 a run failed, 2 bad arguments, 3 interrupted
"""


def _split(args: list[str]) -> tuple[list[str], list[str], str]:
    """(run directories, overrides KEY=VALUE, device); raises ConfigError for a setting that trains."""
    runs, overrides, device = split_run_args(args)
    for item in overrides:
        key = item.partition("=")[0]
        if not key.startswith(EVALUATION_KEYS):
            raise ConfigError(key, item.partition("=")[2], f"only eval.*, results_csv, skip_existing and "
                                                           f"logger can change after training; {key} changes "
                                                           f"what is trained (train again)")
    return runs, overrides, device


def _logger_group(name: str):
    """``logger=NAME`` as on `flowvae train`: the group's file conf/logger/NAME.yaml under ``logger``."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from flowvae.config import LOGGERS

    if name not in LOGGERS:
        raise ConfigError("logger", name, f"one of {', '.join(LOGGERS)}")
    return OmegaConf.create({"logger": OmegaConf.load(files("flowvae.conf") / "logger" / f"{name}.yaml")})


def evaluate_run(run_dir: str, overrides: list[str], device: str = "auto") -> tuple[str, str]:
    """Score one run with ``overrides``; returns (status, message): ok, skipped, or raises for a user error."""
    from omegaconf import OmegaConf

    from flowvae import stopping
    from flowvae.config import validate
    from flowvae.files import RunFiles, resolve_path
    from flowvae.identity import run_hash
    from flowvae.results.store import check_writable, has_ok_row
    from flowvae.run.rebuild import load_run, run_launch_dir

    run = load_run(run_dir, device)
    groups = [_logger_group(o.partition("=")[2]) for o in overrides if o.partition("=")[0] == "logger"]
    try:
        cfg = OmegaConf.merge(run.cfg, *groups, OmegaConf.from_dotlist([o for o in overrides
                                                                        if o.partition("=")[0] != "logger"]))
    except Exception as err:  # noqa: BLE001 - a key the schema does not have, a value of the wrong type
        raise ConfigError("eval", " ".join(overrides), f"settings of the eval or logger group ({err})"
                          .splitlines()[0]) from None
    validate(cfg)
    launch_dir = run_launch_dir(run.root)
    results_csv = resolve_path(cfg.results_csv, launch_dir)
    check_writable(results_csv)
    identity = run_hash(cfg)
    if cfg.skip_existing and has_ok_row(results_csv, identity):
        return "skipped", f"{results_csv} already has this evaluation ({identity})"
    tracker = open_tracker(cfg, RunFiles(run.root), launch_dir, evaluation=True)
    try:
        return _score(cfg, run, results_csv, identity, tracker)
    except stopping.Interrupted as err:
        tracker.finish("interrupted", None, str(err))
        raise


def _score(cfg, run, results_csv: Path, identity: str, tracker: Tracker) -> tuple[str, str]:
    """Generate, score, append the row, track it: the work of one evaluation whose settings passed every check."""
    from flowvae import stopping
    from flowvae.cores import choose_threads
    from flowvae.results.store import append_row
    from flowvae.run import experiment
    from flowvae.run.preflight import configure_torch
    from flowvae.run.row import metric_values, result_row
    from flowvae.run.two_stage import latent_columns

    started = time.time()
    configure_torch(choose_threads(cfg.train.threads, 1))
    with progress.settings(mode=cfg.train.progress):  # as the run reported its own generation and scoring
        generated, gen_mask = experiment.generate_for_scoring(run.model, cfg.eval, run.test_input(cfg.eval.source),
                                                              cfg.seed, run.feature_map, run.events)
        stopping.check("while generating")
        values = experiment.score_events(cfg, run.events, generated, gen_mask)
        values.update(latent_columns(run.model, run.test_input("posterior"), cfg.seed))
    values.update(experiment.final_losses(run.history), epochs_run=0, resumed_from=run.epoch,
                  epochs_trained=run.epoch, best_epoch=run.scored_epoch)
    row = result_row(cfg, run.events, values, "ok", "", started, run.root, identity)
    stopping.check("before its row was written")
    append_row(results_csv, row)
    append_row(run.root / "evaluations.csv", row)
    tracker.finish("ok", metric_values(row, run.events, cfg.eval.protocol))
    return "ok", f"kl_sum={values['kl_sum']:.4g}, row appended to {results_csv}"


def main(args: list[str]) -> int:
    """``flowvae evaluate``: each run directory in turn; the exit code is the worst run's."""
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    from flowvae import stopping
    from flowvae.results.store import ResultsError
    from flowvae.run.rebuild import RebuildError

    stopping.install()
    try:
        runs, overrides, device = _split(args)
    except ConfigError as err:
        print(f"flowvae evaluate: {err}", file=sys.stderr)
        return 2
    worst = 0
    for run_dir in runs:
        try:
            with progress.console():  # each phase says what it does on stderr (flowvae.progress)
                status, message = evaluate_run(run_dir, overrides, device)
        except (ConfigError, RebuildError, ResultsError) as err:
            print(f"flowvae evaluate: {run_dir}: {err}", file=sys.stderr)
            worst = max(worst, 2)
            continue
        except (stopping.Interrupted, KeyboardInterrupt):
            print(f"flowvae evaluate: {run_dir}: stopped by {stopping.received() or 'Ctrl-C'}; no row written",
                  file=sys.stderr)
            return 3
        print(f"{run_dir}: {status}: {message}")
    return worst
