"""How much faster the conditional flow's training step and generation are than with zuko's spline: one run, old
and new taking turns.

``model=conditional_flow`` pushes the decoder's Gaussian through coupling layers whose per-value map is a
rational-quadratic spline. The old path (``CouplingFlow.reference = True``) is the implementation before
:mod:`flowvae.models.spline`: zuko's ``MonotonicRQSTransform`` and autograd, value-major. Both models are built by
``build_model`` from the same composed config and seed (so they start from the same parameters) and trained on the
same jets (``--data``, a JetNet-layout file, by the run's own feature map) by the project's training step. Cells:

* ``train step``: one step of ``fit`` (forward, backward, fused Adam) at ``train.batch_size`` (100), ms, both on
  ``--threads``; ``train step, as a run takes it``: old on ``--threads`` as a run trained before, new on the
  threads a run with ``train.threads=0`` now trains on (one: :func:`flowvae.cores.training_threads`), for more
  than one thread — what a user's run gains;
* ``generate B``: ``model.generate`` of B jets from the prior (decoder, multiplicity, the flow), µs per jet, at
  batch 100 and at the size a run generates in (``GENERATE_BATCH``); ``new, torch spline``: the new model with
  the spline's compiled pass (:mod:`flowvae.models.spline_compiled`) switched off, as before it; the default
  model (no coupling layers) alike;
* with ``--spline``, the spline alone at a layer's shape (45 values per jet, 23 logits each): zuko's call (and
  inverse with backward) against :func:`flowvae.models.spline.rqs`, its forward map also on the torch path.

Every cell is warmed up, then the cells take turns timing blocks of about ``--block`` seconds, ``--repeats`` times;
a figure is the median over its blocks, so a load that comes and goes on a shared machine moves old and new alike
and their ratio holds better than either time. ``CPU old/new`` is the same ratio of the process's CPU time (every
thread's): with one thread, what each costs on a core of its own even when other work shares the machine. With
two threads on a busy 2-core machine every parallel operation waits for a thread the other work has descheduled,
so the wall-clock times there say more about the machine than about the code.

    python scripts/bench_conditional_flow.py                   # 2 threads, under a minute
    python scripts/bench_conditional_flow.py --threads 1 --repeats 9 --spline --md bench_cf.md
    python scripts/bench_conditional_flow.py --threads 1 --batch-sizes 100,250,500,1000 flow=triangular n_flows=10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as flowvae's CLI: spinning threads stall on a shared machine

import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

from flowvae.app import register_configs  # noqa: E402
from flowvae.cores import cpu_name, torch_threads, training_threads  # noqa: E402
from flowvae.data.events import load_events  # noqa: E402
from flowvae.models.sampling import GENERATE_BATCH  # noqa: E402
from flowvae.run.experiment import fit_feature_map, model_tensors, seeded_model  # noqa: E402
from flowvae.run.preflight import configure_torch  # noqa: E402
from flowvae.training.kit import make_optimizer, make_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TORCH_SPLINE = "new, torch spline"  # the new model with the spline's compiled pass switched off
DATA = ROOT / "tests" / "data" / "gluon_30p_slice.npz"


def build(overrides: list[str], reference: bool):
    """The run's model (seeded as a run seeds it), its optimizer and training step; ``reference`` selects the old
    spline path."""
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    events = load_events(cfg.data)
    train_x, _, _ = model_tensors(cfg, events, fit_feature_map(cfg, events), torch.device("cpu"))
    model = seeded_model(cfg, events, torch.device("cpu"))
    if model.likelihood_flow is not None:
        model.likelihood_flow.reference = reference
    step = make_step(model, make_optimizer(model, cfg.train), cfg.train.grad_clip)
    return cfg, model, step, train_x


class Cell:
    """One timed thing: ``run(n)`` does it n times; ``per`` converts seconds per run into the reported unit."""

    def __init__(self, name: str, variant: str, run, per: float, unit: str):
        self.name, self.variant, self.run, self.per, self.unit = name, variant, run, per, unit
        self.blocks: list[float] = []  # wall time per run, in the cell's unit, one entry per timed block
        self.cpu_blocks: list[float] = []  # the process's CPU time (all threads) alike
        self.n = 1

    def calibrate(self, seconds: float) -> None:
        self.run(2)  # warm-up: first-call allocations, kernel choices
        started = time.perf_counter()
        self.run(2)
        once = (time.perf_counter() - started) / 2
        self.n = max(1, round(seconds / max(once, 1e-6)))

    def time_block(self) -> None:
        started, cpu_started = time.perf_counter(), time.process_time()
        self.run(self.n)
        self.cpu_blocks.append((time.process_time() - cpu_started) / self.n * self.per)
        self.blocks.append((time.perf_counter() - started) / self.n * self.per)

    @property
    def median(self) -> float:
        return statistics.median(self.blocks)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_blocks)


def train_cell(variant: str, step, train_x: torch.Tensor, batch_size: int, threads: int | None = None,
               name: str = "train step") -> Cell:
    """``threads``: torch's intra-op threads while the steps run (None: the process's)."""
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    state = {"i": 0}
    per_epoch = max(1, len(train_x) // batch_size)

    def run(n: int) -> None:
        sums = torch.zeros(3, dtype=torch.float64)
        with torch_threads(threads or torch.get_num_threads()):
            for _ in range(n):
                i = state["i"] % per_epoch
                sums += step(train_x[order[i * batch_size:(i + 1) * batch_size]], 1.0)
                state["i"] += 1
        sums.tolist()

    return Cell(name, variant, run, 1e3, "ms")


def generate_cell(variant: str, model, n_jets: int, compiled: bool = True) -> Cell:
    """``compiled``: False runs the spline's torch path where it would take its compiled pass."""
    generator = torch.Generator().manual_seed(1)

    def run(n: int) -> None:
        model.eval()
        with torch.no_grad(), _spline_compiled(compiled):
            for _ in range(n):
                z = torch.randn(n_jets, model.latent_dim, generator=generator)
                model.generate(z, "sample", generator)
        model.train()

    return Cell(f"generate {n_jets}", variant, run, 1e6 / n_jets, "µs/jet")


