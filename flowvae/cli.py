"""``flowvae train|table``: the command line.

``flowvae train ...`` hands every argument after ``train`` to Hydra unchanged, so ``-m``, ``--cfg job``,
``--help`` and any ``hydra.*`` override work as in any Hydra app. Nothing heavy is imported here: torch loads
only inside a run, so ``--help``, ``--cfg`` and tab completion stay fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from flowvae import __version__, stopping
from flowvae.config import register_configs

__all__ = ["main", "train"]

USAGE = f"""\
flowvae {__version__}: train a VAE with a normalizing-flow posterior and score generated events by per-feature KL.

usage:
  flowvae train [HYDRA ARGS/OVERRIDES]   one run, or a sweep with -m   (flowvae train --help for the config)
  flowvae table [RESULTS_CSV] [OPTIONS]  the seed-style table of a results CSV   (flowvae table --help)
  flowvae score GENERATED REFERENCE [OPTIONS]   score two event files, e.g. from any generator (--help)
  flowvae generate RUN_DIR --n N --out FILE     N events from a trained run, in the data's units (--help)
  flowvae evaluate RUN_DIR... [eval.KEY=VALUE]  score trained runs again with other eval settings (--help)
  flowvae --version

examples:
  flowvae train flow=planar n_flows=10
  flowvae train -m flow=planar,iaf n_flows=0,1,2,5,10 seed=0,1,2
  flowvae train -m +experiment=seed_table hydra/launcher=joblib
  flowvae train -m +search=default data=jets flow=planar n_flows=10 logger=mlflow   # a tracked search
  flowvae table outputs/results.csv
  flowvae score gen.npy jets.npz --key particle_features --layout particles_first --mask-feature 3 \\
      --jet-kinematics 0,1,2

exit codes: 0 ok or skipped, 1 a run failed or diverged, 2 bad configuration, 3 interrupted (resumable)
tab completion (bash): eval "$(flowvae train -sc install=bash)"
"""

register_configs()
# OpenMP threads that spin while waiting stall a step 10-100x when other work shares the cores (a sweep's
# parallel jobs, a busy node); passive waiting costs nothing measurable on a quiet machine. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The commands besides `train`, each a module with main(args) -> exit code; imported only when called.
COMMANDS = {"table": "flowvae.table", "score": "flowvae.score", "generate": "flowvae.generate",
            "evaluate": "flowvae.evaluate"}

# Exit codes of the jobs this process ran (a single run, or a sweep on the basic launcher); sweeps on other
# launchers are summed up from the jobs' status files by flowvae.callbacks.SweepSummary.
_exit_codes: list[int] = []


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def train(cfg: DictConfig) -> int | float:
    """Hydra's task: one run of the experiment in its run directory. Returns its exit code, or, under the Optuna
    sweeper, the objective (``optimize.metric`` of its row, +inf when it has none)."""
    from flowvae.job import run

    hc = HydraConfig.get()
    sweep_dir = Path(hc.runtime.cwd, hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    code = run(cfg, Path(hc.runtime.output_dir), Path(hc.runtime.cwd), _parallel_jobs(hc), sweep_dir)
    _exit_codes.append(code)
    if "optuna" in str(OmegaConf.select(hc, "sweeper._target_", default="")).lower():
        from flowvae.job import objective

        return objective(cfg.optimize.metric)  # what the search minimizes; +inf for a failed trial
    return code


def _parallel_jobs(hc) -> int:
    """How many jobs the launcher runs side by side on this machine (for the thread count)."""
    launcher = hc.launcher
    n_jobs = launcher.get("n_jobs") if launcher is not None else None
    if n_jobs is None:
        return 1
    from flowvae.cores import usable_cores

    return usable_cores() if n_jobs < 0 else max(1, int(n_jobs))


def _run_train(args: list[str]) -> int:
    from flowvae import callbacks

    stopping.install()  # from here on SIGTERM and Ctrl-C end the run (or sweep) with exit 3 and a status file
    sys.argv = [f"{Path(sys.argv[0]).name} train", *args]
    comp_line = os.environ.get("COMP_LINE")
    if comp_line is not None:  # tab completion: Hydra must not see the word `train` as an override
        os.environ["COMP_LINE"] = comp_line.replace(" train", "", 1)
    _exit_codes.clear()
    callbacks.SWEEP_EXIT_CODE = None
    try:
        train()
    except KeyboardInterrupt:  # a second Ctrl-C in a sweep's parent: its jobs record their own status
        print("flowvae train: stopped by a second Ctrl-C", file=sys.stderr)
        return 3
    except SystemExit as exit_:
        # Hydra exits 1 when it cannot compose the config (a wrong type, an unknown option): a bad configuration.
        code = exit_.code if isinstance(exit_.code, int) else 1
        return 2 if code == 1 else code
    except ValueError as err:  # Hydra's own argument checks, e.g. -m together with --cfg
        print(f"flowvae train: {err}", file=sys.stderr)
        return 2
    except Exception:
        if stopping.requested():  # a launcher whose workers were stopped under it (e.g. joblib's loky)
            print(f"flowvae train: stopped by {stopping.received()}", file=sys.stderr)
            return 3
        raise
    if callbacks.SWEEP_EXIT_CODE is not None:
        return callbacks.SWEEP_EXIT_CODE
    return max(_exit_codes, default=0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if args[0] in ("-V", "--version"):
        print(f"flowvae {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command == "train":
        return _run_train(rest)
    if command in ("-sc", "--shell-completion"):  # the completion script Hydra installs calls `flowvae -sc ...`
        return _run_train(args)
    if command in COMMANDS:  # each command is one module with a main(args) -> exit code
        from importlib import import_module

        return import_module(COMMANDS[command]).main(rest)
    print(f"flowvae: unknown command {command!r}; the commands are train, {', '.join(COMMANDS)} (flowvae --help)",
          file=sys.stderr)
    return 2


def entry() -> None:
    """The console script. A Ctrl-C that arrives after a run has recorded how it ended (e.g. the second of two
    quick ones) must not turn its exit code into 130: the status file and the exit code always agree."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = 3
    if stopping.requested():
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the outcome is decided: exit with it
    sys.exit(code)


if __name__ == "__main__":
    entry()
