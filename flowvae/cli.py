"""``flowvae train|table``: the command line.

``flowvae train ...`` hands every argument after ``train`` to Hydra unchanged, so ``-m``, ``--cfg job``,
``--help`` and any ``hydra.*`` override work as in any Hydra app. Nothing heavy is imported here: torch loads
only inside a run, so ``--help``, ``--cfg`` and tab completion stay fast.
"""

from __future__ import annotations

import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from flowvae import __version__, stopping
from flowvae.app import register_configs

__all__ = ["main", "train"]

USAGE = f"""\
flowvae {__version__}: train a VAE with a normalizing-flow posterior and score generated events by per-feature KL.

usage:
  flowvae train [HYDRA ARGS/OVERRIDES]   one run, or a sweep with -m   (flowvae train --help for the config)
  flowvae table [RESULTS_CSV] [OPTIONS]  the seed-style table of a results CSV   (flowvae table --help)
  flowvae score GENERATED REFERENCE [OPTIONS]   score two event files, e.g. from any generator (--help)
  flowvae generate RUN_DIR --n N --out FILE     N events from a trained run, in the data's units (--help)
  flowvae generate RUN_DIR --source heldout --out FILE   the run's held-out events, its scoring reference
  flowvae evaluate RUN_DIR... [eval.KEY=VALUE]  score trained runs again with other eval settings (--help)
  flowvae fit-prior RUN_DIR... [prior.KEY=VALUE]  fit a flow prior to a run's latent codes; it then generates
  flowvae --version

examples:
  flowvae train flow=planar n_flows=10
  flowvae train -m flow=planar,iaf n_flows=0,1,2,5,10 seed=0,1,2
  flowvae train -m +experiment=seed_table hydra/launcher=joblib
  flowvae train -m +search=default data=jets flow=planar n_flows=10 logger=mlflow   # a tracked Optuna search
  flowvae table outputs/results.csv
  flowvae score gen.npy jets.npz --key particle_features --layout particles_first --mask-feature 3 \\
      --jet-kinematics 0,1,2

exit codes: 0 ok, skipped or pruned, 1 a run failed or diverged, 2 bad configuration, 3 interrupted (resumable)
tab completion (bash): eval "$(flowvae train -sc install=bash)"
"""

register_configs()
# OpenMP threads that spin while waiting stall a step 10-100x when other work shares the cores (a sweep's
# parallel jobs, a busy node); passive waiting costs nothing measurable on a quiet machine. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The commands besides `train`, each a module with main(args) -> exit code; imported only when called.
COMMANDS = {"table": "flowvae.results.table", "score": "flowvae.commands.score",
            "generate": "flowvae.commands.generate", "evaluate": "flowvae.commands.evaluate",
            "fit-prior": "flowvae.commands.fit_prior"}
COMPLETION_FLAGS = ("-sc", "--shell-completion")

