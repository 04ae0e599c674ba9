"""``flowvae evaluate RUN_DIR [RUN_DIR ...] [eval.KEY=VALUE ...]``: score trained runs again, without training.

Comparing prior against posterior generation, a sampled against a mean read-out, more events or other bins needs
no new training: the model is rebuilt from the run directory (:func:`flowvae.generate.load_run`), generates
with the new ``eval.*`` settings, is scored exactly as a run scores itself, and one row is appended to the run's
results table (and to ``evaluations.csv`` in the run directory). The row's identity is the training identity plus
the evaluation settings (:mod:`flowvae.identity`): its ``train_hash`` is the training run's, its ``config_hash``
says which evaluation it is, so ``skip_existing=true`` skips evaluations already in the table. With the run's own
``eval.*`` values the row's metrics equal the training row's to the bit (same device, torch build and threads).

Only ``eval.*``, ``results_csv`` and ``skip_existing`` may be set: anything else would change what was trained.
Many runs at once: ``flowvae evaluate outputs/multirun/<sweep>/*/ eval.source=posterior``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from flowvae.config import ConfigError

__all__ = ["main", "evaluate_run", "EVALUATION_KEYS"]

# What may change after training: the scoring settings, and where the row goes.
EVALUATION_KEYS = ("eval.", "results_csv", "skip_existing")

USAGE = """\
usage: flowvae evaluate RUN_DIR [RUN_DIR ...] [eval.KEY=VALUE ...] [results_csv=FILE] [skip_existing=true]
                        [--device auto|cpu|cuda]

Score trained runs again with other evaluation settings, without training: e.g.
  flowvae evaluate outputs/runs/<run> eval.source=posterior eval.n_samples=100000 eval.bins=50
  flowvae evaluate outputs/multirun/<sweep>/*/ eval.decode=mean skip_existing=true
Each run appends one row to its results table (its results_csv, or results_csv=...) and to its evaluations.csv.
Only eval.*, results_csv and skip_existing can be set: other settings change what was trained (train again).
exit codes: 0 every run scored or skipped, 1 a run failed, 2 bad arguments, 3 interrupted
"""


def _split(args: list[str]) -> tuple[list[str], list[str], str]:
    """(run directories, overrides KEY=VALUE, device); raises ConfigError for a setting that trains."""
    runs, overrides, device = [], [], "auto"
    items = iter(args)
    for item in items:
        if item == "--device":
            device = next(items, "")
        elif item.startswith("--device="):
            device = item.partition("=")[2]
        elif "=" in item and not Path(item).exists():
            key = item.partition("=")[0].lstrip("+")
            if not key.startswith(EVALUATION_KEYS):
                raise ConfigError(key, item.partition("=")[2], f"only eval.*, results_csv and skip_existing "
                                                               f"can change after training; {key} changes what "
                                                               f"is trained (train again)")
            overrides.append(item.lstrip("+"))
        else:
            runs.append(item)
    if not runs:
        raise ConfigError("RUN_DIR", "", "at least one run directory of `flowvae train`")
    return runs, overrides, device


def evaluate_run(run_dir: str, overrides: list[str], device: str = "auto") -> tuple[str, str]:
    """Score one run with ``overrides``; returns (status, message): ok, skipped, or raises for a user error."""
    from omegaconf import OmegaConf

    from flowvae import experiment, stopping
    from flowvae.config import validate
    from flowvae.cores import choose_threads
    from flowvae.files import resolve_path
    from flowvae.generate import load_run, run_launch_dir
    from flowvae.identity import run_hash
    from flowvae.job import result_row
    from flowvae.results import append_row, check_writable, has_ok_row

    run = load_run(run_dir, device)
    try:
        cfg = OmegaConf.merge(run.cfg, OmegaConf.from_dotlist(overrides))
    except Exception as err:  # noqa: BLE001 - a key the schema does not have, a value of the wrong type
        raise ConfigError("eval", " ".join(overrides), f"settings of the eval group ({err})".splitlines()[0]) from None
    validate(cfg)
    launch_dir = run_launch_dir(run.root)
    results_csv = resolve_path(cfg.results_csv, launch_dir)
    check_writable(results_csv)
    identity = run_hash(cfg)
    if cfg.skip_existing and has_ok_row(results_csv, identity):
        return "skipped", f"{results_csv} already has this evaluation ({identity})"
    started = time.time()
    experiment.configure_torch(choose_threads(cfg.train.threads, 1))
    generated, gen_mask = experiment.generate_events(run.model, cfg.eval, run.test_input(cfg.eval.source),
                                                     cfg.seed, run.events.test.shape[1:])
    generated = run.feature_map.inverse(generated, gen_mask)
    stopping.check("while generating")
    values = experiment.score_events(cfg, run.events, generated, gen_mask)
    values.update(experiment.final_losses(run.history), epochs_run=0, resumed_from=run.epoch)
    row = result_row(cfg, run.events, values, "ok", "", started, run.root, identity)
    stopping.check("before its row was written")
    append_row(results_csv, row)
    append_row(run.root / "evaluations.csv", row)
    return "ok", f"kl_sum={values['kl_sum']:.4g}, row appended to {results_csv}"


def main(args: list[str]) -> int:
    """``flowvae evaluate``: each run directory in turn; the exit code is the worst run's."""
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    from flowvae import stopping
    from flowvae.generate import GenerateError
    from flowvae.results import ResultsError

    stopping.install()
    try:
        runs, overrides, device = _split(args)
    except ConfigError as err:
        print(f"flowvae evaluate: {err}", file=sys.stderr)
        return 2
    worst = 0
    for run_dir in runs:
        try:
            status, message = evaluate_run(run_dir, overrides, device)
        except (ConfigError, GenerateError, ResultsError) as err:
            print(f"flowvae evaluate: {run_dir}: {err}", file=sys.stderr)
            worst = max(worst, 2)
            continue
        except (stopping.Interrupted, KeyboardInterrupt):
            print(f"flowvae evaluate: {run_dir}: stopped by {stopping.received() or 'Ctrl-C'}; no row written",
                  file=sys.stderr)
            return 3
        print(f"{run_dir}: {status}: {message}")
    return worst