@contextmanager
def _spline_compiled(on: bool) -> Iterator[None]:
    """flowvae.models.spline.COMPILED set to ``on`` while the block runs."""
    from flowvae.models import spline

    saved, spline.COMPILED = spline.COMPILED, on
    try:
        yield
    finally:
        spline.COMPILED = saved


def spline_cells(batch: int, train: bool, bins: int = 8, values: int = 45) -> list[Cell]:
    """The spline alone at one layer's shape, given its logits as each flow's layer does: zuko's on (B, n, 3K−1)
    logits, as the old layer's conditioner wrote them; rqs on the same logits value-major (``dim=-1``) at a training
    batch and bins first (``dim=0``, (3K−1, n, B)) at a larger one, as the new layer's conditioner writes them.
    The forward map (generation), and with ``train`` the inverse with a backward pass (training)."""
    from zuko.transforms import MonotonicRQSTransform

    from flowvae.models.spline import rqs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, values, 3 * bins - 1, generator=g)
    bins_first = logits.permute(2, 1, 0).contiguous()
    logits, bins_first = logits.requires_grad_(), bins_first.requires_grad_()
    x = 3 * torch.randn(batch, values, generator=g)

    def zuko(inverse: bool):
        spline = MonotonicRQSTransform(logits[..., :bins], logits[..., bins:2 * bins], logits[..., 2 * bins:], 5.0)
        return (spline.inv if inverse else spline).call_and_ladj(x)

    def ours(inverse: bool):
        if batch <= 256:  # the flow's conditioner width: the layer's value-major output, as it comes
            return rqs(x, logits, 5.0, inverse)
        return rqs(x.t(), bins_first, 5.0, inverse, dim=0)

    cells = []
    for variant, fn, compiled in (("old", zuko, True), ("new", ours, True), (TORCH_SPLINE, ours, False)):
        def inverse_backward(n: int, fn=fn) -> None:
            for _ in range(n):
                y, ladj = fn(True)
                (y.sum() + ladj.sum()).backward()

        def forward(n: int, fn=fn, compiled=compiled) -> None:
            with torch.no_grad(), _spline_compiled(compiled):
                for _ in range(n):
                    fn(False)

        if train and compiled:
            cells.append(Cell(f"spline inverse+backward, {batch}×{values}", variant, inverse_backward, 1e3, "ms"))
        cells.append(Cell(f"spline forward, {batch}×{values}", variant, forward, 1e3, "ms"))
    return cells


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA,
                        help="JetNet-layout .npz (default: the tests' 30-particle slice)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="timed blocks per cell (default 9)")
    parser.add_argument("--block", type=float, default=0.2, help="seconds per timed block (default 0.2)")
    parser.add_argument("--warm-steps", type=int, default=30,
                        help="training steps before timing, so the splines are not the identity (default 30)")
    parser.add_argument("--spline", action="store_true", help="also time the spline alone at a layer's shape")
    parser.add_argument("--md", type=Path, help="also write the table here as Markdown")
    parser.add_argument("--batch-sizes", type=lambda text: [int(b) for b in text.split(",")],
                        help="instead: the training step's cost per jet at each of these batch sizes (e.g. "
                             "100,250,500,1000), taking turns, relative to the first")
    parser.add_argument("overrides", nargs="*", help="config overrides (e.g. model.hidden=[128,128])")
    return parser.parse_args(argv)


