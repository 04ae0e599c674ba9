"""What pruning buys a search: the same Optuna search run through the CLI without a pruner and with the median
pruner on each thing a trial can report (``hydra.sweeper.pruner.report``: the validation loss, the objective on the
validation events), and how long each took to find a given value of the objective.

    python scripts/bench_pruning.py                     # 24 trials of +search=default data=jets flow=planar n_flows=10
    python scripts/bench_pruning.py --trials 12 -- train.epochs=10 data.n_train=2000   # overrides for all
    python scripts/bench_pruning.py --searches none median:objective   # only these

Each search runs alone (one after the other, the unpruned one first) in its own folder under ``--out``, with its
own journal, on the basic launcher, the sampler's seed fixed: until the first trial is pruned all sample the same
trials. From each study (its journal) and its results table it reports the wall time, the trials pruned, the
epochs trained, the best value, and the time each search needed until its best-so-far value came within a given
share of the unpruned search's final best (0 %: reaching it). Times count from the start of the command, Python's
start-up included. Other work on the machine slows all alike only when it is steady: the load is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from flowvae.cores import cpu_name

SEARCH = ["+search=default", "data=jets", "flow=planar", "n_flows=10"]
TOLERANCES = (0.0, 0.02, 0.05, 0.10)  # within this share of the unpruned search's best
# the searches: pruner, or pruner:report (hydra.sweeper.pruner.report); the first, without a pruner, sets the target
SEARCHES = ("none", "median:val_loss", "median:objective")


def run_search(folder: Path, trials: int, search: str, overrides: list[str]) -> dict:
    """Run one search (``pruner`` or ``pruner:report``) in ``folder``; its wall time, the time it started, and its
    exit code."""
    pruner, _, report = search.partition(":")
    folder.mkdir(parents=True, exist_ok=True)
    flowvae = shutil.which("flowvae", path=os.path.dirname(sys.executable)) or "flowvae"  # the console script
    command = [flowvae, "train", "-m", *SEARCH, f"hydra.sweeper.n_trials={trials}",
               f"hydra.sweeper.pruner.name={pruner}", "results_csv=results.csv", "hydra.sweep.dir=sweep",
               "train.progress=log", *([f"hydra.sweeper.pruner.report={report}"] if report else []), *overrides]
    started = time.time()
    with open(folder / "search.log", "w") as log:
        code = subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT).returncode
    return {"started": started, "wall_s": time.time() - started, "exit_code": code}


def summarize(folder: Path, run: dict) -> dict:
    """The study's trials as (seconds since the command started, objective or None), with what the table says."""
    import optuna

    from flowvae.search.storage import open_storage

    storage = open_storage(f"journal:{folder / 'outputs' / 'optuna.journal'}")
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    finished = sorted((t for t in study.trials if t.datetime_complete is not None), key=lambda t: t.datetime_complete)
    events = [(t.datetime_complete.timestamp() - run["started"], t.value if t.state.name == "COMPLETE" else None)
              for t in finished]
    table = pd.read_csv(folder / "results.csv")
    states = [t.state.name.lower() for t in study.trials]
    best = min((v for _, v in events if v is not None), default=float("nan"))
    return {**run, "events": events, "best": best, "n_trials": len(states), "pruned": states.count("pruned"),
            "complete": states.count("complete"), "epochs": int(table["epochs_trained"].sum())}


def time_to(events: list[tuple[float, float | None]], target: float) -> float | None:
    """When the best-so-far value first reached ``target`` or below (None: never)."""
    for seconds, value in events:
        if value is not None and value <= target:
            return seconds
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_pruning"))
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES),
                        help=f"pruner or pruner:report of each search, the unpruned one first (default: "
                             f"{' '.join(SEARCHES)})")
    parser.add_argument("overrides", nargs="*", help="overrides for every search (after --)")
    args = parser.parse_args(argv)
    out = args.out / time.strftime("%Y-%m-%d_%H-%M-%S")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    if args.searches[0] != "none":
        parser.error("the first of --searches is none: the unpruned search's best is the target")
    results = {}
    for search in args.searches:
        folder = out / search.replace(":", "_")
        run = run_search(folder, args.trials, search, args.overrides)
        if run["exit_code"] != 0:
            print(f"the search {search} failed (exit {run['exit_code']}): {folder / 'search.log'}")
            return 1
        results[search] = summarize(folder, run)
        print(f"{search}: {run['wall_s']:.0f} s, load average after: {os.getloadavg()[0]:.2f}", flush=True)
    target = results["none"]["best"]
    print(f"\n{args.trials} trials of flowvae train -m {' '.join([*SEARCH, *args.overrides])} (objective kl_sum)\n")
    print("| pruner: report | wall time | trials complete / pruned | epochs trained | best kl_sum | "
          + " | ".join("time to the unpruned best" if not tol else f"to within {tol:.0%}" for tol in TOLERANCES) + " |")
    print("|---" * (5 + len(TOLERANCES)) + "|")
    for pruner, r in results.items():
        times = [time_to(r["events"], target * (1 + tol)) for tol in TOLERANCES]
        print(f"| {pruner} | {r['wall_s']:.0f} s | {r['complete']} / {r['pruned']} | {r['epochs']} | {r['best']:.4f} | "
              + " | ".join("never" if t is None else f"{t:.0f} s" for t in times) + " |")
    print(f"\nfolders: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