# Exit codes of the jobs this process ran (a single run, or a sweep on the basic launcher); sweeps on other
# launchers are summed up from the jobs' status files by flowvae.sweeps.callbacks.SweepSummary.
_exit_codes: list[int] = []


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def train(cfg: DictConfig) -> int | float:
    """Hydra's task: one run of the experiment in its run directory. Returns what Hydra hands its sweeper as the
    job's ``return_value``: the run's exit code or, under flowvae's Optuna sweeper (:func:`_searching`), the
    objective (``optimize.metric`` of its row, +inf when it has none)."""
    from flowvae.run.job import execute

    hc = HydraConfig.get()
    sweep_dir = Path(hc.runtime.cwd, hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    outcome = execute(cfg, Path(hc.runtime.output_dir), Path(hc.runtime.cwd), _parallel_jobs(hc), sweep_dir)
    _exit_codes.append(outcome.code)
    if _searching(hc):
        return outcome.objective(cfg.optimize.metric)  # what the search optimizes; +inf for a failed trial
    return outcome.code


def _searching(hc) -> bool:
    """Whether the job's sweeper is flowvae's Optuna sweeper (:class:`flowvae.sweeps.optuna_sweeper.OptunaSweeper`,
    under whatever name or subclass ``hydra.sweeper._target_`` gives it), which optimizes its jobs' return values."""
    target = OmegaConf.select(hc, "sweeper._target_", default=None)
    if not target:
        return False
    from hydra.utils import get_class

    from flowvae.sweeps.optuna_sweeper import OptunaSweeper

    try:
        sweeper = get_class(str(target))
    except Exception:  # noqa: BLE001 - a sweeper this process cannot import is not flowvae's
        return False
    return isinstance(sweeper, type) and issubclass(sweeper, OptunaSweeper)


def _parallel_jobs(hc) -> int:
    """How many jobs the launcher runs side by side on this machine (for the thread count)."""
    launcher = hc.launcher
    n_jobs = launcher.get("n_jobs") if launcher is not None else None
    if n_jobs is None:
        return 1
    from flowvae.cores import usable_cores

    return usable_cores() if n_jobs < 0 else max(1, int(n_jobs))


def _run_train(args: list[str]) -> int:
    from flowvae.sweeps import callbacks

    stopping.install()  # from here on SIGTERM and Ctrl-C end the run (or sweep) with exit 3 and a status file
    from hydra_plugins.flowvae_plugins import register

    register()  # hydra/launcher=stacked (and flowvae's other plugins), in editable installs too
    if not any(flag in args for flag in COMPLETION_FLAGS) and (refusal := _unknown_option(args)) is not None:
        print(f"flowvae train: {refusal}", file=sys.stderr)
        return 2
    program = Path(sys.argv[0]).name
    # Hydra names the program after argv[0] in its help; the completion script it installs registers that name,
    # which must be the executable alone (`flowvae`), not a second command called `train`.
    sys.argv = [program if any(flag in args for flag in COMPLETION_FLAGS) else f"{program} train", *args]
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


def _unknown_option(args: list[str]) -> str | None:
    """The one-line refusal of an override that picks an option one of flowvae's config groups does not have
    (``flow=nope``, also inside a sweep ``flow=planar,nope``), naming the group's options, as every other bad
    value is refused; Hydra's own answer is a dozen lines. None when every choice exists, and for what Hydra
    judges itself: flags, values (``flow.hidden=3``), Hydra's groups (``hydra/launcher=...``), null, glob sweeps,
    and every choice of a command line that adds config folders (``hydra.searchpath``, ``--config-dir``), whose
    options flowvae's own folders do not list."""
    from importlib.resources import files

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from flowvae.errors import ConfigError

    if any(arg.lstrip("+").startswith(("hydra.searchpath", "-cd", "--config-dir", "-cp", "--config-path"))
           for arg in args):
        return None
    conf, parser = files("flowvae.conf"), None
    for arg in args:
        group = arg.partition("=")[0].lstrip("+~").partition("@")[0]
        if arg.startswith("-") or "=" not in arg or not group or "." in group or group.startswith("hydra"):
            continue
        folder = conf.joinpath(group)
        if not folder.is_dir():
            continue
        parser = parser or OverridesParser.create()
        try:
            override = parser.parse_override(arg)
            if override.is_sweep_override():
                values = list(override.sweep_string_iterator())
            elif override.value() is None and not override.is_delete():
                values = ["null"]  # a group needs one of its options (Hydra answers with a traceback)
            else:
                values = [override.get_value_element_as_str()] if isinstance(override.value(), str) else []
        except Exception:  # noqa: BLE001 - what cannot be read here is Hydra's to report
            continue
        options = sorted(path.name.removesuffix(".yaml") for path in folder.iterdir() if path.name.endswith(".yaml"))
        unknown = [value for value in values if value not in options]
        if unknown:
            return str(ConfigError(group, unknown[0], f"one of {', '.join(options)}"))
    return None


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
        if rest and rest[0] in COMPLETION_FLAGS:  # `flowvae train -sc install=bash`, as the README says
            return _shell_completion(rest[1:])
        return _run_train(rest)
    if command in COMPLETION_FLAGS:  # the completion script Hydra installs calls `flowvae -sc query=bash` at Tab
        return _shell_completion(rest)
    if command in COMMANDS:  # each command is one module with a main(args) -> exit code
        from importlib import import_module

        return import_module(COMMANDS[command]).main(rest)
    print(f"flowvae: unknown command {command!r}; the commands are train, {', '.join(COMMANDS)} (flowvae --help)",
          file=sys.stderr)
    return 2


def _shell_completion(args: list[str]) -> int:
    """``flowvae -sc query=SHELL``, what the installed completion runs at each Tab with the typed line in
    ``COMP_LINE`` (cursor at ``COMP_POINT``): the subcommand names at the first word, Hydra's completion of the
    overrides of `train` and of `evaluate` (only the keys it accepts), nothing for the other commands' words so
    the shell completes file names. Never an error on the terminal: a line it cannot complete gets nothing.
    ``-sc install=SHELL`` and the rest go to Hydra."""
    mode, _, shell = (args[0] if args else "").partition("=")
    line = os.environ.get("COMP_LINE")
    if mode != "query" or line is None:
        return _run_train([COMPLETION_FLAGS[0], *args])
    point = os.environ.get("COMP_POINT", "")
    line = line[: int(point)] if point.isdigit() else line
    words = line.split()[1:]  # without the program's name
    current = "" if not line or line[-1].isspace() or not words else words.pop()
    if not words:
        candidates = [c for c in ("train", *COMMANDS, "--help", "--version") if c.startswith(current)]
    elif words[0] == "train":
        candidates = _hydra_candidates(shell, words[1:], current)
    elif words[0] == "evaluate":
        candidates = _evaluate_candidates(shell, words[1:], current)
    else:
        candidates = []
    if not candidates and shell == "fish":  # fish's registration turns its own file completion off
        from glob import escape, glob

        candidates = sorted(f"{name}/" if os.path.isdir(name) else name for name in glob(escape(current) + "*"))
    print(("\n" if shell == "fish" else " ").join(candidates))
    return 0


def _hydra_candidates(shell: str, overrides: list[str], current: str) -> list[str]:
    """Hydra's completions of the word ``current`` after ``overrides`` of the train config; [] where Hydra
    cannot parse the line (its error kept off the terminal)."""
    os.environ["COMP_LINE"] = " ".join(["flowvae", *overrides, current])  # Hydra reads the line after the name
    captured = StringIO()
    try:
        with redirect_stdout(captured), redirect_stderr(StringIO()):
            code = _run_train([COMPLETION_FLAGS[0], f"query={shell or 'bash'}"])
    except Exception:  # noqa: BLE001 - a Tab must never print a traceback into the user's command line
        return []
    return captured.getvalue().split() if code == 0 else []


def _evaluate_candidates(shell: str, words: list[str], current: str) -> list[str]:
    """`flowvae evaluate RUN_DIR... [KEY=VALUE...] [--device D]`: its options, its devices, and the overrides
    it accepts; run directories (an empty or path-like word) are left to the shell's file completion."""
    from flowvae.commands.evaluate import EVALUATION_KEYS

    if words and words[-1] == "--device":
        return [d for d in ("auto", "cpu", "cuda") if d.startswith(current)]
    if current.startswith("-"):
        return [o for o in ("--device", "--help") if o.startswith(current)]
    if not current or current.startswith((".", "/", "~")) or ("/" in current and "=" not in current):
        return []
    overrides = [w for w in words if "=" in w and w.lstrip("+").startswith(EVALUATION_KEYS)]
    return [c for c in _hydra_candidates(shell, overrides, current)
            if c.lstrip("+").startswith(EVALUATION_KEYS)]


class _StdStream:
    """sys.stdout or sys.stderr whose reader may go away, as in ``flowvae train --help | head``: the first write
    to the closed pipe sends the rest to /dev/null, and the command ends as it would have (same exit code, as
    ripgrep does) instead of a BrokenPipeError traceback. Catching the error at the top is not enough: Hydra
    reports an exception of its own printing (``--cfg``, ``-sc install``) as a failure with a traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        """Python's documented recipe: /dev/null onto the stream's descriptor, so the text still buffered (and
        the interpreter's last flush at exit) goes there."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def entry() -> None:
    """The console script. A Ctrl-C that arrives after a run has recorded how it ended (e.g. the second of two
    quick ones) must not turn its exit code into 130: the status file and the exit code always agree."""
    sys.stdout, sys.stderr = _StdStream(sys.stdout), _StdStream(sys.stderr)
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
