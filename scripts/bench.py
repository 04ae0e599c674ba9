"""How fast flowvae trains, against what this machine's matrix-multiply peak allows.

For each flow family and n_flows, the median wall time of one training step (forward, backward, Adam) at the
default model and batch size, measured on the project's own model (``build_model``) and training step
(``flowvae.training.kit.make_step``), batched by index exactly as ``fit`` does. Also: the test-loss pass that ``fit``
runs after every epoch, generating and scoring ``eval.n_samples`` events, the plain VAE step's achieved GFLOP/s
against a large ``torch.mm`` at the same thread count (per batch size), and what the seed table costs.

    python scripts/bench.py                                  # every family, n_flows 0, 1, 10, 80
    python scripts/bench.py --flows planar,iaf --n-flows 10 --csv bench.csv --md bench.md
    python scripts/bench.py --threads 1 --jobs 2             # two jobs side by side, one thread each
    python scripts/bench.py --flows orthogonal --n-flows 10 --no-eval --baseline HEAD   # flows/ against HEAD's

Timing: every cell is warmed up, then the cells take turns (round-robin) timing a block of steps, ``--repeats``
times; a cell's figure is the median over its blocks. Taking turns makes the ratios to the plain step robust to
other load on the machine, which moves every cell alike; the absolute times are not. ``cpu_ms_per_step`` is the
process's CPU time per step: with one thread per job it is what a step costs on a core of its own, so it stays
meaningful when other work shares the machine (with more threads it adds up every thread, spinning included).
n_flows = 0 is the same plain VAE for every family (bit-identical), so it is measured once, as flow ``none``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from flowvae import metrics
from flowvae.app import register_configs
from flowvae.cores import choose_threads, cpu_name
from flowvae.data.events import load_events
from flowvae.data.units import model_input
from flowvae.flows import FLOWS
from flowvae.metrics.row import score_row
from flowvae.models import FlowVAE, build_model
from flowvae.models.sampling import generate_events
from flowvae.run.preflight import configure_torch
from flowvae.training.kit import evaluate_loss, make_optimizer, make_step, save_atomic

FAMILIES = tuple(name for name in FLOWS if name != "none")  # the flow registry's families
# the targets for a family's step, as a multiple of the plain VAE's step
TARGET_RATIO = {1: 2.0, 10: 2.0, 80: 8.0}
BLOCK_SECONDS = 0.15  # each timed block of steps lasts about this long


@dataclass
class Cell:
    """One flow family and n_flows; ``flow`` is ``none`` for the plain VAE."""

    flow: str
    n_flows: int
    batch_size: int
    block_ms: list[float] = field(default_factory=list)  # ms per step of each timed block
    block_cpu_ms: list[float] = field(default_factory=list)  # the same blocks' process CPU time per step
    test_loss_ms: list[float] = field(default_factory=list)
    mflop: float = 0.0  # matmul work of the step's Linear layers (encoder, heads, decoder), not the flows' own
    baseline: str = ""  # a folder holding another revision's flows package (--baseline): its flows, swapped in


def compose_config(overrides: list[str]) -> DictConfig:
    """The run's config, composed from the real conf/ exactly as ``flowvae train`` composes it."""
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def matmul_flops(model: FlowVAE, batch_size: int) -> float:
    """FLOPs of one training step's Linear layers outside the flows: forward 2·B·Σ in·out, backward 2× that."""
    linears = [m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.startswith("flows")]
    forward = 2 * batch_size * sum(m.in_features * m.out_features for m in linears)
    return 3 * forward


