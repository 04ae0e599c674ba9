"""Time to quality: how good the generated jets are against the wall-clock time spent training, every epoch.

Trains one configuration (by default the real-jet study's best: the conditional-flow likelihood with triangular
Sylvester flows, K = 10, gradients clipped at 1, on JetNet-style jets with half held out and a tenth of the
training jets for validation, as ``+experiment=jetnet_study`` does) with the project's own training loop, and
after every epoch stops the clock, generates jets from the prior with the model as it is, and scores them against
the validation jets with a quick version of JetNet's protocol (:func:`flowvae.metrics.protocol.score_jets` under
``jetnet`` with its batch sizes scaled to the validation set: FPD's batches 40–100 % of it, KPD's half of it, W1M
over batches of all of it): FPD, KPD, W1M, and the share of generated jets whose particles' pT fractions add up to
more than 1.05 (real jets: about 1 in 10,000), with the largest sum and the largest single fraction. First it
scores as many held-out real jets the same way: the truth row, what a perfect generator would reach at these
sizes (epoch 0 in the file, drawn dotted).

Every line goes to stdout as the epoch ends and to ``<out>/curve.csv``; at the end ``<out>/curve.png`` draws FPD,
KPD and W1M against the minutes of training (scoring excluded) and ``--compare`` adds other runs' curves to the
picture. Training stops after ``--minutes`` of training time or ``train.epochs`` epochs. ``train_cpu_minutes`` is
the process's CPU time spent training (every thread's): with one thread, what the training costs a core of its own
even when other work shares the machine, so runs made side by side compare by it.

    python scripts/bench_time_to_quality.py --data gluon_30p_100k.npz --minutes 30 --out ttq
    python scripts/bench_time_to_quality.py --data gluon_30p_100k.npz --minutes 30 --out ttq_fraction \\
        data.transforms=[none,none,fraction,none] --compare ttq
    python scripts/bench_time_to_quality.py --reference-spline ...     # the conditional flow's spline as before

Any further arguments are config overrides, after the defaults above (``train.batch_size=500 train.lr=3e-3``).
The figures depend on the machine: name its CPU (printed first) beside them.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as flowvae's CLI: spinning threads stall on a shared machine

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from flowvae.app import register_configs  # noqa: E402
from flowvae.cores import cpu_name, torch_threads, training_threads  # noqa: E402
from flowvae.data.events import load_events  # noqa: E402
from flowvae.data.units import data_units  # noqa: E402
from flowvae.metrics.protocol import score_jets  # noqa: E402
from flowvae.models.sampling import generate_events  # noqa: E402
from flowvae.run.experiment import model_tensors, seeded_model  # noqa: E402
from flowvae.run.preflight import configure_torch, fit_feature_map  # noqa: E402
from flowvae.training.callbacks import Callback, StopRequests  # noqa: E402
from flowvae.training.kit import split_validation  # noqa: E402
from flowvae.training.loop import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEST = ["data=jetnet", "model=conditional_flow", "flow=triangular", "n_flows=10", "data.test_fraction=0.5",
        "train.grad_clip=1.0", "train.val_fraction=0.1", "train.epochs=1000"]
# A jet whose particles' pT fractions add up to more than this is in the tail FPD and KPD punish (issue: 0.02 % of
# real gluon jets, 0.6 % of a conditional flow's after 16 epochs).
SUM_TAIL = 1.05
COLUMNS = ["epoch", "train_minutes", "train_cpu_minutes", "train_loss", "val_loss", "fpd", "fpd_err", "kpd", "kpd_err",
           "w1m", "w1m_err",
           "sum_tail", "sum_max", "share_max", "score_seconds"]


X_AXIS = {"wall": ("train_minutes", "training minutes (scoring excluded)"),
          "cpu": ("train_cpu_minutes", "training CPU minutes (scoring excluded)")}


def composed(data: str, overrides: list[str]):
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*BEST, f"data.path={data}", *overrides])


def pt_sums(jets: np.ndarray, mask: np.ndarray | None, pt: int) -> tuple[np.ndarray, float]:
    """Each jet's sum of its particles' pT fractions, and the largest single fraction."""
    shares = jets[:, pt] if mask is None else np.where(mask, jets[:, pt], 0.0)
    return shares.sum(axis=1), float(shares.max())


class Quality(Callback):
    """After every epoch: stop the clock, score the model as it is against the validation jets, write a line."""

    def __init__(self, cfg, model, val_x, reference, ref_mask, events, feature_map, out: Path, minutes: float,
                 every: int = 1, clock: str = "wall"):
        self.cfg, self.model, self.val_x = cfg, model, val_x
        self.reference, self.ref_mask, self.events, self.feature_map = reference, ref_mask, events, feature_map
        self.settings = OmegaConf.merge(cfg.eval, {"n_samples": len(reference), "source": "prior"})
        n = len(reference)
        self.options = {"protocol": "jetnet", "num_eval_samples": n, "num_batches": 5,
                        "fpd_options": {"min_samples": 2 * n // 5, "max_samples": n},
                        "kpd_options": {"batch_size": n // 2}}
        self.out, self.budget, self.trained, self.started = out, 60.0 * minutes, 0.0, time.perf_counter()
        self.cpu, self.cpu_started = 0.0, time.process_time()  # every thread's CPU time: fair under other load
        self.rows: list[dict] = []
        self.every, self.clock = every, clock

    def truth(self) -> None:
        """The truth row (epoch 0): as many held-out real jets as validation jets, scored as generated ones."""
        n = len(self.reference)
        if len(self.events.test) < n:
            return
        mask = None if self.events.test_mask is None else self.events.test_mask[:n]
        self.record({"epoch": 0}, self.events.test[:n], mask, time.perf_counter())
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_epoch_end(self, row: dict, history: list[dict]) -> None:
        if row["epoch"] % self.every and not self.should_stop():
            return  # the clock runs on: this epoch is not scored
        self.trained += time.perf_counter() - self.started
        self.cpu += time.process_time() - self.cpu_started
        scoring = time.perf_counter()
        training = self.model.training
        try:
            generated, mask = generate_events(self.model, self.settings, self.val_x, self.cfg.seed,
                                              self.events.train.shape[1:])
        finally:
            self.model.train(training)
        self.record(row, data_units(self.feature_map, generated, mask, self.events.kinematics), mask, scoring)
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def record(self, row: dict, jets: np.ndarray, mask: np.ndarray | None, scoring: float) -> None:
        sums, share_max = pt_sums(jets, mask, self.events.kinematics[2])
        try:
            scores = score_jets(jets, mask, self.reference, self.ref_mask, self.events.kinematics,
                                seed=self.cfg.seed, **self.options)
        except ValueError as err:  # non-finite jets: this epoch scores nothing
            print(f"epoch {row['epoch']}: not scored ({err})", file=sys.stderr)
            scores = {}
        line = {"epoch": row["epoch"], "train_minutes": self.trained / 60.0,
                "train_cpu_minutes": self.cpu / 60.0, "train_loss": row.get("train_loss"),
                "val_loss": row.get("val_loss"), **{k: scores.get(k, float("nan")) for k in COLUMNS[5:11]},
                "sum_tail": float((sums > SUM_TAIL).mean()), "sum_max": float(sums.max()), "share_max": share_max,
                "score_seconds": time.perf_counter() - scoring}
        self.rows.append(line)
        write_csv(self.out / "curve.csv", self.rows)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items()),
              flush=True)

    def should_stop(self) -> bool:
        if self.clock == "cpu":
            return self.cpu + time.process_time() - self.cpu_started > self.budget
        return self.trained + time.perf_counter() - self.started > self.budget


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_curve(path: Path) -> dict[str, np.ndarray]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return {key: np.array([float(r[key] or "nan") for r in rows]) for key in COLUMNS}


def split_truth(curve: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float] | None]:
    """A curve's epochs, and its truth row (epoch 0) if it has one."""
    first = curve["epoch"] == 0
    epochs = {key: values[~first] for key, values in curve.items()}
    return epochs, ({key: float(values[first][0]) for key, values in curve.items()} if first.any() else None)


