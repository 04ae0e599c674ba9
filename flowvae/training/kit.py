"""The training kit that :func:`flowvae.training.loop.fit` and :func:`flowvae.training.stacked.fit_stacked` share:
the outcome record, checkpoints (atomic writes, the format, restoring, refusing another config's), the loss passes
on held-out events, the validation split and its best-epoch tracker (by the validation loss or ``train.select_by``'s
metric), the KL warm-up and learning-rate schedules (:class:`Plan`), the weights' moving average (:class:`Ema`,
``train.ema``), the optimizer and its step, the per-epoch report (:class:`Progress`), and one model's training as
both loops hold it (:class:`Trainee`: its resume, its checkpoints, and an epoch's end, the same in both)."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from flowvae.errors import ConfigError
from flowvae.files import replaced
from flowvae.models import FlowVAE, LossTerms
from flowvae.training.callbacks import Callback, Callbacks

__all__ = ["EVAL_SEED_OFFSET", "VAL_SEED_OFFSET", "VAL_SPLIT_STREAM", "TRAINED_KEY", "TrainOutcome", "save_atomic",
           "evaluate_loss", "split_validation", "learning_rate", "CheckpointMismatch", "check_checkpoint",
           "trained_record", "trained_outcome", "save_checkpoint", "restore_checkpoint", "Validation",
           "check_patience", "check_selection", "SELECTED", "kl_beta", "Plan", "Ema", "ema_step", "progress_bar",
           "report_epoch", "Progress", "make_optimizer", "make_step", "EpochEnd", "Trainee", "EVAL_BATCH_SIZE",
           "LOSS_TERMS"]


log = logging.getLogger(__name__)


# The test loss draws its noise from seed + 2 (generation uses seed + 1, training the global stream from seed).
EVAL_SEED_OFFSET = 2


# The validation loss draws its noise from seed + 3: a function of the weights, apart from the test loss's.
VAL_SEED_OFFSET = 3


# The validation split's stream: numpy's generator seeded with (data.seed, this), apart from data.seed's own draws.
VAL_SPLIT_STREAM = 1


# The held-out loss passes' batch (evaluate_loss): a seed's noise is drawn batch by batch, so a stacked group's
# pass over all its seeds (flowvae.training.stacked) batches the events as this does.
EVAL_BATCH_SIZE = 1000


# What a loss pass measures, in the order LossTerms.stacked() and a stacked pass's (S, 3) rows give them.
LOSS_TERMS = tuple(term.name for term in fields(LossTerms))


# train.select_by's default: the best epoch is the one with the lowest validation loss.
SELECTED = "val_loss"


# A checkpoint's record of a training that ended elsewhere (a stacked group of seeds, flowvae.training.stacked): its
# outcome, so the seed's own job scores it without training and its row says what the training did.
TRAINED_KEY = "trained"


@dataclass
class TrainOutcome:
    """How training ended: ``ok``, ``diverged`` (a non-finite loss), ``pruned`` (a callback pruned it: a search's
    pruner) or ``interrupted`` (asked to stop)."""

    status: str
    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0  # epochs trained by this process (fewer than train.epochs after a resume)
    resumed_from: int = 0
    message: str = ""
    epochs_trained: int = 0  # epochs done in all, across resumes (where an early stop ended training)
    best_epoch: int | None = None  # with validation: the epoch whose weights the model holds at the end


def save_atomic(obj: object, path: Path) -> None:
    """torch.save through a temporary file and a rename: a kill never leaves half a checkpoint."""
    with replaced(path) as tmp:
        torch.save(obj, tmp)


@torch.no_grad()
def evaluate_loss(model: FlowVAE, x: Tensor, seed: int = 0, batch_size: int = EVAL_BATCH_SIZE
                  ) -> dict[str, float]:
    """Mean loss, reconstruction and KL term on ``x`` (beta = 1), in batches.

    The noise comes from a generator seeded afresh with ``seed`` on every call: the result is a function of the
    weights alone (epochs are compared with the same noise), and training's random stream is never touched, so
    how often the test loss is evaluated cannot change what is trained.
    """
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    sums = torch.zeros(3, device=x.device, dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        terms = model.loss(batch, generator=generator)
        sums += terms.stacked().double() * len(batch)
    model.train()
    return dict(zip(LOSS_TERMS, (sums / len(x)).tolist(), strict=True))


def split_validation(train_x: Tensor, fraction: float, data_seed: int) -> tuple[Tensor, Tensor | None]:
    """(training events, validation events or None): ``round(fraction * N)`` of the N training events (at least
    one, and one left to train on), drawn by a generator seeded from ``data_seed`` alone, so every model seed of a
    data set validates on the same events. Both keep the events' order; ``fraction`` 0 returns ``train_x`` itself.
    """
    if fraction <= 0:
        return train_x, None
    n = len(train_x)
    n_val = min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng([data_seed, VAL_SPLIT_STREAM]).permutation(n)
    held = np.zeros(n, dtype=bool)
    held[order[:n_val]] = True
    held = torch.from_numpy(held).to(train_x.device)
    return train_x[~held], train_x[held]


def learning_rate(cfg_train, step: int, total_steps: int) -> float:
    """The learning rate of optimisation step ``step`` (from 0) of ``total_steps``: ``train.lr`` for ``constant``;
    for ``cosine``, lr_min + (lr - lr_min) (1 + cos(pi step / total_steps)) / 2 with lr_min = lr * lr_min_factor.

    Per step, not per epoch: the decay is smooth however few the epochs, and it is a function of the step alone,
    so a run resumed inside an epoch needs no scheduler state beyond the step it resumes at."""
    schedule = cfg_train.get("lr_schedule", "constant")
    if schedule == "constant":
        return cfg_train.lr
    if schedule == "cosine":
        low = cfg_train.lr * cfg_train.get("lr_min_factor", 0.0)
        return low + (cfg_train.lr - low) * (1 + math.cos(math.pi * step / total_steps)) / 2
    raise ValueError(f"unknown train.lr_schedule {schedule!r}")


@dataclass
class Validation:
    """The best value so far of what picks the best epoch (``select_by``: the validation loss, or a metric of events
    generated after each epoch, :func:`check_selection`), its epoch and weights, and the epochs since; the checkpoint
    keeps all but the weights (which are in ``best.pt``)."""

    patience: int | None
    path: Path | None  # best.pt, or None (kept in memory only)
    extra_state: dict
    select_by: str = SELECTED
    best_loss: float = math.inf  # the best value of select_by (the name of before, when it was always the loss)
    best_epoch: int = 0
    since_best: int = 0
    stopped: bool = False  # training ended early: a resumed run trains no further
    weights: dict | None = None  # the best epoch's, when this process saw it

    @property
    def key(self) -> str:
        """The history row's column of the value that picks the best epoch: ``val_loss``, ``val_kl_sum``, ..."""
        return SELECTED if self.select_by == SELECTED else f"val_{self.select_by}"

    @property
    def label(self) -> str:
        """The value in the log's words: ``validation loss``, ``validation kl_sum``, ..."""
        return "validation loss" if self.select_by == SELECTED else f"validation {self.select_by}"

    def state(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "since_best": self.since_best,
                "stopped": self.stopped, "select_by": self.select_by}

    def restore(self, state: dict, path: Path | None = None) -> None:
        selected = state.get("select_by", SELECTED)  # checkpoints of before selected by the validation loss
        if selected != self.select_by:
            raise CheckpointMismatch(f"the checkpoint {path} chose its best epoch by {selected}, this training by "
                                     f"train.select_by={self.select_by}; move it away or use another run directory")
        self.best_loss, self.best_epoch = float(state["best_loss"]), int(state["best_epoch"])
        self.since_best, self.stopped = int(state["since_best"]), bool(state["stopped"])

    def update(self, model: FlowVAE, loss: float, epoch: int) -> bool:
        """Record epoch ``epoch``'s value ``loss`` of ``select_by`` (lower is better); whether training should stop
        (patience run out)."""
        if loss < self.best_loss:  # a NaN loss is never better
            self.best_loss, self.best_epoch, self.since_best = loss, epoch, 0
            self.weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
            if self.path is not None:
                save_atomic({"epoch": epoch, self.key: loss, "model": self.weights, "extra": self.extra_state},
                            self.path)
        else:
            self.since_best += 1
        self.stopped = self.patience is not None and self.since_best >= self.patience
        return self.stopped

    def why_stopped(self, epoch: int) -> str:
        """What the log says of an early stop after epoch ``epoch``."""
        return (f"stopped early after epoch {epoch}: no better {self.label} for {self.since_best} epochs; best "
                f"epoch {self.best_epoch} ({self.label} {self.best_loss:.4f})")

    def best_weights(self) -> dict:
        """The best epoch's weights: this process's copy, or ``best.pt`` (written before a resume)."""
        if self.weights is not None:
            return self.weights
        state = torch.load(self.path, map_location="cpu", weights_only=True) if self.path is not None \
            and self.path.exists() else {}
        if state.get("epoch") != self.best_epoch or state.get("extra") != self.extra_state:
            raise RuntimeError(f"the best weights (epoch {self.best_epoch}) are not in {self.path}: it is missing or "
                               f"from another epoch or config; remove the run directory's checkpoint to train anew")
        return state["model"]


