"""How fast trained runs generate jets: microseconds per jet, as the published generators report it.

For each run directory, the model is rebuilt (:func:`flowvae.run.rebuild.load_run`) and ``--n`` events are generated
from the prior exactly as the run generates its own (:func:`flowvae.models.sampling.generate_blocks`, then
:func:`flowvae.data.units.data_units`: the inverse feature map and the pT ordering), ``--repeats`` times; the
figure is the median wall time divided by ``--n``. The runs take turns (round-robin), so a load that comes and
goes on a shared machine moves every run alike and the ratios between runs hold better than the absolute times.

    python scripts/bench_generation.py outputs/multirun/<sweep>/*/ --n 50000 --threads 2 --md gen.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from flowvae.cores import cpu_name
from flowvae.data.units import data_units
from flowvae.models.sampling import generate_blocks
from flowvae.run.preflight import configure_torch
from flowvae.run.rebuild import RebuildError, load_run


def generate_once(run, n: int, block: int) -> float:
    """Seconds to generate ``n`` events in data units from ``run``'s model (prior, sampled read-out)."""
    test_x = run.test_input("prior")
    started = time.perf_counter()
    for values, mask in generate_blocks(run.model, n, "prior", "sample", test_x, run.cfg.seed,
                                                   run.events.test.shape[1:], block):
        data_units(run.feature_map, values, mask, run.events.kinematics)
    return time.perf_counter() - started


def describe(run) -> str:
    cfg = run.cfg
    flow = "plain" if cfg.n_flows == 0 else f"{cfg.flow.name} {cfg.n_flows}"
    return f"{cfg.model.get('name', 'default')}, {flow}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories of flowvae train")
    parser.add_argument("--n", type=int, default=50_000, help="jets per timing (default 50,000)")
    parser.add_argument("--block", type=int, default=10_000, help="jets per generated block (default 10,000)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per run; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--md", type=Path, help="also write the table here as Markdown")
    args = parser.parse_args(argv)
    configure_torch(args.threads)
    try:
        runs = [load_run(path, "cpu") for path in args.runs]
    except RebuildError as err:
        print(f"bench_generation: {err}", file=sys.stderr)
        return 2
    for run in runs:  # warm-up: first-call allocations and kernel choices out of the timings
        generate_once(run, min(args.n, args.block), args.block)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(args.repeats):
        for i, run in enumerate(runs):
            times[i].append(generate_once(run, args.n, args.block))
    machine = f"{cpu_name()}, {args.threads} torch thread(s), {args.n:,} jets per timing, median of {args.repeats}"
    lines = [f"Generation speed ({machine})", "", "| run | model | µs/jet |", "|---|---|---|"]
    for run, measured, path in zip(runs, times, args.runs, strict=True):
        per_jet = statistics.median(measured) / args.n * 1e6
        lines.append(f"| {Path(path).name} | {describe(run)} | {per_jet:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
