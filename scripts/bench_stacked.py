"""How much faster S seeds train as one stacked model (flowvae.training.stacked) than one after the other
(flowvae.training.loop.fit).

For each config (a preset of overrides) and S in --seeds: S models built as a run builds them, trained by fit's
own step (``make_step``, one seed after the other) and by fit_stacked's stacked step (all S at once), on the run's
real data batched as both batch it. The figure is training throughput: seed-steps per second (S steps of the
stacked model count S), and the speed-up is stacked over sequential.

    python scripts/bench_stacked.py                                # default and jets presets, 1, 2, 4, 8 seeds
    python scripts/bench_stacked.py --presets default --seeds 4 --csv stacked.csv --json stacked.json
    python scripts/bench_stacked.py --presets planar10 --threads 1

With ``--end-to-end``, the whole sweep as a user runs it instead: ``flowvae train -m seed=0,...,S-1`` with
``hydra/launcher=basic`` and with ``hydra/launcher=stacked``, each in a fresh temporary folder (its own
``hydra.sweep.dir`` and results table), the two launchers taking turns (their order alternating) ``--repeats``
times. For each run: its wall time, the CPU time of its processes, the time in its epoch loops (the training
curves' ``seconds``: summed over the seeds on the basic launcher, the stack's own on the stacked one) and the rest
(starting, checks, models, generating, scoring); for each config the ratios stacked / basic (below 1: stacking
pays), per repeat and their median, and whether the stacked launcher trained the seeds together or fell back:

    python scripts/bench_stacked.py --end-to-end        # default, jets_toy, jets_conditional_flow; 4 seeds, 3 repeats
    python scripts/bench_stacked.py --end-to-end --presets default --seeds 4 --repeats 5 --json e2e.json

Timing as scripts/bench.py: every cell is warmed up, then the cells take turns (round-robin) timing a block of
steps, ``--repeats`` times, and a cell's figure is the median over its blocks; taking turns puts other load on the
machine on every cell alike, so the ratios hold where the absolute times do not. ``best_speedup`` is the ratio of
the fastest blocks, those least disturbed by other work (bursts of it move the medians). ``cpu_speedup`` is the
median ratio of process CPU time: with one thread it is what the work costs on a core of its own, which holds on
a busy machine; with two, a thread waiting for the other (descheduled by other work) spins and counts.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from flowvae.app import register_configs
from flowvae.cores import choose_threads, cpu_name
from flowvae.data.events import load_events
from flowvae.data.units import model_input
from flowvae.run.experiment import seeded_model
from flowvae.run.preflight import configure_torch
from flowvae.training import stacked
from flowvae.training.kit import Plan, make_optimizer, make_step

ROOT = Path(__file__).resolve().parents[1]
# name -> overrides; jets: real gluon jets with their particle masks (the test slice: 30 particles, 4 features)
PRESETS = {
    "default": [],
    "jets": ["data=jetnet", f"data.path={ROOT / 'tests/data/gluon_30p_slice.npz'}"],
    "jets_toy": ["data=jets"],  # the jets toy (10,000 events of 3 features x 100 particles)
    "planar10": ["flow=planar", "n_flows=10"],
    "iaf10": ["flow=iaf", "n_flows=10"],
    "orthogonal10": ["flow=orthogonal", "n_flows=10"],
    "jets_conditional_flow": ["data=jetnet", f"data.path={ROOT / 'tests/data/gluon_30p_slice.npz'}",
                              "model=conditional_flow"],
}
BLOCK_SECONDS = 0.3  # each timed block of steps lasts about this long
TARGET = {4: 2.0}  # the target: 4 seeds stacked at least 2x the throughput of 4 one after the other
END_TO_END_PRESETS = "default,jets_toy,jets_conditional_flow"
LAUNCHERS = ("basic", "stacked")


@dataclass
class Cell:
    """One config, one number of seeds, one way of training them."""

    preset: str
    seeds: int
    mode: str  # sequential or stacked
    block_ms: list[float] = field(default_factory=list)  # ms per round (one step of every seed)
    block_cpu_ms: list[float] = field(default_factory=list)  # the same blocks' process CPU time per round
    restack_ms: float = math.nan  # stacked: rebuilding the stack (when a seed leaves it)


def compose_config(overrides: list[str]) -> DictConfig:
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


class Sequential:
    """S models, each with fit's optimizer and step and its own batch order: a round is one step of each."""

    def __init__(self, cfg: DictConfig, events, train_x: torch.Tensor, seeds: list[int]) -> None:
        self.steps, self.orders = [], []
        for seed in seeds:
            model = seeded_model(cfg_with_seed(cfg, seed), events, train_x.device)
            self.steps.append(make_step(model, make_optimizer(model, cfg.train), cfg.train.grad_clip))
            self.orders.append(torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)))
        self.train_x, self.batch = train_x, cfg.train.batch_size
        self.steps_per_epoch = math.ceil(len(train_x) / self.batch)
        self.next, self.last_cpu_ms = 0, 0.0

    def rounds(self, n: int) -> float:
        sums = torch.zeros(3, dtype=torch.float64)
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(n):
            i = self.next % self.steps_per_epoch
            for step, order in zip(self.steps, self.orders, strict=True):
                sums += step(self.train_x[order[i * self.batch:(i + 1) * self.batch]], 1.0)
            self.next += 1
        sums.tolist()  # fit reads its sums once per epoch
        self.last_cpu_ms = (time.process_time() - cpu_started) / n * 1e3
        return (time.perf_counter() - started) / n * 1e3