def matmul_peak(size: int = 2048, repeats: int = 7) -> float:
    """fp32 GFLOP/s of a large torch.mm at the current thread count (median of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e9


class Runner:
    """One model, its optimizer and the training step of ``fit``, on the run's real data."""

    def __init__(self, cfg: DictConfig, train_x: torch.Tensor, test_x: torch.Tensor, batch_size: int,
                 flows_module: ModuleType | None = None) -> None:
        torch.manual_seed(cfg.seed)
        self.model = build_model(train_x.shape[1], cfg.model, cfg.flow, cfg.n_flows, n_features=cfg.data.n_features)
        if flows_module is not None:  # the same model and step with another implementation of its flows
            options = {k: v for k, v in cfg.flow.items() if k != "name" and v is not None}
            stack = flows_module.build(cfg.flow.name, cfg.model.latent_dim, cfg.n_flows, **options)
            if stack.num_params != self.model.flows.num_params:
                raise SystemExit(f"the baseline's {cfg.flow.name} flows take {stack.num_params} params, these "
                                 f"{self.model.flows.num_params}: not comparable in one model")
            self.model.flows = stack
        optimizer = make_optimizer(self.model, cfg.train)
        self.step_fn = make_step(self.model, optimizer, cfg.train.grad_clip)
        self.train_x, self.test_x, self.batch_size = train_x, test_x, batch_size
        self.order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed))
        self.steps_per_epoch = math.ceil(len(train_x) / batch_size)
        self.next_step, self.last_cpu_ms = 0, 0.0

    def steps(self, n: int) -> float:
        """Run n steps as ``fit`` runs them; return the wall time per step in ms."""
        sums = torch.zeros(3, dtype=torch.float64)
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(n):
            i = self.next_step % self.steps_per_epoch
            batch = self.train_x[self.order[i * self.batch_size:(i + 1) * self.batch_size]]
            sums += self.step_fn(batch, 1.0) * len(batch)
            self.next_step += 1
        sums.tolist()  # the once-per-epoch read of fit
        self.last_cpu_ms = (time.process_time() - cpu_started) / n * 1e3
        return (time.perf_counter() - started) / n * 1e3

    def test_loss_ms(self) -> float:
        started = time.perf_counter()
        evaluate_loss(self.model, self.test_x)
        return (time.perf_counter() - started) * 1e3


