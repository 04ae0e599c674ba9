"""What experiment tracking costs a run: the tracker's own work timed directly, and whole runs with and without.

1. Directly, in a fresh process per repeat: ``import mlflow``, opening the store and creating the run with its
   parameters (``open_tracker``), logging every epoch of a finished run's history one epoch at a time as ``fit``
   does, and the row's metrics and artifacts at the end (``finish``), on a real run directory and a SQLite store
   that already has its tables. Creating the tables (a new store's first run) is reported on its own.
2. End to end: ``flowvae train`` as a user runs it, untracked and tracked in turns; the median of each and of the
   pairs' differences. Training time varies by seconds between runs on a shared machine, so this is the cross-check,
   and (1) is the figure.

    python scripts/bench_tracking.py                          # the default run, 3 pairs
    python scripts/bench_tracking.py --repeats 5 -- data=jets flow=planar n_flows=10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowvae.cores import cpu_name


def _run(work: Path, overrides: list[str], tracked: bool, store: Path) -> float:
    args = [sys.executable, "-m", "flowvae.cli", "train", *overrides, f"results_csv={work / 'results.csv'}",
            f"hydra.run.dir={work / 'runs' / str(time.time_ns())}", "train.progress=log"]
    if tracked:
        args += ["logger=mlflow", f"logger.tracking_uri=sqlite:///{store}"]
    started = time.perf_counter()
    done = subprocess.run(args, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"flowvae train {' '.join(overrides)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def _tracker_cost(run_dir: Path, store: Path) -> dict[str, float]:
    """In this (fresh) process: each part of a tracked run's tracking work, in seconds."""
    import csv

    started = time.perf_counter()
    import mlflow  # noqa: F401

    from flowvae.files import RunFiles
    from flowvae.identity import is_setting_column
    from flowvae.results.tracking import open_tracker

    imported = time.perf_counter()
    from omegaconf import OmegaConf

    files = RunFiles(run_dir)
    cfg = OmegaConf.load(files.config)
    cfg.logger = {"name": "mlflow", "tracking_uri": f"sqlite:///{store}", "experiment_name": "bench"}
    files.tracking.unlink(missing_ok=True)
    tracker = open_tracker(cfg, files, run_dir)
    opened = time.perf_counter()
    with files.curves.open(newline="") as f:
        history = list(csv.DictReader(f))
    for epoch in range(1, len(history) + 1):
        tracker.log_epochs([{key: float(value) for key, value in row.items() if value} for row in history[:epoch]])
    logged = time.perf_counter()
    with files.result.open(newline="") as f:
        row = next(csv.DictReader(f))
    tracker.finish("ok", {key: value for key, value in row.items() if not is_setting_column(key)})
    finished = time.perf_counter()
    assert not tracker.failed, "tracking failed: see the warning above"
    return {"import": imported - started, "open": opened - imported, "epochs": logged - opened,
            "finish": finished - logged, "n_epochs": len(history)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (default 3)")
    parser.add_argument("--measure", nargs=2, metavar=("RUN_DIR", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="flowvae train overrides (after --)")
    args = parser.parse_args()
    if args.measure:  # the child process of part 1
        print(json.dumps(_tracker_cost(Path(args.measure[0]), Path(args.measure[1]))))
        return
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = work / "store" / "mlflow.db"
        plain, tracked = [], []
        first = _run(work, args.overrides, True, store)  # creates the store's tables: a one-off cost
        for i in range(args.repeats):
            order = (False, True) if i % 2 == 0 else (True, False)
            for is_tracked in order:
                (tracked if is_tracked else plain).append(_run(work, args.overrides, is_tracked, store))
        run_dir = next(p.parent for p in (work / "runs").glob("*/result.csv")
                       if not (p.parent / "tracking.json").exists())  # an untracked run's directory
        parts = []
        for i in range(args.repeats + 1):
            copy = work / f"measured_{i}"
            shutil.copytree(run_dir, copy)
            done = subprocess.run([sys.executable, __file__, "--measure", str(copy), str(store)], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                sys.exit(f"measuring the tracker failed:\n{done.stderr[-2000:]}")
            parts.append(json.loads(done.stdout.splitlines()[-1]))
        fresh = work / "fresh" / "mlflow.db"
        shutil.copytree(run_dir, work / "measured_fresh")
        created = json.loads(subprocess.run([sys.executable, __file__, "--measure", str(work / "measured_fresh"),
                                             str(fresh)], capture_output=True, text=True).stdout.splitlines()[-1])
    parts = parts[1:]  # the first child also warms the file cache after the training runs
    med = {key: statistics.median(p[key] for p in parts) for key in ("import", "open", "epochs", "finish")}
    total = sum(med.values())
    p, t = statistics.median(plain), statistics.median(tracked)
    diffs = [b - a for a, b in zip(plain, tracked, strict=True)]
    print(f"flowvae train {' '.join(args.overrides) or '(default config)'}; MLflow {mlflow.__version__}, "
          f"{os.cpu_count()} cores ({cpu_name()})")
    print(f"1. the tracker's own work, median of {len(parts)}: {total:.2f} s per run = import mlflow "
          f"{med['import']:.2f} + open store, create run, parameters {med['open']:.2f} + {parts[0]['n_epochs']} "
          f"epochs' losses {med['epochs']:.2f} + row and artifacts {med['finish']:.2f}")
    print(f"   a new store's first run: opening it (creating its tables) took {created['open']:.2f} s")
    print(f"2. end to end: logger=none median {p:.2f} s ({', '.join(f'{s:.2f}' for s in plain)}); logger=mlflow "
          f"median {t:.2f} s ({', '.join(f'{s:.2f}' for s in tracked)}); paired difference median "
          f"{statistics.median(diffs):+.2f} s ({statistics.median(diffs) / p:+.1%}); first tracked run {first:.2f} s")


if __name__ == "__main__":
    main()