def check_patience(cfg_train, val_x: Tensor | None) -> None:
    if cfg_train.get("patience") is not None and val_x is None:
        raise ValueError("train.patience needs validation events (train.val_fraction > 0)")


def check_selection(cfg_train, val_x: Tensor | None, select: Callable[[], float] | None) -> None:
    """``train.select_by`` other than the validation loss needs validation events and ``select``, the measure of
    the model as it is (a metric of events generated from it against the validation events:
    :func:`flowvae.run.trial.validation_objective`); ``select`` without it is a mistake too."""
    select_by = cfg_train.get("select_by", SELECTED)
    if select_by == SELECTED:
        if select is not None:
            raise ValueError(f"a selection measure was given but train.select_by is {SELECTED}")
        return
    if val_x is None:
        raise ValueError(f"train.select_by={select_by} needs validation events (train.val_fraction > 0)")
    if select is None:
        raise ValueError(f"train.select_by={select_by} needs its measure of the model (select=...): the metric of "
                         f"events generated from it against the validation events")


def kl_beta(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


class Plan:
    """A training's steps on its training events ``train_x``: the settings (``cfg_train``), the events' count and
    device, the steps an epoch, the KL weight and learning rate of each step (counted from 0 over the whole
    training), and which epochs end with a checkpoint."""

    def __init__(self, cfg_train, train_x: Tensor) -> None:
        self.cfg = cfg_train
        self.n, self.device = len(train_x), train_x.device
        self.steps_per_epoch = math.ceil(self.n / cfg_train.batch_size)
        self.warmup_steps = cfg_train.warmup_epochs * self.steps_per_epoch
        self.total_steps = cfg_train.epochs * self.steps_per_epoch
        self.scheduled = cfg_train.get("lr_schedule", "constant") != "constant"
        self.ema = float(cfg_train.get("ema", 0.0) or 0.0)  # the moving average's decay (0: none)

    def ema_weight(self, step: int) -> float | None:
        """The share of step ``step``'s (from 0) weights in the moving average after it (:class:`Ema`); None
        without one. A function of the step alone, like the learning rate: a resume needs only the average."""
        if not self.ema:
            return None
        return (1.0 - self.ema) / (1.0 - self.ema ** (step + 1))

    def beta(self, step: int) -> float:
        return kl_beta(step, self.warmup_steps)

    def lr(self, step: int) -> float | None:
        """The scheduled learning rate of ``step``; None for a constant one (the optimizer keeps train.lr)."""
        return learning_rate(self.cfg, step, self.total_steps) if self.scheduled else None

    def checkpoint_due(self, epochs_done: int) -> bool:
        return epochs_done % self.cfg.checkpoint_every == 0


@torch.no_grad()
def ema_step(averages: list[Tensor], params: list[Tensor], weight: float) -> None:
    """``averages`` <- (1 - weight) ``averages`` + weight ``params``, tensor by tensor, as three elementwise float
    operations each rounded on its own (two products, then a sum; no fused multiply-add, which a vectorized kernel
    and its scalar tail would round differently): an element's result depends on its own two values alone, so a
    seed's slice of a stacked tensor (:mod:`flowvae.training.stacked`) averages bit for bit as fit's own tensor."""
    torch._foreach_mul_(averages, 1.0 - weight)
    torch._foreach_add_(averages, torch._foreach_mul(params, weight))


class Ema:
    """An exponential moving average of ``model``'s parameters with decay ``decay`` (``train.ema``), updated after
    every optimizer step (:meth:`update`, with :meth:`Plan.ema_weight`).

    After step t (from 1) the average is sum_s (1 - d) d^(t-s) p_s / (1 - d^t) over the weights p_s after each step
    s <= t: Adam's bias correction, so every step's weights count and the initial ones not at all, however few the
    steps (an average started at the initial weights keeps d^t of them: 13% after 2000 steps at 0.999). It is kept
    as the recursion a_t = (1 - w_t) a_(t-1) + w_t p_t, w_t = (1 - d) / (1 - d^t) (w_1 = 1, a_1 = p_1), whose w_t is a
    function of the step alone. The average is what validates, generates and is scored: :meth:`averaged` lends it
    to the model for a while, :meth:`apply` gives it for good; the checkpoint's ``model`` holds it (what a rebuilt run
    generates from) and :meth:`state` the training weights, with which training goes on."""

    def __init__(self, model: FlowVAE, decay: float) -> None:
        self.model, self.decay = model, decay
        self.params = dict(model.named_parameters())
        self.average = {name: p.detach().clone() for name, p in self.params.items()}

    def update(self, weight: float) -> None:
        ema_step(list(self.average.values()), list(self.params.values()), weight)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The model holds the average inside the block and its training weights again after it, bit for bit."""
        with torch.no_grad():
            training = [p.detach().clone() for p in self.params.values()]
            for name, p in self.params.items():
                p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, weights in zip(self.params.values(), training, strict=True):
                    p.copy_(weights)

    @torch.no_grad()
    def apply(self) -> None:
        """The average into the model for good (training is over)."""
        for name, p in self.params.items():
            p.copy_(self.average[name])

    def model_state(self) -> dict:
        """The model's state dict with the average for its parameters (copies): the checkpoint's ``model``."""
        with self.averaged():
            return {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}

    def state(self) -> dict:
        """The checkpoint's ``ema``: the decay, and the training weights (the average is its ``model``)."""
        return {"decay": self.decay, "training": {name: p.detach().clone() for name, p in self.params.items()}}

    @torch.no_grad()
    def restore(self, state: dict) -> None:
        """From a checkpoint whose ``model`` the model holds now (the average): the average from it, the training
        weights from ``state`` (:meth:`state`'s)."""
        self.average = {name: p.detach().clone() for name, p in self.params.items()}
        for name, p in self.params.items():
            p.copy_(state["training"][name])


def progress_bar(total: int, initial: int, mode: str):
    """A tqdm bar on a terminal (or when asked for), else None and one log line per epoch."""
    if mode == "log" or (mode == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="epochs", unit="epoch", dynamic_ncols=True)


class Progress(Callback):
    """fit's progress: a line for every epoch (:func:`report_epoch`), on a tqdm bar on a terminal
    (:func:`progress_bar`), which :meth:`close` ends."""

    def __init__(self, cfg_train, first_epoch: int, scheduled: bool) -> None:
        self.epochs, self.scheduled = cfg_train.epochs, scheduled
        self.bar = progress_bar(cfg_train.epochs, first_epoch, cfg_train.progress)

    def on_epoch_end(self, row: dict, history: list[dict]) -> None:
        report_epoch(row, self.epochs, self.bar, self.scheduled)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_optimizer(model: FlowVAE, cfg_train) -> torch.optim.Optimizer:
    """Adam, fused: one kernel for every parameter instead of ~10 small ops each (a quarter of a plain CPU step)."""
    return torch.optim.Adam(model.parameters(), lr=cfg_train.lr, fused=True)


def make_step(model: FlowVAE, optimizer: torch.optim.Optimizer, grad_clip: float | None):
    """One optimisation step; returns the batch's (loss, recon, kl) as a float64 device tensor (no sync)."""

    def step(batch: Tensor, beta: float) -> Tensor:
        terms = model.loss(batch, beta)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return terms.stacked().detach().double()

    return step


def report_epoch(row: dict, epochs: int, bar, scheduled: bool = False) -> None:
    evaluated = math.isfinite(row["test_loss"])
    test = f"  test loss {row['test_loss']:.4f}  kl {row['test_kl']:.4f}" if evaluated else ""
    val = f"  val loss {row['val_loss']:.4f}" if "val_loss" in row else ""
    selected = [key for key in row if key.startswith("val_") and key not in ("val_loss", "val_recon", "val_kl")]
    val += "".join(f"  val {key[4:]} {row[key]:.4f}" for key in selected)  # train.select_by's metric
    lr = f"  lr {row['lr']:.3g}" if scheduled else ""
    text = (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f}{val}{test}{lr}  "
            f"({row['seconds']:.1f} s)")
    if bar is None:
        log.info(text)
    else:
        log.debug(text)
        postfix = {"loss": f"{row['train_loss']:.3f}"}
        if "val_loss" in row:
            postfix.update(val=f"{row['val_loss']:.3f}")
        if evaluated:
            postfix.update(test=f"{row['test_loss']:.3f}", kl=f"{row['test_kl']:.3f}")
        if scheduled:
            postfix.update(lr=f"{row['lr']:.2g}")
        bar.set_postfix(postfix)
        bar.update(1)