class Stacked:
    """The same S models as fit_stacked stacks them: a round is one stacked step."""

    def __init__(self, cfg: DictConfig, events, train_x: torch.Tensor, seeds: list[int]) -> None:
        members, plan = [], Plan(cfg.train, train_x)
        for seed in seeds:
            model = seeded_model(cfg_with_seed(cfg, seed), events, train_x.device)
            member = stacked._Seed(model, seed, plan, torch.get_rng_state())
            member.draw_order()
            members.append(member)
        self.template, self.cfg = stacked._Loss(copy.deepcopy(members[0].model)), cfg.train
        self.evaluator = stacked._Loss(copy.deepcopy(members[0].model).eval())
        self.stack = stacked._Stack(members, self.template, self.evaluator, cfg.train)
        self.train_x, self.batch = train_x, cfg.train.batch_size
        self.steps_per_epoch = math.ceil(len(train_x) / self.batch)
        self.next, self.last_cpu_ms = 0, 0.0

    def rounds(self, n: int) -> float:
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(n):
            i = self.next % self.steps_per_epoch
            self.stack.step(self.train_x, i * self.batch, (i + 1) * self.batch, 1.0, None)
            self.next += 1
        self.stack.sums.tolist()
        self.last_cpu_ms = (time.process_time() - cpu_started) / n * 1e3
        return (time.perf_counter() - started) / n * 1e3

    def restack_ms(self) -> float:
        """What a seed leaving costs the rest: every slice written back, the stack rebuilt (fit_stacked's way)."""
        times = []
        for _ in range(3):
            started = time.perf_counter()
            self.stack.write_back()
            self.stack = stacked._Stack(self.stack.members, self.template, self.evaluator, self.cfg)
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)


def cfg_with_seed(cfg: DictConfig, seed: int) -> DictConfig:
    cfg = copy.deepcopy(cfg)
    cfg.seed = seed
    return cfg