def plot(curves: dict[str, dict[str, np.ndarray]], path: Path, title: str, clock: str = "wall") -> None:
    """FPD, KPD and W1M against the minutes of training (wall-clock, or the training's CPU minutes), one line per
    run; the goal FPD ≤ 5e-3 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (metric, goal), ax in zip((("fpd", 5e-3), ("kpd", None), ("w1m", None)), axes, strict=True):
        for label, whole in curves.items():
            curve, truth = split_truth(whole)
            line = ax.errorbar(curve[X_AXIS[clock][0]], np.clip(curve[metric], 1e-6, None),
                               yerr=curve[f"{metric}_err"], marker="o", ms=3, lw=1, capsize=2, label=label)
            if truth is not None:
                ax.axhline(max(truth[metric], 1e-6), ls=":", lw=1, c=line[0].get_color(), label=f"{label}: truth")
        if goal is not None:
            ax.axhline(goal, ls="--", c="k", lw=0.8, label=f"goal {goal:g} (JetNet's 50k jets)")
        ax.set(yscale="log", xlabel=X_AXIS[clock][1], ylabel=f"{metric.upper()} (quick)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw(args: argparse.Namespace, title: str) -> None:
    """``<out>/curve.png`` from ``<out>/curve.csv`` and the ``--compare`` folders' curves, against ``--clock``."""
    curves = {args.label or args.out.name: read_curve(args.out / "curve.csv")}
    curves.update({other.name: read_curve(other / "curve.csv") for other in args.compare})
    plot(curves, args.out / "curve.png", title, args.clock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "tests" / "data" / "gluon_30p_slice.npz"),
                        help="a JetNet-layout .npz (default: the tests' 400-jet slice, a smoke test only)")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget (scoring excluded)")
    parser.add_argument("--out", type=Path, default=Path("ttq"), help="folder for curve.csv and curve.png")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: every core, and the conditional flow trains on one as a run does)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what --minutes counts: wall-clock training time, or the training's CPU time (fair "
                             "on a shared machine with --threads 1)")
    parser.add_argument("--score-every", type=int, default=1, help="score after every this many epochs (and the last)")
    parser.add_argument("--reference-spline", action="store_true",
                        help="the conditional flow's spline as before flowvae.models.spline (zuko's)")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other runs' folders to draw beside")
    parser.add_argument("--label", default=None, help="this run's name in the picture (default: its folder)")
    parser.add_argument("--plot-only", action="store_true",
                        help="train nothing: draw --out's curve (and --compare's) again, e.g. after a stop")
    args, overrides = parser.parse_known_args(argv)
    if args.plot_only:
        draw(args, f"{Path(args.data).name}, --clock {args.clock}")
        return 0
    cfg = composed(args.data, overrides)
    threads = args.threads or os.cpu_count() or 1
    configure_torch(threads)
    print(f"# {cpu_name()}, {threads} thread{'s' * (threads > 1)}, torch {torch.__version__}; "
          f"overrides: {' '.join(BEST[1:] + overrides)}"
          f"{' (old spline)' if args.reference_spline else ''}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    events = load_events(cfg.data)
    feature_map = fit_feature_map(cfg, events)
    train_x, val_x, test_x = model_tensors(cfg, events, feature_map, torch.device("cpu"))
    held = split_validation(torch.arange(len(events.train)), cfg.train.val_fraction, cfg.data.seed)[1].numpy()
    reference = events.train[held]
    ref_mask = None if events.train_mask is None else events.train_mask[held]
    model = seeded_model(cfg, events, torch.device("cpu"))
    if args.reference_spline:
        model.likelihood_flow.reference = True
    quality = Quality(cfg, model, val_x, reference, ref_mask, events, feature_map, args.out, args.minutes,
                      args.score_every, args.clock)
    print(f"# {len(train_x)} training jets, {len(reference)} validation jets scored each epoch", flush=True)
    quality.truth()
    checkpoint = args.out / "checkpoint.pt"
    checkpoint.unlink(missing_ok=True)
    with torch_threads(training_threads(args.threads, threads, cfg.model.name, "cpu")):  # as a run trains
        fit(model, train_x, test_x, cfg.train, seed=cfg.seed, checkpoint=checkpoint, val_x=val_x,
            callbacks=[quality, StopRequests()])
    draw(args, f"{cpu_name()}, {threads} thread{'s' * (threads > 1)}; {Path(args.data).name}")
    best = min(quality.rows[1:] or quality.rows, key=lambda r: r["fpd"] if np.isfinite(r["fpd"]) else np.inf)
    print(f"# best FPD {best['fpd']:.3g} ± {best['fpd_err']:.2g} after {best['train_minutes']:.1f} min "
          f"(epoch {best['epoch']}); {args.out / 'curve.csv'}, {args.out / 'curve.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