def save_checkpoint(path: Path, model, optimizer, shuffle: torch.Generator, outcome: TrainOutcome, epoch: int,
          extra_state: dict, partial: dict | None = None, validation: Validation | None = None,
          trained: dict | None = None, ema: Ema | None = None) -> None:
    """``epoch`` whole epochs done, plus ``partial`` (step, order, sums) of the next one when stopped inside it;
    with validation its best value, best epoch, epochs since, what picks it and whether it stopped training (the
    learning rate needs no state: it is a function of the step, and the optimizer's holds the last one);
    ``trained``, the :func:`trained_record` of a training that ended (a stacked group's seed), under
    :data:`TRAINED_KEY`. With a moving average (``ema``) ``model`` holds the average, the weights that are generated
    from and scored (a rebuilt run's), and ``ema`` the training weights (:meth:`Ema.state`); without one the
    checkpoint has no ``ema`` key, as before there was one."""
    save_atomic({
        "epoch": epoch,
        "partial": partial,
        "model": model.state_dict() if ema is None else ema.model_state(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.random.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "shuffle_rng": shuffle.get_state(),
        "history": outcome.history,
        "extra": extra_state,
        "validation": None if validation is None else validation.state(),
        **({} if trained is None else {TRAINED_KEY: trained}),
        **({} if ema is None else {"ema": ema.state()}),
    }, path)


class CheckpointMismatch(ValueError):
    """A checkpoint in the run directory belongs to another config: resuming from it would mix two runs."""


def _check_extra(path: Path, state: dict, extra_state: dict) -> None:
    if state.get("extra") != extra_state:
        raise CheckpointMismatch(f"the run directory holds a checkpoint ({path}) written by a different config "
                                 f"({state.get('extra')} != {extra_state}); move it away or use another run "
                                 f"directory")


def check_checkpoint(path: Path, extra_state: dict) -> int | None:
    """The epochs done in the checkpoint at ``path`` (None when there is none); raises
    :class:`CheckpointMismatch` when it was written with other ``extra_state``. Loads no weights onto a device."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    _check_extra(path, state, extra_state)
    return int(state["epoch"])


def trained_record(outcome: TrainOutcome) -> dict:
    """What a checkpoint keeps under :data:`TRAINED_KEY` of a training that ended elsewhere (a stacked group):
    ``outcome`` without its history (the checkpoint has that already)."""
    return {"status": outcome.status, "message": outcome.message, "epochs_run": outcome.epochs_run,
            "resumed_from": outcome.resumed_from, "epochs_trained": outcome.epochs_trained,
            "best_epoch": outcome.best_epoch}


def trained_outcome(model: FlowVAE, outcome: TrainOutcome, trained: dict, validation: Validation | None
                     ) -> TrainOutcome:
    """The outcome a finished checkpoint records, the model holding the weights it is scored with."""
    for key in ("status", "message", "epochs_run", "resumed_from", "epochs_trained", "best_epoch"):
        setattr(outcome, key, trained[key])
    if validation is not None and outcome.status == "ok" and outcome.best_epoch:
        model.load_state_dict(validation.best_weights())
    return outcome


def restore_checkpoint(path: Path, model, optimizer, shuffle: torch.Generator, outcome: TrainOutcome,
             extra_state: dict, validation: Validation | None = None, ema: Ema | None = None
             ) -> tuple[int, dict | None, dict | None]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    _check_extra(path, state, extra_state)
    if (ema is None) != (state.get("ema") is None):
        written, wanted = ("without", "with") if ema is not None else ("with", "without")
        raise CheckpointMismatch(f"the checkpoint {path} was written {written} a moving average of the weights "
                                 f"(train.ema) and this training is {wanted} one; move it away or use another run "
                                 f"directory")
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.restore(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    torch.random.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    shuffle.set_state(state["shuffle_rng"])
    outcome.history = list(state["history"])
    if validation is not None and state.get("validation") is not None:
        validation.restore(state["validation"], path)
    return int(state["epoch"]), state.get("partial"), state.get(TRAINED_KEY)


class EpochEnd(NamedTuple):
    """An epoch's end (:meth:`Trainee.end_epoch`): its history row; whether training ends with it (the last epoch,
    or the patience run out); and whether that was an early stop, before ``train.epochs``."""

    row: dict
    last: bool
    early: bool


class Trainee:
    """One model in training, as both loops hold it: its optimizer, batch-order stream, checkpoint, validation,
    callbacks and outcome; where it starts (``start``: epoch and step) and the current epoch's batch order and
    summed (loss, recon, kl). Its resume (:meth:`restore`), its checkpoints (:meth:`save`), and an epoch's end
    (:meth:`end_epoch`: the row, divergence, validation and early stop, the test loss's cadence, the callbacks) are
    the same in :func:`~flowvae.training.loop.fit` and in each seed of
    :func:`~flowvae.training.stacked.fit_stacked`; the loops differ in how they step and when they write.

    With ``train.ema`` it keeps the weights' moving average (:attr:`ema`, updated by :meth:`after_step`): an
    epoch's end validates, tests, measures and tells the callbacks with the average in the model, and the model
    ends with it (or with the best epoch's). With ``train.select_by`` a metric, ``select`` measures the model after
    each epoch, and that picks the best epoch instead of the validation loss (:func:`check_selection`)."""

    def __init__(self, model: FlowVAE, seed: int, plan: Plan, test_x: Tensor | None = None, *,
                 val_x: Tensor | None = None, checkpoint: Path | None = None, extra_state: dict | None = None,
                 best: Path | None = None, callbacks: Callback | Iterable[Callback | None] | None = (),
                 select: Callable[[], float] | None = None) -> None:
        check_patience(plan.cfg, val_x)
        check_selection(plan.cfg, val_x, select)
        self.model, self.seed, self.plan, self.test_x, self.val_x = model, seed, plan, test_x, val_x
        self.optimizer = make_optimizer(model, plan.cfg)
        self.shuffle = torch.Generator(device="cpu").manual_seed(seed)  # the batch order
        self.checkpoint, self.extra_state = checkpoint, extra_state or {}
        self.validation = None if val_x is None else Validation(plan.cfg.get("patience"), best, self.extra_state,
                                                                plan.cfg.get("select_by", SELECTED))
        self.select = select
        self.ema = Ema(model, plan.ema) if plan.ema else None
        self.callbacks = Callbacks(callbacks)
        self.outcome = TrainOutcome(status="ok")
        self.start = (0, 0)  # (epoch, step) it trains from
        self.order: Tensor | None = None  # the current epoch's batch order (device)
        self.sums: Tensor | None = None  # the current epoch's summed (loss, recon, kl), float64 (device)
        self.trained: dict | None = None  # the checkpoint's record of a training that ended (TRAINED_KEY)
        self.done = False

    def restore(self) -> bool:
        """Resume from the checkpoint, when there is one (False: none): weights, optimizer, torch's streams, the
        batch order's, the history, the validation's state, where to start (and inside an epoch, its order and
        sums so far); :attr:`trained`, a record of a training that ended there."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        epoch, partial, self.trained = restore_checkpoint(self.checkpoint, self.model, self.optimizer, self.shuffle,
                                                          self.outcome, self.extra_state, self.validation, self.ema)
        self.outcome.resumed_from = epoch
        self.start = (epoch, 0)
        if partial is not None:
            self.start = (epoch, int(partial["step"]))
            self.order, self.sums = partial["order"].to(self.plan.device), partial["sums"].to(self.plan.device)
        return True

    def where(self) -> str:
        """Where a resumed training goes on, in words."""
        epoch, step = self.start
        return f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"

    def recorded(self) -> TrainOutcome:
        """The outcome the checkpoint's record (:attr:`trained`) says, the model holding the weights it is scored
        with; nothing is trained."""
        trained_outcome(self.model, self.outcome, self.trained, self.validation)
        if self.ema is not None and not (self.outcome.status == "ok" and self.outcome.best_epoch):
            self.ema.apply()  # the weights it was scored with: the average (the best epoch's came from best.pt)
        self.done = True
        return self.outcome

    def epochs_left(self) -> range:
        """The epochs to train from :attr:`start`: none once validation stopped the training early."""
        first = self.start[0]
        stopped = self.validation is not None and self.validation.stopped
        return range(first, first if stopped else self.plan.cfg.epochs)

    def draw_order(self) -> None:
        """A new epoch: its batch order from the seed's shuffle generator, its sums zero."""
        self.order = torch.randperm(self.plan.n, generator=self.shuffle).to(self.plan.device)
        self.sums = torch.zeros(3, device=self.plan.device, dtype=torch.float64)

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (from 0 over the whole training): the moving average takes its weights."""
        if self.ema is not None:
            self.ema.update(self.plan.ema_weight(step))

    def averaged(self):
        """A block in which the model holds the weights that validate, generate and are scored: the moving average
        with ``train.ema``, else its own."""
        return self.ema.averaged() if self.ema is not None else nullcontext()

    def save(self, epoch: int, partial: dict | None = None, trained: dict | None = None) -> None:
        """The checkpoint (none without a path): ``epoch`` whole epochs done, and :func:`save_checkpoint`'s rest."""
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, self.model, self.optimizer, self.shuffle, self.outcome, epoch,
                            self.extra_state, partial, self.validation, trained, self.ema)

    def interrupt(self, epoch: int, step: int) -> None:
        """A stop request inside epoch ``epoch`` after ``step`` steps: the checkpoint keeps the epoch's batch order
        and sums so far, so a resumed training goes on exactly."""
        self.save(epoch, {"step": step, "order": self.order.cpu(), "sums": self.sums.cpu()})
        self.interrupted(f"in epoch {epoch + 1} after step {step}")

    def interrupted(self, message: str) -> None:
        self.outcome.status, self.outcome.message = "interrupted", message  # the job says how to resume
        self.end()

    def end_epoch(self, epoch: int, started: float) -> EpochEnd | None:
        """Epoch ``epoch``'s end, its steps done (``started``: when it began): the row of its training losses;
        None when the loss is not finite (``diverged``: the row ends the history). Else, with validation, its loss,
        ``train.select_by``'s metric when that picks the best epoch (and whether the patience ran out); the test loss
        every ``eval_every`` epochs and at the last (NaN between); the row in the history; the callbacks'
        :meth:`~Callback.on_epoch_end`. All but the training losses with the weights that are scored in the model
        (:meth:`averaged`). These are the steps :meth:`trained_epoch`, :meth:`validated`, :meth:`test_due` and
        :meth:`close_epoch`, which a stacked group takes one at a time, with its own loss passes between them."""
        row = self.trained_epoch(epoch)
        if row is None:
            return None
        with self.averaged():
            val = None if self.validation is None else evaluate_loss(self.model, self.val_x,
                                                                     seed=self.seed + VAL_SEED_OFFSET)
            end = self.validated(epoch, row, val)
            test = evaluate_loss(self.model, self.test_x, seed=self.seed + EVAL_SEED_OFFSET) \
                if self.test_due(epoch, end) else None
            return self.close_epoch(end, test, time.perf_counter() - started)

    def trained_epoch(self, epoch: int) -> dict | None:
        """The row of epoch ``epoch``'s training losses; None, the outcome ``diverged`` and the row the history's
        last, when the loss is not finite."""
        cfg, outcome = self.plan.cfg, self.outcome
        row = self._training_row(epoch)
        if not math.isfinite(row["train_loss"]):
            outcome.status = "diverged"
            outcome.message = (f"non-finite training loss ({row['train_loss']}) in epoch {epoch + 1}; try a smaller "
                               f"train.lr (now {cfg.lr}) or train.grad_clip")
            outcome.history.append(row)
            return None
        return row

    def validated(self, epoch: int, row: dict, val: dict[str, float] | None) -> EpochEnd:
        """The epoch's validation: its losses ``val`` (:func:`evaluate_loss` on the validation events; None
        without them) and ``train.select_by``'s measure into ``row``, the best epoch and the patience updated;
        whether training ends with this epoch. Inside :meth:`averaged`, as the measure reads the model."""
        early = False
        if self.validation is not None:
            row.update({f"val_{k}": v for k, v in val.items()})
            value = val["loss"]
            if self.select is not None:
                value = row[self.validation.key] = self._measure(epoch)
            early = self.validation.update(self.model, value, epoch + 1)
        last = epoch + 1 == self.plan.cfg.epochs or early
        return EpochEnd(row, last, early and epoch + 1 < self.plan.cfg.epochs)

    def test_due(self, epoch: int, end: EpochEnd) -> bool:
        """Whether epoch ``epoch`` has a test loss: every ``eval_every`` epochs and at the last."""
        return end.last or (epoch + 1) % self.plan.cfg.eval_every == 0

    def close_epoch(self, end: EpochEnd, test: dict[str, float] | None, seconds: float) -> EpochEnd:
        """The epoch's test losses (None: not due, NaN in the row) and its ``seconds`` into its row, the row into the
        history, and the callbacks told. Inside :meth:`averaged`, as the callbacks see the model."""
        if test is None:
            test = dict.fromkeys(LOSS_TERMS, math.nan)
        end.row.update({f"test_{k}": v for k, v in test.items()}, seconds=seconds)
        self.outcome.history.append(end.row)
        self.outcome.epochs_run += 1
        self.callbacks.on_epoch_end(end.row, self.outcome.history)
        return end

    def _measure(self, epoch: int) -> float:
        """``train.select_by``'s value of the model as it is; inf (never the best) for generated events the metric
        refuses (not finite: the run's scoring would refuse them too)."""
        try:
            return float(self.select())
        except ConfigError:
            raise
        except ValueError as err:
            log.warning("%s after epoch %d is inf: %s", self.validation.label, epoch + 1, err)
            return math.inf

    def _training_row(self, epoch: int) -> dict:
        plan = self.plan
        train_loss, train_recon, train_kl = (self.sums / plan.n).tolist()
        row = {"epoch": epoch + 1, "beta": plan.beta((epoch + 1) * plan.steps_per_epoch)}
        if plan.scheduled:  # the epoch's last step's; a constant one is train.lr, and the curves stay as they were
            row["lr"] = self.optimizer.param_groups[0]["lr"]
        row.update(train_loss=train_loss, train_recon=train_recon, train_kl=train_kl)
        return row

    def pruned(self, end: EpochEnd) -> bool:
        """After an epoch that has another after it, whether a callback prunes the training (status ``pruned``,
        its message)."""
        if end.last:
            return False
        with self.averaged():  # a search's objective measures the weights that are scored
            message = self.callbacks.should_prune(end.row)
        if message:
            self.outcome.status, self.outcome.message = "pruned", message
        return bool(message)

    def end(self) -> None:
        """Training is over: the epochs it did in all, and (``ok``, with validation) the best one."""
        outcome, validation = self.outcome, self.validation
        outcome.epochs_trained = outcome.resumed_from + outcome.epochs_run
        if validation is not None and outcome.status == "ok" and validation.best_epoch > 0:
            outcome.best_epoch = validation.best_epoch
        self.done = True

    def load_best(self) -> None:
        """The best epoch's weights into the model, when :meth:`end` named one (after the last checkpoint, which
        keeps the last epoch's); else, with ``train.ema``, the moving average."""
        if self.outcome.best_epoch is not None:
            self.model.load_state_dict(self.validation.best_weights())
        elif self.ema is not None:
            self.ema.apply()