def measure(presets: list[str], seed_counts: list[int], repeats: int, warmup: int) -> list[Cell]:
    """Every cell built, warmed up, then timed in turns."""
    cells, runners, block_rounds = [], [], []
    for preset in presets:
        cfg = compose_config(PRESETS[preset])
        events = load_events(cfg.data, ROOT)
        train_x = model_input(events.train, "cpu", events.train_mask)
        for count in seed_counts:
            seeds = list(range(count))
            for mode, kind in (("sequential", Sequential), ("stacked", Stacked)):
                runner = kind(cfg, events, train_x, seeds)
                runner.rounds(warmup)
                estimate = runner.rounds(max(2, warmup // 2))
                cells.append(Cell(preset, count, mode))
                runners.append(runner)
                block_rounds.append(max(2, round(BLOCK_SECONDS * 1e3 / estimate)))
                print(f"  {preset}, {count} seed(s), {mode}: ~{estimate:.1f} ms a round", flush=True)
    for _ in range(repeats):
        for cell, runner, n in zip(cells, runners, block_rounds, strict=True):
            cell.block_ms.append(runner.rounds(n))
            cell.block_cpu_ms.append(runner.last_cpu_ms)
    for cell, runner in zip(cells, runners, strict=True):
        if isinstance(runner, Stacked):
            cell.restack_ms = runner.restack_ms()
    return cells


def rows_of(cells: list[Cell], threads: int) -> list[dict]:
    """One row per config and number of seeds: both ways' throughput and the speed-up."""
    rows = []
    by_key = {(c.preset, c.seeds, c.mode): c for c in cells}
    for preset, count in dict.fromkeys((c.preset, c.seeds) for c in cells):
        seq, stk = by_key[(preset, count, "sequential")], by_key[(preset, count, "stacked")]
        seq_ms, stk_ms = statistics.median(seq.block_ms), statistics.median(stk.block_ms)
        speedup = seq_ms / stk_ms
        target = TARGET.get(count)
        rows.append({
            "preset": preset, "seeds": count, "threads": threads,
            "sequential_ms_per_round": seq_ms, "stacked_ms_per_round": stk_ms,
            "sequential_seed_steps_per_s": count * 1e3 / seq_ms, "stacked_seed_steps_per_s": count * 1e3 / stk_ms,
            "best_speedup": min(seq.block_ms) / min(stk.block_ms),
            "cpu_speedup": statistics.median(seq.block_cpu_ms) / statistics.median(stk.block_cpu_ms),
            "speedup": speedup, "speedup_iqr": _iqr([a / b for a, b in zip(seq.block_ms, stk.block_ms,
                                                                                 strict=True)]),
            "restack_ms": stk.restack_ms,
            "target": target if target is not None else "",
            "meets_target": "" if target is None else ("yes" if speedup >= target else "no"),
        })
    return rows


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q3 - q1


@dataclass
class Sweep:
    """One end-to-end sweep: a config, a launcher, and what it took."""

    preset: str
    launcher: str
    repeat: int
    wall_s: float
    cpu_s: float  # user + system time of the command's processes
    epochs_s: float  # in the epoch loops (the training curves' seconds)
    stacked: bool  # the seeds trained as one stacked model (False: the basic launcher, or the stacked one fell back)


def flowvae_command() -> list[str]:
    """The console script beside this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("flowvae")
    return [str(script)] if script.exists() else [shutil.which("flowvae") or "flowvae"]


def run_sweep(preset: str, seeds: int, launcher: str, repeat: int, extra: list[str]) -> Sweep:
    """``flowvae train -m seed=0,...`` of ``preset`` on ``launcher``, in a fresh folder, timed."""
    with tempfile.TemporaryDirectory(prefix="flowvae-bench-") as folder:
        sweep_dir = Path(folder) / "sweep"
        args = [*flowvae_command(), "train", "-m", f"seed={','.join(map(str, range(seeds)))}",
                f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}",
                f"results_csv={sweep_dir / 'results.csv'}", *PRESETS[preset], *extra]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(args, cwd=folder, capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        stacked = "as one stacked model" in done.stdout + done.stderr
        return Sweep(preset, launcher, repeat, wall, cpu, epoch_seconds(sweep_dir, stacked), stacked)


def epoch_seconds(sweep_dir: Path, stacked: bool) -> float:
    """The time in epoch loops: each seed's own summed (one after the other), or the longest seed's (one stack)."""
    per_seed = []
    for curves in sweep_dir.glob("*/training_curves.csv"):
        with curves.open() as f:
            per_seed.append(sum(float(row["seconds"]) for row in csv.DictReader(f)))
    return max(per_seed, default=0.0) if stacked else sum(per_seed)


def measure_end_to_end(presets: list[str], seeds: int, repeats: int, extra: list[str]) -> list[Sweep]:
    """Every config's sweep on both launchers, in turns: repeat by repeat, the launchers' order alternating."""
    sweeps = []
    for repeat in range(repeats):
        for preset in presets:
            order = LAUNCHERS if repeat % 2 == 0 else LAUNCHERS[::-1]
            for launcher in order:
                sweep = run_sweep(preset, seeds, launcher, repeat, extra)
                sweeps.append(sweep)
                fell_back = launcher == "stacked" and not sweep.stacked
                print(f"  repeat {repeat + 1}, {preset}, {launcher}: {sweep.wall_s:.1f} s wall, {sweep.cpu_s:.1f} s "
                      f"CPU, {sweep.epochs_s:.1f} s in epochs{' (fell back: seed after seed)' if fell_back else ''}",
                      flush=True)
    return sweeps


def end_to_end_rows(sweeps: list[Sweep], seeds: int) -> list[dict]:
    """One row per config: each launcher's median times over the repeats, and stacked / basic per repeat and their
    median (wall, CPU, epochs, the rest)."""
    rows = []
    for preset in dict.fromkeys(s.preset for s in sweeps):
        pairs = [(b, k) for b in sweeps for k in sweeps if b.preset == k.preset == preset and b.repeat == k.repeat
                 and b.launcher == "basic" and k.launcher == "stacked"]
        row = {"preset": preset, "seeds": seeds, "repeats": len(pairs),
               "stacked_trained_together": sum(k.stacked for _, k in pairs)}
        for name, value in (("wall", lambda s: s.wall_s), ("cpu", lambda s: s.cpu_s),
                            ("epochs", lambda s: s.epochs_s), ("rest", lambda s: s.wall_s - s.epochs_s)):
            for launcher, index in (("basic", 0), ("stacked", 1)):
                row[f"{launcher}_{name}_s"] = statistics.median(value(pair[index]) for pair in pairs)
            ratios = [value(k) / value(b) for b, k in pairs if value(b) > 0]
            row[f"{name}_ratio"] = statistics.median(ratios) if ratios else math.nan
            row[f"{name}_ratios"] = " ".join(f"{r:.3f}" for r in ratios)
        rows.append(row)
    return rows


def end_to_end(args: argparse.Namespace, presets: list[str], machine: str) -> int:
    counts = sorted({int(s) for s in args.seeds.split(",") if s})
    if len(counts) != 1:
        raise SystemExit("--end-to-end times one number of seeds: give --seeds N")
    started = time.time()
    sweeps = measure_end_to_end(presets, counts[0], args.repeats, args.extra)
    rows = end_to_end_rows(sweeps, counts[0])
    _print_table(rows, ["preset", "seeds", "repeats", "stacked_trained_together", "basic_wall_s", "stacked_wall_s",
                        "wall_ratio", "wall_ratios", "cpu_ratio", "basic_epochs_s", "stacked_epochs_s",
                        "epochs_ratio", "basic_rest_s", "stacked_rest_s"],
                 "\nEnd to end, `flowvae train -m seed=...` on the basic launcher against the stacked one (medians "
                 "over the repeats; ratio: stacked / basic)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "presets": {p: PRESETS[p] for p in presets},
                                         "extra": args.extra, "rows": rows,
                                         "sweeps": [vars(s) for s in sweeps]}, indent=2))
    print(f"bench took {time.time() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}", flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--end-to-end", action="store_true",
                        help="time whole sweeps, `flowvae train -m` on the basic and the stacked launcher")
    parser.add_argument("--presets", default=None,
                        help=f"comma-separated configs (default: default,jets; with --end-to-end "
                             f"{END_TO_END_PRESETS}); any of {', '.join(PRESETS)}")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated numbers of seeds (default: 1,2,4,8; with --end-to-end 4)")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="with --end-to-end: more overrides for every sweep (train.epochs=5, ...)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: this machine's cores)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed blocks per cell (median over them; default 7); with --end-to-end, sweeps per "
                             "config and launcher (default 3)")
    parser.add_argument("--warmup", type=int, default=6, help="untimed rounds per cell first")
    parser.add_argument("--csv", type=Path, help="write the table here")
    parser.add_argument("--json", type=Path, help="write the table and the machine here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.presets is None:
        args.presets = END_TO_END_PRESETS if args.end_to_end else "default,jets"
    if args.seeds is None:
        args.seeds = "4" if args.end_to_end else "1,2,4,8"
    if args.repeats is None:
        args.repeats = 3 if args.end_to_end else 7
    presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise SystemExit(f"unknown preset(s) {', '.join(unknown)}; allowed: {', '.join(PRESETS)}")
    if args.end_to_end:
        machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; load average at start "
                   f"{os.getloadavg()[0]:.1f}")
        print(machine, flush=True)
        return end_to_end(args, presets, machine)
    seed_counts = sorted({int(s) for s in args.seeds.split(",") if s})
    threads = args.threads or choose_threads(0, 1)
    configure_torch(threads)  # as a run sets it
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s); load average "
               f"at start {os.getloadavg()[0]:.1f}")
    print(machine, flush=True)
    started = time.time()
    rows = rows_of(measure(presets, seed_counts, args.repeats, args.warmup), threads)
    columns = ["preset", "seeds", "sequential_ms_per_round", "stacked_ms_per_round", "sequential_seed_steps_per_s",
               "stacked_seed_steps_per_s", "speedup", "speedup_iqr", "best_speedup", "cpu_speedup", "restack_ms",
               "target", "meets_target"]
    _print_table(rows, columns, "\nTraining throughput, S seeds one after the other (fit's step) against stacked "
                                "(one vmapped step)")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "presets": {p: PRESETS[p] for p in presets},
                                         "rows": rows}, indent=2))
    print(f"bench took {time.time() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}", flush=True)
    return 0


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _print_table(rows: list[dict], columns: list[str], title: str) -> None:
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