def per_jet(args: argparse.Namespace, overrides: list[str]) -> str:
    """The training step's wall and CPU time per jet at each of ``args.batch_sizes`` (one model, warmed up at the
    first), the cells taking turns; the last column is the first size's CPU time per jet over this one's."""
    _, _, step, train_x = build(overrides, reference=False)
    train_cell("", step, train_x, args.batch_sizes[0]).run(args.warm_steps)
    cells = [train_cell(str(b), step, train_x, b) for b in args.batch_sizes]
    for cell, b in zip(cells, args.batch_sizes, strict=True):
        cell.per, cell.unit = 1e6 / b, "µs/jet"
        cell.calibrate(args.block)
    for _ in range(args.repeats):
        for cell in cells:
            cell.time_block()
    lines = ["| batch | µs/jet (wall) | µs/jet (CPU) | CPU per jet, relative |", "|---|---|---|---|"]
    for cell in cells:
        lines.append(f"| {cell.variant} | {cell.median:.1f} | {cell.cpu_median:.1f} | "
                     f"{cells[0].cpu_median / cell.cpu_median:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_torch(args.threads)
    overrides = ["model=conditional_flow", "data=jetnet", f"data.path={args.data}", *args.overrides]
    if args.batch_sizes:
        machine = (f"{cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), {args.repeats} blocks of "
                   f"~{args.block} s per cell, load average {os.getloadavg()[0]:.2f} at the end")
        table = per_jet(args, overrides)
        print(f"{machine}\n{table}")
        if args.md:
            args.md.write_text(f"{machine}\n\n{table}\n")
        return 0
    cfg, old_model, old_step, train_x = build(overrides, reference=True)
    _, new_model, new_step, _ = build(overrides, reference=False)
    _, default_model, _, _ = build([o for o in overrides if o != "model=conditional_flow"], reference=False)
    with torch.no_grad():  # the same starting point, checked: both builds drew the same parameters
        for a, b in zip(old_model.parameters(), new_model.parameters(), strict=True):
            assert torch.equal(a, b)
    batch = cfg.train.batch_size
    for step in (old_step, new_step):
        train_cell("", step, train_x, batch).run(args.warm_steps)
    cells = [train_cell("old", old_step, train_x, batch), train_cell("new", new_step, train_x, batch)]
    run_threads = training_threads(0, args.threads, "conditional_flow", "cpu")
    if run_threads != args.threads:  # old: the step on --threads before; new: on the threads a run now trains on
        cells += [train_cell("old", old_step, train_x, batch, name=f"train step, as a run takes it ({run_threads})"),
                  train_cell("new", new_step, train_x, batch, run_threads,
                             name=f"train step, as a run takes it ({run_threads})")]
    for n_jets in (batch, GENERATE_BATCH):
        cells += [generate_cell("old", old_model, n_jets), generate_cell("new", new_model, n_jets),
                  generate_cell(TORCH_SPLINE, new_model, n_jets, compiled=False),
                  generate_cell("default model", default_model, n_jets)]
    if args.spline:
        cells += spline_cells(batch, train=True) + spline_cells(GENERATE_BATCH, train=False)
    for cell in cells:
        cell.calibrate(args.block)
    started = time.perf_counter()
    for _ in range(args.repeats):
        for cell in cells:
            cell.time_block()
    rows = []
    for name in dict.fromkeys(cell.name for cell in cells):
        group = {cell.variant: cell for cell in cells if cell.name == name}
        old, new = group["old"], group["new"]
        row = {"cell": name, "unit": new.unit, "old": old.median, "new": new.median, "old/new": old.median / new.median,
               "spread new": (max(new.blocks) - min(new.blocks)) / new.median,
               "CPU old/new": old.cpu_median / new.cpu_median}
        for column in (TORCH_SPLINE, "default model"):
            if column in group:
                row[column] = group[column].median
        rows.append(row)
    machine = (f"{cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), batch {batch}, "
               f"{args.repeats} blocks of ~{args.block} s per cell, {time.perf_counter() - started:.0f} s timed, "
               f"load average {os.getloadavg()[0]:.2f} at the end")
    table = _table(rows)
    print(machine)
    print(table)
    if args.md:
        args.md.write_text(f"{machine}\n\n{table}\n")
    return 0


def _table(rows: list[dict]) -> str:
    columns = ["cell", "unit", "old", "new", "old/new", "CPU old/new", TORCH_SPLINE, "default model", "spread new"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