def measure_steps(cfg_overrides: list[str], cells: list[Cell], repeats: int, warmup: int,
                  test_loss: bool) -> None:
    """Fill each cell's ``block_ms`` (and ``test_loss_ms``), the cells taking turns."""
    base = compose_config(cfg_overrides)
    events = load_events(base.data)
    train_x, test_x = model_input(events.train), model_input(events.test)
    runners, block_steps = [], []
    for cell in cells:
        cfg = compose_config([*cfg_overrides, f"flow={cell.flow}", f"n_flows={cell.n_flows}"])
        runner = Runner(cfg, train_x, test_x, cell.batch_size, _baseline_module(cell.baseline))
        runner.steps(warmup)
        estimate = runner.steps(max(2, warmup // 2))
        runners.append(runner)
        cell.mflop = matmul_flops(runner.model, cell.batch_size) / 1e6
        block_steps.append(max(3, round(BLOCK_SECONDS * 1e3 / estimate)))
    for _ in range(repeats):
        for cell, runner, n in zip(cells, runners, block_steps, strict=True):
            cell.block_ms.append(runner.steps(n))
            cell.block_cpu_ms.append(runner.last_cpu_ms)
    if test_loss:
        for _ in range(3):
            for cell, runner in zip(cells, runners, strict=True):
                cell.test_loss_ms.append(runner.test_loss_ms())


def _worker(job: tuple[list[str], list[Cell], int, int, bool, int]) -> list[Cell]:
    overrides, cells, repeats, warmup, test_loss, threads = job
    configure_torch(threads)
    measure_steps(overrides, cells, repeats, warmup, test_loss)
    return cells


def measure_generation(cfg_overrides: list[str], repeats: int = 3) -> dict[str, float]:
    """Seconds a run spends outside its training steps, for the plain VAE: making the data, generating
    eval.n_samples events, scoring them, the noise floor, the histogram picture and one checkpoint."""
    from flowvae.results.plots import plot_histograms

    cfg = compose_config(cfg_overrides)
    events = load_events(cfg.data)
    test_x = model_input(events.test)
    torch.manual_seed(cfg.seed)
    model = build_model(test_x.shape[1], cfg.model, cfg.flow, 0, n_features=cfg.data.n_features)
    optimizer = make_optimizer(model, cfg.train)
    kl_options = {"bins": cfg.eval.bins, "eps": cfg.eval.eps}
    # score_s: every metric of the row (per-feature, W1 errors, floors, FPD, KPD); noise_floor_s: the KL's alone
    timings: dict[str, list[float]] = {name: [] for name in ("data_s", "generate_s", "score_s", "noise_floor_s",
                                                              "plot_s", "checkpoint_s")}

    def timed(name: str, work, *args, **kwargs):
        started = time.perf_counter()
        result = work(*args, **kwargs)
        timings[name].append(time.perf_counter() - started)
        return result

    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            timed("data_s", load_events, cfg.data)
            generated, _ = timed("generate_s", generate_events, model, cfg.eval, test_x, cfg.seed,
                                 events.test.shape[1:])
            scores = timed("score_s", score_row, generated, None, events.test, None, seed=cfg.seed, **kl_options)
            timed("noise_floor_s", metrics.noise_floor, events.test, seed=cfg.seed, **kl_options)
            timed("plot_s", plot_histograms, generated, events.test, events.feature_names, scores,
                  Path(tmp) / "histograms.png", title="", bins=cfg.eval.bins)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            timed("checkpoint_s", save_atomic, state, Path(tmp) / "checkpoint.pt")
    result = {key: statistics.median(values) for key, values in timings.items()}
    saves = math.ceil(cfg.train.epochs / cfg.train.checkpoint_every)
    result["per_run_s"] = sum(v for k, v in result.items() if k != "checkpoint_s") + saves * result["checkpoint_s"]
    return result | {"n_samples": cfg.eval.n_samples}


def seed_table_cost(rows: list[dict], cfg: DictConfig, per_run_s: float, jobs: int,
                    batch_size: int) -> dict[str, float] | None:
    """Hours of the ``+experiment=seed_table`` sweep from the measured steps, interpolated linearly in n_flows.

    A run costs epochs x steps per epoch x step + the test-loss passes (every ``train.eval_every`` epochs and
    after the last) + ``per_run_s`` (data, generation, scoring, picture, checkpoints: the plain VAE's).
    n_flows = 0 is run once per seed (the preset's skip_existing); ``jobs`` runs share the work evenly.
    Process start-up and the launcher are not counted.
    """
    sweep = cfg.hydra.sweeper.params
    families = str(sweep.flow).split(",")
    n_flows_values = [int(k) for k in str(sweep.n_flows).split(",")]
    seeds = len(str(sweep.seed).split(","))
    step_ms = {(r["flow"], r["n_flows"]): r["ms_per_step"] for r in rows}
    eval_ms = {(r["flow"], r["n_flows"]): r["ms_test_loss"] for r in rows}
    if ("none", 0) not in step_ms or not all(any((f, k) in step_ms for k in n_flows_values if k) for f in families):
        return None
    steps_per_epoch = math.ceil(cfg.data.n_train / batch_size)
    epochs, every = cfg.train.epochs, cfg.train.eval_every
    test_passes = epochs // every + (epochs % every != 0)

    def interpolate(table: dict, family: str, k: int) -> float:
        known = sorted([(0, table[("none", 0)])] + [(n, v) for (f, n), v in table.items() if f == family])
        for (k0, v0), (k1, v1) in zip(known, known[1:], strict=False):
            if k0 <= k <= k1:
                return v0 + (v1 - v0) * (k - k0) / (k1 - k0)
        (k0, v0), (k1, v1) = known[-2], known[-1]  # beyond the last measured n_flows: extrapolate
        return v1 + (v1 - v0) * (k - k1) / (k1 - k0)

    def run_s(family: str, k: int) -> float:
        step = step_ms[("none", 0)] if k == 0 else interpolate(step_ms, family, k)
        test = eval_ms[("none", 0)] if k == 0 else interpolate(eval_ms, family, k)
        return (epochs * steps_per_epoch * step + test_passes * test) / 1e3 + per_run_s

    cells = [("none", 0)] + [(f, k) for f in families for k in n_flows_values if k > 0]
    train_s = sum(run_s(f, k) - per_run_s for f, k in cells) * seeds
    total_s = train_s + per_run_s * len(cells) * seeds
    return {"runs": len(cells) * seeds, "train_s": train_s, "total_s": total_s, "jobs": jobs,
            "wall_s": total_s / jobs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", default=",".join(FAMILIES), help="comma-separated families (default: all)")
    parser.add_argument("--n-flows", default="0,1,10,80", help="comma-separated n_flows (default: 0,1,10,80)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size of the config")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per job (default: this machine's cores divided among the jobs)")
    parser.add_argument("--jobs", type=int, default=1, help="run this many identical benchmarks side by side")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per cell (median over them)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per cell first")
    parser.add_argument("--gflops-batch-sizes", default="100,250,500,1000",
                        help="batch sizes for the plain step's GFLOP/s (empty: skip)")
    parser.add_argument("--no-eval", action="store_true", help="skip test-loss, generation and scoring timings")
    parser.add_argument("--baseline", metavar="REV",
                        help="also time each flow cell with flowvae/flows/ as it is at git revision REV (a tag, "
                             "a commit), swapped into the same model and step, the cells taking turns; adds "
                             "ratio_to_baseline (wall and CPU time)")
    parser.add_argument("--csv", type=Path, help="write the step table here")
    parser.add_argument("--md", type=Path, help="write every table here as Markdown")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.latent_dim=16")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = compose_config(args.overrides)
    threads = args.threads or choose_threads(base.train.threads, args.jobs)
    batch_size = args.batch_size or base.train.batch_size
    families = [f for f in args.flows.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown flow(s) {', '.join(unknown)}; allowed: {', '.join(FAMILIES)}")
    n_flows_values = sorted({int(k) for k in args.n_flows.split(",") if k})
    cells = [Cell("none", 0, batch_size)] + [Cell(f, k, batch_size) for f in families for k in n_flows_values if k]
    baseline_dir = tempfile.TemporaryDirectory() if args.baseline else None
    if baseline_dir is not None:
        _write_baseline(args.baseline, Path(baseline_dir.name))
        cells = [cells[0]] + [c for cell in cells[1:]
                              for c in (cell, Cell(cell.flow, cell.n_flows, batch_size, baseline=baseline_dir.name))]
    configure_torch(threads)  # as a run sets it

    started = time.time()
    print(_machine(threads, args.jobs), flush=True)
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048² torch.mm, {threads} thread(s)): {peak:.0f} GFLOP/s", flush=True)
    job = (args.overrides, cells, args.repeats, args.warmup, not args.no_eval, threads)
    if args.jobs == 1:
        measured = [_worker(job)]
    else:  # identical jobs side by side, each its own process
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            measured = pool.map(_worker, [job] * args.jobs)
    rows = _step_rows(measured, base, threads, args.jobs, args.baseline)
    if baseline_dir is not None:
        baseline_dir.cleanup()
    plain_model = build_model(base.data.n_features * base.data.n_particles, base.model, base.flow, 0,
                              n_features=base.data.n_features)
    plain = rows[0]
    plain["gflops"] = matmul_flops(plain_model, batch_size) / plain["ms_per_step"] / 1e6
    plain["fraction_of_peak"] = plain["gflops"] / peak
    _print_table(rows, ["flow", "n_flows", "ms_per_step", "iqr_ms", "cpu_ms_per_step", "ratio_to_plain",
                        "target_ratio", "meets_target", "flop_ratio", "ms_test_loss"]
                 + (["ratio_to_baseline", "cpu_ratio_to_baseline"] if args.baseline else []),
                 "Training step (forward, backward, Adam)")
    print(f"plain step: {matmul_flops(plain_model, batch_size) / 1e6:.0f} MFLOP in its Linear layers "
          f"(backward counted as 2x forward) -> {plain['gflops']:.0f} GFLOP/s = {plain['fraction_of_peak']:.0%} of "
          f"the {peak:.0f} GFLOP/s peak", flush=True)

    sections = {"Training step (forward, backward, Adam)": rows}
    batch_rows = _batch_size_rows(args, base, plain_model, peak, threads)
    if batch_rows:
        sections["Plain VAE step vs batch size"] = batch_rows
        _print_table(batch_rows, list(batch_rows[0]), "Plain VAE step vs batch size")
    if not args.no_eval:
        generation = measure_generation(args.overrides)
        sections["Per run, outside the training steps"] = [generation]
        _print_table([generation], list(generation), "Per run, outside the training steps (plain VAE)")
        seed_cfg = compose_config([*args.overrides, "+experiment=seed_table"])
        cost = seed_table_cost(rows, seed_cfg, generation["per_run_s"], args.jobs, batch_size)
        if cost is not None:
            sections["Seed table estimate"] = [cost]
            _print_table([cost], list(cost), "Seed table (+experiment=seed_table), from these steps")
    if args.csv:
        _write_csv(args.csv, rows)
    if args.md:
        _write_md(args.md, sections, _machine(threads, args.jobs), peak)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench took {time.time() - started:.0f} s; load average at the end {load:.1f}", flush=True)
    return 0


def _step_rows(measured: list[list[Cell]], cfg: DictConfig, threads: int, jobs: int,
               baseline: str | None = None) -> list[dict]:
    """One row per cell; with several jobs, each cell's blocks from all jobs are pooled. A baseline cell's row is
    its flow named ``flow@REV``, and the row before it (the same cell with this checkout's flows) gets its ratios
    to it."""
    rows = []
    for cells in zip(*measured, strict=True):
        blocks = [ms for cell in cells for ms in cell.block_ms]
        cpu = [ms for cell in cells for ms in cell.block_cpu_ms]
        test = [ms for cell in cells for ms in cell.test_loss_ms]
        q1, _, q3 = statistics.quantiles(blocks, n=4) if len(blocks) > 1 else (blocks[0],) * 3
        rows.append({
            "flow": f"{cells[0].flow}@{baseline}" if cells[0].baseline else cells[0].flow,
            "n_flows": cells[0].n_flows, "ms_per_step": statistics.median(blocks),
            "iqr_ms": q3 - q1, "cpu_ms_per_step": statistics.median(cpu), "batch_size": cells[0].batch_size,
            "latent_dim": cfg.model.latent_dim,
            "hidden": "x".join(str(h) for h in cfg.model.hidden), "threads": threads, "jobs": jobs,
            "ms_test_loss": statistics.median(test) if test else float("nan"), "mflop_linear": cells[0].mflop,
        })
    plain = rows[0]["ms_per_step"]
    for row in rows:
        row["ratio_to_plain"] = row["ms_per_step"] / plain
        row["flop_ratio"] = row["mflop_linear"] / rows[0]["mflop_linear"]
        target = TARGET_RATIO.get(row["n_flows"]) if row["flow"] != "none" else None
        row["target_ratio"] = target if target is not None else ""
        row["meets_target"] = "" if target is None else ("yes" if row["ratio_to_plain"] <= target else "no")
    if baseline:
        for row, other in zip(rows, rows[1:], strict=False):
            if other["flow"] == f"{row['flow']}@{baseline}":
                row["ratio_to_baseline"] = row["ms_per_step"] / other["ms_per_step"]
                row["cpu_ratio_to_baseline"] = row["cpu_ms_per_step"] / other["cpu_ms_per_step"]
                other["target_ratio"] = other["meets_target"] = ""
    return rows


BASELINE_PACKAGE = "baseline_flows"  # the name another revision's flows package is imported under


def _write_baseline(revision: str, folder: Path) -> None:
    """flowvae/flows/ of git revision ``revision`` as the package ``BASELINE_PACKAGE`` in ``folder``, its imports of
    flowvae.flows pointing at itself (a revision from before the package: flowvae/flows.py as its __init__)."""
    root = Path(__file__).resolve().parents[1]

    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *command], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"--baseline {revision}: {done.stderr.strip()}")
        return done.stdout

    names = [Path(path).name for path in git("ls-tree", "--name-only", revision, "flowvae/flows/").split()
             if path.endswith(".py")]
    files = {name: f"flowvae/flows/{name}" for name in names}
    if not files and git("ls-tree", "--name-only", revision, "flowvae/flows.py").strip():
        files = {"__init__.py": "flowvae/flows.py"}
    if not files:
        raise SystemExit(f"--baseline {revision}: no flowvae/flows/ there")
    package = folder / BASELINE_PACKAGE
    package.mkdir()
    for name, path in files.items():
        source = git("show", f"{revision}:{path}")
        (package / name).write_text(source.replace("flowvae.flows", BASELINE_PACKAGE))


def _baseline_module(folder: str) -> ModuleType | None:
    """The baseline's flows package written by :func:`_write_baseline` into ``folder``, or None without one."""
    if not folder:
        return None
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(BASELINE_PACKAGE)


def _batch_size_rows(args: argparse.Namespace, cfg: DictConfig, plain_model: FlowVAE, peak: float,
                     threads: int) -> list[dict]:
    sizes = [int(b) for b in args.gflops_batch_sizes.split(",") if b]
    if not sizes:
        return []
    cells = [Cell("none", 0, b) for b in sizes]
    measure_steps(args.overrides, cells, args.repeats, args.warmup, test_loss=False)
    rows = []
    for cell in cells:
        ms = statistics.median(cell.block_ms)
        gflops = matmul_flops(plain_model, cell.batch_size) / ms / 1e6
        rows.append({"batch_size": cell.batch_size, "ms_per_step": ms, "us_per_event": ms * 1e3 / cell.batch_size,
                     "epoch_s": ms * math.ceil(cfg.data.n_train / cell.batch_size) / 1e3, "gflops": gflops,
                     "fraction_of_peak": gflops / peak, "threads": threads})
    return rows


def _machine(threads: int, jobs: int) -> str:
    cpu = cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s) x {jobs} job(s); "
            f"load average at start {load:.1f}")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _print_table(rows: list[dict], columns: list[str], title: str) -> None:
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(rows)


def _write_md(path: Path, sections: dict[str, list[dict]], machine: str, peak: float) -> None:
    lines = [f"{machine}; fp32 matmul peak {peak:.0f} GFLOP/s", ""]
    for title, rows in sections.items():
        columns = _columns(rows)
        lines += [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
